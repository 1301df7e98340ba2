"""Episodic training through ``fewshot train`` against a plain PyTorch loop (episodes/s).

    python benchmarks/perf/trainer.py [--quick] [--json PATH] [--threads N] [--root DIR]

What a user gets from the trainer (sampler -> learner step -> metrics, logs, checkpoints)
against the loop a user would write without a framework, on the same episodes: the same
built-in glyphs stores (``fewshot data prepare glyphs`` under ``--root``; made when absent),
the same :class:`EpisodeSampler` and seed, the same Conv-4 (same initial weights, the same
memory format the trainer picks), Adam at 1e-3, prototypes by class means and
``-torch.cdist(q, c) ** 2`` logits, one episode per step. Ours runs ``fewshot.api.train``
with validation and periodic checkpoints off (its final checkpoint is written; it is not
timed); its rate is the median of the ``items_per_s`` the trainer logs every ``--window``
steps. The plain loop's rate is the median over windows of the same length. The two run
alternately (ours, plain, ours, ...) so a change of load on the shared machine hits both.

Workloads (issue 11, item 5): ProtoNet 60-way 1-shot 5-query on 28x28 glyphs, and 5-way
5-shot 15-query at 84x84 (glyphs resized on the fly is not possible, so the 84x84 case uses
the glyph stores upscaled once into ``--root``/glyphs84). Target: ours/plain >= 0.95.
``--quick`` (under a minute): 20-way at 28x28 only, fewer steps.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, machine, median, parser, write_json  # noqa: E402

FULL = [dict(name="60w1s_28", ways=60, shots=1, queries=5, size=28, steps=60, rounds=3),
        dict(name="5w5s_84", ways=5, shots=5, queries=15, size=84, steps=30, rounds=3)]
QUICK = [dict(name="20w1s_28", ways=20, shots=1, queries=5, size=28, steps=30, rounds=2)]
LR, SEED = 1e-3, 0


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
        import torch.nn.functional as F
        import torch
        from fewshot.data.store import write_store

        for split in ("train", "val", "test"):
            s = open_split("glyphs", split, root=root)
            x = torch.from_numpy(s.images_tensor().numpy()).permute(0, 3, 1, 2).float()
            up = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            img = up.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
            write_store(root / name / f"{split}.h5", img, s.labels, s.class_names,
                        dataset=name, split=split, source="glyphs upscaled for benchmarks/perf/trainer.py")
    return name


def ours(root: Path, dataset: str, w: dict, window: int) -> float:
    """Median items/s over the trainer's log windows."""
    import json

    from fewshot.api import train

    cfg = {"data": {"dataset": dataset, "root": str(root)},
           "learner": {"name": "protonet", "lr": LR},
           "train": {"episodes": w["steps"], "meta_batch": 1, "ways": w["ways"], "shots": w["shots"],
                     "queries": w["queries"], "val_every": 0, "checkpoint_every": 0,
                     "log_every": window, "seed": SEED, "device": "cpu", "quiet": True}}
    with tempfile.TemporaryDirectory() as out:
        run = train(cfg, out=Path(out) / "run", evaluate=False)
        rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["items_per_s"] for r in rows if r.get("split") == "train"]
    return median(rates[1:] if len(rates) > 2 else rates)  # the first window holds the warm-up


def plain(root: Path, dataset: str, w: dict, window: int) -> float:
    """Median episodes/s of a hand-written ProtoNet loop over windows of ``window`` steps."""
    import torch
    import torch.nn.functional as F

    from fewshot.data.episodes import EpisodeSampler
    from fewshot.data.store import open_split
    from fewshot.learners import get_learner

    store = open_split(dataset, "train", root=root)
    sampler = EpisodeSampler(store, w["ways"], w["shots"], w["queries"], seed=SEED)
    torch.manual_seed(SEED)
    cls = get_learner("protonet")
    encoder = cls(cls.Config(lr=LR), in_channels=1, image_size=w["size"]).encoder
    opt = torch.optim.Adam(encoder.parameters(), lr=LR)
    rates, t0 = [], time.perf_counter()
    for step in range(1, w["steps"] + 1):
        ep = sampler.sample()
        z = encoder(torch.cat([ep.support_x, ep.query_x]))
        s = ep.support_x.shape[0]
        protos = z[:s].view(w["ways"], w["shots"], -1).mean(1)
        loss = F.cross_entropy(-torch.cdist(z[s:], protos) ** 2, ep.query_y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % window == 0:
            rates.append(window / (time.perf_counter() - t0))
            t0 = time.perf_counter()
    return median(rates[1:] if len(rates) > 2 else rates)


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    ap.add_argument("--root", type=Path, default=None, help="data root for the glyph stores "
                    "(default: a folder under the system temp dir, reused)")
    ap.add_argument("--window", type=int, default=5, help="steps per rate window")
    ap.add_argument("--only", default=None, help="comma-separated workload names (e.g. 60w1s_28)")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.root or Path(tempfile.gettempdir()) / "fewshot-bench-data"
    metrics, ratios = {}, {}
    plan = QUICK if args.quick else FULL
    if args.only:
        plan = [w for w in plan if w["name"] in args.only.split(",")]
    for w in plan:
        dataset = ensure_stores(root, w["size"])
        ours_r, plain_r = [], []
        for _ in range(w["rounds"]):
            ours_r.append(ours(root, dataset, w, args.window))
            plain_r.append(plain(root, dataset, w, args.window))
        o, p = median(ours_r), median(plain_r)
        metrics[w["name"]] = {"ours_episodes_per_s": o, "plain_episodes_per_s": p,
                              "ours_rounds": ours_r, "plain_rounds": plain_r}
        ratios[f"trainer_over_plain_{w['name']}"] = o / p
        print(f"{w['name']:>10}: fewshot train {o:7.2f} ep/s | plain loop {p:7.2f} ep/s | "
              f"ratio {o / p:.3f} (target >= 0.95)")
    if args.json:
        write_json(args.json, "trainer", machine=machine(None, f"load average {os.getloadavg()[0]:.1f}"),
                   command=command("trainer.py", argv), metrics=metrics, ratios=ratios)


if __name__ == "__main__":
    main()
