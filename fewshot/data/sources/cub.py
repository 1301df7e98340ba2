"""CUB-200-2011 (Wah et al., 2011) from the official ``CUB_200_2011/`` folder, with the class
split of Chen et al., "A Closer Look at Few-shot Classification" (ICLR 2019).

Expected (``CUB_200_2011.tgz``, extracted)::

    CUB_200_2011/classes.txt                 "1 001.Black_footed_Albatross" ... (200 lines)
    CUB_200_2011/images/<class>/*.jpg        11788 images, 41 to 60 per class

Split (Chen et al.'s ``filelists/CUB/write_CUB_filelist.py``): the 200 class folders in sorted
order, ``i`` from 0: ``i % 2 == 0`` -> ``train`` (their "base", 100 classes),
``i % 4 == 1`` -> ``val`` (50), ``i % 4 == 3`` -> ``test`` (their "novel", 50). Bounding boxes,
parts and attributes are not used: each whole image is converted to RGB and resized to
``image_size`` x ``image_size`` (default 84, the Conv-4 setting) with a Lanczos filter, without
cropping. Store classes keep the folder names (``001.Black_footed_Albatross``) in sorted order;
images of a class are in sorted file-name order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from fewshot.data.sources import (Decoder, read_text_lines, require_dir, staged_dataset,
                                  write_classes)
from fewshot.data.sources.image_folder import images_under
from fewshot.data.store import StoreWriter
from fewshot.errors import DataError

NAME = "cub"
FOLDER = "CUB_200_2011"
SPLITS = ("train", "val", "test")
NUM_CLASSES = 200


def split_of(i: int) -> Optional[str]:
    """Chen et al.'s split of the ``i``-th class (0-based) in sorted folder order."""
    if i % 2 == 0:
        return "train"
    return "val" if i % 4 == 1 else "test"


def locate(from_path) -> Path:
    p = require_dir(from_path, f"pass the extracted {FOLDER}/ folder (or its parent)")
    for cand in (p, p / FOLDER):
        if (cand / "images").is_dir() and (cand / "classes.txt").is_file():
            return cand
    raise DataError(f"{p}: no images/ folder and classes.txt here or in {FOLDER}/; pass the "
                    f"extracted official {FOLDER}.tgz folder")


def class_folders(root: Path) -> List[str]:
    """The 200 class folder names in sorted order, checked against ``classes.txt``."""
    listed = []
    for lineno, line in read_text_lines(root / "classes.txt"):
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise DataError(f"{root / 'classes.txt'}:{lineno}: expected '<id> <folder>', got "
                            f"'{line}'")
        listed.append(parts[1])
    if len(listed) != NUM_CLASSES or len(set(listed)) != NUM_CLASSES:
        raise DataError(f"{root / 'classes.txt'}: {len(set(listed))} distinct classes, expected "
                        f"{NUM_CLASSES}; this is not CUB-200-2011's classes.txt")
    folders = sorted(d.name for d in (root / "images").iterdir() if d.is_dir())
    missing = sorted(set(listed) - set(folders))
    if missing:
        raise DataError(f"{root / 'images' / missing[0]}: class folder listed in classes.txt not "
                        f"found ({len(missing)} missing); extract the official archive again")
    return sorted(listed)


def convert(from_path, out_dir, *, splits=SPLITS, image_size: int = 84,
            workers: Optional[int] = None, dataset: str = NAME) -> List[Path]:
    """Write ``train``/``val``/``test`` stores of CUB with Chen et al.'s class split."""
    root = locate(Path(from_path))
    for s in splits:
        if s not in SPLITS:
            raise DataError(f"unknown cub split '{s}'; use train, val or test")
    classes = class_folders(root)
    chosen: Dict[str, List[str]] = {s: [] for s in SPLITS}
    for i, name in enumerate(classes):
        chosen[split_of(i)].append(name)
    files = {c: images_under(root / "images" / c) for c in classes}
    empty = [c for c in classes if not files[c]]
    if empty:
        raise DataError(f"{root / 'images' / empty[0]}: no images; extract the official archive "
                        "again")
    out_dir = Path(out_dir)
    with Decoder((image_size, image_size), mode="RGB", workers=workers) as dec, \
            staged_dataset(out_dir) as stage:
        dec.start(sum(len(files[c]) for s in splits for c in chosen[s]))
        for s in splits:
            with StoreWriter(stage / f"{s}.h5", chosen[s], dataset=dataset, split=s,
                             source=f"{FOLDER}/images",
                             num_images=sum(len(files[c]) for c in chosen[s])) as w:
                write_classes(w, dec, ((label, [(str(f), f) for f in files[c]])
                                       for label, c in enumerate(chosen[s])))
    return [out_dir / f"{s}.h5" for s in splits]
