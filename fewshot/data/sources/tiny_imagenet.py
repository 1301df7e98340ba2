"""Tiny ImageNet (CS231n, 200 classes of 64x64 images) from the official
``tiny-imagenet-200/`` tree (``tiny-imagenet-200.zip``, extracted)::

    wnids.txt                       200 class wnids, one per line (store class order)
    words.txt                       optional: wnid <TAB> human-readable name
    train/<wnid>/images/*.JPEG      500 images per class
    val/images/*.JPEG               10000 images
    val/val_annotations.txt         <file> <TAB> <wnid> <TAB> x0 y0 x1 y1

Splits: ``train`` (100000 images) and ``val`` (the official validation set, 50 per class; the
official test set has no labels, so ``val`` is the split to report test accuracy on, as the
MLTP paper does). A few images are grayscale JPEGs; every image is converted to RGB.
``image_size`` (default 64) resizes with a Lanczos filter when different.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from fewshot.data.sources import Decoder, read_text_lines, require_dir, write_classes
from fewshot.data.store import StoreWriter
from fewshot.errors import DataError

NAME = "tiny-imagenet"
FOLDER = "tiny-imagenet-200"


def locate(from_path: Path) -> Path:
    p = require_dir(from_path, f"pass the extracted {FOLDER}/ folder")
    if (p / FOLDER / "wnids.txt").is_file():
        return p / FOLDER
    if (p / "wnids.txt").is_file():
        return p
    raise DataError(f"{p}: no wnids.txt here or in {FOLDER}/; pass the extracted official "
                    f"{FOLDER}.zip folder")


def _listing(folder: Path) -> Dict[str, List[Path]]:
    root = locate(folder)
    wnids = [line for _, line in read_text_lines(root / "wnids.txt")]
    if len(set(wnids)) != len(wnids):
        raise DataError(f"{root / 'wnids.txt'}: duplicate wnids")
    train: Dict[str, List[Path]] = {}
    for w in wnids:
        d = root / "train" / w / "images"
        if not d.is_dir():
            raise DataError(f"{d}: missing train folder of class {w} (listed in wnids.txt); the "
                            f"{FOLDER}/ tree is incomplete")
        train[w] = sorted(f for f in d.iterdir() if f.suffix.lower() in (".jpeg", ".jpg", ".png"))
    ann = root / "val" / "val_annotations.txt"
    val: Dict[str, List[Path]] = {w: [] for w in wnids}
    if ann.is_file():
        for lineno, line in read_text_lines(ann):
            cols = line.split("\t")
            if len(cols) < 2:
                raise DataError(f"{ann}:{lineno}: expected '<file>\\t<wnid>\\t...', got '{line}'")
            if cols[1] not in val:
                raise DataError(f"{ann}:{lineno}: wnid '{cols[1]}' is not in wnids.txt")
            val[cols[1]].append(root / "val" / "images" / cols[0])
    return {"root": root, "wnids": wnids, "train": train,
            "val": {w: sorted(v) for w, v in val.items()} if ann.is_file() else None}


def convert(from_path, out_dir, *, splits=("train", "val"), image_size: int = 64,
            workers: Optional[int] = None, dataset: str = NAME) -> List[Path]:
    """Convert the official Tiny ImageNet tree into ``train``/``val`` stores."""
    lst = _listing(Path(from_path))
    root, wnids = lst["root"], lst["wnids"]
    words = {}
    if (root / "words.txt").is_file():
        for _, line in read_text_lines(root / "words.txt"):
            parts = line.split("\t", 1)
            if len(parts) == 2:
                words[parts[0]] = parts[1]
    out_dir = Path(out_dir)
    written = []
    with Decoder((image_size, image_size), mode="RGB", workers=workers) as dec:
        dec.start(sum(len(v) for s in splits if lst.get(s) for v in lst[s].values()))
        for split in splits:
            if split not in ("train", "val"):
                raise DataError(f"unknown tiny-imagenet split '{split}'; use train or val (the "
                                "official test set has no labels)")
            files = lst[split]
            if files is None:
                raise DataError(f"{root / 'val' / 'val_annotations.txt'}: missing; cannot "
                                "label the validation images")
            info = {"words": [words.get(w, "") for w in wnids]}
            path = out_dir / f"{split}.h5"
            with StoreWriter(path, wnids, dataset=dataset, split=split,
                             source=f"{FOLDER}/{split}", class_info=info,
                             num_images=sum(len(v) for v in files.values())) as w:
                write_classes(w, dec, ((label, [(str(f), f) for f in files[wnid]])
                                       for label, wnid in enumerate(wnids)))
            written.append(path)
    return written
