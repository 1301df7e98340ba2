"""tiered-ImageNet (Ren et al., 2018): 608 ImageNet classes grouped into 34 high-level
categories, split by category into 351 train / 97 val / 160 test classes, 84x84 RGB.

Input: the files of Ren et al.'s release (also what learn2learn downloads), in ``from_path``
or ``from_path/tiered-imagenet/``:

* ``{split}_images_png.pkl``: a list (or object array) of PNG-encoded images, each a uint8
  array or ``bytes``;
* ``{split}_labels.pkl``: a dict with ``label_specific`` (N,) class ids,
  ``label_specific_str`` (class wnids), and optionally ``label_general`` /
  ``label_general_str`` (category ids / wnids).

Both pickles go through the allow-list unpickler. The encoded images are decoded class by class
(in a small process pool) straight into the store, so the decoded split (9.5 GB for train) is
never held in memory, only the encoded list and one class. Store classes are the
``label_specific`` ids in order, named by ``label_specific_str``;
``class_info["category"]`` holds each class's high-level category.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np

from fewshot.data.safe_pickle import safe_load
from fewshot.data.sources import Decoder, require_dir, write_classes
from fewshot.data.store import StoreWriter
from fewshot.errors import DataError

NAME = "tiered-imagenet"
SPLITS = ("train", "val", "test")


def _find(p: Path, fname: str) -> Path:
    for base in (p, p / "tiered-imagenet", p / "tiered_imagenet"):
        if (base / fname).is_file():
            return base / fname
    raise DataError(f"{p}: {fname} not found (also looked in tiered-imagenet/); pass the folder "
                    "of Ren et al.'s tiered-ImageNet pickles")


def _labels(path: Path) -> dict:
    d = safe_load(path)
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a dict of label arrays, got {type(d).__name__}")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "label_specific" not in d:
        raise DataError(f"{path}: field 'label_specific' missing (has {sorted(d)}); this is not "
                        "a tiered-ImageNet labels pickle")
    return d


def _strs(values) -> List[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def convert_split(images_path: Path, labels_path: Path, out_path: Path, split: str, *,
                  decoder: Decoder, dataset: str = NAME) -> Path:
    lab = _labels(labels_path)
    try:
        specific = np.asarray(lab["label_specific"], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{labels_path}: field 'label_specific' is not an integer array") from None
    k = int(specific.max()) + 1 if specific.size else 0
    if specific.size == 0 or specific.min() < 0:
        raise DataError(f"{labels_path}: field 'label_specific' is empty or negative")
    names = _strs(lab["label_specific_str"]) if "label_specific_str" in lab else \
        [f"class{c:04d}" for c in range(k)]
    if len(names) < k:
        raise DataError(f"{labels_path}: field 'label_specific_str' names {len(names)} classes "
                        f"but 'label_specific' uses {k}")
    names = names[:k]
    info = None
    if "label_general" in lab:
        general = np.asarray(lab["label_general"], dtype=np.int64).reshape(-1)
        if general.shape != specific.shape:
            raise DataError(f"{labels_path}: field 'label_general' has {general.size} entries for "
                            f"{specific.size} images")
        gnames = _strs(lab["label_general_str"]) if "label_general_str" in lab else None
        cat = [""] * k
        for c in range(k):
            g = np.unique(general[specific == c])
            if g.size > 1:
                raise DataError(f"{labels_path}: class {names[c]} belongs to several categories "
                                f"{g.tolist()} in 'label_general'")
            if g.size:
                cat[c] = gnames[g[0]] if gnames and g[0] < len(gnames) else str(int(g[0]))
        info = {"category": cat}
    encoded = safe_load(images_path)
    if not isinstance(encoded, (list, tuple, np.ndarray)):
        raise DataError(f"{images_path}: expected a list of PNG-encoded images, got "
                        f"{type(encoded).__name__}")
    if len(encoded) != specific.size:
        raise DataError(f"{images_path}: {len(encoded)} images but {labels_path.name} has "
                        f"{specific.size} labels; the two files are from different splits")
    order = np.argsort(specific, kind="stable")
    bounds = np.searchsorted(specific[order], np.arange(k + 1))

    def encoded_class(c: int):
        items = []
        for i in order[bounds[c]:bounds[c + 1]]:
            e = encoded[int(i)]
            if isinstance(e, np.ndarray):
                e = e.tobytes()
            elif not isinstance(e, (bytes, bytearray)):
                raise DataError(f"{images_path}[{int(i)}]: expected PNG bytes, got "
                                f"{type(e).__name__}")
            items.append((f"{images_path}[{int(i)}]", bytes(e)))
        return c, items

    decoder.start(specific.size)
    with StoreWriter(out_path, names, dataset=dataset, split=split, class_info=info,
                     source=f"{images_path.name} + {labels_path.name}",
                     num_images=specific.size) as w:
        write_classes(w, decoder, (encoded_class(c) for c in range(k)))
    return out_path


def convert(from_path, out_dir, *, splits=SPLITS, image_size: Optional[int] = None,
            workers: Optional[int] = None, dataset: str = NAME) -> List[Path]:
    """Convert ``{split}_images_png.pkl`` + ``{split}_labels.pkl`` for each split."""
    p = require_dir(from_path, "pass the folder of the tiered-ImageNet pickles")
    out_dir = Path(out_dir)
    size = (int(image_size), int(image_size)) if image_size else None
    written = []
    for s in splits:
        if s not in SPLITS:
            raise DataError(f"unknown tiered-imagenet split '{s}'; use train, val or test")
    with Decoder(size, mode="RGB", workers=workers) as dec:
        for s in splits:
            images = _find(p, f"{s}_images_png.pkl")
            try:
                labels = _find(p, f"{s}_labels.pkl")
            except DataError:
                labels = _find(p, f"{s}_labels_png.pkl")
            written.append(convert_split(images, labels, out_dir / f"{s}.h5", s, decoder=dec,
                                         dataset=dataset))
    return written
