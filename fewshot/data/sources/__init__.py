"""Source readers: one module per on-disk format, each converting files a user already has into
:class:`~fewshot.data.store.ImageStore` files. Conversion never downloads (see
:mod:`fewshot.data.sources.download` for the explicit download path).

Shared helpers live here: image decoding with PIL (one-line :class:`DataError` naming the file on
a corrupt image), a small process pool for parallel JPEG/PNG decoding, and input-path helpers.
"""
from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import shutil
import zipfile
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np

from fewshot.errors import DataError

#: jobs below this count are decoded in the calling process (a pool costs more than it saves)
POOL_MIN_JOBS = 256


def default_workers() -> int:
    """Decoding processes: ``$FEWSHOT_DECODE_WORKERS`` or min(2, cpu count)."""
    env = os.environ.get("FEWSHOT_DECODE_WORKERS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise DataError(f"$FEWSHOT_DECODE_WORKERS={env!r} is not an integer") from None
    return max(1, min(2, os.cpu_count() or 1))


#: resampling filters by name (``resample=`` of the image converters); Lanczos is the default
RESAMPLE_FILTERS = ("lanczos", "bicubic", "bilinear", "box", "hamming", "nearest")


def _resample(name: str = "lanczos"):
    from PIL import Image
    if name not in RESAMPLE_FILTERS:
        raise DataError(f"resample={name!r} is not a filter; use one of "
                        f"{', '.join(RESAMPLE_FILTERS)}")
    enum = Image.Resampling if hasattr(Image, "Resampling") else Image
    return getattr(enum, name.upper())


def converted(img, mode: str, size: Optional[Tuple[int, int]] = None,
              resample: str = "lanczos") -> np.ndarray:
    """A PIL image converted to ``mode`` first, then resized to ``size`` = (H, W) with the
    ``resample`` filter: uint8 (H, W) or (H, W, C). The one statement of "convert, then
    resize" that the converters (:func:`decode_image`) and the conversion of whole stores to
    another shape (:mod:`fewshot.data.conform`) share."""
    img = img.convert(mode)
    if size is not None and (img.height, img.width) != tuple(size):
        img = img.resize((size[1], size[0]), _resample(resample))
    return np.asarray(img, dtype=np.uint8)


def decode_image(data: Union[bytes, bytearray, memoryview, np.ndarray, str, os.PathLike], *,
                 name: str, size: Optional[Tuple[int, int]] = None, mode: str = "RGB",
                 invert: bool = False, resample: str = "lanczos") -> np.ndarray:
    """Decode one image (encoded bytes or a file path) to uint8 (H, W, C).

    ``mode`` is the PIL mode to convert to *before* resizing ("L" or "RGB"; 1-bit images are
    therefore smoothed, not thresholded: Pillow resizes a mode "1" image with nearest neighbour
    whatever filter is asked); ``size`` is (H, W) and uses the ``resample`` filter (a name in
    :data:`RESAMPLE_FILTERS`, Lanczos by default); JPEGs are decoded at a reduced scale first
    when at least twice as large as ``size`` (``Image.draft``, a power-of-two DCT scaling).
    ``invert`` maps p -> 255 - p (Omniglot: ink bright on a dark background)."""
    from PIL import Image, UnidentifiedImageError
    try:
        if isinstance(data, (str, os.PathLike)):
            img = Image.open(data)
        else:
            img = Image.open(io.BytesIO(bytes(data) if isinstance(data, np.ndarray) else data))
        if size is not None and img.format == "JPEG":
            img.draft(mode, (size[1], size[0]))
        arr = converted(img, mode, size, resample)
    except FileNotFoundError:
        raise DataError(f"{name}: image file not found; the dataset folder is incomplete, "
                        "extract the original archive again") from None
    except UnidentifiedImageError:
        raise DataError(f"{name}: cannot decode image (not a recognised image format); the file "
                        "is corrupt or not an image, replace it from the original archive") \
            from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{name}: cannot decode image ({type(e).__name__}: {e}); the file is "
                        "corrupt or not an image, replace it from the original archive") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if invert:
        arr = 255 - arr
    return np.ascontiguousarray(arr)


