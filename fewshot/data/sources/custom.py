"""Your own images into stores: ``fewshot data prepare folder|csv NAME --from PATH``.

The listing (:mod:`~fewshot.data.sources.image_folder`) gives classes and files, a class-level
split (:mod:`~fewshot.data.sources.class_split`) gives the stores, and every image is decoded
with Pillow as the other converters do (:func:`fewshot.data.sources.decode_image`): converted
to ``mode`` ("RGB", default, or "L") *before* it is resized, so a 1-bit image is resized as
8-bit grey (Pillow would use nearest neighbour on mode "1" whatever the filter), then resized
to ``image_size`` (default 84x84, as mini-ImageNet; ``N``, ``H,W`` or ``original``) with the
``resample`` filter (default Lanczos), without cropping; transparency is dropped as Pillow's
``convert`` does, the first frame of an animated GIF is used. JPEGs at least twice the target
size are first decoded at a reduced power-of-two scale (``Image.draft``).

Checks, each a one-line :class:`DataError` before anything is written: every split has at least
``min_classes`` classes (default 5, a 5-way episode) and every class at least ``min_images``
images (default 2, one support and one query). An image that cannot be decoded fails the
conversion naming the file (``on_error="fail"``, default) or is left out and counted
(``on_error="skip"``; the counts are re-checked after decoding). All stores of the dataset are
written, or none, and they replace every store of the previous conversion of NAME
(:func:`~fewshot.data.sources.staged_dataset` with ``replace_all``).

Each store records ``source`` (the folder or CSV), ``class_names``, ``class_info["origin"]``
(each class's folder, or the CSV line of its first image) and the settings (attributes
``extra_split_rule``, ``extra_image_mode``, ``extra_resample``, ``extra_skipped_images``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from fewshot.data.sources import Decoder, RESAMPLE_FILTERS, staged_dataset, write_classes
from fewshot.data.sources.class_split import assign, check_sizes
from fewshot.data.sources.image_folder import Listing, list_csv, list_folder
from fewshot.data.store import StoreWriter
from fewshot.errors import ConfigError, DataError

KINDS = ("folder", "csv")
MODES = ("RGB", "L")
ON_ERROR = ("fail", "skip")


@dataclass
class Conversion:
    """What a conversion wrote: ``paths`` of the stores, ``skipped`` messages of the images
    left out (``on_error="skip"``), ``unused`` classes named in no split list."""
    paths: List[Path]
    skipped: List[str] = field(default_factory=list)
    unused: List[str] = field(default_factory=list)


def parse_size(value) -> Optional[Tuple[int, int]]:
    """``84`` / ``"84"`` -> (84, 84); ``"84,96"`` or (84, 96) -> (H, W); ``"original"`` -> None
    (images are kept at their size, which must then be the same for all)."""
    if isinstance(value, str) and value.strip().lower() == "original":
        return None
    parts = value.replace("x", ",").split(",") if isinstance(value, str) else \
        list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        size = [int(p) for p in parts]
    except (TypeError, ValueError):
        size = []
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"image_size={value!r}: expected N (square), H,W or 'original'")
    return size[0], size[1]


def _choice(key: str, value: str, allowed) -> str:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not understood; use one of {', '.join(allowed)}")
    return value


def _check_images(listing: Listing, splits: Dict[str, List[str]], min_images: int) -> None:
    for split, names in splits.items():
        for name in names:
            n = len(listing.files[name])
            if n < min_images:
                raise DataError(f"{listing.origin[name]}: class '{name}' (split '{split}') has "
                                f"{n} image(s), fewer than min_images={min_images}; add "
                                "images, remove the class, or lower --opt min_images")


def _write_split(path: Path, listing: Listing, split: str, names: List[str], decoder: Decoder,
                 *, dataset: str, attrs: dict, skip: bool, min_images: int) -> List[str]:
    """One store; -> messages of the images skipped."""
    skipped: Optional[list] = [] if skip else None
    items = [(label, [(str(f), f) for f in listing.files[n]]) for label, n in enumerate(names)]
    with StoreWriter(path, names, dataset=dataset, split=split, source=str(listing.source),
                     num_images=sum(len(i) for _, i in items), attrs=attrs,
                     class_info={"origin": [listing.origin[n] for n in names]}) as w:
        write_classes(w, decoder, items, skipped=skipped)
        lost = [label for label, _ in skipped or []]
        for label, name in enumerate(names):
            left = len(listing.files[name]) - lost.count(label)
            if left < min_images:
                raise DataError(f"{listing.origin[name]}: class '{name}' (split '{split}') keeps "
                                f"{left} image(s) after skipping {lost.count(label)} unreadable "
                                f"one(s), fewer than min_images={min_images}; replace the "
                                "files or lower --opt min_images")
        w.extra_attrs["skipped_images"] = len(lost)
    return [m for _, m in skipped or []]


def convert(kind: str, from_path, out_dir, *, images=None, split: Optional[str] = None,
            split_lists=None, seed: int = 0, image_size=84, mode: str = "RGB",
            resample: str = "lanczos", on_error: str = "fail", min_images: int = 2,
            min_classes: int = 5, workers: Optional[int] = None,
            dataset: str = "custom") -> Conversion:
    """Convert a class folder (``kind="folder"``) or a path,label CSV (``kind="csv"``, image
    paths relative to ``images`` or the CSV's folder) into ``out_dir/<split>.h5``."""
    _choice("kind", kind, KINDS)
    size = parse_size(image_size)
    mode = _choice("mode", str(mode).upper(), MODES)
    _choice("resample", str(resample).lower(), RESAMPLE_FILTERS)
    skip = _choice("on_error", on_error, ON_ERROR) == "skip"
    if int(min_images) < 1 or int(min_classes) < 1:
        raise ConfigError("min_images and min_classes must be >= 1")
    if kind == "folder" and images is not None:
        raise ConfigError("--images is for `prepare csv`; a folder's images are in its class "
                          "sub-folders")
    listing = list_csv(from_path, images) if kind == "csv" else list_folder(from_path)
    if listing.missing and not skip:
        raise DataError(f"{listing.missing[0]} ({len(listing.missing)} listed files missing); "
                        "fix the paths (relative to --images or the CSV's folder) or pass "
                        "--opt on_error=skip")
    empty = [n for n, f in listing.files.items() if not f]  # every file of the class missing
    if empty:
        raise DataError(f"{listing.origin[empty[0]]}: class '{empty[0]}' has no images left "
                        f"after skipping {len(listing.missing)} missing file(s); fix the paths")
    splits, unused, rule = assign(list(listing.files), fractions=split, split_lists=split_lists,
                                  seed=int(seed), column=listing.split, source=str(listing.source))
    check_sizes(splits, int(min_classes), rule)
    _check_images(listing, splits, int(min_images))
    attrs = {"split_rule": rule, "image_mode": mode, "resample": str(resample).lower()}
    skipped = list(listing.missing)
    out_dir = Path(out_dir)
    with Decoder(size, mode=mode, workers=workers, resample=str(resample).lower()) as dec, \
            staged_dataset(out_dir, replace_all=True) as stage:
        dec.start(sum(len(listing.files[n]) for names in splits.values() for n in names))
        for s, names in splits.items():
            skipped += _write_split(stage / f"{s}.h5", listing, s, names, dec, dataset=dataset,
                                    attrs=attrs, skip=skip, min_images=int(min_images))
    return Conversion([out_dir / f"{s}.h5" for s in splits], skipped, unused)
