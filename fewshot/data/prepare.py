"""Dataset preparation: convert files a user has into stores, describe and verify stores.

The CLI (``fewshot data prepare|info|verify|download``) calls these functions and prints what
they return; none of them prints.

======================  ==========================================  ===========================
name                    ``--from`` expects                          stores (splits)
======================  ==========================================  ===========================
``glyphs``              nothing (generated from a seed)             train, val, test
``omniglot``            folder with images_background.zip and      train, val, test (Vinyals)
                        images_evaluation.zip (or extracted)        or background, evaluation
``mini-imagenet``       mini-imagenet-cache-*.pkl, or images/ +     train, val, test
                        Ravi's train/val/test.csv
``tiered-imagenet``     {split}_images_png.pkl + {split}_labels.pkl train, val, test
``cifar10``             cifar-10-batches-py/                        train, test
``cifar100``            cifar-100-python/                           train, test
``tiny-imagenet``       tiny-imagenet-200/                          train, val
``cifar-fs``            cifar-100-python/                           train, val, test
``fc100``               cifar-100-python/                           train, val, test
``cub``                 CUB_200_2011/ (images/ + classes.txt)       train, val, test
======================  ==========================================  ===========================

A user's own images: :func:`prepare_custom` (``fewshot data prepare folder|csv NAME --from``)
writes ``<root>/NAME/<split>.h5`` from a folder of class folders or a path,label CSV; ``info``
and ``verify`` take any prepared NAME.
"""
from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Dict, List

from fewshot.data.store import (FORMAT_VERSION, ImageStore, available_splits, data_root,
                                store_path)
from fewshot.data.sources import glyphs
from fewshot.data.sources.download import fetch
from fewshot.errors import ConfigError, DataError, unknown_name

DATASETS = ("glyphs", "omniglot", "mini-imagenet", "tiered-imagenet", "cifar10", "cifar100",
            "tiny-imagenet", "cifar-fs", "fc100", "cub")
#: a dataset name is a folder under the data root
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

#: (module, extra fixed keyword arguments) of each dataset's converter
_CONVERTERS = {
    "omniglot": ("fewshot.data.sources.omniglot", {}),
    "mini-imagenet": ("fewshot.data.sources.mini_imagenet", {}),
    "tiered-imagenet": ("fewshot.data.sources.tiered_imagenet", {}),
    "cifar10": ("fewshot.data.sources.cifar", {"name": "cifar10"}),
    "cifar100": ("fewshot.data.sources.cifar", {"name": "cifar100"}),
    "tiny-imagenet": ("fewshot.data.sources.tiny_imagenet", {}),
    "cifar-fs": ("fewshot.data.sources.cifar_fs", {"variant": "cifar-fs"}),
    "fc100": ("fewshot.data.sources.cifar_fs", {"variant": "fc100"}),
    "cub": ("fewshot.data.sources.cub", {}),
}

#: published sizes: split -> (classes, images per class or None when it varies)
REFERENCE: Dict[str, Dict[str, tuple]] = {
    "omniglot": {"train": (4112, 20), "val": (688, 20), "test": (1692, 20),
                 "background": (964, 20), "evaluation": (659, 20)},
    "mini-imagenet": {"train": (64, 600), "val": (16, 600), "test": (20, 600)},
    "tiered-imagenet": {"train": (351, None), "val": (97, None), "test": (160, None)},
    "cifar10": {"train": (10, 5000), "test": (10, 1000)},
    "cifar100": {"train": (100, 500), "test": (100, 100)},
    "tiny-imagenet": {"train": (200, 500), "val": (200, 50)},
    "glyphs": {"train": (800, 20), "val": (200, 20), "test": (200, 20)},
    "cifar-fs": {"train": (64, 600), "val": (16, 600), "test": (20, 600)},
    "fc100": {"train": (60, 600), "val": (20, 600), "test": (20, 600)},
    "cub": {"train": (100, None), "val": (50, None), "test": (50, None)},
}


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise DataError(f"{unknown_name('dataset', name, DATASETS)} For your own images: "
                        f"`fewshot data prepare folder {name} --from DIR` (or csv)")
    return name


