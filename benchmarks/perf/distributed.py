"""Episodes per second of data-parallel meta-training with 1 and 2 processes (torch.distributed).

    python benchmarks/perf/distributed.py [--quick] [--json PATH] [--learner protonet|maml]
                                          [--device cpu|cuda]

Each configuration runs in fresh processes launched like torchrun does (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT in the environment, ``fewshot.distributed.init_from_env``;
gloo on CPU, nccl on CUDA). Every rank trains the learner on its own meta-batch of M tasks
per step (weak scaling: W processes process W·M tasks per step) and
``Learner.outer_step`` all-reduces the meta-gradient. Measured:

* ``1proc_1thread``: one process, one intra-op thread (the unit of the scaling efficiency);
* ``1proc_Nthreads``: one process using every core with intra-op threads (what a user gets
  without torch.distributed: the peer the 2-process run must beat to be worth it);
* ``2proc_1thread``: two processes (gloo), one thread each.

``scaling_efficiency`` = eps(2 processes) / (2 · eps(1 process, 1 thread)); 1.0 is
perfect. Ratios: ``2proc_over_1proc_1thread`` and ``2proc_over_1proc_Nthreads``. Also the
median time of one gradient all-reduce of the learner's parameters between the 2 ranks.

Step time: per repeat, all ranks meet at a barrier, run ``steps`` training steps (episodes
already in memory: sampling is not measured) and meet again; the median over repeats after
warm-up steps. Full: 3x84x84 images, Conv-4 with 64 filters (the ProtoNet paper's
mini-ImageNet net), 5-way 1-shot 15-query tasks, M = 2 (about 50 GFLOP per task: minutes
on 2 CPU cores). ``--quick``: 1x28x28, 32 filters, M = 2 (under a minute on 2 idle cores). Images are random: the timing does
not depend on their content. On GPU (``--device cuda``) the 1-thread/N-thread distinction
does not apply and 2 processes need 2 GPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine, median, parser, write_json  # noqa: E402


# ------------------------------------------------------------------ one rank
def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from fewshot import distributed as D
    from fewshot.data.episodes import Episode
    from fewshot.learners import get_learner

    ctx = D.init_from_env(device=args.device, timeout_s=300)
    dev = ctx.device
    channels, size, hidden, m = ((1, 28, 32, 2) if args.quick else (3, 84, 64, 2))
    ways, shots, queries = 5, 1, 15
    g = torch.Generator().manual_seed(1 + ctx.rank)

    def episode():
        sy = torch.arange(ways).repeat_interleave(shots)
        qy = torch.arange(ways).repeat_interleave(queries)
        classes = torch.arange(ways)
        return Episode(torch.randn(len(sy), channels, size, size, generator=g), sy,
                       torch.randn(len(qy), channels, size, size, generator=g), qy, classes,
                       base_support_y=classes[sy], base_query_y=classes[qy]).to(dev)

    batches = [[episode() for _ in range(m)] for _ in range(2)]
    cls = get_learner(args.learner)
    torch.manual_seed(0)
    opts = {"backbone_options": {"hidden": hidden}}
    if args.learner == "maml":
        opts.update(ways=ways, inner_steps=1, meta_batch=m)
    learner = cls(cls.Config(**opts), in_channels=channels, image_size=size).to(dev)
    D.broadcast_module(learner)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        D.barrier()

    for k in range(args.warmup):
        learner.train_step(batches[k % 2])
    times = []
    for k in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        for s in range(args.steps):
            out = learner.train_step(batches[(k + s) % 2])
        float(out["loss"])
        sync()
        times.append((time.perf_counter() - t0) / args.steps)
    result = {"world": ctx.world_size, "threads": args.threads, "meta_batch_per_rank": m,
              "step_s": median(times), "step_s_all": times,
              "params": sum(p.numel() for p in learner.parameters())}
    if ctx.world_size > 1:  # one gradient all-reduce of the learner's parameters alone
        params = [p for p in learner.parameters()]
        for p in params:
            p.grad = torch.ones_like(p)
        ar = []
        for _ in range(20):
            sync()
            t0 = time.perf_counter()
            D.all_reduce_mean_grads(params)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            ar.append(time.perf_counter() - t0)
        result["allreduce_s"] = median(ar)
    if ctx.rank == 0:
        Path(args.out).write_text(json.dumps(result))
    D.shutdown()


# ------------------------------------------------------------------ launcher
def launch(args, world: int, threads: int) -> dict:
    from fewshot.distributed import find_free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        port = find_free_port()
        procs = []
        for r in range(world):
            env = dict(os.environ, OMP_NUM_THREADS=str(threads),
                       PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(k, None)
            if world > 1:
                env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            cmd = [sys.executable, __file__, "--worker", "--out", str(out), "--threads",
                   str(threads), "--learner", args.learner, "--device", args.device,
                   "--warmup", str(args.warmup), "--repeats", str(args.repeats),
                   "--steps", str(args.steps)] + (["--quick"] if args.quick else [])
            procs.append(subprocess.Popen(cmd, env=env))
        codes = [p.wait() for p in procs]
        if any(codes) or not out.exists():
            raise SystemExit(f"benchmark processes (world {world}) exited with {codes}")
        return json.loads(out.read_text())


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--learner", default="protonet", choices=("protonet", "maml"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    q = args.quick
    args.warmup = args.warmup if args.warmup is not None else (2 if q else 1)
    args.repeats = args.repeats if args.repeats is not None else (5 if q else 5)
    args.steps = args.steps if args.steps is not None else (2 if q else 1)
    if args.worker:
        return worker(args)

    cores = os.cpu_count() or 1
    cuda = args.device.startswith("cuda")
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    runs = {"1proc_1thread": launch(args, 1, 1)}
    if not cuda:
        runs[f"1proc_{cores}threads"] = launch(args, 1, cores)
    runs["2proc_1thread"] = launch(args, 2, 1)
    eps = {k: r["world"] * r["meta_batch_per_rank"] / r["step_s"] for k, r in runs.items()}
    one, two = eps["1proc_1thread"], eps["2proc_1thread"]
    metrics = {f"{k}_episodes_per_s": v for k, v in eps.items()}
    metrics.update({f"{k}_step_s": r["step_s"] for k, r in runs.items()})
    metrics["2proc_allreduce_ms"] = 1000 * runs["2proc_1thread"]["allreduce_s"]
    metrics["scaling_efficiency"] = two / (2 * one)
    metrics["params"] = runs["1proc_1thread"]["params"]
    # other work on the machine: 2 processes on 2 busy cores cannot both run at once, and
    # every all-reduce waits for the rank that was descheduled
    metrics["load_average_1min_before"] = load_before
    metrics["load_average_1min_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    ratios = {"2proc_over_1proc_1thread": two / one}
    if not cuda:
        ratios[f"2proc_over_1proc_{cores}threads"] = two / eps[f"1proc_{cores}threads"]
    command = "python benchmarks/perf/distributed.py" + (" --quick" if q else "") + \
        f" --learner {args.learner} --device {args.device}"
    m = runs["1proc_1thread"]["meta_batch_per_rank"]
    shape = "1x28x28, Conv-4/32" if q else "3x84x84, Conv-4/64"
    print(f"# distributed ({args.learner}, {args.device}) on {machine(args.device, threads=False)}; {shape}, "
          f"5-way 1-shot 15-query, meta-batch {m} per rank; median of {args.repeats} x "
          f"{args.steps} steps after {args.warmup} warm-up")
    print(f"{'configuration':<20}{'processes':>10}{'threads':>9}{'step (ms)':>11}{'episodes/s':>12}")
    for k, r in runs.items():
        print(f"{k:<20}{r['world']:>10}{r['threads']:>9}{1000 * r['step_s']:>11.1f}{eps[k]:>12.2f}")
    print(f"gradient all-reduce (2 ranks, {metrics['params']} params): "
          f"{metrics['2proc_allreduce_ms']:.2f} ms")
    print(f"scaling efficiency (2 processes vs 2 x 1 process): {metrics['scaling_efficiency']:.2f}")
    print(f"machine load (1-min average) before / after: {metrics['load_average_1min_before']:.1f}"
          f" / {metrics['load_average_1min_after']:.1f} on {cores} cores")
    for k, v in ratios.items():
        print(f"{k:<34}{v:>8.2f}")
    if args.json:
        write_json(args.json, "distributed", machine=machine(args.device, threads=False),
                   command=command, metrics=metrics, ratios=ratios)


if __name__ == "__main__":
    main()
