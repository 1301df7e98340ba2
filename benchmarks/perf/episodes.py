"""Episodes per second: fewshot's EpisodeSampler vs learn2learn's TaskDataset vs a bare gather.

5-way 5-shot 15-query episodes at 84x84x3 from a synthetic store (64 classes x 600 images,
like mini-ImageNet's train split; --quick: 64 x 100), each delivered *ready for a learner*:
float32 (B, C, H, W), normalised by the store's per-channel mean/std, split into support
and query, with labels 0..N-1.

* ours: ``EpisodeSampler(store, 5, 5, 15).sample()`` (in-memory store), and with
  ``channels_last=True`` (no transpose: the store is NHWC);
* learn2learn: ``TaskDataset(MetaDataset(ds), [NWays, KShots(20), LoadData, RemapLabels])``
  over a Dataset of the same uint8 tensor, then the same support/query split (first 5 of
  each class) and the same conversion (permute, float, normalise);
* bare: the same bytes of precomputed episodes (row lists drawn beforehand) with one
  ``index_select`` and the same conversion: the cost of moving and converting the pixels,
  with no sampling at all (the memory-bandwidth bound of this machine);
* lazy: ``EpisodeSampler`` on the store opened on disk (``in_memory=False``), in a child
  process whose peak resident memory is reported.

Rates are medians over interleaved repeats after a warm-up; torch runs 1 thread (the machine
is shared; all three use the same). Usage:
``python benchmarks/perf/episodes.py [--quick] [--json PATH] [--md PATH]``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, machine, median, parser, write_json, write_text  # noqa: E402

from fewshot.data.episodes import EpisodeSampler  # noqa: E402
from fewshot.data.store import ImageStore, write_store  # noqa: E402

WAYS, SHOTS, QUERIES = 5, 5, 15


def make_store(path: Path, classes: int, per_class: int, size: int = 84) -> Path:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (classes * per_class, size, size, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(classes), per_class)
    return write_store(path, images, labels, [f"n{c:08d}" for c in range(classes)],
                       dataset="synthetic", split="train", source="benchmarks/perf/episodes.py")


def rate(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - t)


def _status_mb(key: str) -> float:
    """VmRSS / VmHWM of this process in MB (VmHWM, unlike ru_maxrss, is reset by exec, so a
    child does not inherit the parent's peak)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def lazy_child(path: str, n: int) -> None:
    torch.set_num_threads(1)
    base = _status_mb("VmRSS")  # after importing torch and fewshot
    store = ImageStore.open(path, in_memory=False)
    sampler = EpisodeSampler(store, WAYS, SHOTS, QUERIES, seed=0)
    for _ in range(5):
        sampler.sample()
    rates = [rate(sampler.sample, n) for _ in range(3)]
    print(json.dumps({"rate": median(rates), "peak_rss_mb": _status_mb("VmHWM"),
                      "growth_mb": _status_mb("VmHWM") - base}))


def main(argv=None) -> dict:
    ap = parser(__doc__)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--lazy-child", nargs=2, metavar=("PATH", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.lazy_child:
        lazy_child(args.lazy_child[0], int(args.lazy_child[1]))
        return {}
    torch.set_num_threads(1)
    per_class = 100 if args.quick else 600
    n = 100 if args.quick else 300  # episodes per timed repeat
    repeats = 5 if args.quick else 9
    tmp = Path(tempfile.mkdtemp(prefix="fewshot-bench-"))
    try:
        path = make_store(tmp / "synthetic.h5", 64, per_class)
        store = ImageStore.open(path, in_memory=True)
        results = run(store, n, repeats, args.quick)
        child = subprocess.run([sys.executable, __file__, "--lazy-child", str(path),
                                str(max(20, n // 5))], capture_output=True, text=True, check=True)
        lazy = json.loads(child.stdout.strip().splitlines()[-1])
    finally:
        for p in tmp.glob("*"):
            p.unlink()
        tmp.rmdir()
    m = results
    m["lazy_episodes_per_s"] = round(lazy["rate"], 1)
    m["lazy_peak_rss_mb"] = round(lazy["peak_rss_mb"], 1)
    m["lazy_rss_growth_over_imports_mb"] = round(lazy["growth_mb"], 1)
    m["store"] = f"64 classes x {per_class} images, 84x84x3 uint8 ({64 * per_class * 84 * 84 * 3 / 2**20:.0f} MiB)"
    ratios = {
        "ours_over_learn2learn": round(m["ours_episodes_per_s"] / m["learn2learn_episodes_per_s"], 3),
        "ours_over_bare_gather": round(m["ours_episodes_per_s"] / m["bare_episodes_per_s"], 3),
        "ours_channels_last_over_bare_gather":
            round(m["ours_channels_last_episodes_per_s"] / m["bare_episodes_per_s"], 3),
        "lazy_over_in_memory": round(m["lazy_episodes_per_s"] / m["ours_episodes_per_s"], 3),
    }
    out = {"benchmark": "episodes",
           "machine": machine(None, load_average()),
           "command": "python benchmarks/perf/episodes.py" + (" --quick" if args.quick else ""),
           "metrics": m, "ratios": ratios}
    table = [("ours (EpisodeSampler)", m["ours_episodes_per_s"]),
             ("ours, channels_last", m["ours_channels_last_episodes_per_s"]),
             ("learn2learn TaskDataset + split + convert", m["learn2learn_episodes_per_s"]),
             ("bare index_select + convert (no sampling)", m["bare_episodes_per_s"]),
             ("ours, lazy on-disk store", m["lazy_episodes_per_s"])]
    lines = [f"# episodes: {WAYS}-way {SHOTS}-shot {QUERIES}-query, 84x84x3, {m['store']}", "",
             f"`{out['command']}` on {out['machine']}", "",
             "| pipeline | episodes/s |", "|---|---:|"]
    lines += [f"| {name} | {v:.1f} |" for name, v in table]
    lines += ["", f"lazy peak RSS: {m['lazy_peak_rss_mb']:.0f} MB, of which "
              f"{m['lazy_rss_growth_over_imports_mb']:.0f} MB above the process after importing "
              "torch and fewshot (torch alone is ~600 MB here)", "",
              "| ratio | value | target |", "|---|---:|---|",
              f"| ours / learn2learn | {ratios['ours_over_learn2learn']:.2f} | >= 2 |",
              f"| ours / bare gather | {ratios['ours_over_bare_gather']:.2f} | >= 0.8 (within 1.25x) |",
              f"| ours channels_last / bare gather | "
              f"{ratios['ours_channels_last_over_bare_gather']:.2f} | |",
              f"| lazy / in-memory | {ratios['lazy_over_in_memory']:.2f} | |"]
    text = "\n".join(lines)
    print(text)
    if args.json:
        write_json(args.json, indent=1, **out)
    if args.md:
        write_text(args.md, text + "\n")
    return out


def run(store: ImageStore, n: int, repeats: int, quick: bool) -> dict:
    import learn2learn as l2l

    images = store.images_tensor()
    labels = torch.as_tensor(store.labels)
    mean = torch.tensor(store.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(store.std, dtype=torch.float32).view(1, 3, 1, 1)
    scale, shift = 1.0 / (255.0 * std), -mean / std

    def convert(u8_nhwc):
        out = torch.empty((u8_nhwc.shape[0], 3, 84, 84), dtype=torch.float32)
        out.copy_(u8_nhwc.permute(0, 3, 1, 2))
        return out.mul_(scale).add_(shift)

    # -- ours
    ours = EpisodeSampler(store, WAYS, SHOTS, QUERIES, seed=0)
    ours_cl = EpisodeSampler(store, WAYS, SHOTS, QUERIES, seed=0, channels_last=True)
    ep = ours.sample()
    assert ep.support_x.shape == (25, 3, 84, 84) and ep.query_x.shape == (75, 3, 84, 84)

    # -- learn2learn
    class TensorImages(torch.utils.data.Dataset):
        def __len__(self):
            return images.shape[0]

        def __getitem__(self, i):
            return images[i], int(labels[i])

    l2i = {c: list(range(int(store.class_offsets[c]), int(store.class_offsets[c + 1])))
           for c in range(store.num_classes)}
    meta = l2l.data.MetaDataset(TensorImages(), labels_to_indices=l2i)
    tasks = l2l.data.TaskDataset(meta, task_transforms=[
        l2l.data.transforms.NWays(meta, WAYS), l2l.data.transforms.KShots(meta, SHOTS + QUERIES),
        l2l.data.transforms.LoadData(meta), l2l.data.transforms.RemapLabels(meta)], num_tasks=-1)

    def l2l_episode():
        x, y = tasks.sample()  # (100, 84, 84, 3) uint8 stacked by the collate, y (100,)
        y = torch.as_tensor(y)
        order = torch.argsort(y, stable=True)
        x, y = x[order], y[order]
        pos = torch.arange(y.numel()) % (SHOTS + QUERIES)
        s = pos < SHOTS
        xf = convert(x)
        return xf[s], y[s], xf[~s], y[~s]

    sx, sy, qx, qy = l2l_episode()
    assert sx.shape == (25, 3, 84, 84) and qx.shape == (75, 3, 84, 84)

    # -- bare: the same bytes (rows of real episodes drawn beforehand), gathered and converted
    plans = [ours.plan_at(10_000 + i) for i in range(n)]
    rows = [torch.cat([p.support_rows, p.query_rows]) for p in plans]
    state = {"k": 0}

    def bare():
        r = rows[state["k"] % n]
        state["k"] += 1
        x = convert(torch.index_select(images, 0, r))
        return x[:25], x[25:]

    runs = {"ours": ours.sample, "ours_channels_last": ours_cl.sample, "learn2learn": l2l_episode,
            "bare": bare}
    for fn in runs.values():  # warm-up
        for _ in range(10):
            fn()
    got = {k: [] for k in runs}
    for _ in range(repeats):  # interleaved so load changes hit every pipeline alike
        for k, fn in runs.items():
            got[k].append(rate(fn, n))
    return {f"{k}_episodes_per_s": round(median(v), 1) for k, v in got.items()} | {
        "repeats": repeats, "episodes_per_repeat": n}


if __name__ == "__main__":
    main()
