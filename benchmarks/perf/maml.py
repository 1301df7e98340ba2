"""MAML meta-training step: fewshot's ``maml``/``fomaml`` learners against learn2learn's MAML.

    python benchmarks/perf/maml.py [--quick] [--json PATH] [--threads N]

Workload (full): Conv-4 (64 filters) on 3x84x84 images, a 5-way head, 5-way 1-shot 15-query
tasks, 5 inner SGD steps (α = 0.01), meta-batch 4, Adam outer step, BatchNorm with batch
statistics, float32 on CPU. Both sides get the same initial weights and the same episodes
(random images: the cost does not depend on their content) and process the tasks of a
meta-batch one after the other, each task's graph freed by its own backward pass (the
usual way to use learn2learn: ``clone()``, ``adapt()`` k times, query loss ``.backward()``).

Time: one process for both orders; after ``warmup`` steps of each implementation, steps of ours
and learn2learn's alternate (A B A B ...) so that a change of load on the machine hits both;
the median of ``repeats`` steps each. Two clocks: CPU time of the process
(``time.process_time``; with one intra-op thread this is the work done, and it does not
count the time other processes hold the cores) and wall-clock time. On the shared 2-core
machine, wall-clock steps of the same work varied 3x with the other users' load, so the
ratio ``<order>_time_ours_over_l2l`` uses CPU time (< 1: ours faster); the wall-clock ratio
is ``<order>_wall_ours_over_l2l``.

Peak memory: torch's CPU allocations are invisible to tracemalloc, so every (implementation,
order, inner steps) cell runs in a fresh subprocess that builds the model and the episodes,
reads its resident set size (VmRSS from /proc/self/status), runs one meta-training step and
reads the peak resident set size (ru_maxrss of getrusage). The peak minus the resident size
before the step is the step's peak memory (activations, the unrolled inner-loop graph,
gradients, Adam state). For the peak RSS to follow the live tensors, glibc is made to serve
every allocation above 64 KiB with its own mmap, returned to the OS when freed
(MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0); with the heap instead (the
Makefile's setting, good for speed) freed blocks stay resident and fragmentation made the
same cell vary by hundreds of MiB between runs. Reported for 1, 5 and 10 inner steps, second
and first order. Ratio ``<order>_peak_mem_ours_over_l2l`` (at 5 steps).

``--quick`` (under a minute on 2 cores): 1x28x28 images, 32 filters, meta-batch 2, fewer
repeats; memory only at 5 inner steps.

``--part steps`` (issue 15, item 7): peak memory and time of one second-order meta-training
step at 1 / 5 / 10 / 20 inner steps for three implementations: ``maml`` (the ordinary
unrolled loop), ``maml`` with ``inner_checkpoint = true`` (each inner step recomputed in the
backward pass) and learn2learn's MAML. Workload: Finn et al.'s mini-ImageNet 5-way 5-shot
setup (Conv-4 with 32 filters, 3x84x84, 15 queries per class), one task per meta-batch (tasks
are processed one after the other, so a task is the unit of memory). Memory: every
(implementation, inner steps) cell in a fresh subprocess as above (peak RSS minus the
resident size before the step, mmap'd allocations), the cells in alternating order
(``mem_rounds`` rounds, the median reported); on CUDA (``--device cuda``) instead
``torch.cuda.max_memory_allocated`` minus the allocated bytes before the step. Time: per inner
step count one subprocess times the three implementations round-robin (A B C A B C ...)
after a warm-up, median CPU time (and wall time) of ``repeats`` steps; on CUDA wall time
after ``torch.cuda.synchronize``. Writes ``--json`` (e.g.
benchmarks/results/maml_memory.json) and, with ``--md``, a table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (command, interleaved_times, load_average, machine, median, parser,  # noqa: E402
                     write_json, write_text)

FULL = dict(channels=3, size=84, hidden=64, meta_batch=4, warmup=1, repeats=3, mem_steps=(1, 5, 10))
QUICK = dict(channels=1, size=28, hidden=32, meta_batch=2, warmup=1, repeats=7, mem_steps=(5,))
STEPS_FULL = dict(channels=3, size=84, hidden=32, shots=5, meta_batch=1, warmup=1, repeats=3,
                  steps=(1, 5, 10, 20), mem_rounds=2)
STEPS_QUICK = dict(channels=1, size=28, hidden=16, shots=5, meta_batch=1, warmup=1, repeats=3,
                   steps=(1, 5, 10), mem_rounds=1)
STEPS_IMPLS = ("ours", "ours_ckpt", "l2l")
STEPS_NOTE = (
    "plain: `maml` (unrolled second-order inner loop); checkpoint: `maml` with "
    "`inner_checkpoint = true` (each inner step recomputed in the backward pass, the same "
    "meta-gradient); learn2learn: `l2l.algorithms.MAML(first_order=False)`, clone/adapt. One "
    "task per meta-step, same weights and episodes for all three. Peak MiB: peak resident set "
    "size minus the resident size before the step, each cell in a fresh subprocess with "
    "mmap'd allocations (MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0), median of "
    "the rounds (cells in alternating order; all rounds in the JSON). CPU s: median process "
    "CPU time of a meta-step, the three timed round-robin after a warm-up, one thread; wall "
    "times in the JSON. The machine was shared (load averages in the title).")
WAYS, SHOTS, QUERIES, INNER_LR, OUTER_LR = 5, 1, 15, 0.01, 1e-3


def rss_mib() -> float:
    """Current resident set size (VmRSS) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    """Peak resident set size of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def setup(p, first_order: bool, steps: int, seed: int = 0, checkpoint: bool = False,
          device: str = "cpu"):
    """(our learner, l2l step function, episodes) with identical initial weights;
    ``checkpoint``: our learner with ``inner_checkpoint = true``."""
    import torch

    from fewshot.data.episodes import Episode
    from fewshot.learners import get_learner

    torch.manual_seed(seed)
    cls = get_learner("fomaml" if first_order else "maml")
    ours = cls(cls.Config(ways=WAYS, inner_steps=steps, inner_lr=INNER_LR, lr=OUTER_LR,
                          backbone_options={"hidden": p["hidden"]}, inner_checkpoint=checkpoint),
               in_channels=p["channels"], image_size=p["size"]).to(device)
    g = torch.Generator().manual_seed(seed + 1)

    def episode():
        sy = torch.arange(WAYS).repeat_interleave(p.get("shots", SHOTS))
        qy = torch.arange(WAYS).repeat_interleave(QUERIES)
        c, s = p["channels"], p["size"]
        return Episode(torch.randn(len(sy), c, s, s, generator=g), sy,
                       torch.randn(len(qy), c, s, s, generator=g), qy, torch.arange(WAYS))

    episodes = [episode().to(device) for _ in range(p["meta_batch"])]

    def l2l_step_factory():
        import learn2learn as l2l

        from _peers import learn2learn_maml_step

        return learn2learn_maml_step(l2l, ours.net, inner_lr=INNER_LR, outer_lr=OUTER_LR,
                                     first_order=first_order, steps=steps)

    return ours, l2l_step_factory, episodes


def silence_gym():
    import warnings

    warnings.filterwarnings("ignore")
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        import learn2learn  # noqa: F401  (gym prints a deprecation banner on import)


# ------------------------------------------------------------------ workers
def time_worker(p) -> dict:
    silence_gym()
    fns = {}
    for order in ("second", "first"):
        ours, make_l2l, eps = setup(p, order == "first", steps=5)
        fns[f"{order}/ours"] = lambda ours=ours, eps=eps: ours.train_step(eps)
        fns[f"{order}/l2l"] = lambda step=make_l2l(), eps=eps: step(eps)
    return interleaved_times(fns, p["warmup"], p["repeats"], cpu_time=True)


def step_function(p, impl: str, first_order: bool, steps: int, device: str = "cpu"):
    """A no-argument meta-training step of ``impl`` ("ours", "ours_ckpt" or "l2l")."""
    if impl == "l2l":
        silence_gym()
    ours, make_l2l, eps = setup(p, first_order, steps=steps, checkpoint=impl == "ours_ckpt",
                                device=device)
    if impl == "l2l":
        return lambda e=make_l2l(): e(eps)
    return lambda: ours.train_step(eps)


def mem_worker(p, impl: str, first_order: bool, steps: int, device: str = "cpu") -> dict:
    import torch

    step = step_function(p, impl, first_order, steps, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return {"peak_mib": (torch.cuda.max_memory_allocated() - before) / 2 ** 20}
    before = rss_mib()
    step()
    return {"peak_mib": peak_rss_mib() - before}


def steps_time_worker(p, steps: int, device: str = "cpu") -> dict:
    """Round-robin timings of the three implementations at ``steps`` inner steps."""
    import torch

    fns = {impl: step_function(p, impl, False, steps, device) for impl in STEPS_IMPLS}
    if device.startswith("cuda"):
        fns = {k: (lambda f=f: (f(), torch.cuda.synchronize())) for k, f in fns.items()}
    return interleaved_times(fns, p["warmup"], p["repeats"], cpu_time=True)


def run_worker(args_list, threads: int, memory: bool = False) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if memory:  # large blocks by mmap, unmapped on free: peak RSS follows live tensors
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    else:  # the Makefile's allocator setting (no page faults on reuse), same for both sides
        env.update(MALLOC_MMAP_THRESHOLD_="1000000000", MALLOC_TRIM_THRESHOLD_="1000000000")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, __file__, "--worker", "--out", str(out), "--threads", str(threads),
               *args_list]
        subprocess.run(cmd, check=True, env=env)
        return json.loads(out.read_text())


def steps_study(args) -> None:
    """``--part steps``: peak memory and time against the number of inner steps (second
    order), ours with and without ``inner_checkpoint`` and learn2learn; see the docstring."""
    p = STEPS_QUICK if args.quick else STEPS_FULL
    common = [*(["--quick"] if args.quick else []), "--part", "steps", "--device", args.device]
    load_before = load_average()
    mem = {impl: {n: [] for n in p["steps"]} for impl in STEPS_IMPLS}
    for r in range(p["mem_rounds"]):  # alternating cells; the order flips every round
        cells = [(n, impl) for n in p["steps"] for impl in STEPS_IMPLS]
        for n, impl in (cells if r % 2 == 0 else cells[::-1]):
            mem[impl][n].append(run_worker([*common, "--kind", "mem", "--impl", impl, "--order",
                                            "second", "--steps", str(n)], args.threads,
                                           memory=True)["peak_mib"])
    times = {n: run_worker([*common, "--kind", "steps_time", "--steps", str(n)], args.threads)
             for n in p["steps"]}
    metrics, ratios, rows = steps_summary(p, mem, times)
    import torch

    torch.set_num_threads(args.threads)
    where = machine(args.device, load_before + " (start)", load_average() + " (end)",
                    threads=True)
    header = (f"MAML second-order meta-training step against inner steps: 5-way "
              f"{p['shots']}-shot {QUERIES}-query, {p['channels']}x{p['size']}x{p['size']}, "
              f"Conv-4({p['hidden']}), {args.device}; {where}")
    table = steps_table(rows)
    print(header)
    print(table)
    if args.json:
        write_json(args.json, "maml_memory", machine=where, command=command("maml.py"),
                   metrics=metrics, ratios=ratios,
                   params={k: list(v) if isinstance(v, tuple) else v for k, v in p.items()})
    if args.md:
        write_text(args.md, f"# {header}\n\n`{command('maml.py')}`\n\n{table}\n\n{STEPS_NOTE}\n")


def steps_summary(p, mem, times):
    """(metrics, ratios, table rows) of the inner-steps study."""
    metrics, ratios, rows = {}, {}, []
    for n in p["steps"]:
        peak = {impl: median(mem[impl][n]) for impl in STEPS_IMPLS}
        cpu = {impl: median(c for _, c in times[n][impl]) for impl in STEPS_IMPLS}
        wall = {impl: median(w for w, _ in times[n][impl]) for impl in STEPS_IMPLS}
        metrics[f"steps_{n}"] = {"peak_mib": peak, "peak_mib_rounds": {k: mem[k][n] for k in mem},
                                 "step_cpu_s": cpu, "step_wall_s": wall,
                                 "all_wall_cpu": times[n]}
        ratios[f"ckpt_peak_over_plain_{n}"] = peak["ours_ckpt"] / peak["ours"]
        ratios[f"ckpt_peak_over_l2l_{n}"] = peak["ours_ckpt"] / peak["l2l"]
        ratios[f"ckpt_time_over_plain_{n}"] = cpu["ours_ckpt"] / cpu["ours"]
        ratios[f"ckpt_time_over_l2l_{n}"] = cpu["ours_ckpt"] / cpu["l2l"]
        rows.append((n, peak, cpu))
    first = p["steps"][0]
    for n in p["steps"][1:]:
        for impl in STEPS_IMPLS:
            ratios[f"{impl}_peak_{n}_over_{first}_steps"] = (metrics[f"steps_{n}"]["peak_mib"][impl]
                                                            / metrics[f"steps_{first}"]["peak_mib"][impl])
    return metrics, ratios, rows


def steps_table(rows) -> str:
    """Markdown table: peak MiB and step CPU seconds per implementation and inner steps."""
    lines = ["| inner steps | peak MiB plain | peak MiB checkpoint | peak MiB learn2learn "
             "| CPU s plain | CPU s checkpoint | CPU s learn2learn | checkpoint/plain time |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, peak, cpu in rows:
        lines.append(f"| {n} | {peak['ours']:.0f} | {peak['ours_ckpt']:.0f} | {peak['l2l']:.0f} "
                     f"| {cpu['ours']:.2f} | {cpu['ours_ckpt']:.2f} | {cpu['l2l']:.2f} "
                     f"| {cpu['ours_ckpt'] / cpu['ours']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads per process (1: stable timings on a shared machine)")
    ap.add_argument("--part", choices=("all", "time", "memory", "steps"), default="all",
                    help="measure only time or memory; with --json, the other part's numbers "
                         "are kept from the existing file; 'steps': memory and time against "
                         "the number of inner steps, with and without inner_checkpoint")
    ap.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (--part steps)")
    ap.add_argument("--md", type=Path, help="also write a markdown table here (--part steps)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--order", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    p = QUICK if args.quick else FULL

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        if args.part == "steps":
            p = STEPS_QUICK if args.quick else STEPS_FULL
        if args.kind == "time":
            res = time_worker(p)
        elif args.kind == "steps_time":
            res = steps_time_worker(p, args.steps, args.device)
        else:
            res = mem_worker(p, args.impl, args.order == "first", args.steps, args.device)
        Path(args.out).write_text(json.dumps(res))
        return
    if args.part == "steps":
        return steps_study(args)

    quick = ["--quick"] if args.quick else []
    metrics, ratios = {}, {}
    rows = []
    previous = {}
    if args.part != "all" and args.json and args.json.exists():  # keep the other part's numbers
        previous = json.loads(args.json.read_text())
        keep = "_peak_" if args.part == "time" else "_step_"
        metrics = {k: v for k, v in previous.get("metrics", {}).items() if keep in k}
        ratios = {k: v for k, v in previous.get("ratios", {}).items()
                  if ("_peak_" in k) == (args.part == "time")}
    if args.part in ("all", "time"):
        times = run_worker([*quick, "--kind", "time"], args.threads)
        for order in ("second", "first"):
            t = {impl: times[f"{order}/{impl}"] for impl in ("ours", "l2l")}
            cpu = {k: median(c for _, c in v) for k, v in t.items()}
            wall = {k: median(w for w, _ in v) for k, v in t.items()}
            metrics[f"{order}_order_step_s"] = {
                "cpu": cpu, "wall": wall,
                "all_wall_cpu": {k: [list(x) for x in v] for k, v in t.items()}}
            ratios[f"{order}_order_time_ours_over_l2l"] = cpu["ours"] / cpu["l2l"]
            ratios[f"{order}_order_wall_ours_over_l2l"] = wall["ours"] / wall["l2l"]
            rows.append((f"{order}-order step CPU time (s)", cpu["ours"], cpu["l2l"],
                         cpu["ours"] / cpu["l2l"]))
            rows.append((f"{order}-order step wall time (s)", wall["ours"], wall["l2l"],
                         wall["ours"] / wall["l2l"]))
    for order in ("second", "first") if args.part in ("all", "memory") else ():
        for steps in p["mem_steps"]:
            mem = {impl: run_worker([*quick, "--kind", "mem", "--impl", impl, "--order", order,
                                     "--steps", str(steps)], args.threads, memory=True)["peak_mib"]
                   for impl in ("ours", "l2l")}
            metrics[f"{order}_order_peak_mib_{steps}_steps"] = mem
            rows.append((f"{order}-order peak MiB, {steps} inner steps", mem["ours"], mem["l2l"],
                         mem["ours"] / mem["l2l"]))
            if steps == 5:
                ratios[f"{order}_order_peak_mem_ours_over_l2l"] = mem["ours"] / mem["l2l"]

    import torch

    torch.set_num_threads(args.threads)
    print(f"MAML meta-training step, {'quick' if args.quick else 'full'}: "
          f"{p['channels']}x{p['size']}x{p['size']}, Conv-4({p['hidden']}), 5-way 1-shot 15-query, "
          f"meta-batch {p['meta_batch']}; {machine()}")
    print(f"{'':44s} {'fewshot':>10s} {'learn2learn':>12s} {'ratio':>7s}")
    for name, a, b, r in rows:
        print(f"{name:44s} {a:10.3f} {b:12.3f} {r:7.3f}")
    for k, v in metrics.items():
        if "_peak_" in k and args.part == "time":
            print(f"(kept from {args.json}) {k}: ours {v['ours']:.1f} MiB, l2l {v['l2l']:.1f} MiB")
    if args.json:
        write_json(args.json, "maml", machine=machine(), command=command("maml.py"),
                   metrics=metrics, ratios=ratios,
                   params={k: list(v) if isinstance(v, tuple) else v for k, v in p.items()})


if __name__ == "__main__":
    main()