def _check_any_name(name: str) -> str:
    """A built-in dataset or a name given to `prepare folder|csv`: a plain folder name."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise DataError(f"dataset name {name!r} is not a plain folder name; use letters, digits, "
                        "'_', '-' or '.'")
    return name


def _coerce(value, default):
    """CLI options arrive as strings: convert to the type of the parameter's default."""
    if not isinstance(value, str):
        return value
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        return value
    if isinstance(default, int) or (default is None and value.isdigit()):
        try:
            return int(value)
        except ValueError:
            return value
    if isinstance(default, tuple):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return value


def _options(params, allowed: List[str], name: str, opts: dict) -> dict:
    """``opts`` (strings from the command line, or values) checked against the ``allowed``
    parameter names of a converter and coerced to the type of each one's default."""
    kwargs = {}
    for key, value in opts.items():
        if key not in allowed:
            raise ConfigError(f"option '{key}' is not understood by `fewshot data prepare {name}`"
                              f": {unknown_name('option', key, allowed)}")
        default = params[key].default
        kwargs[key] = _coerce(value, None if default is inspect.Parameter.empty else default)
    return kwargs


def _call(fn, name: str, fixed: dict, opts: dict, *args):
    params = inspect.signature(fn).parameters
    allowed = [p for p, v in params.items() if v.kind == v.KEYWORD_ONLY and p not in fixed
               and p != "dataset"]
    return fn(*args, **fixed, **_options(params, allowed, name, opts))


def prepare(name: str, from_path=None, root=None, **opts) -> List[Path]:
    """Convert ``name`` from ``from_path`` into ``<root>/<name>/<split>.h5``; returns the paths.

    ``glyphs`` needs no ``from_path`` (options: seed, per_class, size). Other options are
    passed to the dataset's converter (e.g. omniglot ``splits='official'``, ``split_lists=DIR``,
    ``image_size=28``; mini-imagenet ``split_csvs=DIR``; ``workers=N`` for decoding)."""
    _check_name(name)
    out_dir = data_root(root) / name
    if name == "glyphs":
        if from_path is not None:
            raise ConfigError(f"glyphs are generated and read no files: drop --from "
                              f"'{from_path}' (run `fewshot data prepare glyphs`)")
        params = inspect.signature(glyphs.prepare).parameters
        allowed = [p for p in params if p not in ("root", "from_path")]
        kw = _options(params, allowed, name, opts)
        out_dir.mkdir(parents=True, exist_ok=True)
        return [Path(p) for p in glyphs.prepare(out_dir, **kw)]
    if from_path is None:
        raise DataError(f"`fewshot data prepare {name}` needs --from PATH (the downloaded files; "
                        f"see datasets/{name}/README.md), or run `fewshot data download {name}`")
    module, fixed = _CONVERTERS[name]
    conv = importlib.import_module(module).convert
    return [Path(p) for p in _call(conv, name, dict(fixed, dataset=name), opts,
                                   Path(from_path).expanduser(), out_dir)]


def prepare_custom(kind: str, name: str, from_path, root=None, **opts):
    """Convert a user's own images into ``<root>/<name>/<split>.h5``: ``kind`` "folder" (one
    sub-folder per class) or "csv" (path,label[,split]; ``images=DIR`` for relative paths).
    Options: split, split_lists, seed, image_size, mode, resample, on_error, min_images,
    min_classes, workers (see :mod:`fewshot.data.sources.custom`). Returns its
    :class:`~fewshot.data.sources.custom.Conversion` (paths, skipped images, unused classes)."""
    from fewshot.data.sources import custom

    if kind not in custom.KINDS:
        raise DataError(unknown_name("input kind", kind, custom.KINDS))
    if not name:
        raise ConfigError(f"`fewshot data prepare {kind}` needs a NAME for the new dataset: "
                          f"fewshot data prepare {kind} NAME --from PATH")
    _check_any_name(name)
    if name in DATASETS or name in custom.KINDS:
        raise ConfigError(f"'{name}' is a built-in dataset name; choose another NAME for your "
                          f"own data (e.g. my-{name})")
    if from_path is None:
        raise DataError(f"`fewshot data prepare {kind} {name}` needs --from PATH (the "
                        f"{'folder of class folders' if kind == 'folder' else 'CSV file'})")
    return _call(custom.convert, f"{kind} {name}", {"dataset": name}, opts, kind,
                 Path(from_path).expanduser(), data_root(root) / name)


