"""HDF5 image stores: one file per dataset split, the only format samplers read.

Layout of ``<root>/<dataset>/<split>.h5`` (``FORMAT_VERSION`` 1)::

    /images          uint8 (N, H, W, C), chunked by image (small images a few per 16 KiB chunk),
                     each chunk with a Fletcher-32 checksum
    /labels          int64 (N,), sorted ascending: class c occupies rows [offsets[c], offsets[c+1]);
                     chunked, Fletcher-32 checksummed
    /class_offsets   int64 (K + 1,)
    /class_names     utf-8 strings (K,)   (e.g. ImageNet wnids, ``Alphabet/characterNN/rot090``)
    /class_info/<k>  optional utf-8 strings (K,) per class (e.g. tiered-ImageNet's category)
    attrs: magic, format_version, dataset, split, source, image_shape, num_images, num_classes,
           mean, std (per channel, pixel values scaled to [0, 1]), checksum ("sha256:<hex>" of the
           image bytes in row order), complete (True only once everything above is written)

The per-channel statistics are the population moments over every pixel of the split,
``mean_c = (1/M) Σ x_c`` and ``std_c = sqrt((1/M) Σ x_c² − mean_c²)`` with ``x = pixel/255`` and
``M = N·H·W``; they are computed exactly from per-channel 256-bin histograms while writing.

Writing is atomic: :class:`StoreWriter` writes ``<name>.tmp-<pid>`` next to the target and
``os.replace``-s it only after every dataset and the ``complete`` attribute are written; on any
exception the temporary file is removed, so a store on disk is always whole.

Integrity: HDF5 verifies a chunk's Fletcher-32 checksum (h5py ``fletcher32=True``) every time
the chunk is read, so a byte flipped on disk fails the read that touches it (loading into memory,
a lazy episode read, ``fewshot data verify``) with a one-line :class:`DataError` that names the
file and says to re-run ``fewshot data prepare NAME``; the sha256 ``checksum`` attribute is the
whole-file check that ``fewshot data verify`` adds. Stores written before the checksums (contiguous
or chunked without the filter, same ``FORMAT_VERSION``) open and read as before, unchecked.

Reading: a store small enough is loaded into memory (one contiguous ``numpy`` array, wrapped by
:meth:`ImageStore.images_tensor` without a copy); otherwise images stay on disk and
:meth:`ImageStore.read` fetches only the rows an episode needs (sorted, de-duplicated h5py reads
through a small chunk cache), so resident memory stays bounded whatever the file size.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import h5py
import numpy as np

from fewshot.errors import DataError

FORMAT_VERSION = 1
MAGIC = "fewshot.ImageStore"
#: h5py raw-data chunk cache per lazily opened store (bytes); keeps lazy reads' memory bounded.
CHUNK_CACHE_BYTES = 4 * 1024 * 1024
#: Minimum bytes per HDF5 chunk: small images are grouped a few per chunk (28x28: 20, one
#: Omniglot character; 32x32x3: 5), larger ones (84x84x3) get one each. Fewer, larger chunks
#: cut HDF5's per-chunk cost of checksumming (benchmarks/perf/store_checksums.py).
MIN_CHUNK_BYTES = 16384
#: Rows per chunk of the labels dataset (int64: 64 KiB per chunk).
LABEL_CHUNK_ROWS = 8192
#: Images processed per block while writing / verifying (bounds the writer's temporary memory).
BLOCK_IMAGES = 512

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------- paths
def data_root(root: Optional[PathLike] = None) -> Path:
    """The data root: ``root`` if given, else ``$FEWSHOT_DATA``, else ``./datasets``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("FEWSHOT_DATA")
    if env:
        return Path(env).expanduser()
    return Path("datasets")


def store_path(dataset: str, split: str, root: Optional[PathLike] = None) -> Path:
    """Path of the store of one dataset split: ``<root>/<dataset>/<split>.h5``."""
    return data_root(root) / dataset / f"{split}.h5"


