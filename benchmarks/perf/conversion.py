"""Dataset conversion and store read speed, and the memory of lazy reads.

    python benchmarks/perf/conversion.py [--quick] [--json PATH]

Measured in one run, on synthetic data with the real formats' layout (84x84x3 uint8):

* ``pickle_images_per_s``: ``mini_imagenet.convert`` of a ``mini-imagenet-cache-test.pkl``
  (allow-list unpickling, class-ordered streaming write, sha256 and statistics) against the
  naive peer ``pickle.load`` + one ``h5py`` ``create_dataset(data=...)`` of the class-sorted
  array (no checks, no checksum): ratio ``ours_over_naive_h5py`` (speed, >1 = we are faster).
* ``jpeg_images_per_s_w1`` / ``_w2``: conversion of a folder of 84x84 JPEGs + a Ravi-style CSV
  with 1 and 2 decoding processes: ratio ``jpeg_2workers_over_1worker``.
* ``store_open_s`` vs ``l2l_load_s``: opening the converted store in memory against
  ``learn2learn.vision.datasets.MiniImagenet(mode="test")`` loading the same pickle: ratio
  ``ours_open_over_l2l_load`` (speed). Skipped when learn2learn is not importable.
* ``lazy_episodes_per_s`` / ``memory_episodes_per_s``: 5-way 1-shot 15-query episodes (80
  images at random rows of 5 random classes) read with ``ImageStore.read`` from a lazy (on
  disk) and an in-memory store.
* ``lazy_peak_rss_mb`` / ``memory_peak_rss_mb``: peak resident memory (VmHWM) of a fresh
  process that reads 200 such episodes lazily, or opens the store in memory; the store's
  image bytes are ``store_mb``.

Timings are medians over repeats after one warm-up. Full: 20 classes x 600 images (pickle,
254 MB) and 2000 JPEGs; ``--quick``: 8 x 100 and 400 JPEGs (under a minute on 2 cores).
"""
from __future__ import annotations

import csv
import pickle
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, load_average, machine, median_time, parser, write_json  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from fewshot.data.sources import mini_imagenet  # noqa: E402
from fewshot.data.store import ImageStore  # noqa: E402


def describe_machine() -> str:
    return machine(None, f"python {platform.python_version()}", f"h5py {h5py.__version__}",
                   load_average(), with_torch=False)


def synthetic_images(rng, n: int) -> np.ndarray:
    """Smooth random colour images (compress like photos, unlike white noise)."""
    small = rng.integers(0, 256, (n, 6, 6, 3), dtype=np.uint8)
    out = np.empty((n, 84, 84, 3), np.uint8)
    for i in range(n):
        out[i] = np.asarray(Image.fromarray(small[i]).resize((84, 84), Image.BILINEAR))
    noise = rng.integers(0, 12, out.shape, dtype=np.uint8)
    return out + noise


_PEAK = r"""
import sys, numpy as np
from fewshot.data.store import ImageStore
path, mode = sys.argv[1], sys.argv[2]
s = ImageStore.open(path, in_memory=(mode == "memory"))
rng = np.random.default_rng(0)
if mode == "lazy":
    for _ in range(200):
        cls = rng.choice(s.num_classes, 5, replace=False)
        rows = np.concatenate([rng.choice(s.class_indices(c), 16, replace=False) for c in cls])
        s.read(rows)
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(int(line.split()[1]) / 1024)
"""


def episode_reader(store, rng):
    def run():
        for _ in range(20):
            cls = rng.choice(store.num_classes, 5, replace=False)
            rows = np.concatenate([rng.choice(store.class_indices(c), 16, replace=False)
                                   for c in cls])
            store.read(rows)
    return run


