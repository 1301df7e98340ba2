"""mini-ImageNet (Vinyals et al., 2016) with the Ravi & Larochelle (2017) class split:
64 train / 16 val / 20 test classes of 600 images, 84x84 RGB.

Two accepted inputs (``from_path`` is a folder):

(a) pickle caches ``mini-imagenet-cache-{train,val,test}.pkl`` (the files learn2learn and many
    repositories distribute): a dict with ``image_data`` uint8 (N, 84, 84, 3) and
    ``class_dict`` {wnid: [row indices]}; read with the allow-list unpickler.
(b) a JPEG folder plus Ravi's split CSVs (header ``filename,label``, e.g.
    ``n0153282900000005.jpg,n01532829``): images in ``images/`` (flat, or ``images/<wnid>/``),
    CSVs ``train.csv``/``val.csv``/``test.csv`` next to it (or in ``split_csvs=DIR``). Each
    image is converted to RGB and resized to ``image_size`` x ``image_size`` (84) with a
    Lanczos filter, without cropping (as Ravi & Larochelle's pre-processing).
    The folder may also be the ImageNet (ILSVRC-2012) train folder, ``<wnid>/<wnid>_<N>.JPEG``:
    a CSV name ``<wnid><k, 8 digits>.jpg`` then means the k-th (from 1) image of the class in
    increasing order of N, the convention of the mini-imagenet-tools generator.

Store classes are the wnids in sorted order; rows follow the cache's index order / CSV order.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from fewshot.data.safe_pickle import safe_load
from fewshot.data.sources import Decoder, require_dir, write_classes
from fewshot.data.store import StoreWriter
from fewshot.errors import DataError

NAME = "mini-imagenet"
#: Ravi's file names: <wnid><8-digit index>.jpg
_RAVI_FILE = re.compile(r"^(n\d{8})(\d{8})\.jpe?g$", re.IGNORECASE)
#: ImageNet train files: <wnid>_<number>.JPEG
_IMAGENET_FILE = re.compile(r"^(n\d{8})_(\d+)\.jpe?g$", re.IGNORECASE)
SPLITS = ("train", "val", "test")
CACHE = "mini-imagenet-cache-{split}.pkl"


def _cache_names(split: str) -> List[str]:
    # learn2learn names the validation cache "mini-imagenet-cache-validation.pkl"
    return [CACHE.format(split=split)] + ([CACHE.format(split="validation")] if split == "val"
                                          else [])


def _cache_files(p: Path) -> Dict[str, Path]:
    if p.is_file():
        for s in SPLITS:
            if p.name in _cache_names(s):
                return {s: p}
        return {}
    out = {}
    for s in SPLITS:
        for base in (p, p / "mini-imagenet", p / "miniimagenet"):
            hit = [base / n for n in _cache_names(s) if (base / n).is_file()]
            if hit:
                out[s] = hit[0]
                break
    return out


def convert_cache(path: Path, out_path: Path, split: str, dataset: str = NAME) -> Path:
    """One ``mini-imagenet-cache-<split>.pkl`` -> one store."""
    d = safe_load(path)
    if not isinstance(d, dict) or "image_data" not in d or "class_dict" not in d:
        keys = sorted(map(str, d)) if isinstance(d, dict) else type(d).__name__
        raise DataError(f"{path}: expected a dict with 'image_data' and 'class_dict', got "
                        f"{keys}; this is not a mini-ImageNet cache pickle")
    images = d["image_data"]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[3] != 3:
        desc = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else \
            type(images).__name__
        raise DataError(f"{path}: field 'image_data' is {desc}, expected uint8 (N, H, W, 3)")
    cd = d["class_dict"]
    if not isinstance(cd, dict) or not cd:
        raise DataError(f"{path}: field 'class_dict' must be a non-empty dict wnid -> indices")
    wnids = sorted(cd)
    n = images.shape[0]
    rows = []
    for w in wnids:
        try:
            idx = np.asarray(cd[w], dtype=np.int64).reshape(-1)
        except (TypeError, ValueError):
            raise DataError(f"{path}: field 'class_dict' entry '{w}' is not a list of "
                            "indices") from None
        if idx.size == 0 or idx.min() < 0 or idx.max() >= n:
            raise DataError(f"{path}: field 'class_dict' entry '{w}' has indices outside "
                            f"0..{n - 1} (or none)")
        rows.append(idx)
    with StoreWriter(out_path, wnids, dataset=dataset, split=split, source=path.name,
                     num_images=sum(r.size for r in rows)) as wr:
        for label, idx in enumerate(rows):
            wr.add(images[idx], label)
    return out_path


def read_split_csv(path: Path) -> List[tuple]:
    """Ravi split CSV -> [(filename, wnid)] in file order."""
    if not path.is_file():
        raise DataError(f"{path}: split CSV not found; put Ravi & Larochelle's train.csv/val.csv/"
                        "test.csv next to images/ or pass split_csvs=DIR")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["filename", "label"]:
            raise DataError(f"{path}:1: expected the header 'filename,label', got "
                            f"{','.join(header or [])!r}; use Ravi & Larochelle's split CSVs")
        out = []
        for lineno, row in enumerate(reader, 2):
            if not row:
                continue
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise DataError(f"{path}:{lineno}: expected 'filename,label', got {row}")
            out.append((row[0].strip(), row[1].strip()))
    if not out:
        raise DataError(f"{path}: split CSV has no rows")
    return out


def convert_folder(images_dir: Path, csv_path: Path, out_path: Path, split: str, *,
                   image_size: int = 84, decoder: Decoder, dataset: str = NAME) -> Path:
    rows = read_split_csv(csv_path)
    by_class: Dict[str, List[str]] = {}
    for fname, wnid in rows:
        by_class.setdefault(wnid, []).append(fname)
    wnids = sorted(by_class)

    imagenet: Dict[str, List[Path]] = {}

    def imagenet_files(wnid: str) -> List[Path]:
        """ImageNet train layout ``<wnid>/<wnid>_<N>.JPEG``, sorted by N."""
        if wnid not in imagenet:
            d = images_dir / wnid
            found = []
            if d.is_dir():
                for f in d.iterdir():
                    m = _IMAGENET_FILE.match(f.name)
                    if m and m.group(1) == wnid:
                        found.append((int(m.group(2)), f))
            imagenet[wnid] = [f for _, f in sorted(found)]
        return imagenet[wnid]

    def find(fname: str, wnid: str) -> Path:
        for cand in (images_dir / fname, images_dir / wnid / fname):
            if cand.is_file():
                return cand
        files = imagenet_files(wnid)
        m = _RAVI_FILE.match(fname)
        if files and m and m.group(1) == wnid:
            k = int(m.group(2))
            if not 1 <= k <= len(files):
                raise DataError(f"{csv_path}: '{fname}' asks for image {k} of class {wnid} but "
                                f"{images_dir / wnid} holds {len(files)}; use the full ImageNet "
                                "train folder of that class")
            return files[k - 1]
        raise DataError(f"{images_dir / fname}: image listed in {csv_path.name} not found (also "
                        f"looked in {wnid}/); the images folder does not match the split CSV")

    items = [(label, [(str(p), p) for p in (find(f, w) for f in by_class[w])])
             for label, w in enumerate(wnids)]  # every file is checked before writing
    decoder.start(len(rows))
    with StoreWriter(out_path, wnids, dataset=dataset, split=split,
                     source=f"{images_dir.name}/ + {csv_path.name}", num_images=len(rows)) as wr:
        write_classes(wr, decoder, items)
    return out_path


def convert(from_path, out_dir, *, splits=SPLITS, split_csvs: Optional[Path] = None,
            image_size: int = 84, workers: Optional[int] = None,
            dataset: str = NAME) -> List[Path]:
    """Convert pickle caches (preferred when present) or a JPEG folder + split CSVs."""
    p = require_dir(from_path, "pass the folder holding mini-imagenet-cache-*.pkl, or images/ "
                               "and Ravi's split CSVs")
    out_dir = Path(out_dir)
    for s in splits:
        if s not in SPLITS:
            raise DataError(f"unknown mini-imagenet split '{s}'; use train, val or test")
    caches = _cache_files(p)
    written = []
    if caches:
        todo = [s for s in splits if s in caches] if p.is_file() else list(splits)
        for s in todo:
            if s not in caches:
                raise DataError(f"{p}: {CACHE.format(split=s)} missing (found "
                                f"{', '.join(c.name for c in caches.values())})")
            written.append(convert_cache(caches[s], out_dir / f"{s}.h5", s, dataset))
        return written
    if p.is_file():
        raise DataError(f"{p}: expected a folder or a mini-imagenet-cache-<split>.pkl file")
    images_dir = p / "images" if (p / "images").is_dir() else \
        p / "train" if (p / "train").is_dir() else p
    csv_dir = Path(split_csvs) if split_csvs is not None else p
    if not any((csv_dir / f"{s}.csv").is_file() for s in splits):
        raise DataError(f"{p}: neither mini-imagenet-cache-*.pkl nor split CSVs "
                        f"({', '.join(s + '.csv' for s in splits)}) found; see "
                        "datasets/mini-imagenet/README.md")
    with Decoder((image_size, image_size), mode="RGB", workers=workers) as dec:
        for s in splits:
            written.append(convert_folder(images_dir, csv_dir / f"{s}.csv", out_dir / f"{s}.h5",
                                          s, image_size=image_size, decoder=dec, dataset=dataset))
    return written
