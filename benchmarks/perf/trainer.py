"""Episodic training through ``fewshot train`` against the fastest plain PyTorch loop (episodes/s).

    python benchmarks/perf/trainer.py [--quick] [--json PATH] [--threads N] [--root DIR]

What a user gets from the trainer (sampler -> learner step -> metrics, logs, checkpoints)
against the loop a user would write without a framework, on the same episodes: the same
built-in glyphs stores (``fewshot data prepare glyphs`` under ``--root``; made when absent),
the same :class:`EpisodeSampler` and seed, the same Conv-4 (same initial weights), the same
thread count, fused Adam at 1e-3, one outer step per meta-batch. The plain loops are the
fastest this CPU allows that we know of: weights and images in ``torch.channels_last``
(1.2-1.4x over the default layout on 2 cores), ``torch.func.functional_call`` with hand-written
SGD steps (``torch._foreach_add``, no ``higher``) for FO-MAML, no checks, no logging.

* ProtoNet (Snell et al.): prototypes by class means, ``-torch.cdist(q, c) ** 2`` logits.
* FO-MAML (Finn et al. sec. 5.2): 5 inner SGD steps of 0.01 on the support set from θ,
  query loss at the adapted weights, its gradient (first order: ∇L treated as constant)
  accumulated into θ over the meta-batch (mean), BatchNorm on batch statistics.

Ours runs ``fewshot.api.train`` (``train.memory_format = "auto"``) with validation and periodic
checkpoints off (its final checkpoint is written; it is not timed); its rate is the median of
the ``items_per_s`` the trainer logs every ``--window`` steps after the first window (warm-up).
The plain loop's rate is the median over windows of the same length. The two run alternately
(ours, plain, ours, ...), so a change of load on the shared machine hits both; the reported
ratio is the median over rounds of ours/plain within a round.

Workloads (issue 17, item 1): ProtoNet 60-way 1-shot 5-query on 28x28 glyphs, 5-way 5-shot
15-query at 84x84 (the glyph stores upscaled once into ``--root``/glyphs84), and FO-MAML
5-way 1-shot 15-query 28x28, meta-batch 8. Target: ours/plain >= 0.95. ``--quick`` (about a
minute): 20-way ProtoNet and FO-MAML meta-batch 2, fewer steps.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, median, parser, write_json  # noqa: E402

FULL = [dict(name="protonet_60w1s_28", learner="protonet", ways=60, shots=1, queries=5, size=28,
             meta_batch=1, steps=24, rounds=4),
        dict(name="protonet_5w5s_84", learner="protonet", ways=5, shots=5, queries=15, size=84,
             meta_batch=1, steps=12, rounds=4),
        dict(name="fomaml_5w1s_28_mb8", learner="fomaml", ways=5, shots=1, queries=15, size=28,
             meta_batch=8, steps=9, rounds=4)]
QUICK = [dict(name="protonet_20w1s_28", learner="protonet", ways=20, shots=1, queries=5, size=28,
              meta_batch=1, steps=15, rounds=2),
         dict(name="fomaml_5w1s_28_mb2", learner="fomaml", ways=5, shots=1, queries=15, size=28,
              meta_batch=2, steps=15, rounds=2)]
LR, SEED, INNER_STEPS, INNER_LR = 1e-3, 0, 5, 0.01


def ensure_stores(root: Path, size: int) -> str:
    """The glyphs dataset at ``size`` pixels under ``root``; returns its dataset name."""
    from fewshot.data.prepare import prepare
    from fewshot.data.store import open_split

    if not (root / "glyphs" / "train.h5").exists():
        prepare("glyphs", root=root)
    if size == 28:
        return "glyphs"
    name = f"glyphs{size}"
    if not (root / name / "train.h5").exists():
        import torch
        import torch.nn.functional as F
        from fewshot.data.store import write_store

        for split in ("train", "val", "test"):
            s = open_split("glyphs", split, root=root)
            x = torch.from_numpy(s.images_tensor().numpy()).permute(0, 3, 1, 2).float()
            up = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            img = up.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
            write_store(root / name / f"{split}.h5", img, s.labels, s.class_names,
                        dataset=name, split=split, source="glyphs upscaled for benchmarks/perf/trainer.py")
    return name


def learner_options(w: dict) -> dict:
    if w["learner"] == "fomaml":
        return {"name": "fomaml", "lr": LR, "ways": w["ways"], "inner_steps": INNER_STEPS,
                "inner_lr": INNER_LR}
    return {"name": "protonet", "lr": LR}


def ours(root: Path, dataset: str, w: dict, window: int, threads: int) -> tuple:
    """(episodes per wall second, per CPU second): medians over the trainer's log windows after
    the first (warm-up). Wall: the ``items_per_s`` the trainer logs; CPU: this process's CPU
    time between two log windows (recorded by a subclass that only reads the clock)."""
    from fewshot.trainer import Trainer

    class Timed(Trainer):
        marks = []

        def _log_window(self, prog, window_):
            self.marks.append(time.process_time())
            super()._log_window(prog, window_)

    cfg = {"data": {"dataset": dataset, "root": str(root)}, "learner": learner_options(w),
           "train": {"episodes": w["steps"], "meta_batch": w["meta_batch"], "ways": w["ways"],
                     "shots": w["shots"], "queries": w["queries"], "val_every": 0,
                     "checkpoint_every": 0, "log_every": window, "seed": SEED, "device": "cpu",
                     "quiet": True, "threads": threads}}
    with tempfile.TemporaryDirectory() as out:
        trainer = Timed(cfg, Path(out) / "run")
        run = trainer.run(evaluate=False)
        rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["items_per_s"] for r in rows if r.get("split") == "train"]
    per_cpu = [window * w["meta_batch"] / (b - a) for a, b in zip(trainer.marks, trainer.marks[1:])]
    return median(rates[1:]), median(per_cpu)


def _plain_model(w: dict):
    """The learner's network with its initial weights (the trainer's seed), in channels_last."""
    import torch

    from fewshot.learners import get_learner

    torch.manual_seed(SEED)
    cls = get_learner(w["learner"])
    opts = {k: v for k, v in learner_options(w).items() if k != "name"}
    learner = cls(cls.Config(**opts), in_channels=1, image_size=w["size"])
    net = learner.encoder if w["learner"] == "protonet" else learner.net
    return net.to(memory_format=torch.channels_last).train()


def protonet_step(net, w: dict):
    """One plain ProtoNet step: ``step(episodes)``."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.Adam(net.parameters(), lr=LR, fused=True)

    def step(eps):
        opt.zero_grad(set_to_none=True)
        for ep in eps:
            s = ep.support_x.shape[0]
            z = net(torch.cat([ep.support_x, ep.query_x])).flatten(1)
            protos = z[:s].view(w["ways"], w["shots"], -1).mean(1)
            loss = F.cross_entropy(-torch.cdist(z[s:], protos) ** 2, ep.query_y)
            (loss / len(eps)).backward()
        opt.step()

    return step


