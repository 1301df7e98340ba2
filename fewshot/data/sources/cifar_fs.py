"""CIFAR-FS and FC100: the few-shot class splits of CIFAR-100, from ``cifar-100-python/``.

Both use all 600 images of a class (the 500 of the official ``train`` batch, then the 100 of
``test``, in file order), 32x32 RGB, and assign whole fine classes to ``train``/``val``/``test``:

* **CIFAR-FS** (Bertinetto, Henriques, Torr & Vedaldi, "Meta-learning with differentiable
  closed-form solvers", ICLR 2019): 64 / 16 / 20 fine classes chosen at random by the authors;
  the lists are those of their R2D2 repository (``data/cifar-fs/splits/bertinetto``), shipped
  as ``splits/cifar-fs/{train,val,test}.txt`` (one fine label name per line, sorted).
* **FC100** (Oreshkin, Rodríguez López & Lacoste, "TADAM: Task dependent adaptive metric for
  improved few-shot learning", NeurIPS 2018): by superclass, so that no superclass is shared
  between splits: 12 / 4 / 4 superclasses = 60 / 20 / 20 fine classes; superclasses (CIFAR-100
  coarse label indices) train 1-6, 9, 10, 15, 17-19, val 8, 11, 13, 16, test 0, 7, 12, 14,
  shipped by name as ``splits/fc100/{train,val,test}.txt``.

The shipped lists are checked before anything is written (counts, disjoint splits, every one
of the 100 fine / 20 coarse names of the user's ``meta`` used once; FC100's names also against
the coarse indices above), so a changed list or a foreign ``meta`` is a one-line DataError.
Store classes are the split's fine names in CIFAR-100 label order (alphabetical);
``class_info["superclass"]`` holds each class's coarse name.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from fewshot.data.sources import staged_dataset
from fewshot.data.sources.cifar import locate, read_batches, read_meta, superclass_names
from fewshot.data.store import write_store
from fewshot.errors import DataError

SPLITS = ("train", "val", "test")
VARIANTS = ("cifar-fs", "fc100")
#: classes per split: CIFAR-FS fine classes; FC100 superclasses
SIZES = {"cifar-fs": {"train": 64, "val": 16, "test": 20},
         "fc100": {"train": 12, "val": 4, "test": 4}}
#: FC100 superclasses by CIFAR-100 coarse label index (Oreshkin et al. 2018, Sec. 4)
FC100_COARSE = {"train": (1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19), "val": (8, 11, 13, 16),
                "test": (0, 7, 12, 14)}


def published_lists(variant: str) -> Dict[str, List[str]]:
    """The shipped class (CIFAR-FS) or superclass (FC100) names of each split, checked for
    counts and disjointness."""
    if variant not in VARIANTS:
        raise DataError(f"unknown CIFAR-100 few-shot split '{variant}'; use cifar-fs or fc100")
    base = resources.files("fewshot.data.sources") / "splits" / variant
    lists = {}
    for split in SPLITS:
        text = (base / f"{split}.txt").read_text(encoding="utf-8")
        lists[split] = [line.strip() for line in text.splitlines() if line.strip()]
        if len(lists[split]) != SIZES[variant][split] or \
                len(set(lists[split])) != len(lists[split]):
            raise DataError(f"{base / f'{split}.txt'}: {len(lists[split])} names, expected "
                            f"{SIZES[variant][split]} distinct; the installed list is damaged, "
                            "reinstall fewshot")
    names = [n for v in lists.values() for n in v]
    if len(set(names)) != len(names):
        raise DataError(f"{base}: a name is in two splits; reinstall fewshot")
    return lists


def _check_against_meta(variant: str, lists: Dict[str, List[str]], meta, folder: Path) -> None:
    known = meta["coarse"] if variant == "fc100" else meta["names"]
    listed = sorted(n for v in lists.values() for n in v)
    if listed != sorted(known):
        odd = sorted(set(listed) ^ set(known))[:3]
        raise DataError(f"{folder / 'meta'}: its {len(known)} "
                        f"{'coarse' if variant == 'fc100' else 'fine'} label names differ from "
                        f"the published {variant} lists (e.g. {odd}); pass the official "
                        "cifar-100-python/ folder")
    if variant == "fc100":
        for split, idx in FC100_COARSE.items():
            if sorted(known[i] for i in idx) != sorted(lists[split]):
                raise DataError(f"{folder / 'meta'}: coarse labels {list(idx)} are not the FC100 "
                                f"{split} superclasses {lists[split]}; pass the official "
                                "cifar-100-python/ folder")


def split_classes(variant: str, meta, fine_to_coarse: np.ndarray) -> Dict[str, List[int]]:
    """{split: fine label indices, ascending} of ``variant`` given the user's meta and each
    fine class's coarse index."""
    lists = published_lists(variant)
    names = meta["names"]
    if variant == "cifar-fs":
        wanted = {s: set(v) for s, v in lists.items()}
        return {s: [i for i, n in enumerate(names) if n in wanted[s]] for s in SPLITS}
    out = {}
    for split in SPLITS:
        coarse = {meta["coarse"].index(c) for c in lists[split]}
        out[split] = [i for i in range(len(names)) if fine_to_coarse[i] in coarse]
        want = 5 * SIZES["fc100"][split]
        if len(out[split]) != want:
            raise DataError(f"FC100 {split}: {len(out[split])} fine classes in superclasses "
                            f"{lists[split]}, expected {want}; the batches' coarse labels are not "
                            "CIFAR-100's")
    return out


def convert(from_path, out_dir, *, variant: str = "cifar-fs", splits=SPLITS,
            dataset: Optional[str] = None) -> List[Path]:
    """Write ``train``/``val``/``test`` stores of ``variant`` from ``cifar-100-python/``."""
    lists = published_lists(variant)
    folder = locate(Path(from_path), "cifar100")
    meta = read_meta(folder, "cifar100")
    _check_against_meta(variant, lists, meta, folder)
    for s in splits:
        if s not in SPLITS:
            raise DataError(f"unknown {variant} split '{s}'; use train, val or test")
    parts = [read_batches(folder, "cifar100", s, ("fine_labels", "coarse_labels"))
             for s in ("train", "test")]
    images = np.concatenate([p[0] for p in parts])
    fine = np.concatenate([p[1]["fine_labels"] for p in parts])
    coarse = np.concatenate([p[1]["coarse_labels"] for p in parts])
    if fine.min() < 0 or fine.max() >= len(meta["names"]):
        raise DataError(f"{folder}: fine labels outside 0..{len(meta['names']) - 1}")
    fine_to_coarse = np.full(len(meta["names"]), -1, dtype=np.int64)
    fine_to_coarse[fine] = coarse
    superclass = superclass_names(fine, coarse, meta)
    chosen = split_classes(variant, meta, fine_to_coarse)
    out_dir = Path(out_dir)
    with staged_dataset(out_dir) as stage:
        for s in splits:
            classes = chosen[s]
            remap = np.full(len(meta["names"]), -1, dtype=np.int64)
            remap[classes] = np.arange(len(classes))
            rows = np.flatnonzero(remap[fine] >= 0)
            write_store(stage / f"{s}.h5", images[rows], remap[fine[rows]],
                        [meta["names"][i] for i in classes], dataset=dataset or variant,
                        split=s, source=f"{folder.name}/train+test",
                        class_info={"superclass": [superclass[i] for i in classes]})
    return [out_dir / f"{s}.h5" for s in splits]
