"""Bridge from learn2learn / torch datasets to image stores.

:func:`from_dataset` takes a ``learn2learn.data.MetaDataset`` (it uses its
``labels_to_indices`` table, so classes are streamed one by one without first iterating the
data set) or any labelled map-style ``torch.utils.data.Dataset`` returning ``(image, label)``
(``targets``/``labels`` attributes are used when present), and returns an in-memory
:class:`~fewshot.data.store.ImageStore` or, with ``path=``, writes a store file atomically.

Images may be PIL images, (H, W[, C]) arrays or (C, H, W) tensors; float images are taken to
lie in [0, 1] and scaled by 255 (rounded). Labels may be ints, 0-dim tensors or strings; the
store's classes are the distinct labels in sorted order, named ``str(label)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from fewshot.data.store import ImageStore, StoreWriter, write_store
from fewshot.errors import DataError


def to_uint8_hwc(x, *, where: str = "image", image_size: Optional[int] = None) -> np.ndarray:
    """One image -> uint8 (H, W, C)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(x, Image.Image):
        if x.mode not in ("L", "RGB"):
            x = x.convert("RGB" if x.mode in ("RGBA", "P", "CMYK", "YCbCr") else "L")
        if image_size is not None and x.size != (image_size, image_size):
            x = x.resize((image_size, image_size), Image.Resampling.LANCZOS)
        arr = np.asarray(x, dtype=np.uint8)
        return arr[:, :, None] if arr.ndim == 2 else arr
    try:
        import torch
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu()
            if t.ndim == 3 and t.shape[0] in (1, 3) and t.shape[2] not in (1, 3):
                t = t.permute(1, 2, 0)
            x = t.numpy()
    except ImportError:  # pragma: no cover
        pass
    arr = np.asarray(x)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise DataError(f"{where}: image of shape {arr.shape}; expected (H, W), (H, W, C) or "
                        "(C, H, W)")
    if arr.shape[0] in (1, 3) and arr.shape[2] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating):
            hi = float(np.nanmax(arr)) if arr.size else 0.0
            scale = 255.0 if hi <= 1.0 + 1e-6 else 1.0
            arr = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        elif np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
            arr = np.clip(arr.astype(np.int64) * (255 if arr.dtype == bool else 1), 0, 255
                          ).astype(np.uint8)
        else:
            raise DataError(f"{where}: image dtype {arr.dtype} is not numeric")
    if image_size is not None and arr.shape[:2] != (image_size, image_size):
        from PIL import Image as _I
        mode = "L" if arr.shape[2] == 1 else "RGB"
        img = _I.fromarray(arr[:, :, 0] if mode == "L" else arr, mode)
        arr = to_uint8_hwc(img.resize((image_size, image_size), _I.Resampling.LANCZOS))
    return np.ascontiguousarray(arr)


def _label_key(y):
    try:
        import torch
        if isinstance(y, torch.Tensor):
            y = y.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(y, np.generic):
        y = y.item()
    return y


def _sorted_labels(labels) -> list:
    try:
        return sorted(labels)
    except TypeError:
        return sorted(labels, key=str)


def _class_table(dataset) -> Optional[Dict[object, List[int]]]:
    table = getattr(dataset, "labels_to_indices", None)  # learn2learn MetaDataset
    if isinstance(table, dict) and table:
        return {_label_key(k): [int(i) for i in v] for k, v in table.items()}
    for attr in ("targets", "labels", "_labels"):
        ys = getattr(dataset, attr, None)
        if ys is not None and not callable(ys):
            try:
                ys = list(ys)
            except TypeError:
                continue
            if len(ys) == len(dataset):
                table: Dict[object, List[int]] = {}
                for i, y in enumerate(ys):
                    table.setdefault(_label_key(y), []).append(i)
                return table
    return None


def from_dataset(dataset, *, name: str = "custom", split: str = "train",
                 path: Optional[Union[str, Path]] = None, image_size: Optional[int] = None,
                 class_names: Optional[Sequence[str]] = None,
                 source: Optional[str] = None) -> Union[ImageStore, Path]:
    """Convert a learn2learn MetaDataset or labelled torch Dataset into a store.

    Returns an in-memory :class:`ImageStore` when ``path`` is None, else writes ``path``
    (atomically, class by class when the class table is known) and returns it."""
    src = source or type(getattr(dataset, "dataset", dataset)).__name__
    try:
        n = len(dataset)
    except TypeError:
        raise DataError(f"{src}: the dataset has no len(); pass a map-style Dataset") from None
    if n == 0:
        raise DataError(f"{src}: the dataset is empty")

    item = _item_reader(dataset, src, image_size)
    table = _class_table(dataset)
    if table is not None:
        keys = _sorted_labels(table)
        names = _class_names(class_names, keys, src)
        if path is None:
            xs, ys = [], []
            for c, k in enumerate(keys):
                for i in table[k]:
                    xs.append(item(i)[0])
                    ys.append(c)
            return ImageStore.from_arrays(_stack(xs, src), np.array(ys), names, dataset=name,
                                          split=split, source=src)
        with StoreWriter(path, names, dataset=name, split=split, source=src,
                         num_images=n) as w:
            for c, k in enumerate(keys):
                w.add(_stack([item(i)[0] for i in table[k]], src), c)
        return Path(path)
    xs, raw = [], []
    for i in range(n):
        x, y = item(i)
        xs.append(x)
        raw.append(y)
    keys = _sorted_labels(set(raw))
    index = {k: c for c, k in enumerate(keys)}
    ys = np.array([index[y] for y in raw], dtype=np.int64)
    names = _class_names(class_names, keys, src)
    images = _stack(xs, src)
    if path is None:
        return ImageStore.from_arrays(images, ys, names, dataset=name, split=split, source=src)
    return write_store(path, images, ys, names, dataset=name, split=split, source=src)


def _item_reader(dataset, src: str, image_size: Optional[int]):
    """``item(i) -> (uint8 HWC image, label key)`` of ``dataset[i]``, with one-line errors."""

    def item(i: int):
        try:
            got = dataset[i]
        except Exception as e:  # a user dataset may raise anything
            raise DataError(f"{src}[{i}]: reading the item failed ({type(e).__name__}: {e})") \
                from None
        if not isinstance(got, (tuple, list)) or len(got) < 2:
            raise DataError(f"{src}[{i}]: expected an (image, label) pair, got "
                            f"{type(got).__name__}")
        return to_uint8_hwc(got[0], where=f"{src}[{i}]", image_size=image_size), \
            _label_key(got[1])

    return item


def _class_names(class_names: Optional[Sequence[str]], keys, src: str) -> List[str]:
    """The given class names (one per class), else the labels as strings."""
    names = list(class_names) if class_names is not None else [str(k) for k in keys]
    if len(names) != len(keys):
        raise DataError(f"{src}: {len(names)} class names for {len(keys)} classes")
    return names


def _stack(xs: List[np.ndarray], src: str) -> np.ndarray:
    shapes = {x.shape for x in xs}
    if len(shapes) > 1:
        raise DataError(f"{src}: images have different shapes {sorted(shapes)[:3]}; pass "
                        "image_size=N to resize them all")
    return np.stack(xs)
