"""Listing a user's own images: a folder with one sub-folder per class, or a CSV of path,label.

* **folder** (torchvision's ``ImageFolder`` layout): ``DIR/<class>/...``; each top-level
  sub-folder is a class, named after the folder, and its images are found recursively
  (nested folders belong to their top-level class). Images are files ending in ``.png``,
  ``.jpg``, ``.jpeg``, ``.bmp``, ``.gif`` or ``.webp`` (any case); hidden files and folders
  (``.DS_Store``, macOS ``._name.jpg`` forks, ``__MACOSX``) and other files are ignored. Images
  of a class are taken in sorted order of their path inside the class folder.
* **CSV** with a header naming the columns ``path`` and ``label`` (any order, any case; other
  columns are ignored) and optionally ``split``: ``path`` is relative to ``--images DIR`` when
  given, else to the CSV's folder (absolute paths are kept). Classes are the labels; images of a
  class keep the CSV's row order. A ``split`` column assigns every image of a class to one
  split; a class in two splits is refused (splits are by class).

Both give a :class:`Listing`; :mod:`fewshot.data.sources.custom` turns it into stores.
Class names are NFC-normalised; two classes whose names differ only in case or Unicode form
(``Cat`` / ``cat``) are refused as duplicates, since they cannot be told apart in a split list
or on a case-insensitive file system.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from fewshot.data.sources import require_dir
from fewshot.data.sources.class_split import check_split_name, nfc
from fewshot.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_IGNORED_DIRS = ("__MACOSX",)


@dataclass
class Listing:
    """What a folder or CSV holds: ``files`` class -> image paths (classes sorted),
    ``origin`` class -> where it came from (its folder, or ``CSV:first line``), ``split``
    class -> split when the CSV has a split column, ``missing`` messages of listed files that
    do not exist (CSV only)."""
    source: Path
    files: Dict[str, List[Path]]
    origin: Dict[str, str]
    split: Optional[Dict[str, str]] = None
    missing: List[str] = field(default_factory=list)


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in _IGNORED_DIRS


def _is_image(name: str) -> bool:
    return not _hidden(name) and name.lower().endswith(IMAGE_SUFFIXES)


def images_under(folder: Path) -> List[Path]:
    """Image files below ``folder`` (recursively, hidden entries skipped), sorted by their
    path relative to ``folder``."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not _hidden(d)]
        found.extend(Path(root, f) for f in files if _is_image(f))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


class _Names:
    """Class names seen so far, refusing two that differ only in case or Unicode form."""

    def __init__(self, what: str):
        self.what, self.keys = what, {}

    def add(self, name: str, where: str) -> str:
        key = name.casefold()
        if key in self.keys and self.keys[key][0] != name:
            other, other_where = self.keys[key]
            raise DataError(f"{where}: class '{name}' and class '{other}' ({other_where}) are "
                            f"duplicate class names (they differ only in case or Unicode form); "
                            f"rename or merge one of the {self.what}")
        self.keys.setdefault(key, (name, where))
        return name


def list_folder(path) -> Listing:
    """``DIR/<class>/**/<image>`` -> :class:`Listing` (module docstring)."""
    root = require_dir(path, "pass a folder with one sub-folder of images per class")
    if not root.is_dir():
        raise DataError(f"{root}: expected a folder with one sub-folder per class, not a file "
                        "(for a CSV of path,label use `fewshot data prepare csv NAME --from`)")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    loose = [e.name for e in entries if e.is_file() and _is_image(e.name)]
    if loose:
        raise DataError(f"{root}: {len(loose)} image(s) directly in the folder (e.g. "
                        f"'{loose[0]}'); put each class's images in its own sub-folder "
                        f"{root}/<class>/")
    dirs = [e for e in entries if e.is_dir() and not _hidden(e.name)]
    if not dirs:
        raise DataError(f"{root}: empty folder, no class sub-folders; expected "
                        f"{root}/<class>/<images> (png, jpg, jpeg, bmp, gif, webp)")
    names = _Names("class folders")
    files: Dict[str, List[Path]] = {}
    origin: Dict[str, str] = {}
    for d in dirs:
        name = names.add(nfc(d.name), str(Path(d.path)))
        if name in files:  # the same name in two Unicode forms (composed / decomposed)
            raise DataError(f"{d.path}: class '{name}' and class folder '{origin[name]}' are "
                            "duplicate class names (the same name in two Unicode forms); "
                            "merge the two folders")
        files[name] = images_under(Path(d.path))
        origin[name] = str(Path(d.path).resolve())
    empty = [n for n in files if not files[n]]
    if empty:
        raise DataError(f"{origin[empty[0]]}: class '{empty[0]}' has no images (png, jpg, jpeg, "
                        f"bmp, gif, webp, searched recursively); {len(empty)} of {len(files)} "
                        "classes are empty; add images or remove the folder")
    return Listing(root.resolve(), dict(sorted(files.items())), origin)


