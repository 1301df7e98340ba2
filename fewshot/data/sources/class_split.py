"""Class-level splits of a dataset a user brings: which classes go to which store.

Every rule here assigns whole classes (never the images of one class to two splits), so the
classes of the ``val`` and ``test`` episodes are unseen in training, as episodic few-shot
evaluation requires. Two rules:

* **split lists** (``split_lists=DIR`` or ``split_lists=a.txt,b.txt``): one text file per split,
  one class name per line, as the Vinyals Omniglot lists; a folder gives its ``train.txt``,
  ``val.txt`` and ``test.txt`` (whichever exist; a ``trainval.txt`` beside them is not read),
  files given by name give splits named after their stems. Store classes follow line order.
* **fractions** (``split=0.64,0.16,0.2`` with ``seed=0``): the ``K`` class names, sorted, are
  permuted by ``numpy.random.default_rng(seed).permutation(K)``; the first ``n_train`` go to
  ``train``, the next ``n_val`` to ``val``, the rest to ``test``, each split's classes then
  sorted. The counts are ``n_s = floor(f_s K)`` plus one for the splits with the largest
  remainders ``f_s K - floor(f_s K)`` (earlier split first on ties) until they sum to ``K``
  (100 classes at 0.64/0.16/0.2: 64/16/20, mini-ImageNet's proportions). A fraction of 0 leaves
  that split out. NumPy's PCG64 stream is fixed across platforms, so the seed fixes the split.

Class names are compared after Unicode NFC normalisation (a name typed on one system and a
folder made on another may differ only in composed / decomposed accents).
"""
from __future__ import annotations

import math
import re
import unicodedata
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from fewshot.data.sources import read_text_lines
from fewshot.errors import ConfigError, DataError, closest

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.64, 0.16, 0.2)
#: a split name becomes a file name <split>.h5 ('+' is taken: open_split("d", "val+test"))
SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def nfc(name: str) -> str:
    """The form class names are stored and compared in: NFC, surrounding spaces removed."""
    return unicodedata.normalize("NFC", str(name)).strip()


def check_split_name(name: str, where: str) -> str:
    if not SPLIT_NAME.match(name):
        raise DataError(f"{where}: split name {name!r} is not usable as a store name; use "
                        "letters, digits, '_', '-' or '.' (e.g. train, val, test)")
    return name


