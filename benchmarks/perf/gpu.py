"""GPU figures of issue 11 in one run: task batching, MAML against peers, evaluation, MLTP, operator counts.

    python benchmarks/perf/gpu.py [--device cuda] [--quick] [--json PATH] [--md PATH] [--parts LIST]
    make bench-gpu                       # = the line above on CUDA, full plan (< 5 min on an H200)
    python benchmarks/perf/gpu.py --device cpu --quick    # CPU CI: the operator counts, labelled CPU

Needs torch, h5py and higher (learn2learn optional: its MAML is timed as a peer when importable).
No data set: every episode is random images of the right shape (the cost does not depend on
their content), built once and moved to the device before timing. Every ratio comes from one
run: the sides take turns (round-robin after warm-up, ``_common.interleaved_times``), each
timed unit ends with a device synchronisation, and the medians are compared. Parts:

* ``fomaml``: first-order MAML meta-steps on Omniglot-shaped tasks (5-way 1-shot 15-query,
  1x28x28, Conv-4/64, meta-batch 32, 1 inner step of α = 0.4 as Finn et al.'s Omniglot runs),
  ``task_batching="on"`` against ``"off"`` (target >= 10x on a GPU), and the projected time of
  Finn et al.'s 60,000 iterations at the batched rate (learner steps only; data loading is
  not included).
* ``maml84``: one second-order MAML meta-step, 3x84x84, Conv-4/64, meta-batch 4, 5-way 1-shot
  15-query, 5 inner steps: ours batched and sequential against a plain sequential
  ``torch.func.functional_call`` MAML written here (:class:`FuncMAML`; target ours batched <=
  0.5x of it) and learn2learn's MAML when importable.
* ``eval``: test-time fine-tuning of 600 MAML 5-way 1-shot 15-query episodes (3x84x84,
  Conv-4/32 as Finn et al.'s mini-ImageNet model, 10 steps; ``--quick``: 4 of 1x28x28): ``predict_batch`` over chunks of
  episodes against ``predict`` one episode at a time (target >= 10x), and the largest
  difference of their logits.
* ``mltp``: ``benchmarks/perf/mltp.py``'s per-iteration ratios MLTP_FO and MLTP over standard
  training at batch 128 (two tasks of 64), CNet1 32x32 and ResNet-18 64x64 (targets 1.3x, 2.5x).
* ``ops``: dispatched operators and host syncs of one FO-MAML meta-step at meta-batch 32
  (``torch.profiler``; device-independent), batched over sequential (target <= 1/8).

Every batched side is a learner built with ``task_batching="on"``, every sequential one with
``"off"``; before timing, one call of each side (its first warm-up) runs under a spy on
``InnerLoop.adapt_batched`` and the script stops if a batched side did not reach it or a
sequential one did (``paths`` in the JSON). ResNet-18 needs torchvision: without it the
``mltp`` part keeps CNet1 and says so. ``--quick`` shrinks widths, meta-batches, steps and
repeats (CPU CI); the operator counts do not depend on widths, so they match the full plan.
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, command, interleaved_times, machine, median, parser, sync, write_json, write_text  # noqa: E402

from fewshot.data.episodes import Episode  # noqa: E402
from fewshot.learners import get_learner  # noqa: E402

PARTS = ("fomaml", "maml84", "eval", "mltp", "ops")
FULL = {
    "fomaml": dict(channels=1, size=28, hidden=64, meta_batch=32, warmup=3, repeats=10),
    "maml84": dict(channels=3, size=84, hidden=64, meta_batch=4, steps=5, warmup=2, repeats=7),
    "eval": dict(channels=3, size=84, hidden=32, episodes=600, chunk=100, steps=10, warmup=1, repeats=2),
    "mltp": dict(nets=("cnet1", "resnet18"), batch=128, warmup=2, repeats=5),
    "ops": dict(channels=1, size=28, hidden=64, meta_batch=32),
}
QUICK = {  # CPU CI on a loaded 2-core machine (~1 min); the operator counts keep meta-batch 32
    "fomaml": dict(channels=1, size=28, hidden=8, meta_batch=4, warmup=2, repeats=5),
    "maml84": dict(channels=3, size=28, hidden=4, meta_batch=2, steps=2, warmup=2, repeats=5),
    "eval": dict(channels=1, size=28, hidden=8, episodes=4, chunk=2, steps=10, warmup=2, repeats=3),
    "mltp": dict(nets=("cnet1",), batch=8, warmup=1, repeats=3),
    "ops": dict(channels=1, size=28, hidden=8, meta_batch=32),
}
WAYS, SHOTS, QUERIES = 5, 1, 15


# ------------------------------------------------------------------ shared pieces
def build(name: str, p: dict, device, batching: str, **options):
    """Learner ``name`` (5-way, Conv-4 with ``p["hidden"]`` filters, ``task_batching=batching``),
    seeded, on ``device``."""
    cls = get_learner(name)
    options["task_batching"] = batching
    torch.manual_seed(0)
    cfg = cls.Config(ways=WAYS, backbone_options={"hidden": p["hidden"]}, **options)
    return cls(cfg, in_channels=p["channels"], image_size=p["size"]).to(device)


def episodes(p: dict, n: int, device, seed: int = 1):
    """``n`` 5-way 1-shot 15-query episodes of random images, on ``device``; marked
    ``checked`` as a sampler marks the episodes it made (labels checked on the host before the
    copy), so the learner's step does what it does in ``fewshot train``."""
    g = torch.Generator().manual_seed(seed)
    c, s = p["channels"], p["size"]
    sy = torch.arange(WAYS).repeat_interleave(SHOTS)
    qy = torch.arange(WAYS).repeat_interleave(QUERIES)
    return [Episode(torch.randn(len(sy), c, s, s, generator=g), sy,
                    torch.randn(len(qy), c, s, s, generator=g), qy, torch.arange(WAYS),
                    checked=True).to(device)
            for _ in range(n)]