def main() -> None:
    ap = parser(__doc__, json_help="write the results here")
    args = ap.parse_args()
    k, per, n_jpeg, reps = (8, 100, 400, 2) if args.quick else (20, 600, 2000, 3)
    rng = np.random.default_rng(0)
    metrics, ratios = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # ---- pickle cache
        n = k * per
        imgs = synthetic_images(rng, n)
        wnids = [f"n{c:08d}" for c in range(k)]
        perm = rng.permutation(n)  # class rows scattered through image_data
        cd = {w: perm[c * per:(c + 1) * per].tolist() for c, w in enumerate(wnids)}
        src = tmp / "cache"
        src.mkdir()
        with open(src / "mini-imagenet-cache-test.pkl", "wb") as fh:
            pickle.dump({"image_data": imgs, "class_dict": cd}, fh, protocol=4)
        del imgs
        out = tmp / "out"
        ours = median_time(lambda: mini_imagenet.convert(src, out, splits=("test",)), reps)

        def naive():
            with open(src / "mini-imagenet-cache-test.pkl", "rb") as fh:
                d = pickle.load(fh)
            order = np.concatenate([d["class_dict"][w] for w in sorted(d["class_dict"])])
            with h5py.File(tmp / "naive.h5", "w") as f:
                f.create_dataset("images", data=d["image_data"][order])
        peer = median_time(naive, reps)
        metrics["pickle_images"] = n
        metrics["pickle_images_per_s"] = round(n / ours, 1)
        metrics["naive_h5py_images_per_s"] = round(n / peer, 1)
        ratios["ours_over_naive_h5py"] = round(peer / ours, 3)
        store = out / "test.h5"
        metrics["store_mb"] = round(n * 84 * 84 * 3 / 2 ** 20, 1)

        # ---- JPEG folder
        jdir = tmp / "jpeg"
        (jdir / "images").mkdir(parents=True)
        jimgs = synthetic_images(rng, n_jpeg)
        jk = 10
        rows = []
        for i in range(n_jpeg):
            w = f"n{i % jk:08d}"
            fname = f"{w}{i:08d}.jpg"
            Image.fromarray(jimgs[i]).save(jdir / "images" / fname, quality=90)
            rows.append((fname, w))
        with open(jdir / "test.csv", "w", newline="") as fh:
            wr = csv.writer(fh)
            wr.writerow(["filename", "label"])
            wr.writerows(rows)
        for workers in (1, 2):
            t = median_time(lambda: mini_imagenet.convert(jdir, tmp / f"j{workers}",
                                                          splits=("test",), workers=workers),
                            reps)
            metrics[f"jpeg_images_per_s_w{workers}"] = round(n_jpeg / t, 1)
        metrics["jpeg_images"] = n_jpeg
        ratios["jpeg_2workers_over_1worker"] = round(
            metrics["jpeg_images_per_s_w2"] / metrics["jpeg_images_per_s_w1"], 3)

        # ---- open vs learn2learn load
        metrics["store_open_s"] = round(median_time(
            lambda: ImageStore.open(store, in_memory=True).close(), reps), 4)
        try:
            import learn2learn as l2l
            t = median_time(lambda: l2l.vision.datasets.MiniImagenet(str(src), mode="test"),
                            reps)
            metrics["l2l_load_s"] = round(t, 4)
            ratios["ours_open_over_l2l_load"] = round(t / metrics["store_open_s"], 3)
        except ImportError as e:
            metrics["l2l_load_s"] = f"skipped ({e})"

        # ---- episode reads and peak memory
        for mode in ("lazy", "memory"):
            s = ImageStore.open(store, in_memory=(mode == "memory"))
            t = median_time(episode_reader(s, np.random.default_rng(1)), reps)
            metrics[f"{mode}_episodes_per_s"] = round(20 / t, 1)
            s.close()
            got = subprocess.run([sys.executable, "-c", _PEAK, str(store), mode], cwd=REPO,
                                 capture_output=True, text=True, check=True)
            metrics[f"{mode}_peak_rss_mb"] = round(float(got.stdout.strip()), 1)
        ratios["lazy_over_memory_episodes"] = round(
            metrics["lazy_episodes_per_s"] / metrics["memory_episodes_per_s"], 3)

    cmd = "python benchmarks/perf/conversion.py" + (" --quick" if args.quick else "")
    result = {"benchmark": "conversion", "machine": describe_machine(), "command": cmd,
              "metrics": metrics, "ratios": ratios}
    width = max(len(key) for key in list(metrics) + list(ratios))
    print(f"conversion benchmark ({'quick' if args.quick else 'full'}) on {result['machine']}")
    for key, val in metrics.items():
        print(f"  {key:<{width}}  {val}")
    print("ratios:")
    for key, val in ratios.items():
        print(f"  {key:<{width}}  {val}")
    if args.json:
        write_json(args.json, indent=1, **result)


if __name__ == "__main__":
    main()
