"""Omniglot (Lake et al., 2015) from the official ``images_background.zip`` /
``images_evaluation.zip`` (or their extracted folders, e.g. torchvision's ``omniglot-py/``).

Each 105x105 1-bit PNG is converted to 8-bit grayscale *before* it is resized to
``image_size`` (28 by default) with a Lanczos filter, so strokes are anti-aliased rather than
thresholded, and inverted (``p -> 255 - p``) so ink is bright on a dark background (as
Prototypical Networks and learn2learn feed it: ``1 - x``).

Two class splits:

* ``"vinyals"`` (Vinyals et al., 2016, as distributed with Prototypical Networks): stores
  ``train``/``val``/``test`` of 1028/172/423 characters, each character in four rotations
  (0, 90, 180, 270 degrees counter-clockwise, ``np.rot90``) that are separate classes, named
  ``Alphabet/characterNN/rotDDD``: 4112/688/1692 classes of 20 images. The class lists are
  read from ``train.txt``/``val.txt``/``test.txt`` (one ``Alphabet/characterNN/rotDDD`` per
  line) when ``split_lists=DIR`` is given, in their line order; otherwise the same split is
  built in: whole alphabets, except Gurmukhi whose characters 42-45 are test (see
  :data:`VINYALS_VAL_ALPHABETS`, :data:`VINYALS_TEST_ALPHABETS`), classes in sorted order.
* ``"official"``: one store per set, ``background`` (964 characters) and ``evaluation`` (659),
  classes ``Alphabet/characterNN``, no rotations. Any other zip/folder of the same layout
  (e.g. ``images_background_small1.zip``) becomes a store named after it
  (``background_small1``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from fewshot.data.sources import Decoder, FileTree, read_text_lines, require_dir
from fewshot.data.store import StoreWriter
from fewshot.errors import DataError, unknown_name

NAME = "omniglot"
SETS = ("images_background", "images_evaluation")
SCHEMES = ("auto", "vinyals", "official")
ROTATIONS = (0, 90, 180, 270)

#: Vinyals split, validation alphabets (whole alphabets, 172 characters)
VINYALS_VAL_ALPHABETS = ("Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)")
#: Vinyals split, test alphabets (423 characters with Gurmukhi 42-45)
VINYALS_TEST_ALPHABETS = (
    "Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian", "Old_Church_Slavonic_(Cyrillic)",
    "Oriya", "Sylheti", "Syriac_(Serto)", "Tengwar", "Tibetan", "ULOG")
#: characters of Gurmukhi (an otherwise-train alphabet) that belong to the Vinyals test split
VINYALS_TEST_GURMUKHI = range(42, 46)
#: (characters, classes incl. rotations) per Vinyals split
VINYALS_SIZES = {"train": 1028, "val": 172, "test": 423}

_LINE = re.compile(r"^([^/]+)/(character\d+)/rot(\d{3})$")

Key = Tuple[str, str]  # (alphabet, "characterNN")


def vinyals_split_of(alphabet: str, character: str) -> str:
    """Split ('train'/'val'/'test') of a character under the built-in Vinyals split."""
    if alphabet in VINYALS_TEST_ALPHABETS:
        return "test"
    if alphabet in VINYALS_VAL_ALPHABETS:
        return "val"
    if alphabet == "Gurmukhi" and int(character.replace("character", "")) in VINYALS_TEST_GURMUKHI:
        return "test"
    return "train"


def parse_split_list(path: Path) -> List[Tuple[Key, int]]:
    """Lines ``Alphabet/characterNN/rotDDD`` -> [((alphabet, characterNN), degrees)]."""
    out = []
    for lineno, line in read_text_lines(path):
        m = _LINE.match(line)
        if not m or int(m.group(3)) not in ROTATIONS:
            raise DataError(f"{path}:{lineno}: expected 'Alphabet/characterNN/rotDDD' with DDD in "
                            f"000/090/180/270, got '{line}'; use the Prototypical Networks "
                            "split files (data/omniglot/splits/vinyals)")
        out.append(((m.group(1), m.group(2)), int(m.group(3))))
    if not out:
        raise DataError(f"{path}: split list is empty")
    return out


def locate_sets(from_path: Path) -> Dict[str, Path]:
    """Map set name ('background', 'evaluation', or another zip's stem) -> zip file or folder."""
    p = require_dir(from_path, "pass the folder holding images_background.zip and "
                               "images_evaluation.zip (or one such zip)")
    if p.is_file():
        if p.suffix.lower() != ".zip":
            raise DataError(f"{p}: expected an Omniglot .zip (images_background.zip) or a folder")
        return {_set_name(p.stem): p}
    found: Dict[str, Path] = {}
    for base in [p] + sorted(d for d in p.iterdir() if d.is_dir()):
        for s in SETS:
            if _set_name(s) in found:
                continue
            if (base / s).is_dir():
                found[_set_name(s)] = base / s
            elif (base / f"{s}.zip").is_file():
                found[_set_name(s)] = base / f"{s}.zip"
    if not found:
        zips = sorted(p.glob("images_*.zip"))
        for z in zips:
            found[_set_name(z.stem)] = z
    if not found:
        if any(c.is_dir() and any(c.glob("character*")) for c in p.iterdir()):
            found[_set_name(p.name)] = p  # a folder of alphabets
        else:
            raise DataError(f"{p}: no images_background(.zip) or images_evaluation(.zip) found; "
                            "download them from https://github.com/brendenlake/omniglot "
                            "(python/) and pass their folder with --from")
    return found


def _set_name(stem: str) -> str:
    return stem[len("images_"):] if stem.startswith("images_") else stem


def load_set(path: Path, decoder: Decoder) -> Dict[Key, np.ndarray]:
    """Decode every PNG of one set: {(alphabet, characterNN): (drawings, H, W, 1) uint8}."""
    with FileTree(path) as tree:
        files = tree.files((".png",))
        if not files:
            raise DataError(f"{path}: no .png images inside; expected "
                            "<Alphabet>/characterNN/*.png (the official Omniglot layout)")
        groups: Dict[Key, List[str]] = {}
        for rel in files:
            parts = rel.split("/")
            if len(parts) < 3 or not parts[-2].startswith("character"):
                raise DataError(f"{tree.name(rel)}: not in <Alphabet>/characterNN/ (wrong "
                                "layout); use the official Omniglot zips")
            groups.setdefault((parts[-3], parts[-2]), []).append(rel)
        keys = sorted(groups)
        items = [(tree.name(rel), tree.read(rel)) for k in keys for rel in groups[k]]
    images = decoder.decode(items)
    out, i = {}, 0
    for k in keys:
        n = len(groups[k])
        out[k] = images[i:i + n]
        i += n
    return out


def _rotate(images: np.ndarray, degrees: int) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(images, k=degrees // 90, axes=(1, 2)))


def _write(path: Path, classes: Sequence[Tuple[Key, int]], chars: Dict[Key, np.ndarray], *,
           split: str, source: str, rotations: bool, dataset: str) -> Path:
    if rotations:
        names = [f"{a}/{c}/rot{r:03d}" for (a, c), r in classes]
    else:
        names = [f"{a}/{c}" for (a, c), _ in classes]
    info = {"alphabet": [a for (a, _), _ in classes],
            "character": [f"{a}/{c}" for (a, c), _ in classes]}
    with StoreWriter(path, names, dataset=dataset, split=split, source=source,
                     num_images=sum(len(chars[k]) for k, _ in classes), class_info=info) as w:
        for label, (key, rot) in enumerate(classes):
            w.add(_rotate(chars[key], rot) if rot else chars[key], label)
    return path


def _read_split_lists(folder: Path, chars, src: str) -> Dict[str, List[Tuple[Key, int]]]:
    """train/val/test.txt of ``folder`` (Prototypical Networks' Vinyals lists): every character
    must be among the images, and no class may be listed twice."""
    lists = {}
    seen: Dict[Tuple[Key, int], str] = {}
    for split in ("train", "val", "test"):
        f = folder / f"{split}.txt"
        if not f.is_file():
            raise DataError(f"{f}: split list not found; split_lists must be the folder with "
                            "train.txt, val.txt and test.txt (Prototypical Networks' "
                            "data/omniglot/splits/vinyals)")
        entries = parse_split_list(f)
        for lineno, e in enumerate(entries, 1):
            if e[0] not in chars:
                raise DataError(f"{f}:{lineno}: character '{e[0][0]}/{e[0][1]}' is not in "
                                f"{src}; the split list and the images do not match")
            if e in seen:
                raise DataError(f"{f}:{lineno}: class {e[0][0]}/{e[0][1]}/rot{e[1]:03d} also "
                                f"listed in {seen[e]}.txt; split lists must be disjoint")
            seen[e] = split
        lists[split] = entries
    return lists


def convert(from_path, out_dir, *, splits: str = "auto", split_lists: Optional[Path] = None,
            image_size: int = 28, invert: bool = True, workers: Optional[int] = None,
            dataset: str = NAME) -> List[Path]:
    """Convert Omniglot at ``from_path`` into stores under ``out_dir``; returns their paths.

    ``splits``: "vinyals" (train/val/test with rotations; needs both full sets), "official"
    (one store per set), or "auto" (vinyals when both full sets are present, else official)."""
    if splits not in SCHEMES:
        raise DataError(unknown_name("omniglot split scheme", splits, SCHEMES))
    out_dir = Path(out_dir)
    sets = locate_sets(Path(from_path))
    full = all(_set_name(s) in sets for s in SETS)
    scheme = ("vinyals" if full else "official") if splits == "auto" else splits
    if scheme == "vinyals" and not full:
        missing = [f"{s}.zip" for s in SETS if _set_name(s) not in sets]
        raise DataError(f"{from_path}: the Vinyals split needs both Omniglot sets, missing "
                        f"{', '.join(missing)}; add it or use splits='official'")
    size = (int(image_size), int(image_size))
    with Decoder(size, mode="L", invert=invert, workers=workers) as dec:
        chars: Dict[Key, np.ndarray] = {}
        origin: Dict[Key, str] = {}
        loaded = {}
        for name, p in sets.items():
            loaded[name] = load_set(p, dec)
            for k, v in loaded[name].items():
                chars[k] = v
                origin[k] = name
    written: List[Path] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    if scheme == "official":
        for name, p in sets.items():
            classes = [(k, 0) for k in sorted(loaded[name])]
            written.append(_write(out_dir / f"{name}.h5", classes, loaded[name], split=name,
                                  source=p.name, rotations=False, dataset=dataset))
        return written
    src = " + ".join(p.name for p in sets.values())
    if split_lists is not None:
        lists = _read_split_lists(Path(split_lists), chars, src)
        src += f"; split lists {Path(split_lists)}"
    else:
        lists = {s: [] for s in ("train", "val", "test")}
        for k in sorted(chars):
            for r in ROTATIONS:
                lists[vinyals_split_of(*k)].append((k, r))
    for split, classes in lists.items():
        if not classes:
            raise DataError(f"{from_path}: no characters for the Vinyals '{split}' split (its "
                            "alphabets are missing: these are not the official Omniglot sets); "
                            "use splits='official' or pass split_lists=DIR")
    for split, classes in lists.items():
        written.append(_write(out_dir / f"{split}.h5", classes, chars, split=split,
                              source=src, rotations=True, dataset=dataset))
    return written
