"""ProtoNet training step: fewshot's ``protonet`` learner against plain PyTorch.

    python benchmarks/perf/protonet.py [--quick] [--json PATH] [--threads N]

Workload (full): Conv-4 (64 filters) on 3x84x84 images, 5-way 5-shot 15-query episodes, one
episode per step, Adam, float32 on CPU. The peer is the same computation written directly in
PyTorch, as a user would without a framework: a copy of the same Conv-4 (same initial
weights), support and query embedded in one batch, prototypes as ``view(ways, shots, D)
.mean(1)``, logits ``-torch.cdist(q, protos) ** 2``, cross-entropy, backward, Adam step. Ours
adds the learner's episode checks (label ranges, image shapes, shots per class), the
non-finite-loss check, the metrics and the learning-rate scheduler.

Time: after ``warmup`` steps of each, steps of ours and of the peer alternate (A B A B ...)
so a change of load on the shared machine hits both; medians over ``repeats`` steps each.
Ratio ``time_ours_over_plain`` (target <= 1.05).

``--quick`` (under a minute on 2 cores): 1x28x28 images, 32 filters. The script runs with
the Makefile's glibc allocator settings (re-executing itself to set them), the same for both.
"""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, interleaved_times, machine, median, parser, write_json  # noqa: E402

FULL = dict(channels=3, size=84, hidden=64, warmup=2, repeats=15)
QUICK = dict(channels=1, size=28, hidden=32, warmup=3, repeats=30)
#: glibc settings of the Makefile: big tensors from the heap, kept, instead of a fresh mmap
#: (and page faults) per allocation; the script re-executes itself with them when unset.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "1000000000"}
WAYS, SHOTS, QUERIES, LR = 5, 5, 15, 1e-3


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (1: stable timings on a shared machine)")
    args = ap.parse_args(argv)
    p = QUICK if args.quick else FULL
    if any(k not in os.environ for k in MALLOC_ENV):
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]],
                  {**os.environ, **MALLOC_ENV})

    import torch
    import torch.nn.functional as F

    from fewshot.data.episodes import Episode
    from fewshot.learners import get_learner

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cls = get_learner("protonet")
    ours = cls(cls.Config(lr=LR, backbone_options={"hidden": p["hidden"]}),
               in_channels=p["channels"], image_size=p["size"])
    encoder = copy.deepcopy(ours.encoder)
    opt = torch.optim.Adam(encoder.parameters(), lr=LR)

    g = torch.Generator().manual_seed(1)
    c, s = p["channels"], p["size"]
    sy = torch.arange(WAYS).repeat_interleave(SHOTS)
    qy = torch.arange(WAYS).repeat_interleave(QUERIES)
    ep = Episode(torch.randn(len(sy), c, s, s, generator=g), sy,
                 torch.randn(len(qy), c, s, s, generator=g), qy, torch.arange(WAYS))

    def plain_step():
        encoder.train()
        opt.zero_grad(set_to_none=True)
        z = encoder(torch.cat([ep.support_x, ep.query_x]))
        protos = z[:WAYS * SHOTS].view(WAYS, SHOTS, -1).mean(1)
        logits = -torch.cdist(z[WAYS * SHOTS:], protos) ** 2
        loss = F.cross_entropy(logits, ep.query_y)
        loss.backward()
        opt.step()
        return loss.detach()

    fns = {"ours": lambda: ours.train_step([ep]), "plain": plain_step}
    # both compute the same loss from the same weights (a check that the peer is the same work)
    l_ours, l_plain = float(ours.train_step([ep])["loss"]), float(plain_step())
    if abs(l_ours - l_plain) > 1e-3 * max(1.0, abs(l_plain)):
        raise SystemExit(f"ours and plain disagree on the first loss: {l_ours} vs {l_plain}")
    times = interleaved_times(fns, p["warmup"], p["repeats"])
    med = {k: median(v) for k, v in times.items()}
    ratio = med["ours"] / med["plain"]
    print(f"ProtoNet training step, {'quick' if args.quick else 'full'}: {c}x{s}x{s}, "
          f"Conv-4({p['hidden']}), 5-way 5-shot 15-query; {machine()}")
    print(f"{'':24s} {'fewshot':>10s} {'plain torch':>12s} {'ratio':>7s}")
    print(f"{'step time (ms, median)':24s} {1e3 * med['ours']:10.2f} {1e3 * med['plain']:12.2f} "
          f"{ratio:7.3f}")
    print(f"first-step loss: ours {l_ours:.6f}, plain {l_plain:.6f}")
    if args.json:
        write_json(args.json, "protonet", machine=machine(), command=command("protonet.py"),
                   metrics={"step_s": {"ours": med["ours"], "plain": med["plain"],
                                       "ours_all": times["ours"], "plain_all": times["plain"]},
                            "first_loss": {"ours": l_ours, "plain": l_plain}},
                   ratios={"time_ours_over_plain": ratio}, params=p)


if __name__ == "__main__":
    main()