def _decode_job(job):
    name, data, size, mode, invert, resample = job
    return decode_image(data, name=name, size=size, mode=mode, invert=invert, resample=resample)


def _decode_or_message(job):
    """Like :func:`_decode_job`, but a file that cannot be decoded gives its one-line message
    (a ``str``) instead of raising (``on_error=skip``)."""
    try:
        return _decode_job(job)
    except DataError as e:
        return str(e)


def _decode_chunk(jobs, tolerant: bool = False):
    """Decode a chunk of jobs in a worker; one array (or list when shapes differ, or when a
    file failed in tolerant mode) comes back, so inter-process traffic is one message per
    chunk, not per image."""
    arrays = [(_decode_or_message if tolerant else _decode_job)(j) for j in jobs]
    if all(isinstance(a, np.ndarray) for a in arrays) and len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    return arrays


def _decode_chunk_tolerant(jobs):
    return _decode_chunk(jobs, tolerant=True)


class Decoder:
    """Decode batches of images, in a process pool when there are enough of them.

    Create it *before* opening a :class:`~fewshot.data.store.StoreWriter` (the pool forks)."""

    def __init__(self, size: Optional[Tuple[int, int]], mode: str = "RGB", invert: bool = False,
                 workers: Optional[int] = None, resample: str = "lanczos"):
        _resample(resample)  # an unknown filter fails here, before any file is read
        self.size, self.mode, self.invert, self.resample = size, mode, invert, resample
        self.workers = default_workers() if workers is None else max(1, int(workers))
        self._pool = None

    def __enter__(self) -> "Decoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def start(self, jobs: Optional[int] = None) -> "Decoder":
        """Start the pool now (before opening a store for writing, so no HDF5 file is open
        when the workers fork), unless ``jobs`` images are too few to use it."""
        if jobs is not None and jobs < POOL_MIN_JOBS:
            return self
        if self.workers > 1 and self._pool is None:
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else "spawn")
            self._pool = ctx.Pool(self.workers)
        return self

    def _empty(self) -> np.ndarray:
        c = 1 if self.mode == "L" else 3
        h, w = self.size if self.size else (0, 0)
        return np.empty((0, h, w, c), dtype=np.uint8)

    def _run(self, items: Sequence[Tuple[str, object]], tolerant: bool) -> list:
        jobs = [(name, data, self.size, self.mode, self.invert, self.resample)
                for name, data in items]
        if self.workers > 1 and len(jobs) >= POOL_MIN_JOBS:
            self.start()
            size = max(16, min(128, len(jobs) // (self.workers * 4)))
            chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
            arrays: list = []
            fn = _decode_chunk_tolerant if tolerant else _decode_chunk
            for got in self._pool.imap(fn, chunks):
                arrays.extend(got)
            return arrays
        return [(_decode_or_message if tolerant else _decode_job)(j) for j in jobs]

    def decode_some(self, items: Sequence[Tuple[str, object]]):
        """Decode what can be decoded: -> (arrays (m, H, W, C) of the readable items in order,
        kept (n,) bool, messages of the unreadable ones)."""
        got = self._run(items, tolerant=True)
        kept = np.array([isinstance(a, np.ndarray) for a in got], dtype=bool)
        good = [(it, a) for it, a in zip(items, got) if isinstance(a, np.ndarray)]
        arrays = self._stack([it for it, _ in good], [a for _, a in good])
        return arrays, kept, [a for a in got if not isinstance(a, np.ndarray)]

    def decode(self, items: Sequence[Tuple[str, object]]) -> np.ndarray:
        """``items`` = [(name, bytes or path), ...] -> (n, H, W, C) uint8 in the same order."""
        return self._stack(items, self._run(items, tolerant=False))

    def _stack(self, items, arrays) -> np.ndarray:
        if not arrays:
            return self._empty()
        first = arrays[0].shape
        for (name, _), a in zip(items, arrays):
            if a.shape != first:
                raise DataError(f"{name}: image is {a.shape[1]}x{a.shape[0]}, others are "
                                f"{first[1]}x{first[0]}; pass image_size=N to resize all")
        return np.stack(arrays)


def write_classes(writer, decoder: Decoder, classes, batch: int = 1024,
                  skipped: Optional[list] = None) -> None:
    """Decode and append class after class: ``classes`` yields (label, [(name, data), ...]) in
    label order; images of consecutive classes are decoded together in batches of about
    ``batch`` (so small classes still keep both decoding processes busy).

    With ``skipped`` (a list), an image that cannot be decoded is left out and its
    ``(label, message)`` appended there; without it the first such image raises."""
    items: list = []
    labels: list = []

    def flush():
        if not items:
            return
        lab = np.asarray(labels, dtype=np.int64)
        if skipped is None:
            writer.add(decoder.decode(items), lab)
        else:
            arrays, kept, messages = decoder.decode_some(items)
            skipped.extend(zip(lab[~kept].tolist(), messages))
            writer.add(arrays, lab[kept])
        items.clear()
        labels.clear()

    for label, class_items in classes:
        items.extend(class_items)
        labels.extend([label] * len(class_items))
        if len(items) >= batch:
            flush()
    flush()


@contextlib.contextmanager
def staged_dataset(out_dir: Union[str, os.PathLike], replace_all: bool = False) -> Iterator[Path]:
    """All of a conversion's stores, or none: the converter writes its split stores into a
    staging folder beside ``out_dir`` (``.<name>.tmp-<pid>``); when the block ends without an
    error they are moved into ``out_dir`` (with ``replace_all``, a split store there that was
    not rewritten is removed, so the folder holds exactly this conversion: a user's own dataset
    is redefined by each conversion), on any error the staging folder is deleted and
    ``out_dir`` is left as it was."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        out_dir.mkdir(exist_ok=True)
        for old in out_dir.glob("*.h5") if replace_all else ():
            if not (stage / old.name).exists():
                old.unlink()
        for new in sorted(stage.glob("*.h5")):
            os.replace(new, out_dir / new.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# --------------------------------------------------------------------------------------- input
def require_dir(path: Union[str, os.PathLike], what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: not found; {what}")
    return p


class FileTree:
    """Uniform read access to an extracted folder or a zip archive of images."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._zip = None
        if self.path.is_file():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as e:
                raise DataError(f"{self.path}: not a readable zip archive ({e}); re-download "
                                "it") from None

    def files(self, suffixes: Tuple[str, ...]) -> list[str]:
        """Relative paths (with '/') of the files with one of ``suffixes`` (lower-case)."""
        if self._zip is not None:
            return sorted(n for n in self._zip.namelist()
                          if not n.endswith("/") and n.lower().endswith(suffixes)
                          and "__MACOSX" not in n)
        out = []
        for root, _dirs, files in os.walk(self.path):
            for f in files:
                if f.lower().endswith(suffixes):
                    out.append(Path(root, f).relative_to(self.path).as_posix())
        return sorted(out)

    def read(self, rel: str) -> bytes:
        try:
            if self._zip is not None:
                return self._zip.read(rel)
            return (self.path / rel).read_bytes()
        except (KeyError, OSError, zipfile.BadZipFile) as e:
            raise DataError(f"{self.path}!{rel}: cannot read ({e}); the archive is damaged, "
                            "re-download it") from None

    def name(self, rel: str) -> str:
        return f"{self.path}!{rel}" if self._zip is not None else str(self.path / rel)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def __enter__(self) -> "FileTree":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_text_lines(path: Path) -> Iterator[Tuple[int, str]]:
    """(line number, stripped line) of the non-empty lines of a text file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read as UTF-8 text ({e})") from None
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line:
            yield i, line