def _header(path: Path, row) -> Dict[str, int]:
    cols = {c.strip().lower(): i for i, c in enumerate(row or [])}
    missing = [c for c in ("path", "label") if c not in cols]
    if missing:
        raise DataError(f"{path}:1: header {','.join(row or [])!r} lacks the column(s) "
                        f"{', '.join(missing)}; the first row must name the columns path,label "
                        "(and optionally split)")
    return cols


def _cell(row, i: Optional[int]) -> str:
    return row[i].strip() if i is not None and i < len(row) else ""


class _CsvReader:
    """Row-by-row reading of a path,label[,split] CSV into a :class:`Listing`."""

    def __init__(self, path: Path, images_dir: Path):
        self.path, self.images_dir = path, images_dir
        self.names = _Names("labels")
        self.files: Dict[str, List[Path]] = {}
        self.origin: Dict[str, str] = {}
        self.split: Dict[str, tuple] = {}
        self.seen: Dict[Path, int] = {}
        self.missing: List[str] = []

    def row(self, lineno: int, rel: str, label: str, split: Optional[str]) -> None:
        where = f"{self.path}:{lineno}"
        if not rel or not label:
            raise DataError(f"{where}: empty {'path' if not rel else 'label'}; every row needs "
                            "path,label")
        name = self.names.add(nfc(label), where)
        file = self.images_dir / rel
        if file in self.seen:
            raise DataError(f"{where}: image '{rel}' is listed again (first on line "
                            f"{self.seen[file]}); list each image once")
        self.seen[file] = lineno
        if split is not None:
            check_split_name(split, where)
            first = self.split.setdefault(name, (split, lineno))
            if first[0] != split:
                raise DataError(f"{where}: class '{name}' is in split '{split}' here but in "
                                f"'{first[0]}' on line {first[1]}; splits are by class, every "
                                "image of a class goes to one split")
        self.origin.setdefault(name, where)
        self.files.setdefault(name, [])
        if file.is_file():
            self.files[name].append(file)
        else:
            self.missing.append(f"{where}: image file {file} not found")


def list_csv(path, images_dir=None) -> Listing:
    """``FILE.csv`` with path,label[,split] -> :class:`Listing` (module docstring)."""
    csv_path = require_dir(path, "pass a CSV file with the columns path,label")
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: expected a CSV file of path,label rows, not a folder (for "
                        "a folder per class use `fewshot data prepare folder NAME --from`)")
    base = Path(images_dir).expanduser() if images_dir else csv_path.parent
    if not base.is_dir():
        raise DataError(f"{base}: --images folder not found")
    reader = _CsvReader(csv_path.resolve(), base)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            rows = csv.reader(fh)
            cols = _header(csv_path, next(rows, None))
            for lineno, row in enumerate(rows, 2):
                if any(c.strip() for c in row):
                    reader.row(lineno, _cell(row, cols["path"]), _cell(row, cols["label"]),
                               _cell(row, cols["split"]) if "split" in cols else None)
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: cannot read as a UTF-8 CSV ({e})") from None
    if not reader.files:
        raise DataError(f"{csv_path}: no rows after the header; list one image per row as "
                        "path,label")
    split = {n: s for n, (s, _) in reader.split.items()} if "split" in cols else None
    return Listing(csv_path.resolve(), dict(sorted(reader.files.items())), reader.origin, split,
                   reader.missing)
