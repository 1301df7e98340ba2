"""Fixture builders: tiny copies of every real on-disk format, written into tmp_path.

Each builder returns the path to pass to the converter and the ground truth (images per class
in the order the converter must produce them), built independently of fewshot's readers.
"""
from __future__ import annotations

import csv
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"


def png_bytes(arr: np.ndarray, mode=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG") if mode is None else \
        Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_file(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="JPEG", quality=95)


def _pickle(path: Path, obj, protocol=2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=protocol)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ---------------------------------------------------------------------------------- CIFAR
@pytest.fixture
def fake_cifar10(tmp_path, rng):
    """cifar-10-batches-py with 5 train batches of 6 images and a test batch of 10; keys are
    bytes (Python 2 pickles loaded with encoding='bytes')."""
    root = tmp_path / "cifar-10-batches-py"
    names = [f"class{i}" for i in range(10)]
    _pickle(root / "batches.meta", {b"label_names": [n.encode() for n in names],
                                    b"num_vis": 3072})
    truth = {"train": ([], []), "test": ([], [])}
    train_labels = rng.permutation(np.arange(30) % 10)  # every class in every split
    for fname, split, n, labels in \
            [(f"data_batch_{i}", "train", 6, train_labels[6 * i - 6:6 * i]) for i in range(1, 6)] \
            + [("test_batch", "test", 10, rng.permutation(10))]:
        imgs = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = [int(v) for v in labels]
        data = imgs.transpose(0, 3, 1, 2).reshape(n, 3072)
        _pickle(root / fname, {b"batch_label": b"x", b"labels": labels, b"data": data,
                               b"filenames": [b"f.png"] * n})
        truth[split][0].append(imgs)
        truth[split][1].extend(labels)
    truth = {s: (np.concatenate(x), np.array(y)) for s, (x, y) in truth.items()}
    return tmp_path, names, truth


@pytest.fixture
def fake_cifar100(tmp_path, rng):
    root = tmp_path / "cifar-100-python"
    fine = [f"fine{i:02d}" for i in range(100)]
    coarse = [f"coarse{i:02d}" for i in range(20)]
    _pickle(root / "meta", {b"fine_label_names": [n.encode() for n in fine],
                            b"coarse_label_names": [n.encode() for n in coarse]})
    truth = {}
    for split, n in (("train", 200), ("test", 100)):
        imgs = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        f = rng.permutation(np.arange(n) % 100)
        c = f // 5  # each fine class in one superclass
        _pickle(root / split, {b"data": imgs.transpose(0, 3, 1, 2).reshape(n, 3072),
                               b"fine_labels": f.tolist(), b"coarse_labels": c.tolist(),
                               b"filenames": [b"f"] * n})
        truth[split] = (imgs, f)
    return tmp_path, fine, coarse, truth


# ---------------------------------------------------------------------------------- tiny-ImageNet
@pytest.fixture
def fake_tiny(tmp_path):
    """tiny-imagenet-200 with 3 classes, 4 train + 2 val images each, flat-colour 64x64 JPEGs
    (one grayscale); returns (root, wnids, colour per class)."""
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01", "n03"]  # wnids.txt order is the class order
    colours = {"n01": (200, 30, 30), "n02": (30, 200, 30), "n03": (30, 30, 200)}
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n01\tgoldfish\nn02\tshark\nn03\tfrog\n")
    ann = []
    for w in wnids:
        for i in range(4):
            jpeg_file(root / "train" / w / "images" / f"{w}_{i}.JPEG",
                      np.full((64, 64, 3), colours[w], np.uint8))
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
        for i in range(2):
            name = f"val_{w}_{i}.JPEG"
            jpeg_file(root / "val" / "images" / name, np.full((64, 64, 3), colours[w], np.uint8))
            ann.append(f"{name}\t{w}\t0\t0\t63\t63")
    # one grayscale JPEG, as the real set has
    Image.fromarray(np.full((64, 64), 77, np.uint8)).save(
        root / "train" / "n01" / "images" / "n01_3.JPEG", format="JPEG")
    (root / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    return root, wnids, colours


# ---------------------------------------------------------------------------------- mini-ImageNet
@pytest.fixture
def fake_mini_cache(tmp_path, rng):
    """mini-imagenet-cache-{train,val,test}.pkl with 12x12 images: 3/2/2 classes of 4 rows;
    rows of a class are interleaved in image_data (as class_dict allows)."""
    truth = {}
    for split, k in (("train", 3), ("val", 2), ("test", 2)):
        n = 4 * k
        imgs = rng.integers(0, 256, (n, 12, 12, 3), dtype=np.uint8)
        wnids = [f"n{split}{c}" for c in range(k)][::-1]  # unsorted dict order
        cd = {w: list(range(c, n, k)) for c, w in enumerate(wnids)}
        _pickle(tmp_path / f"mini-imagenet-cache-{split}.pkl",
                {"image_data": imgs, "class_dict": cd}, protocol=4)
        truth[split] = {w: imgs[idx] for w, idx in cd.items()}
    return tmp_path, truth


@pytest.fixture
def fake_mini_jpeg(tmp_path):
    """images/ of flat-colour 40x30 JPEGs + Ravi-style CSVs (2 classes per split, 3 images)."""
    tmp_path = tmp_path / "jpeg"
    truth = {}
    for s, split in enumerate(("train", "val", "test")):
        rows = []
        truth[split] = {}
        for c in range(2):
            wnid = f"n0{s}{c}000000"[:9]
            colour = (40 + 60 * c, 90 + 50 * s, 200 - 70 * c)
            truth[split][wnid] = colour
            for i in range(3):
                fname = f"{wnid}{i + 1:08d}.jpg"
                jpeg_file(tmp_path / "images" / fname, np.full((30, 40, 3), colour, np.uint8))
                rows.append((fname, wnid))
        with open(tmp_path / f"{split}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["filename", "label"])
            w.writerows(rows)
    return tmp_path, truth


# ---------------------------------------------------------------------------------- Omniglot
def omniglot_drawings(rng, n):
    """n random 105x105 boolean drawings (True = white background, ink False)."""
    imgs = np.ones((n, 105, 105), dtype=bool)
    for i in range(n):
        r0, c0 = rng.integers(10, 60, 2)
        imgs[i, r0:r0 + 30, c0:c0 + 8] = False
        imgs[i, r0 + 20:r0 + 26, c0:c0 + 35] = False
    return imgs


def write_omniglot_zip(path: Path, top: str, chars: dict) -> None:
    """chars: {(alphabet, characterNN): bool array (d, 105, 105)} -> an official-layout zip
    with directory entries and 1-bit PNGs."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{top}/", "")
        cid = 1
        for (alpha, char), drawings in sorted(chars.items()):
            z.writestr(f"{top}/{alpha}/", "") if not any(
                n == f"{top}/{alpha}/" for n in z.namelist()) else None
            z.writestr(f"{top}/{alpha}/{char}/", "")
            for d, img in enumerate(drawings, 1):
                z.writestr(f"{top}/{alpha}/{char}/{cid:04d}_{d:02d}.png",
                           png_bytes((img * 255).astype(np.uint8), "1"))
            cid += 1


@pytest.fixture
def omniglot_tools():
    """(omniglot_drawings, write_omniglot_zip) for tests that build their own zips."""
    return omniglot_drawings, write_omniglot_zip


@pytest.fixture
def fake_omniglot(tmp_path, rng):
    """images_background.zip (alphabets Aa, Bb) + images_evaluation.zip (Cc), 2 characters
    each, 3 drawings; plus Vinyals-style split lists (train: Aa, val: Bb, test: Cc)."""
    bg = {("Aa", "character01"): omniglot_drawings(rng, 3),
          ("Aa", "character02"): omniglot_drawings(rng, 3),
          ("Bb", "character01"): omniglot_drawings(rng, 3),
          ("Bb", "character02"): omniglot_drawings(rng, 3)}
    ev = {("Cc", "character01"): omniglot_drawings(rng, 3),
          ("Cc", "character02"): omniglot_drawings(rng, 3)}
    src = tmp_path / "src"
    src.mkdir()
    write_omniglot_zip(src / "images_background.zip", "images_background", bg)
    write_omniglot_zip(src / "images_evaluation.zip", "images_evaluation", ev)
    lists = tmp_path / "splits"
    lists.mkdir()
    for split, alpha in (("train", "Aa"), ("val", "Bb"), ("test", "Cc")):
        lines = [f"{alpha}/character{c:02d}/rot{r:03d}" for c in (1, 2) for r in (0, 90, 180, 270)]
        (lists / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return src, lists, {**bg, **ev}


# ---------------------------------------------------------------------------------- tiered
@pytest.fixture
def fake_tiered(tmp_path, rng):
    """{split}_images_png.pkl (list of uint8 arrays of PNG bytes) + {split}_labels.pkl for
    train (3 classes, 2 categories) and val; rows are shuffled across classes."""
    root = tmp_path / "tiered-imagenet"
    root.mkdir()
    truth = {}
    for split, k in (("train", 3), ("val", 2)):
        n = 3 * k
        spec = rng.permutation(np.repeat(np.arange(k), 3))
        gen = spec % 2
        imgs = rng.integers(0, 256, (n, 10, 10, 3), dtype=np.uint8)
        enc = [np.frombuffer(png_bytes(im), dtype=np.uint8) for im in imgs]
        _pickle(root / f"{split}_images_png.pkl", enc)
        _pickle(root / f"{split}_labels.pkl", {
            "label_specific": spec, "label_general": gen,
            "label_specific_str": [f"n{split}{c}" for c in range(k)],
            "label_general_str": ["catA", "catB"]})
        truth[split] = (imgs, spec, gen)
    return tmp_path, truth
