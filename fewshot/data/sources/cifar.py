"""CIFAR-10 / CIFAR-100 (Krizhevsky, 2009) from the official "python version" pickles.

* ``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5`` (train), ``test_batch``,
  ``batches.meta`` (``label_names``). Store classes: the 10 label names.
* ``cifar-100-python/``: ``train``, ``test``, ``meta`` (``fine_label_names``,
  ``coarse_label_names``). Store classes: the 100 fine labels; ``class_info["superclass"]``
  holds each fine class's coarse label name.

Every batch is a dict with ``data`` (n, 3072) uint8 (1024 red, 1024 green, 1024 blue values
of a 32x32 image, row-major) and ``labels`` / ``fine_labels``; they are read with
:func:`fewshot.data.safe_pickle.safe_load` (``encoding="bytes"``, as the official loader) and
reshaped to (n, 32, 32, 3). Splits: ``train`` (50000 images), ``test`` (10000).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from fewshot.data.safe_pickle import safe_load
from fewshot.data.sources import require_dir
from fewshot.data.store import write_store
from fewshot.errors import DataError

LAYOUTS = {
    "cifar10": {"folder": "cifar-10-batches-py", "meta": "batches.meta", "names": "label_names",
                "labels": "labels",
                "splits": {"train": [f"data_batch_{i}" for i in range(1, 6)],
                           "test": ["test_batch"]}},
    "cifar100": {"folder": "cifar-100-python", "meta": "meta", "names": "fine_label_names",
                 "labels": "fine_labels",
                 "splits": {"train": ["train"], "test": ["test"]}},
}


def _get(d: dict, key: str, path: Path):
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a pickled dict (a CIFAR batch), got "
                        f"{type(d).__name__}; pass the official python-version folder")
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    have = ", ".join(sorted(k.decode() if isinstance(k, bytes) else str(k) for k in d))
    raise DataError(f"{path}: field '{key}' missing (has: {have}); this is not a "
                    "CIFAR python-version batch")


def _strings(values, path: Path, field: str) -> List[str]:
    try:
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
    except (TypeError, UnicodeDecodeError):
        raise DataError(f"{path}: field '{field}' is not a list of names") from None


def locate(from_path: Path, name: str) -> Path:
    folder = LAYOUTS[name]["folder"]
    p = require_dir(from_path, f"pass the extracted {folder}/ folder (or its parent)")
    if p.is_file():
        raise DataError(f"{p}: expected the extracted {folder}/ folder, not a file; extract the "
                        f"official {folder.replace('-batches-py', '').replace('-python', '')}"
                        "-python.tar.gz first")
    if (p / folder).is_dir():
        return p / folder
    if (p / LAYOUTS[name]["meta"]).is_file():
        return p
    raise DataError(f"{p}: no {folder}/ folder and no {LAYOUTS[name]['meta']} file; pass the "
                    f"extracted official {folder}/ folder")


def read_batches(folder: Path, name: str, split: str, label_fields=None):
    """-> images (n, 32, 32, 3) uint8 and {field: (n,) int64} of one split; ``label_fields``
    defaults to the variant's class labels (``labels`` / ``fine_labels``); CIFAR-100 batches
    also hold ``coarse_labels``."""
    lay = LAYOUTS[name]
    fields = tuple(label_fields or (lay["labels"],))
    xs, ys = [], {f: [] for f in fields}
    for fname in lay["splits"][split]:
        path = folder / fname
        if not path.is_file():
            raise DataError(f"{path}: missing CIFAR batch file; the {lay['folder']}/ folder is "
                            "incomplete, extract the official archive again")
        d = safe_load(path, encoding="bytes")
        data = np.asarray(_get(d, "data", path))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{path}: field 'data' is {data.dtype} {data.shape}, expected uint8 "
                            "(n, 3072); the file is not an official CIFAR batch")
        for f in fields:
            labels = np.asarray(_get(d, f, path))
            if labels.shape != (data.shape[0],):
                raise DataError(f"{path}: field '{f}' has {labels.size} labels for "
                                f"{data.shape[0]} images")
            ys[f].append(labels.astype(np.int64))
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return np.concatenate(xs), {f: np.concatenate(v) for f, v in ys.items()}


def read_split(folder: Path, name: str, split: str):
    """-> images (n, 32, 32, 3) uint8, labels (n,) int64 of one split."""
    images, labels = read_batches(folder, name, split)
    return images, labels[LAYOUTS[name]["labels"]]


def read_meta(folder: Path, name: str) -> Dict[str, List[str]]:
    """The variant's class names (``"names"``) and, for CIFAR-100, ``"coarse"`` names."""
    lay = LAYOUTS[name]
    meta_path = folder / lay["meta"]
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: missing; the {lay['folder']}/ folder is incomplete")
    meta = safe_load(meta_path, encoding="bytes")
    out = {"names": _strings(_get(meta, lay["names"], meta_path), meta_path, lay["names"])}
    if name == "cifar100":
        out["coarse"] = _strings(_get(meta, "coarse_label_names", meta_path), meta_path,
                                 "coarse_label_names")
    return out


def convert(from_path, out_dir, *, name: str = "cifar10", splits=("train", "test"),
            dataset: Optional[str] = None) -> List[Path]:
    """Convert the official CIFAR python pickles of ``name`` ('cifar10'/'cifar100')."""
    if name not in LAYOUTS:
        raise DataError(f"unknown CIFAR variant '{name}'; use cifar10 or cifar100")
    folder = locate(Path(from_path), name)
    lay = LAYOUTS[name]
    meta = read_meta(folder, name)
    class_names = meta["names"]
    info: Dict[str, List[str]] = {}
    out_dir = Path(out_dir)
    written = []
    for split in splits:
        if split not in lay["splits"]:
            raise DataError(f"unknown CIFAR split '{split}'; use train or test")
        fields = (lay["labels"], "coarse_labels") if name == "cifar100" else None
        images, got = read_batches(folder, name, split, fields)
        labels = got[lay["labels"]]
        if labels.min() < 0 or labels.max() >= len(class_names):
            raise DataError(f"{folder}: labels of '{split}' outside 0..{len(class_names) - 1}")
        if name == "cifar100":
            info = {"superclass": superclass_names(labels, got["coarse_labels"], meta)}
        written.append(write_store(out_dir / f"{split}.h5", images, labels, class_names,
                                   dataset=dataset or name, split=split,
                                   source=f"{lay['folder']}/{'+'.join(lay['splits'][split])}",
                                   class_info=info or None))
    return written


def superclass_names(fine: np.ndarray, coarse: np.ndarray, meta: Dict[str, List[str]]) -> List[str]:
    """Each fine class's coarse (superclass) name, from the per-image label pairs."""
    sup = [""] * len(meta["names"])
    for f, c in zip(fine, coarse):
        sup[f] = meta["coarse"][int(c)]
    return sup
