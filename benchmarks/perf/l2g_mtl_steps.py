"""Training-step time of L2G and MTL against their base learners, same episodes, same run.

    python benchmarks/perf/l2g_mtl_steps.py [--quick] [--json PATH] [--device cpu|cuda] [--threads N]

Ratios (median step time after warm-up, each learner stepping on the same fixed batches):

* ``l2g+protonet_over_protonet``: L2G + ProtoNet (inner step on T_i, second-order meta-loss
  on T_j, L2G eq. 4) over ProtoNet on the same T_j episodes (meta-batch 5);
* ``maml+protonet_over_protonet``: the paper's MAML + ProtoNet baseline over ProtoNet;
* ``mtl+maml_over_maml``: MTL + MAML (k = 10 inner steps on sub-batches of 20, second
  order, plus the C-way transfer step) over MAML with 10 inner steps on the same episodes;
* ``mtl+maml_over_mtl+maml_beta1``: the cost of MTL's transfer update alone (β = 0.9 over
  β = 1, which skips it).

Full: mini-ImageNet-shaped random data (3x84x84), Conv-4 with 64 filters for the metric
learners (L2G paper) and 32 for MAML/MTL (meta-transfer paper), 5-way 1-shot 15-query tasks
for ProtoNet/L2G and 5-way 15-shot 5-query tasks for MAML/MTL. ``--quick``: 1x28x28 images
Conv-4 with 32 filters everywhere, meta-batch 2 and fewer repeats (about a minute on 2
CPU cores). Images are random: the timing does not
depend on their content.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, parser, sync, write_json  # noqa: E402

from fewshot.data.episodes import Episode  # noqa: E402
from fewshot.learners import get_learner  # noqa: E402

NUM_CLASSES = 64


def make_episode(g, ways, shots, queries, channels, size, offset, device):
    sy = torch.arange(ways).repeat_interleave(shots)
    qy = torch.arange(ways).repeat_interleave(queries)
    classes = torch.arange(ways) + offset
    return Episode(torch.randn(len(sy), channels, size, size, generator=g), sy,
                   torch.randn(len(qy), channels, size, size, generator=g), qy, classes,
                   base_support_y=classes[sy], base_query_y=classes[qy]).to(device)


def time_steps(learner, batches, warmup, repeats, device):
    for k in range(warmup):
        learner.train_step(batches[k % len(batches)])
    sync(device)
    times = []
    for k in range(repeats):
        t0 = time.perf_counter()
        out = learner.train_step(batches[k % len(batches)])
        float(out["loss"])  # the step's result reaches the host
        sync(device)
        times.append(time.perf_counter() - t0)
    return median(times)


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: on a shared machine, OpenMP threads contending "
                         "with other processes make small convolutions many times slower)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    channels, size = (1, 28) if args.quick else (3, 84)
    warmup, repeats = (1, 3) if args.quick else (5, 20)
    meta_batch = 2 if args.quick else 5
    metric_hidden = 32 if args.quick else 64
    g = torch.Generator().manual_seed(0)

    # metric learners: 5-way 1-shot 15-query, T_i and T_j class-disjoint
    pairs = [[(make_episode(g, 5, 1, 15, channels, size, 10 * t, device),
               make_episode(g, 5, 1, 15, channels, size, 10 * t + 5, device))
              for t in range(meta_batch)] for _ in range(2)]
    tj_batches = [[tj for _, tj in batch] for batch in pairs]
    # MAML / MTL: 5-way 15-shot 5-query
    mtl_batches = [[make_episode(g, 5, 15, 5, channels, size, 5 * t, device)
                    for t in range(meta_batch)] for _ in range(2)]

    def build(name, batches, **options):
        cls = get_learner(name)
        torch.manual_seed(0)
        learner = cls(cls.Config(**options), in_channels=channels, image_size=size,
                      num_classes=NUM_CLASSES).to(device)
        return time_steps(learner, batches, warmup, repeats, device)

    mtl_opts = dict(backbone_options={"hidden": 32}, inner_steps=10, inner_batch=20)
    metrics = {
        "protonet_step_s": build("protonet", tj_batches, backbone_options={"hidden": metric_hidden}),
        "l2g+protonet_step_s": build("l2g+protonet", pairs, backbone_options={"hidden": metric_hidden}),
        "maml+protonet_step_s": build("maml+protonet", tj_batches,
                                      backbone_options={"hidden": metric_hidden}),
        "maml_step_s": build("maml", mtl_batches, backbone_options={"hidden": 32}, inner_steps=10),
        "mtl+maml_step_s": build("mtl+maml", mtl_batches, **mtl_opts),
        "mtl+maml_beta1_step_s": build("mtl+maml", mtl_batches, beta=1.0, **mtl_opts),
    }
    ratios = {
        "l2g+protonet_over_protonet": metrics["l2g+protonet_step_s"] / metrics["protonet_step_s"],
        "maml+protonet_over_protonet": metrics["maml+protonet_step_s"] / metrics["protonet_step_s"],
        "mtl+maml_over_maml": metrics["mtl+maml_step_s"] / metrics["maml_step_s"],
        "mtl+maml_over_mtl+maml_beta1": metrics["mtl+maml_step_s"] / metrics["mtl+maml_beta1_step_s"],
    }
    command = "python benchmarks/perf/l2g_mtl_steps.py" + (" --quick" if args.quick else "") + \
        f" --device {args.device} --threads {args.threads}"
    print(f"# l2g_mtl_steps on {machine(device)}; {channels}x{size}x{size}, meta-batch {meta_batch}, "
          f"median of {repeats} steps after {warmup} warm-up")
    print(f"{'learner':<22}{'step (ms)':>12}")
    for k, v in metrics.items():
        print(f"{k[:-7]:<22}{1000 * v:>12.1f}")
    print(f"{'ratio':<34}{'value':>8}")
    for k, v in ratios.items():
        print(f"{k:<34}{v:>8.2f}")
    if args.json:
        write_json(args.json, "l2g_mtl_steps", machine=machine(device), command=command,
                   metrics=metrics, ratios=ratios)


if __name__ == "__main__":
    main()
