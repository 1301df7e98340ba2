"""What the stores' Fletcher-32 chunk checksums cost: reads of a checksummed store against the
same store written without them (the layout before the checksums), in one run.

    python benchmarks/perf/store_checksums.py [--quick] [--json PATH]

For two image shapes, Omniglot-like 28x28x1 (5 images per 4 KiB chunk) and mini-ImageNet-like
84x84x3 (one image per chunk), the same random images are written once by ``write_store``
(images and labels chunked with ``fletcher32=True``) and copied into a second file with the
same chunk shape and no filter, labels contiguous (exactly what ``StoreWriter`` wrote before).
Timed on both, interleaved round-robin after a warm-up, medians:

* ``open_memory_s``: ``ImageStore.open(path, in_memory=True)`` (every chunk read and, when
  checksummed, verified);
* ``lazy_episodes_per_s``: 5-way 1-shot 15-query episodes (80 rows of 5 random classes, the
  same row lists for both files) read with ``ImageStore.read`` from the store opened on disk.

Ratios ``<shape>_open_checked_over_plain`` (seconds / seconds; 1.0 = no cost) and
``<shape>_lazy_checked_over_plain`` (episodes/s / episodes/s; 1.0 = no cost). Full: 20000
28x28 images and 3000 84x84x3 images; ``--quick``: 4000 and 600.
"""
from __future__ import annotations

import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (command, interleaved_times, load_average, machine, median,  # noqa: E402
                     parser, write_json)

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from fewshot.data.store import ImageStore, write_store  # noqa: E402


#: The writer's minimum chunk size before the checksums (``MIN_CHUNK_BYTES`` was 4096).
BEFORE_CHUNK_BYTES = 4096


def write_pair(folder: Path, tag: str, n: int, shape: tuple, classes: int, seed: int = 0):
    """(checksummed path, plain path) holding the same images."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
    y = np.arange(n) % classes
    checked = write_store(folder / f"{tag}_checked.h5", x, y, [f"c{i}" for i in range(classes)],
                          dataset="bench", split=tag, source="random")
    plain = folder / f"{tag}_plain.h5"
    with h5py.File(checked, "r") as src, h5py.File(plain, "w") as dst:
        for key in src:
            chunks = (max(1, BEFORE_CHUNK_BYTES // int(np.prod(shape))),) + shape \
                if key == "images" else None
            dst.create_dataset(key, data=src[key][()], dtype=src[key].dtype, chunks=chunks)
        dst.attrs.update(dict(src.attrs))
    return checked, plain


def episodes(store_path: Path, count: int, seed: int = 1):
    """Row lists of ``count`` 5-way 1-shot 15-query episodes."""
    with ImageStore.open(store_path, in_memory=False) as s:
        offsets = s.class_offsets
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        cls = rng.choice(len(offsets) - 1, 5, replace=False)
        out.append(np.concatenate([rng.choice(np.arange(offsets[c], offsets[c + 1]), 16,
                                              replace=False) for c in cls]))
    return out


def measure(checked: Path, plain: Path, repeats: int, n_episodes: int) -> dict:
    eps = episodes(checked, n_episodes)
    lazy = {k: ImageStore.open(p, in_memory=False) for k, p in (("checked", checked),
                                                                   ("plain", plain))}

    def opener(p):
        return lambda: ImageStore.open(p, in_memory=True).close()

    def reader(s):
        return lambda: [s.read(e) for e in eps]

    t = interleaved_times({"open_checked": opener(checked), "open_plain": opener(plain),
                           "lazy_checked": reader(lazy["checked"]),
                           "lazy_plain": reader(lazy["plain"])}, warmup=1, repeats=repeats)
    for s in lazy.values():
        s.close()
    m = {f"{k}_s": median(v) for k, v in t.items() if k.startswith("open")}
    m.update({f"{k}_episodes_per_s": n_episodes / median(v) for k, v in t.items()
              if k.startswith("lazy")})
    return m


def main() -> None:
    args = parser(__doc__, "smaller stores (a few seconds)", "write the result here").parse_args()
    sizes = {"28x28x1": ((28, 28, 1), 4000 if args.quick else 20000, 200),
             "84x84x3": ((84, 84, 3), 600 if args.quick else 3000, 20)}
    metrics, ratios = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for tag, (shape, n, classes) in sizes.items():
            checked, plain = write_pair(Path(tmp), tag, n, shape, classes)
            m = measure(checked, plain, 5 if args.quick else 9, 50 if args.quick else 200)
            metrics.update({f"{tag}_{k}": round(v, 4) for k, v in m.items()})
            metrics[f"{tag}_images"] = n
            ratios[f"{tag}_open_checked_over_plain"] = round(m["open_checked_s"] / m["open_plain_s"], 3)
            ratios[f"{tag}_lazy_checked_over_plain"] = round(
                m["lazy_checked_episodes_per_s"] / m["lazy_plain_episodes_per_s"], 3)
    mach = machine(None, f"python {platform.python_version()}", f"h5py {h5py.__version__}",
                   f"HDF5 {h5py.version.hdf5_version}", load_average(), with_torch=False)
    print(mach)
    for k, v in {**metrics, **ratios}.items():
        print(f"  {k:40s} {v}")
    if args.json:
        write_json(args.json, "store_checksums", machine=mach, command=command("store_checksums.py"),
                   metrics=metrics, ratios=ratios)


if __name__ == "__main__":
    main()
