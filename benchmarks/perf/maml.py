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
from _common import command, interleaved_times, machine, median, parser, write_json  # noqa: E402

FULL = dict(channels=3, size=84, hidden=64, meta_batch=4, warmup=1, repeats=3, mem_steps=(1, 5, 10))
QUICK = dict(channels=1, size=28, hidden=32, meta_batch=2, warmup=1, repeats=7, mem_steps=(5,))
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


def setup(p, first_order: bool, steps: int, seed: int = 0):
    """(our learner, l2l step function, episodes) with identical initial weights."""
    import torch

    from fewshot.data.episodes import Episode
    from fewshot.learners import get_learner

    torch.manual_seed(seed)
    cls = get_learner("fomaml" if first_order else "maml")
    ours = cls(cls.Config(ways=WAYS, inner_steps=steps, inner_lr=INNER_LR, lr=OUTER_LR,
                          backbone_options={"hidden": p["hidden"]}),
               in_channels=p["channels"], image_size=p["size"])
    g = torch.Generator().manual_seed(seed + 1)

    def episode():
        sy = torch.arange(WAYS).repeat_interleave(SHOTS)
        qy = torch.arange(WAYS).repeat_interleave(QUERIES)
        c, s = p["channels"], p["size"]
        return Episode(torch.randn(len(sy), c, s, s, generator=g), sy,
                       torch.randn(len(qy), c, s, s, generator=g), qy, torch.arange(WAYS))

    episodes = [episode() for _ in range(p["meta_batch"])]

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


def mem_worker(p, impl: str, first_order: bool, steps: int) -> dict:
    if impl == "l2l":
        silence_gym()
    ours, make_l2l, eps = setup(p, first_order, steps=steps)
    step = (lambda: ours.train_step(eps)) if impl == "ours" else (lambda e=make_l2l(): e(eps))
    before = rss_mib()
    step()
    return {"peak_mib": peak_rss_mib() - before}


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


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads per process (1: stable timings on a shared machine)")
    ap.add_argument("--part", choices=("all", "time", "memory"), default="all",
                    help="measure only time or memory; with --json, the other part's numbers "
                         "are kept from the existing file")
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
        res = (time_worker(p) if args.kind == "time"
               else mem_worker(p, args.impl, args.order == "first", args.steps))
        Path(args.out).write_text(json.dumps(res))
        return

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