def parse_fractions(value) -> Tuple[float, ...]:
    """``"0.64,0.16,0.2"`` (or a sequence) -> three fractions of train/val/test summing to 1."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        fr = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise ConfigError(f"split={value!r}: expected three fractions train,val,test such as "
                          "0.64,0.16,0.2") from None
    if len(fr) != len(SPLITS) or any(not math.isfinite(f) or f < 0 for f in fr):
        raise ConfigError(f"split={value!r}: expected three fractions >= 0 (train,val,test), "
                          "e.g. 0.64,0.16,0.2")
    if abs(sum(fr) - 1.0) > 1e-6:
        raise ConfigError(f"split={value!r}: the fractions sum to {sum(fr):g}, not 1")
    return fr


def fraction_counts(k: int, fractions: Sequence[float]) -> List[int]:
    """Classes per split by the largest-remainder rule (module docstring)."""
    exact = [round(f * k, 9) for f in fractions]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:k - sum(counts)]:
        counts[i] += 1
    return counts


def seeded_split(names: Sequence[str], fractions: Sequence[float],
                 seed: int) -> Dict[str, List[str]]:
    """Class names -> {split: sorted class names} by seeded fractions (module docstring)."""
    ordered = sorted(names)
    perm = np.random.default_rng(int(seed)).permutation(len(ordered))
    out: Dict[str, List[str]] = {}
    start = 0
    for split, f, n in zip(SPLITS, fractions, fraction_counts(len(ordered), fractions)):
        if f > 0:  # a split asked for but rounded to no class stays, for check_sizes to refuse
            out[split] = sorted(ordered[i] for i in perm[start:start + n])
        start += n
    return out


def _list_files(spec) -> List[Path]:
    if isinstance(spec, (list, tuple)):
        return [Path(p).expanduser() for p in spec]
    text = str(spec)
    if "," in text:
        return [Path(p.strip()).expanduser() for p in text.split(",") if p.strip()]
    p = Path(text).expanduser()
    if p.is_dir():
        files = [p / f"{s}.txt" for s in SPLITS if (p / f"{s}.txt").is_file()]
        if not files:
            raise DataError(f"{p}: no train.txt, val.txt or test.txt here; split lists hold one "
                            "class name per line, one file per split")
        return files
    return [p]


def read_split_lists(spec) -> Dict[str, List[Tuple[str, Path, int]]]:
    """-> {split: [(class name, list file, line number)]}; a class named twice (in one list
    or in two) is a DataError naming both places."""
    out: Dict[str, List[Tuple[str, Path, int]]] = {}
    seen: Dict[str, Tuple[Path, int]] = {}
    for path in _list_files(spec):
        split = check_split_name(path.stem, str(path))
        if split in out:
            raise DataError(f"{path}: a second list for split '{split}'; give one file per split")
        rows = []
        for lineno, line in read_text_lines(path):
            name = nfc(line)
            if name in seen:
                first, first_line = seen[name]
                raise DataError(f"{path}:{lineno}: class '{name}' is listed twice (first in "
                                f"{first.name}:{first_line}); a class belongs to one split")
            seen[name] = (path, lineno)
            rows.append((name, path, lineno))
        if not rows:
            raise DataError(f"{path}: split list is empty")
        out[split] = rows
    return out


def split_by_lists(names: Sequence[str], lists: Dict[str, List[Tuple[str, Path, int]]],
                   source: str) -> Tuple[Dict[str, List[str]], List[str]]:
    """-> ({split: class names in line order}, classes of ``names`` in no list). A listed
    class that ``names`` lacks is a DataError naming the list, line and closest class."""
    have = set(names)
    for rows in lists.values():
        for name, path, lineno in rows:
            if name not in have:
                raise DataError(f"{path}:{lineno}: class '{name}' is not in {source} "
                                f"({len(have)} classes).{closest(name, have)} Fix the list or "
                                "the data")
    listed = {name for rows in lists.values() for name, _, _ in rows}
    return ({s: [n for n, _, _ in rows] for s, rows in lists.items()},
            sorted(have - listed))


def check_sizes(splits: Dict[str, List[str]], min_classes: int, rule: str) -> None:
    """Every split must hold at least ``min_classes`` classes (an N-way episode needs N)."""
    total = sum(len(v) for v in splits.values())
    for split, names in splits.items():
        if len(names) < min_classes:
            raise DataError(
                f"split '{split}' gets {len(names)} of {total} classes ({rule}), fewer than "
                f"min_classes={min_classes} (a {min_classes}-way episode needs "
                f"{min_classes}); bring more classes, change the split, or lower "
                "--opt min_classes")


def assign(names: Sequence[str], *, fractions: Optional[str], split_lists, seed: int,
           column: Optional[Dict[str, str]], source: str):
    """The one place that picks the rule: -> ({split: classes}, classes left out, rule text).

    ``column`` is the CSV's split column (class -> split) when it has one; giving it together
    with ``split_lists`` or ``split`` fractions is a ConfigError (two rules for one split)."""
    given = [w for w, v in (("a split column", column), ("split_lists", split_lists),
                            ("split", fractions)) if v]
    if len(given) > 1:
        raise ConfigError(f"{source}: {' and '.join(given)} both define the splits; give one")
    if column:
        out: Dict[str, List[str]] = {}
        for name in sorted(names):
            out.setdefault(column[name], []).append(name)
        order = {s: i for i, s in enumerate(SPLITS)}
        return dict(sorted(out.items(), key=lambda kv: (order.get(kv[0], 3), kv[0]))), [], \
            "the CSV's split column"
    if split_lists:
        splits, unused = split_by_lists(names, read_split_lists(split_lists), source)
        return splits, unused, f"split lists {split_lists}"
    fr = parse_fractions(fractions or DEFAULT_FRACTIONS)
    text = ",".join(f"{f:g}" for f in fr)
    return seeded_split(names, fr, seed), [], f"split={text} seed={seed}"