def reaches_batched(fn) -> bool:
    """Whether one call of ``fn`` goes through ``InnerLoop.adapt_batched`` (a spy, removed after)."""
    from fewshot.inner_loop import InnerLoop

    real, calls = InnerLoop.adapt_batched, []

    def spy(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    InnerLoop.adapt_batched = spy
    try:
        fn()
    finally:
        InnerLoop.adapt_batched = real
    return bool(calls)


def timed(fns: dict, device, warmup: int, repeats: int, out: dict, part: str) -> dict:
    """Median seconds of each of ``fns`` (each call ends with a device sync), interleaved.

    The first warm-up round checks the path of each side: a key containing "batched" (and
    not "sequential") must reach ``adapt_batched``, every other key must not."""
    synced = {k: (lambda f=f: (f(), sync(device))) for k, f in fns.items()}
    for k, f in synced.items():
        used, want = reaches_batched(f), "batched" in k and "sequential" not in k
        out["paths"][f"{part}/{k}"] = "adapt_batched" if used else "sequential"
        if used != want:
            raise RuntimeError(f"gpu.py {part}/{k}: expected the {'batched' if want else 'sequential'} "
                               f"path, got the other (check the learner's task_batching option)")
    times = interleaved_times(synced, max(0, warmup - 1), repeats)
    return {k: median(v) for k, v in times.items()}


class FuncMAML:
    """A plain MAML peer: tasks one after another, ``torch.func.functional_call`` forwards,
    ``torch.autograd.grad`` inner steps (Finn et al. eq. 1; ``create_graph`` for second
    order), mean query loss backward per task, one Adam step (eq. 3). BatchNorm in training
    mode (batch statistics, as MAML's code)."""

    def __init__(self, net, inner_lr: float, steps: int, first_order: bool, lr: float = 1e-3):
        self.net, self.inner_lr, self.steps, self.first_order = net, inner_lr, steps, first_order
        self.params = dict(net.named_parameters())
        self.buffers = dict(net.named_buffers())
        self.opt = torch.optim.Adam(self.params.values(), lr=lr)

    def _f(self, params, x):
        return torch.func.functional_call(self.net, (params, self.buffers), (x,))

    def step(self, eps) -> None:
        self.net.train()
        self.opt.zero_grad(set_to_none=True)
        for ep in eps:
            fast = dict(self.params)
            for _ in range(self.steps):
                loss = F.cross_entropy(self._f(fast, ep.support_x), ep.support_y)
                grads = torch.autograd.grad(loss, list(fast.values()),
                                            create_graph=not self.first_order)
                fast = {n: w - self.inner_lr * g for (n, w), g in zip(fast.items(), grads)}
            (F.cross_entropy(self._f(fast, ep.query_x), ep.query_y) / len(eps)).backward()
        self.opt.step()


def l2l_step(net, inner_lr: float, steps: int, first_order: bool):
    """learn2learn's MAML meta-step on a copy of ``net``, or None when it is not importable."""
    try:
        import contextlib
        import io
        import warnings

        warnings.filterwarnings("ignore")
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            import learn2learn as l2l
    except Exception:  # noqa: BLE001 - optional peer
        return None
    from _peers import learn2learn_maml_step

    return learn2learn_maml_step(l2l, net, inner_lr=inner_lr, outer_lr=1e-3,
                                 first_order=first_order, steps=steps)


# ------------------------------------------------------------------ parts
def part_fomaml(p, device, out):
    """FO-MAML Omniglot meta-steps/s, batched vs sequential; 60,000-iteration projection."""
    eps = episodes(p, p["meta_batch"], device)
    opts = dict(inner_steps=1, inner_lr=0.4, lr=1e-3)
    fns = {k: build("fomaml", p, device, b, **opts).train_step for k, b in (("sequential", "off"),
                                                                          ("batched", "on"))}
    t = timed({k: (lambda f=f: f(eps)) for k, f in fns.items()}, device, p["warmup"], p["repeats"],
              out, "fomaml")
    for k, s in t.items():
        out["metrics"][f"fomaml_omniglot/{k}/meta_steps_per_s"] = round(1 / s, 3)
        out["metrics"][f"fomaml_omniglot/{k}/tasks_per_s"] = round(p["meta_batch"] / s, 1)
        out["metrics"][f"fomaml_omniglot/{k}/hours_for_60000_iterations"] = round(60000 * s / 3600, 3)
        out["rows"].append((f"FO-MAML Omniglot meta-step, mb {p['meta_batch']} ({k})",
                            f"{s * 1e3:.1f} ms", f"60,000 iterations: {60000 * s / 3600:.2f} h"))
    r = t["sequential"] / t["batched"]
    out["ratios"]["fomaml_omniglot_batched_speedup_over_sequential"] = round(r, 3)
    out["rows"].append(("FO-MAML throughput batched / sequential", f"{r:.2f}x", "target >= 10x (GPU)"))


def part_maml84(p, device, out):
    """Second-order MAML step at 84x84: ours (batched, sequential) vs torch.func and l2l peers."""
    eps = episodes(p, p["meta_batch"], device)
    n = p["steps"]
    opts = dict(inner_steps=n, inner_lr=0.01, lr=1e-3)
    seq, bat = build("maml", p, device, "off", **opts), build("maml", p, device, "on", **opts)
    fns = {"ours_sequential": lambda: seq.train_step(eps), "ours_batched": lambda: bat.train_step(eps)}
    peer = FuncMAML(copy.deepcopy(seq.net), 0.01, n, first_order=False)
    fns["torch_func_sequential"] = lambda: peer.step(eps)
    l2l = l2l_step(seq.net, 0.01, n, first_order=False)
    if l2l is not None:
        fns["learn2learn"] = lambda: l2l(eps)
    else:
        out["notes"].append("maml84: learn2learn not importable; its peer is left out")
    t = timed(fns, device, p["warmup"], p["repeats"], out, "maml84")
    what = f"2nd-order MAML step {p['size']}x{p['size']}, {n} steps, mb {p['meta_batch']}"
    for k, s in t.items():
        out["metrics"][f"maml84_second_order/{k}/step_ms"] = round(s * 1e3, 2)
        out["rows"].append((f"{what} ({k})", f"{s * 1e3:.1f} ms", ""))
    ref = t["torch_func_sequential"]
    for k in ("ours_batched", "ours_sequential", "learn2learn"):
        if k in t:
            out["ratios"][f"maml84_{k}_over_torch_func"] = round(t[k] / ref, 3)
    out["rows"].append(("2nd-order MAML ours batched / torch.func", f"{t['ours_batched'] / ref:.2f}x",
                        "target <= 0.5x"))


def part_eval(p, device, out):
    """600 MAML episodes fine-tuned 10 steps: predict_batch in chunks vs predict one by one."""
    eps = episodes(p, p["episodes"], device, seed=3)
    seq = build("maml", p, device, "off", eval_steps=p["steps"], inner_lr=0.01)
    bat = build("maml", p, device, "on", eval_steps=p["steps"], inner_lr=0.01)
    seq.eval()
    bat.eval()
    c = p["chunk"]

    last = {}  # each side's latest logits (compared after timing, no extra pass)

    def sequential():
        last["sequential"] = torch.stack([seq.predict(e) for e in eps])

    def batched():
        last["batched"] = torch.cat([bat.predict_batch(eps[i:i + c]) for i in range(0, len(eps), c)])

    fns = {"sequential": sequential, "batched": batched}
    t = timed(fns, device, p["warmup"], p["repeats"], out, "eval")
    for k, s in t.items():
        out["metrics"][f"eval_maml_{p['episodes']}_episodes/{k}/seconds"] = round(s, 3)
        out["rows"].append((f"evaluate {p['episodes']} MAML episodes, {p['steps']} steps ({k})",
                            f"{s:.2f} s", ""))
    diff = float((last["batched"] - last["sequential"]).abs().max())
    out["metrics"]["eval_maml_batched_max_abs_logit_difference"] = diff
    r = t["sequential"] / t["batched"]
    out["ratios"]["eval_maml_batched_speedup_over_sequential"] = round(r, 3)
    out["rows"].append(("evaluation batched / sequential", f"{r:.2f}x",
                        f"target >= 10x; max |logit diff| {diff:.1e}"))


def part_mltp(p, device, out):
    """MLTP_FO and MLTP per iteration over standard training (mltp.py's measurement)."""
    import importlib.util

    import mltp as M

    for net in p["nets"]:
        if net.startswith("resnet") and importlib.util.find_spec("torchvision") is None:
            out["notes"].append(f"mltp: {net} needs torchvision, which is not importable; left out")
            continue
        res = M.measure(["standard", "mltp_fo", "mltp"], net, p["batch"], p["warmup"], p["repeats"], device)
        std = res["standard"][0]
        for name, (sec, _) in res.items():
            out["metrics"][f"mltp_{net}_b{p['batch']}/{name}/ms_per_iter"] = round(sec * 1e3, 2)
            if name != "standard":
                r = sec / std
                out["ratios"][f"{name}_over_standard_time_{net}"] = round(r, 3)
                target = 1.3 if name == "mltp_fo" else 2.5
                out["rows"].append((f"{name} / standard per iteration, {net} batch {p['batch']}",
                                    f"{r:.2f}x", f"target <= {target}x"))


def part_ops(p, device, out):
    """Dispatched operators and host syncs of one FO-MAML meta-step at meta-batch 32."""
    from _profile import count_ops

    eps = episodes(p, p["meta_batch"], device)
    counts = {}
    for k, b in (("sequential", "off"), ("batched", "on")):
        learner = build("fomaml", p, device, b, inner_steps=1, inner_lr=0.4)
        if reaches_batched(lambda: learner.train_step(eps)) != (b == "on"):  # also the warm-up
            raise RuntimeError(f"gpu.py ops/{k}: task_batching={b!r} took the other path")
        out["paths"][f"ops/{k}"] = "adapt_batched" if b == "on" else "sequential"
        counts[k] = count_ops(lambda: learner.train_step(eps), warmup=0)
        out["metrics"][f"fomaml_mb{p['meta_batch']}_ops/{k}"] = counts[k]
        out["rows"].append((f"FO-MAML meta-step mb {p['meta_batch']}: operators ({k})",
                            str(counts[k]["ops"]), f"host syncs {counts[k]['syncs']}"))
    r = counts["batched"]["ops"] / counts["sequential"]["ops"]
    out["ratios"]["fomaml_ops_batched_over_sequential"] = round(r, 4)
    out["rows"].append(("operators batched / sequential", f"{r:.3f}", "target <= 0.125"))


# ------------------------------------------------------------------ main
def markdown(title: str, rows, notes) -> str:
    lines = [f"# {title}", "", "| measurement | value | note |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    if notes:
        lines += ["", *[f"* {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = parser(__doc__, quick_help="small plan (CPU CI: the operator counts)",
                json_help="result file (default benchmarks/results/gpu.json on CUDA, "
                          "gpu_cpu_quick.json / gpu_cpu.json on the CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--md", type=Path, help="markdown table (default: the JSON path with .md)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("gpu.py: --device cuda but CUDA is not available; use --device cpu --quick", file=sys.stderr)
            return 2
        torch.backends.cudnn.benchmark = True  # the same for every side
    plan = QUICK if args.quick else FULL
    stem = "gpu" if device.type == "cuda" else ("gpu_cpu_quick" if args.quick else "gpu_cpu")
    js = args.json or REPO / "benchmarks" / "results" / f"{stem}.json"
    md = args.md or js.with_suffix(".md")
    out = {"metrics": {}, "ratios": {}, "rows": [], "notes": [], "paths": {}}
    t0 = time.perf_counter()
    for part in [s.strip() for s in args.parts.split(",") if s.strip()]:
        if part not in PARTS:
            print(f"gpu.py: unknown part {part!r}; choose from {', '.join(PARTS)}", file=sys.stderr)
            return 2
        t = time.perf_counter()
        globals()[f"part_{part}"](plan[part], device, out)
        print(f"[{part}: {time.perf_counter() - t:.1f} s]", flush=True)
    label = ("GPU" if device.type == "cuda" else "CPU (not a GPU figure: only the operator counts "
             "carry over)") + (", quick plan" if args.quick else "")
    mach = machine(device)
    title = f"Issue 11 GPU benchmark on {label}: {mach}"
    out["notes"].append(f"total {time.perf_counter() - t0:.0f} s; command: {command('gpu.py', argv)}")
    text = markdown(title, out["rows"], out["notes"])
    print(text)
    write_json(js, "gpu", machine=mach, command=command("gpu.py", argv), metrics=out["metrics"],
               ratios=out["ratios"], device=str(device), label=label, notes=out["notes"], paths=out["paths"],
               plan={k: dict(v) for k, v in plan.items()})
    write_text(md, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
