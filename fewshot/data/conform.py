"""Bring a store's images to another shape (size and channels), as its converter would have.

Cross-domain evaluation (a run trained on one dataset, evaluated on another) and multi-source
training (episodes from several datasets for one learner) need every image in the shape the
learner was built for, ``(H, W, C)``. Stores are written by the converters of
:mod:`fewshot.data.sources`, which decode each image with PIL, convert its mode first and then
resize it with a Lanczos filter (``decode_image``); :func:`conform_images` applies the same two
steps to a store's uint8 images, so an image reaches the learner as if its dataset had been
prepared at the learner's size and channel count:

1. channels (PIL ``Image.convert``): RGB -> L is the ITU-R 601-2 luma transform
   ``L = R·299/1000 + G·587/1000 + B·114/1000`` (rounded by PIL); L -> RGB repeats the grey
   value in the three channels;
2. size (PIL ``Image.resize``): Lanczos (``Image.Resampling.LANCZOS``, antialiased when
   shrinking, as PIL's filters always are) to ``W x H``; an image already of that size is
   left as it is.

Normalisation is not changed here: a sampler normalises a store by that store's own
per-channel statistics (the rule every episodic run already follows on its own test split),
so :func:`conform_store` recomputes ``mean``/``std`` exactly (256-bin histograms, as the store
writer does) over the *converted* images of the split.

A conformed store is in memory when the converted images fit (:func:`fits_in_memory`), else
lazy: rows are read from the source store and converted per episode.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from fewshot.data.store import (BLOCK_IMAGES, ImageStore, _channel_hist, _stats_from_hist,
                                fits_in_memory)
from fewshot.data.sources import converted
from fewshot.errors import DataError

__all__ = ["MODES", "conform_images", "conform_store", "describe_conversion"]

#: PIL mode of each channel count
MODES = {1: "L", 3: "RGB"}


def _mode(channels: int, what: str) -> str:
    if channels not in MODES:
        raise DataError(f"{what} has {channels} channels; only 1 (L) and 3 (RGB) channel images "
                        "can be converted")
    return MODES[channels]


def conform_images(images: np.ndarray, shape: Sequence[int], *, what: str = "images") -> np.ndarray:
    """uint8 ``(n, h, w, c)`` -> uint8 ``(n, H, W, C)`` for ``shape = (H, W, C)``: each image's
    mode converted (RGB -> L by ITU-R 601-2 luma, L -> RGB by repetition), then resized with
    Lanczos (see the module docstring). Images already of ``shape`` are returned unchanged."""
    from PIL import Image

    images = np.asarray(images)
    h, w, c = (int(s) for s in shape)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise DataError(f"{what}: expected uint8 (n, H, W, C) images, got {images.dtype} "
                        f"{images.shape}")
    if tuple(images.shape[1:]) == (h, w, c):
        return images
    src, dst = _mode(images.shape[3], what), _mode(c, f"target shape {tuple(shape)}")
    out = np.empty((images.shape[0], h, w, c), dtype=np.uint8)
    for i, arr in enumerate(images):
        img = Image.fromarray(arr[..., 0] if src == "L" else arr, src)
        out[i] = converted(img, dst, (h, w)).reshape(h, w, c)
    return out


def describe_conversion(source_shape: Sequence[int], shape: Sequence[int]) -> str:
    """A short phrase naming what :func:`conform_images` does between two shapes (for reports)."""
    sh, sw, sc = (int(s) for s in source_shape)
    h, w, c = (int(s) for s in shape)
    steps = []
    if sc != c:
        steps.append("RGB->L (ITU-R 601-2 luma)" if c == 1 else "L->RGB (repeated)")
    if (sh, sw) != (h, w):
        steps.append(f"{sh}x{sw}->{h}x{w} Lanczos")
    return ", ".join(steps) or "none"


class _ConformedImages:
    """Read-only array-like: rows of a source store converted to ``shape`` on every read."""

    def __init__(self, source: ImageStore, shape: Tuple[int, int, int]):
        self.source = source
        self.shape = (len(source),) + tuple(shape)
        self.dtype = np.dtype(np.uint8)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            key = np.arange(*key.indices(self.shape[0]))
        idx = np.asarray(key, dtype=np.int64).reshape(-1)
        return conform_images(self.source.read(idx), self.shape[1:], what=_name(self.source))


def _name(store) -> str:
    return f"store {store.dataset}/{store.split}"


def conform_store(store: ImageStore, shape: Sequence[int],
                  in_memory: Optional[bool] = None) -> ImageStore:
    """``store`` with its images brought to ``shape = (H, W, C)`` (the same store when they
    already have it): classes, labels and names kept, statistics recomputed over the converted
    images, ``source`` noting the conversion. ``in_memory=None``: in memory when the converted
    images fit. Closing the result closes ``store``."""
    shape = tuple(int(s) for s in shape)
    if tuple(store.image_shape) == shape:
        return store
    lazy = _ConformedImages(store, shape)
    n = len(store)
    if in_memory is None:
        in_memory = fits_in_memory(n * int(np.prod(shape)))
    hist = np.zeros((shape[2], 256), dtype=np.int64)
    blocks = []
    for start in range(0, n, BLOCK_IMAGES):
        block = lazy[np.arange(start, min(n, start + BLOCK_IMAGES))]
        hist += _channel_hist(block)
        if in_memory:
            blocks.append(block)
    mean, std = _stats_from_hist(hist) if n else ((0.0,) * shape[2], (1.0,) * shape[2])
    images = (np.concatenate(blocks) if blocks else np.empty((0,) + shape, np.uint8)) \
        if in_memory else lazy
    conversion = describe_conversion(store.image_shape, shape)
    out = ImageStore(images=images, labels=store.labels, class_names=store.class_names,
                     dataset=store.dataset, split=store.split,
                     source=f"{store.source} [conformed: {conversion}]", mean=mean, std=std,
                     path=store.path, in_memory=bool(in_memory), checksum=store.checksum,
                     class_info=store.class_info, _parts=None if in_memory else [store])
    if in_memory:
        store.close()
    return out