def download(name: str, root=None, **opts) -> List[Path]:
    """Download ``name`` with its library's downloader (checksummed) and convert it."""
    _check_name(name)
    if name == "glyphs":
        return prepare(name, None, root, **opts)
    raw_dir = opts.pop("raw_dir", None)
    out_dir = data_root(root) / name
    src = fetch(name, out_dir, raw_dir)
    return prepare(name, src, root, **opts)


def _splits_or_raise(name: str, root) -> List[str]:
    _check_any_name(name)
    splits = available_splits(name, root)
    if not splits and name not in DATASETS:
        raise DataError(f"{unknown_name('dataset', name, DATASETS)} Nothing is prepared under "
                        f"{data_root(root) / name}; for your own images run `fewshot data "
                        f"prepare folder {name} --from DIR` (or `csv`)")
    if not splits:
        hint = "" if name == "glyphs" else " --from PATH"
        raise DataError(f"{data_root(root) / name}: dataset '{name}' is not prepared; run "
                        f"`fewshot data prepare {name}{hint}` (see datasets/{name}/README.md)")
    order = {"train": 0, "val": 1, "test": 2}
    return sorted(splits, key=lambda s: (order.get(s, 3), s))


def info(name: str, root=None) -> dict:
    """Summary of a prepared dataset: per split classes, images, images per class (min/max),
    image size, per-channel mean/std, source and checksum."""
    out = {"dataset": name, "root": str(data_root(root)), "format_version": FORMAT_VERSION,
           "splits": {}}
    for split in _splits_or_raise(name, root):
        path = store_path(name, split, root)
        with ImageStore.open(path, in_memory=False) as s:
            counts = s.class_counts()
            out["splits"][split] = {
                "path": str(path), "classes": s.num_classes, "images": len(s),
                "per_class_min": int(counts.min()), "per_class_max": int(counts.max()),
                "image_shape": list(s.image_shape), "mean": list(s.mean), "std": list(s.std),
                "source": s.source, "checksum": s.checksum,
                "size_bytes": path.stat().st_size}
    shapes = {tuple(v["image_shape"]) for v in out["splits"].values()}
    out["image_shape"] = list(shapes.pop()) if len(shapes) == 1 else None
    out["classes"] = sum(v["classes"] for v in out["splits"].values())
    return out


def verify(name: str, root=None) -> dict:
    """Verify every store of ``name`` (shapes, dtypes, labels, offsets, sha256 checksum) and
    compare class counts with the published sizes (``matches_reference``; None when the split
    has no reference). Raises :class:`DataError` on the first broken store."""
    out = {"dataset": name, "root": str(data_root(root)), "splits": {}, "ok": True}
    for split in _splits_or_raise(name, root):
        with ImageStore.open(store_path(name, split, root), in_memory=False) as s:
            summary = s.verify()
        ref = REFERENCE.get(name, {}).get(split)
        if ref is None:
            summary["matches_reference"] = None
        else:
            k, per = ref
            summary["reference"] = {"classes": k, "per_class": per}
            summary["matches_reference"] = bool(
                summary["classes"] == k and (per is None or summary["per_class_min"] ==
                                             summary["per_class_max"] == per))
        summary["image_shape"] = list(summary["image_shape"])
        out["splits"][split] = summary
    return out