def _available_memory() -> Optional[int]:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def fits_in_memory(nbytes: int) -> bool:
    """Whether ``nbytes`` of images should be loaded into memory by default.

    True when the images take at most a quarter of the currently available memory (at most
    1 GiB when that cannot be read), or ``$FEWSHOT_IN_MEMORY_MAX`` bytes when set.
    """
    env = os.environ.get("FEWSHOT_IN_MEMORY_MAX")
    if env:
        try:
            return nbytes <= int(float(env))
        except ValueError:
            raise DataError(f"$FEWSHOT_IN_MEMORY_MAX={env!r} is not a number of bytes; "
                            "set it to e.g. 2e9 or unset it") from None
    avail = _available_memory()
    limit = avail // 4 if avail else 1 << 30
    return nbytes <= limit


def _offsets_from_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    counts = np.bincount(labels, minlength=num_classes) if labels.size else np.zeros(num_classes, np.int64)
    offsets = np.zeros(num_classes + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


def _stats_from_hist(hist: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of pixel/255 from (C, 256) integer histograms (exact)."""
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for h in hist:
        m = float(h.sum())
        if m == 0:
            means.append(0.0)
            stds.append(1.0)
            continue
        mu = float((h * values).sum() / m)
        var = float((h * (values - mu) ** 2).sum() / m)
        means.append(mu)
        stds.append(float(np.sqrt(max(var, 0.0))))
    return tuple(means), tuple(stds)


def _channel_hist(block: np.ndarray) -> np.ndarray:
    c = block.shape[-1]
    flat = block.reshape(-1, c)
    return np.stack([np.bincount(flat[:, k], minlength=256) for k in range(c)]).astype(np.int64)


# --------------------------------------------------------------------------------------- writer
class StoreWriter:
    """Stream images into a new store, class by class, atomically.

    Usage::

        with StoreWriter(path, class_names, dataset="omniglot", split="train",
                         source="images_background.zip") as w:
            w.add(images, labels)   # (n,H,W,C) or (n,H,W) uint8; labels non-decreasing overall

    Rows must arrive in non-decreasing label order (class by class). Nothing appears at ``path``
    until the ``with`` block exits without an exception; then per-channel statistics, the sha256
    checksum and ``complete=True`` are written and the temporary file is renamed into place.
    Every class must have at least one image.
    """

    def __init__(self, path: PathLike, class_names: Sequence[str], *, dataset: str, split: str,
                 source: str, image_shape: Optional[Sequence[int]] = None,
                 num_images: Optional[int] = None,
                 class_info: Optional[Mapping[str, Sequence[str]]] = None,
                 attrs: Optional[Mapping[str, object]] = None):
        self.path = Path(path)
        self.class_names = [str(c) for c in class_names]
        if not self.class_names:
            raise DataError(f"{self.path}: cannot write a store with no classes")
        if len(set(self.class_names)) != len(self.class_names):
            dup = sorted({c for c in self.class_names if self.class_names.count(c) > 1})[:3]
            raise DataError(f"{self.path}: duplicate class names {dup}; class names must be unique")
        self.dataset, self.split, self.source = str(dataset), str(split), str(source)
        self.image_shape = tuple(int(s) for s in image_shape) if image_shape is not None else None
        self.num_images_hint = num_images
        self.class_info = {k: [str(x) for x in v] for k, v in (class_info or {}).items()}
        for k, v in self.class_info.items():
            if len(v) != len(self.class_names):
                raise DataError(f"{self.path}: class_info '{k}' has {len(v)} entries for "
                                f"{len(self.class_names)} classes")
        self.extra_attrs = dict(attrs or {})
        self.tmp_path = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        self._file: Optional[h5py.File] = None
        self._images = None
        self._n = 0  # rows added
        self._written = 0  # rows written to the file (the rest wait in _pending)
        self._pending: list[np.ndarray] = []
        self._pending_n = 0
        self._labels: list[np.ndarray] = []
        self._last_label = -1
        self._sha = hashlib.sha256()
        self._hist: Optional[np.ndarray] = None

    # -- context manager
    def __enter__(self) -> "StoreWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(self.path)
        self._file = h5py.File(self.tmp_path, "w")
        if self.image_shape is not None:
            self._create_images(self.image_shape)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self._finish()
            except BaseException:
                self._abort()
                raise
        else:
            self._abort()

    # -- internals
    def _create_images(self, shape: tuple) -> None:
        if len(shape) != 3 or min(shape) < 1:
            raise DataError(f"{self.path}: image shape {shape} is not (H, W, C)")
        self.image_shape = tuple(int(s) for s in shape)
        per = int(np.prod(self.image_shape))
        k = max(1, MIN_CHUNK_BYTES // per)
        n0 = int(self.num_images_hint) if self.num_images_hint else 0
        self._images = self._file.create_dataset(
            "images", shape=(n0,) + self.image_shape, maxshape=(None,) + self.image_shape,
            dtype=np.uint8, chunks=(k,) + self.image_shape, fletcher32=True)
        self._hist = np.zeros((self.image_shape[2], 256), dtype=np.int64)

    def add(self, images: np.ndarray, labels: Union[int, Sequence[int], np.ndarray]) -> None:
        """Append rows. ``labels`` is one class index for all rows or one per row."""
        if self._file is None:
            raise DataError(f"{self.path}: StoreWriter.add called outside its `with` block")
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise DataError(f"{self.path}: images must be uint8, got {images.dtype}; convert "
                            "pixels to 0..255 uint8 before writing")
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4:
            raise DataError(f"{self.path}: images must be (n, H, W, C), got shape {images.shape}")
        n = images.shape[0]
        if np.ndim(labels) == 0:
            lab = np.full(n, int(labels), dtype=np.int64)
        else:
            lab = np.asarray(labels, dtype=np.int64).reshape(-1)
        if lab.shape[0] != n:
            raise DataError(f"{self.path}: {n} images but {lab.shape[0]} labels")
        if n == 0:
            return
        if self._images is None:
            self._create_images(images.shape[1:])
        if tuple(images.shape[1:]) != self.image_shape:
            raise DataError(f"{self.path}: image of shape {tuple(images.shape[1:])} in a store of "
                            f"{self.image_shape} images; resize every image to one size")
        if lab.min() < 0 or lab.max() >= len(self.class_names):
            raise DataError(f"{self.path}: label {int(lab.max() if lab.max() >= 0 else lab.min())} "
                            f"outside 0..{len(self.class_names) - 1}")
        if lab[0] < self._last_label or np.any(np.diff(lab) < 0):
            raise DataError(f"{self.path}: rows must be added in class order (labels "
                            "non-decreasing); sort by label or use write_store")
        self._last_label = int(lab[-1])
        self._labels.append(lab)
        self._n += n
        if n >= BLOCK_IMAGES:
            self._flush()
            self._write_rows(images)
        else:  # small adds (one class of 20 images) are gathered into blocks: fewer h5py calls
            self._pending.append(np.array(images, copy=True))
            self._pending_n += n
            if self._pending_n >= BLOCK_IMAGES:
                self._flush()

    def _flush(self) -> None:
        if self._pending:
            block = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._pending, self._pending_n = [], 0
            self._write_rows(block)

    def _write_rows(self, images: np.ndarray) -> None:
        n = images.shape[0]
        end = self._written + n
        if end > self._images.shape[0]:
            self._images.resize(max(end, int(self._images.shape[0] * 1.25)), axis=0)
        for s in range(0, n, BLOCK_IMAGES):
            block = np.ascontiguousarray(images[s:s + BLOCK_IMAGES])
            self._images[self._written + s:self._written + s + block.shape[0]] = block
            self._sha.update(memoryview(block).cast("B"))
            self._hist += _channel_hist(block)
        self._written = end

    def add_class(self, label: int, images: np.ndarray) -> None:
        """Append every image of class ``label`` (an index into ``class_names``)."""
        self.add(images, int(label))

    def _finish(self) -> None:
        f = self._file
        if self._images is not None:
            self._flush()
        if self._n == 0 or self._images is None:
            raise DataError(f"{self.path}: no images were written; the source holds no images "
                            "for this split")
        if self._images.shape[0] != self._n:
            self._images.resize(self._n, axis=0)
        labels = np.concatenate(self._labels)
        k = len(self.class_names)
        offsets = _offsets_from_labels(labels, k)
        empty = np.flatnonzero(np.diff(offsets) == 0)
        if empty.size:
            names = [self.class_names[i] for i in empty[:3]]
            raise DataError(f"{self.path}: {empty.size} class(es) have no images, e.g. {names}; "
                            "check that the source has images for every listed class")
        f.create_dataset("labels", data=labels, chunks=(min(labels.size, LABEL_CHUNK_ROWS),),
                         fletcher32=True)
        f.create_dataset("class_offsets", data=offsets)
        f.create_dataset("class_names", data=np.array(self.class_names, dtype=object),
                         dtype=h5py.string_dtype("utf-8"))
        if self.class_info:
            g = f.create_group("class_info")
            for key, vals in self.class_info.items():
                g.create_dataset(key, data=np.array(vals, dtype=object),
                                 dtype=h5py.string_dtype("utf-8"))
        mean, std = _stats_from_hist(self._hist)
        a = f.attrs
        a["magic"] = MAGIC
        a["format_version"] = FORMAT_VERSION
        a["dataset"] = self.dataset
        a["split"] = self.split
        a["source"] = self.source
        a["image_shape"] = np.array(self.image_shape, dtype=np.int64)
        a["num_images"] = self._n
        a["num_classes"] = k
        a["mean"] = np.array(mean, dtype=np.float64)
        a["std"] = np.array(std, dtype=np.float64)
        a["checksum"] = "sha256:" + self._sha.hexdigest()
        for key, val in self.extra_attrs.items():
            a[f"extra_{key}"] = val
        a["complete"] = True
        f.flush()
        f.close()
        self._file = None
        os.replace(self.tmp_path, self.path)

    def _abort(self) -> None:
        _close_quietly(self._file)
        self._file = None
        try:
            self.tmp_path.unlink()
        except FileNotFoundError:
            pass


def _close_quietly(handle) -> None:
    """Close an h5py file (or None) on a path that is already failing or ending: a second
    error from the close must not hide the first one."""
    if handle is not None:
        try:
            handle.close()
        except Exception:
            pass


def damaged_store_error(path, dataset: Optional[str], err: BaseException) -> DataError:
    """The one-line :class:`DataError` for a store whose bytes cannot be read back: a chunk
    failing its Fletcher-32 checksum (h5py reports "filter returned failure during read") or
    another HDF5 read error. It names the file and the command that rebuilds it."""
    detail = " ".join(str(err).split())
    if "filter returned failure" in detail:
        what = ("corrupt store: a chunk fails its Fletcher-32 checksum, so the file was damaged "
                "after it was written")
    else:
        what = f"damaged store ({type(err).__name__}: {detail})"
    return DataError(f"{path}: {what}; {rebuild_hint(path, dataset)}")


def rebuild_hint(path, dataset: Optional[str]) -> str:
    """What to do about a damaged store: the command that rebuilds it."""
    name = dataset or (Path(path).parent.name if path is not None else "NAME")
    hint = "" if name == "glyphs" else " --from PATH"
    return f"delete it and re-run `fewshot data prepare {name}{hint}`"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(path: Path) -> None:
    """Delete ``<name>.tmp-<pid>`` files left by writers that were killed (no live pid)."""
    for tmp in path.parent.glob(f"{path.name}.tmp-*"):
        suffix = tmp.name.rsplit("-", 1)[-1]
        if suffix.isdigit() and int(suffix) != os.getpid() and not _pid_alive(int(suffix)):
            try:
                tmp.unlink()
            except OSError:
                pass


def write_store(path: PathLike, images: np.ndarray, labels: np.ndarray,
                class_names: Sequence[str], *, dataset: str, split: str, source: str,
                class_info: Optional[Mapping[str, Sequence[str]]] = None) -> Path:
    """Write a whole store from arrays (rows are sorted by label, stably) and return its path."""
    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{path}: {images.shape[0]} images but {labels.shape[0]} labels")
    order = np.argsort(labels, kind="stable")
    sorted_already = bool(np.all(order == np.arange(order.size)))
    with StoreWriter(path, class_names, dataset=dataset, split=split, source=source,
                     num_images=labels.shape[0], class_info=class_info) as w:
        for s in range(0, labels.shape[0], BLOCK_IMAGES * 4):
            idx = order[s:s + BLOCK_IMAGES * 4]
            block = images[s:s + idx.size] if sorted_already else images[idx]
            w.add(block, labels[idx])
    return Path(path)


# --------------------------------------------------------------------------------------- reader
class _UnionImages:
    """Read-only array-like over the image rows of several stores, one after the other."""

    def __init__(self, stores: Sequence["ImageStore"]):
        self._stores = list(stores)
        self._starts = np.cumsum([0] + [len(s) for s in stores])
        self.shape = (int(self._starts[-1]),) + tuple(stores[0].image_shape)
        self.dtype = np.dtype(np.uint8)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self._read(np.array([int(key)]))[0]
        if isinstance(key, slice):
            return self._read(np.arange(*key.indices(self.shape[0])))
        return self._read(np.asarray(key, dtype=np.int64))

    def _read(self, idx: np.ndarray) -> np.ndarray:
        idx = np.where(idx < 0, idx + self.shape[0], idx)
        out = np.empty((idx.size,) + self.shape[1:], dtype=np.uint8)
        part = np.searchsorted(self._starts, idx, side="right") - 1
        for p in np.unique(part):
            sel = part == p
            out[sel] = self._stores[p].read(idx[sel] - self._starts[p])
        return out


class ImageStore:
    """One dataset split: uint8 images sorted by class, labels, class names and statistics.

    Attributes: ``path``, ``dataset``, ``split``, ``source``, ``class_names``, ``num_classes``,
    ``images`` ((N,H,W,C) uint8 ``np.ndarray`` in memory, or the ``h5py`` dataset when lazy),
    ``labels`` ((N,) int64, ascending), ``class_offsets`` ((K+1,) int64), ``mean``/``std``
    (per-channel, pixel/255), ``checksum``, ``class_info`` (dict of per-class string lists),
    ``in_memory``.
    """

    def __init__(self, *, images, labels: np.ndarray, class_names: Sequence[str], dataset: str,
                 split: str, source: str, mean: Sequence[float], std: Sequence[float],
                 path: Optional[PathLike] = None, in_memory: bool = True,
                 checksum: Optional[str] = None,
                 class_info: Optional[Mapping[str, Sequence[str]]] = None,
                 _file: Optional[h5py.File] = None, _parts: Optional[list] = None):
        self.path = Path(path) if path is not None else None
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = [str(c) for c in class_names]
        self.num_classes = len(self.class_names)
        self.class_offsets = _offsets_from_labels(self.labels, self.num_classes)
        self.dataset, self.split, self.source = str(dataset), str(split), str(source)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.in_memory = bool(in_memory)
        self.checksum = checksum
        self.class_info = {k: [str(x) for x in v] for k, v in (class_info or {}).items()}
        self._file = _file
        self._pid = os.getpid()
        self._parts = _parts
        self._tensor = None

    # -- construction
    @classmethod
    def from_arrays(cls, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], *,
                    dataset: str = "memory", split: str = "train",
                    source: str = "arrays") -> "ImageStore":
        """An in-memory store (no file) from arrays; rows are sorted by label (stably)."""
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise DataError(f"images must be uint8, got {images.dtype}")
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4:
            raise DataError(f"images must be (N, H, W, C), got shape {images.shape}")
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if labels.shape[0] != images.shape[0]:
            raise DataError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise DataError(f"labels must lie in 0..{len(class_names) - 1}")
        order = np.argsort(labels, kind="stable")
        images = np.ascontiguousarray(images[order])
        labels = labels[order]
        mean, std = _stats_from_hist(_channel_hist(images)) if images.size else ((0.0,), (1.0,))
        return cls(images=images, labels=labels, class_names=class_names, dataset=dataset,
                   split=split, source=source, mean=mean, std=std, in_memory=True)

    @classmethod
    def open(cls, path: PathLike, in_memory: Optional[bool] = None) -> "ImageStore":
        """Open a store file; ``in_memory=None`` loads it into memory if it fits
        (see :func:`fits_in_memory`). Raises :class:`DataError` for a missing, foreign,
        incomplete or wrong-version file."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: store file not found; create it with "
                            "`fewshot data prepare <dataset> --from PATH`")
        try:
            f = h5py.File(path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES, rdcc_nslots=10007)
        except OSError as e:
            raise DataError(f"{path}: not a readable HDF5 store ({e}); delete it and run "
                            "`fewshot data prepare` again") from None
        try:
            a = f.attrs
            if a.get("magic") != MAGIC:
                raise DataError(f"{path}: not a fewshot image store (no '{MAGIC}' marker); "
                                "create stores with `fewshot data prepare`")
            version = int(a.get("format_version", -1))
            if version != FORMAT_VERSION:
                raise DataError(f"{path}: store format version {version}, this fewshot reads "
                                f"version {FORMAT_VERSION}; re-run `fewshot data prepare`")
            if not bool(a.get("complete", False)):
                raise DataError(f"{path}: store is incomplete (writing was interrupted); delete "
                                "it and re-run `fewshot data prepare`")
            for key in ("images", "labels", "class_names"):
                if key not in f:
                    raise DataError(f"{path}: store lacks the '{key}' dataset; delete it and "
                                    "re-run `fewshot data prepare`")
            dset = f["images"]
            labels = f["labels"][()].astype(np.int64)
            names = [s.decode("utf-8") if isinstance(s, bytes) else str(s)
                     for s in f["class_names"][()]]
            info = {}
            if "class_info" in f:
                for k, d in f["class_info"].items():
                    info[k] = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in d[()]]
            if in_memory is None:
                in_memory = fits_in_memory(int(np.prod(dset.shape)))
            if in_memory:
                images = np.empty(dset.shape, dtype=np.uint8)
                if images.size:
                    dset.read_direct(images)
            else:
                images = dset
            store = cls(images=images, labels=labels, class_names=names,
                        dataset=_s(a.get("dataset")), split=_s(a.get("split")),
                        source=_s(a.get("source")), mean=tuple(a["mean"]), std=tuple(a["std"]),
                        path=path, in_memory=in_memory, checksum=_s(a.get("checksum")),
                        class_info=info, _file=None if in_memory else f)
        except DataError:
            f.close()
            raise
        except (KeyError, OSError, ValueError) as e:
            name = _attr_or_none(f, "dataset")
            f.close()
            raise damaged_store_error(path, name, e) from None
        if in_memory:
            f.close()
        return store

    # -- basic properties
    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])

    def class_counts(self) -> np.ndarray:
        """(K,) number of images of each class."""
        return np.diff(self.class_offsets)

    def class_indices(self, c: int) -> np.ndarray:
        """Row indices of class ``c``."""
        return np.arange(self.class_offsets[c], self.class_offsets[c + 1], dtype=np.int64)

    def __repr__(self) -> str:
        return (f"ImageStore(dataset={self.dataset!r}, split={self.split!r}, classes="
                f"{self.num_classes}, images={len(self)}, shape={self.image_shape}, "
                f"in_memory={self.in_memory})")

    # -- reading
    def _dataset(self):
        """The h5py images dataset, reopened after a fork (h5py handles do not survive one)."""
        if self._pid != os.getpid() and self.path is not None:
            self._file = h5py.File(self.path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES, rdcc_nslots=10007)
            self.images = self._file["images"]
            self._pid = os.getpid()
        if self._file is None or not self._file.id.valid:
            raise DataError(f"{self.path}: store is closed; open it again with ImageStore.open")
        return self.images

    def read(self, indices) -> np.ndarray:
        """Images at ``indices`` (any order, repeats allowed) as (n, H, W, C) uint8.

        Lazy stores read the sorted unique rows from disk in one h5py selection and scatter
        them back into the requested order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise DataError(f"store {self.dataset}/{self.split}: index out of range 0..{n - 1}")
        idx = np.where(idx < 0, idx + n, idx)
        if self.in_memory:
            return self.images[idx]
        if self._parts is not None:
            return self.images[idx]
        if idx.size == 0:
            return np.empty((0,) + self.image_shape, dtype=np.uint8)
        dset = self._dataset()
        uniq, inverse = np.unique(idx, return_inverse=True)
        shape = self.image_shape
        out = np.empty((uniq.size,) + shape, dtype=np.uint8)
        # one low-level hyperslab read per run of consecutive rows straight into a contiguous
        # slice of `out` (h5py's high-level selections cost ~0.25 ms each; a single union
        # hyperslab is slower still)
        fspace = dset.id.get_space()
        zeros = (0,) * len(shape)
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
        start = 0
        try:
            for run in np.split(uniq, breaks):
                n = int(run.size)
                fspace.select_hyperslab((int(run[0]),) + zeros, (n,) + shape)
                dset.id.read(h5py.h5s.create_simple((n,) + shape), fspace, out[start:start + n])
                start += n
        except OSError as e:  # a chunk failing its Fletcher-32 checksum, or unreadable bytes
            raise damaged_store_error(self.path, self.dataset, e) from None
        return out[inverse] if uniq.size != idx.size or np.any(np.diff(idx) <= 0) else out

    def images_tensor(self):
        """All images as a torch uint8 (N, H, W, C) tensor sharing this store's memory (no copy;
        forked DataLoader workers share the pages). In-memory stores only."""
        if not self.in_memory:
            raise DataError(f"store {self.dataset}/{self.split} is lazy (on disk); open it with "
                            "in_memory=True or read episodes with store.read(indices)")
        if self._tensor is None:
            import torch
            self._tensor = torch.from_numpy(self.images)
        return self._tensor

    # -- unions
    @staticmethod
    def union(stores: Sequence["ImageStore"], split: str) -> "ImageStore":
        """One store holding the classes of ``stores`` one after another (class ids re-numbered:
        class c of ``stores[i]`` becomes ``c + Σ_{j<i} K_j``), e.g. mini-ImageNet val+test = the
        36 classes unseen in training. Statistics are pooled exactly:
        ``mean = Σ n_i μ_i / Σ n_i``, ``var = Σ n_i (σ_i² + μ_i²) / Σ n_i − mean²``."""
        stores = list(stores)
        if not stores:
            raise DataError("ImageStore.union needs at least one store")
        shape = stores[0].image_shape
        for s in stores[1:]:
            if s.image_shape != shape:
                raise DataError(f"cannot unite {stores[0].dataset}/{stores[0].split} {shape} with "
                                f"{s.dataset}/{s.split} {s.image_shape}: image shapes differ")
        names: list[str] = []
        for s in stores:
            names.extend(s.class_names)
        if len(set(names)) != len(names):
            dup = sorted({c for c in names if names.count(c) > 1})[:3]
            raise DataError(f"cannot unite splits sharing classes {dup}; a union needs disjoint "
                            "class sets")
        labels, k0 = [], 0
        for s in stores:
            labels.append(s.labels + k0)
            k0 += s.num_classes
        labels = np.concatenate(labels)
        ns = np.array([len(s) for s in stores], dtype=np.float64)
        mu = np.array([s.mean for s in stores])
        sd = np.array([s.std for s in stores])
        mean = (ns[:, None] * mu).sum(0) / ns.sum()
        var = (ns[:, None] * (sd ** 2 + mu ** 2)).sum(0) / ns.sum() - mean ** 2
        std = np.sqrt(np.maximum(var, 0.0))
        info_keys = set.intersection(*[set(s.class_info) for s in stores])
        info = {k: sum((s.class_info[k] for s in stores), []) for k in sorted(info_keys)}
        datasets = sorted({s.dataset for s in stores})
        all_mem = all(s.in_memory for s in stores)
        images = np.concatenate([s.images for s in stores]) if all_mem else _UnionImages(stores)
        return ImageStore(images=images, labels=labels, class_names=names,
                          dataset="+".join(datasets), split=split,
                          source=" + ".join(f"{s.dataset}/{s.split}" for s in stores),
                          mean=tuple(mean), std=tuple(std), in_memory=all_mem, class_info=info,
                          _parts=None if all_mem else stores)

    # -- integrity
    def verify(self) -> dict:
        """Check shapes, dtypes, label range and order, class offsets and counts, and the sha256
        checksum (re-read in blocks). Returns a summary dict; raises :class:`DataError`."""
        where = str(self.path) if self.path else f"{self.dataset}/{self.split}"
        n = len(self)
        if self.images.dtype != np.uint8 or len(self.images.shape) != 4:
            raise DataError(f"{where}: images are {self.images.dtype} {self.images.shape}, "
                            "expected uint8 (N, H, W, C)")
        if self.images.shape[0] != n:
            raise DataError(f"{where}: {self.images.shape[0]} images but {n} labels")
        if n and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise DataError(f"{where}: labels outside 0..{self.num_classes - 1}")
        if np.any(np.diff(self.labels) < 0):
            raise DataError(f"{where}: labels are not sorted by class")
        counts = self.class_counts()
        if np.any(counts <= 0):
            raise DataError(f"{where}: {(counts <= 0).sum()} class(es) have no images")
        if self.path is not None and self._parts is None:
            with h5py.File(self.path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES) as f:
                try:  # a missing or unreadable entry is a damaged file, as in open()
                    stored = f["class_offsets"][()]
                    counts_stored = int(f.attrs["num_images"]), int(f.attrs["num_classes"])
                except (KeyError, OSError, ValueError, TypeError) as e:
                    raise damaged_store_error(self.path, self.dataset, e) from None
                fix = rebuild_hint(self.path, self.dataset)
                if not np.array_equal(stored, self.class_offsets):
                    raise DataError(f"{where}: stored class_offsets disagree with the labels; {fix}")
                if counts_stored != (n, self.num_classes):
                    raise DataError(f"{where}: num_images/num_classes attributes disagree with "
                                    f"the data; {fix}")
                sha = hashlib.sha256()
                d = f["images"]
                try:
                    for s in range(0, n, BLOCK_IMAGES):
                        block = d[s:min(n, s + BLOCK_IMAGES)]
                        sha.update(memoryview(np.ascontiguousarray(block)).cast("B"))
                except OSError as e:  # a chunk failing its Fletcher-32 checksum
                    raise damaged_store_error(self.path, self.dataset, e) from None
                digest = "sha256:" + sha.hexdigest()
                if digest != self.checksum:
                    raise DataError(f"{where}: checksum mismatch (stored {self.checksum}, "
                                    f"computed {digest}); the file is corrupt, {fix}")
        return {"path": where, "dataset": self.dataset, "split": self.split,
                "images": n, "classes": self.num_classes, "image_shape": self.image_shape,
                "per_class_min": int(counts.min()), "per_class_max": int(counts.max()),
                "checksum": self.checksum, "ok": True}

    # -- lifetime
    def close(self) -> None:
        if self._parts is not None:
            for p in self._parts:
                p.close()
        _close_quietly(self._file)
        self._file = None

    def __enter__(self) -> "ImageStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        # picklable for DataLoader workers (spawn): lazy stores reopen their file by path
        state = dict(self.__dict__)
        state["_tensor"] = None
        if not self.in_memory and self._parts is None:
            state["images"] = None
            state["_file"] = None
            state["_pid"] = -1
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if not self.in_memory and self._parts is None:
            self._pid = -1
            self._dataset_reopen()

    def _dataset_reopen(self) -> None:
        self._file = h5py.File(self.path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES, rdcc_nslots=10007)
        self.images = self._file["images"]
        self._pid = os.getpid()


def _attr_or_none(f: h5py.File, key: str) -> Optional[str]:
    """A string attribute of an open file, or None when absent or unreadable."""
    try:
        return _s(f.attrs.get(key)) or None
    except Exception:
        return None


def _s(v) -> str:
    if v is None:
        return ""
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def available_splits(dataset: str, root: Optional[PathLike] = None) -> list[str]:
    """Names of the splits with a store file under ``<root>/<dataset>/``."""
    d = data_root(root) / dataset
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.h5"))


def open_split(dataset: str, split: str, root: Optional[PathLike] = None,
               in_memory: Optional[bool] = None) -> ImageStore:
    """Open ``<root>/<dataset>/<split>.h5``. ``split`` may join splits with ``+``
    (``"val+test"``) to get their :meth:`ImageStore.union`."""
    parts = [p.strip() for p in str(split).split("+") if p.strip()]
    if len(parts) > 1:
        return ImageStore.union([open_split(dataset, p, root, in_memory) for p in parts], split)
    path = store_path(dataset, split, root)
    if not path.is_file():
        have = available_splits(dataset, root)
        if have:
            raise DataError(f"{path}: dataset '{dataset}' has no split '{split}' (prepared "
                            f"splits: {', '.join(have)})")
        hint = "" if dataset == "glyphs" else " --from PATH"
        raise DataError(f"{path}: dataset '{dataset}' is not prepared under {data_root(root)}; "
                        f"run `fewshot data prepare {dataset}{hint}` (see datasets/{dataset}/"
                        "README.md)")
    return ImageStore.open(path, in_memory=in_memory)