def fomaml_step(net, w: dict):
    """One plain first-order MAML step with ``torch.func.functional_call``: ``step(episodes)``."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    names = [n for n, _ in net.named_parameters()]
    theta = [p for _, p in net.named_parameters()]
    opt = torch.optim.Adam(theta, lr=LR, fused=True)

    def step(eps):
        opt.zero_grad(set_to_none=True)
        for ep in eps:
            fast = theta
            for _ in range(INNER_STEPS):
                loss = F.cross_entropy(functional_call(net, dict(zip(names, fast)), (ep.support_x,)),
                                       ep.support_y)
                grads = torch.autograd.grad(loss, fast)  # first order: no create_graph
                fast = torch._foreach_add(fast, grads, alpha=-INNER_LR)
            logits = functional_call(net, dict(zip(names, fast)), (ep.query_x,))
            (F.cross_entropy(logits, ep.query_y) / len(eps)).backward()
        opt.step()

    return step


def fomaml_step_handwritten(net, w: dict):
    """:func:`fomaml_step` with the Conv-4 forward written out in ``torch.nn.functional``
    (conv, batch-statistics BatchNorm, ReLU, 2x2 max-pool per block; linear head) instead of
    ``functional_call``: no module machinery at all."""
    import torch
    import torch.nn.functional as F

    theta = list(net.parameters())  # 4 x (conv weight, bias, bn weight, bias), head weight, bias
    blocks = len(theta) // 4
    opt = torch.optim.Adam(theta, lr=LR, fused=True)

    def forward(ps, x):
        for i in range(blocks):
            cw, cb, g, b = ps[4 * i:4 * i + 4]
            x = F.conv2d(x, cw, cb, padding=1)
            x = F.max_pool2d(F.relu(F.batch_norm(x, None, None, g, b, True)), 2)
        return F.linear(x.flatten(1), ps[-2], ps[-1])

    def step(eps):
        opt.zero_grad(set_to_none=True)
        for ep in eps:
            fast = theta
            for _ in range(INNER_STEPS):
                loss = F.cross_entropy(forward(fast, ep.support_x), ep.support_y)
                fast = torch._foreach_add(fast, torch.autograd.grad(loss, fast), alpha=-INNER_LR)
            (F.cross_entropy(forward(fast, ep.query_x), ep.query_y) / len(eps)).backward()
        opt.step()

    return step


PLAIN = {"protonet": {"plain": protonet_step},
         "fomaml": {"functional_call": fomaml_step, "handwritten": fomaml_step_handwritten}}


def plain(root: Path, dataset: str, w: dict, window: int, make_step) -> tuple:
    """(episodes per wall second, per CPU second) of the hand-written loop ``make_step(net,
    w)``: medians over windows of ``window`` steps after the first."""
    from fewshot.data.episodes import EpisodeSampler
    from fewshot.data.store import open_split

    store = open_split(dataset, "train", root=root)
    sampler = EpisodeSampler(store, w["ways"], w["shots"], w["queries"], seed=SEED,
                             channels_last=True)
    net = _plain_model(w)
    step = make_step(net, w)
    rates, cpu, t0, c0 = [], [], time.perf_counter(), time.process_time()
    for k in range(1, w["steps"] + 1):
        step([sampler.sample() for _ in range(w["meta_batch"])])
        if k % window == 0:
            rates.append(window * w["meta_batch"] / (time.perf_counter() - t0))
            cpu.append(window * w["meta_batch"] / (time.process_time() - c0))
            t0, c0 = time.perf_counter(), time.process_time()
    return median(rates[1:]), median(cpu[1:])


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads, the same for both "
                    "sides (0: torch's default, one per physical core)")
    ap.add_argument("--root", type=Path, default=None, help="data root for the glyph stores "
                    "(default: a folder under the system temp dir, reused)")
    ap.add_argument("--window", type=int, default=3, help="steps per rate window")
    ap.add_argument("--only", default=None, help="comma-separated workload names")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    root = args.root or Path(tempfile.gettempdir()) / "fewshot-bench-data"
    metrics, ratios = {}, {}
    plan = QUICK if args.quick else FULL
    if args.only:
        plan = [w for w in plan if w["name"] in args.only.split(",")]
    load_before = os.getloadavg()[0]
    for w in plan:
        dataset = ensure_stores(root, w["size"])
        loops = PLAIN[w["learner"]]
        runs = {"ours": [], **{k: [] for k in loops}}
        for _ in range(w["rounds"]):
            runs["ours"].append(ours(root, dataset, w, args.window, threads))
            for k, make_step in loops.items():
                runs[k].append(plain(root, dataset, w, args.window, make_step))
        m = {"rounds (wall ep/s, cpu ep/s)": runs}
        for j, clock in enumerate(("wall", "cpu")):
            med = {k: median([r[j] for r in v]) for k, v in runs.items()}
            best = max(loops, key=lambda k: med[k])  # the fastest plain loop on this clock
            paired = median([o[j] / p[j] for o, p in zip(runs["ours"], runs[best])])
            m[clock] = {"episodes_per_s": med, "fastest_plain": best, "paired_ratio": paired}
            ratios[f"trainer_over_plain_{clock}_{w['name']}"] = round(paired, 3)
            print(f"{w['name']:>20} {clock:4s}: fewshot train {med['ours']:6.2f} ep/s | "
                  + " | ".join(f"{k} {med[k]:6.2f}" for k in loops)
                  + f" | ratio to {best} {paired:.3f} (median of {w['rounds']} paired rounds; "
                  f"target >= 0.95)", flush=True)
        metrics[w["name"]] = m
    load = f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    print(load)
    if args.json:
        write_json(args.json, "trainer", machine=machine(None, load),
                   command=command("trainer.py", argv), metrics=metrics, ratios=ratios)


if __name__ == "__main__":
    main()
