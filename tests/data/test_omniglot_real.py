"""The real Omniglot files from ../shared/data (skipped when absent): the official small zip,
the Vinyals split lists against the full zips, and (slow) the full Vinyals conversion."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from fewshot.data import prepare as P
from fewshot.data.sources import omniglot
from fewshot.data.store import ImageStore

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
OMNI = DATA / "omniglot"
LISTS = DATA / "splits" / "omniglot_vinyals"


def _need(*paths: Path) -> None:
    for p in paths:
        if not p.exists():
            pytest.skip(f"real Omniglot data not available ({p} missing)")


def test_small1_zip_counts_pixels_and_resize(tmp_path):
    zpath = OMNI / "images_background_small1.zip"
    npz = OMNI / "npz" / "images_background.npz"
    _need(zpath, npz)
    (path,) = omniglot.convert(zpath, tmp_path, image_size=105)
    s = ImageStore.open(path)
    assert s.split == "background_small1"
    assert s.num_classes == 136 and len(s) == 2720
    assert set(s.class_counts().tolist()) == {20}
    assert sorted(set(s.class_info["alphabet"])) == ["Balinese", "Early_Aramaic", "Greek",
                                                     "Korean", "Latin"]
    # independent ground truth: the bool arrays (True = background) indexed by official id
    with zipfile.ZipFile(zpath) as z:
        files = sorted(n for n in z.namelist() if n.endswith(".png"))
    ids = {}
    for n in files:
        _, alpha, char, fname = n.split("/")
        ids.setdefault(f"{alpha}/{char}", []).append(
            (int(fname[:4]), int(fname[5:7])))
    ref = np.load(npz)["images"]
    for c in range(0, 136, 9):
        name = s.class_names[c]
        want = np.stack([np.where(ref[i - 1, d - 1], 0, 255) for i, d in ids[name]])
        np.testing.assert_array_equal(s.read(s.class_indices(c))[..., 0], want)
    # the default 28x28 store: a smooth (area-preserving) resize of the same drawings
    small = ImageStore.open(omniglot.convert(zpath, tmp_path / "small")[0])
    assert small.image_shape == (28, 28, 1) and small.class_names == s.class_names
    ink_big = s.images.reshape(len(s), -1).mean(1) / 255
    ink_small = small.images.reshape(len(small), -1).mean(1) / 255
    assert np.abs(ink_big - ink_small).max() < 0.02
    assert len(np.unique(small.images)) > 100  # grey levels: converted to L before resizing


def test_vinyals_lists_parse_and_match_zips():
    _need(LISTS / "train.txt", OMNI / "images_background.zip", OMNI / "images_evaluation.zip")
    chars = set()
    for z in ("images_background.zip", "images_evaluation.zip"):
        with zipfile.ZipFile(OMNI / z) as f:
            for n in f.namelist():
                parts = n.split("/")
                if n.endswith(".png"):
                    chars.add((parts[1], parts[2]))
    assert len(chars) == 1623
    seen = {}
    for split, k in omniglot.VINYALS_SIZES.items():
        entries = omniglot.parse_split_list(LISTS / f"{split}.txt")
        assert len(entries) == 4 * k
        assert {r for _, r in entries} == {0, 90, 180, 270}
        for key, rot in entries:
            assert key in chars
            assert (key, rot) not in seen
            seen[(key, rot)] = split
            assert omniglot.vinyals_split_of(*key) == split  # the built-in split agrees
    assert {key for key, _ in seen} == chars  # train + val + test cover all characters
    trainval = omniglot.parse_split_list(LISTS / "trainval.txt")
    assert trainval == (omniglot.parse_split_list(LISTS / "train.txt")
                        + omniglot.parse_split_list(LISTS / "val.txt"))


@pytest.mark.slow
def test_full_vinyals_conversion(tmp_path):
    _need(LISTS / "train.txt", OMNI / "images_background.zip", OMNI / "images_evaluation.zip")
    paths = P.prepare("omniglot", OMNI, root=tmp_path, split_lists=LISTS)
    assert [p.stem for p in paths] == ["train", "val", "test"]
    rep = P.verify("omniglot", root=tmp_path)
    for split, k in omniglot.VINYALS_SIZES.items():
        r = rep["splits"][split]
        assert r["classes"] == 4 * k and r["images"] == 4 * k * 20 and r["matches_reference"]
    tr = ImageStore.open(paths[0], in_memory=False)
    lines = (LISTS / "train.txt").read_text().split()
    assert tr.class_names == lines  # class ids follow the split file's line order
    a, b = tr.read(tr.class_indices(0)), tr.read(tr.class_indices(1))  # rot000, rot090
    np.testing.assert_array_equal(b, np.rot90(a, 1, axes=(1, 2)))
    info = P.info("omniglot", root=tmp_path)
    assert info["image_shape"] == [28, 28, 1] and info["classes"] == 4 * 1623
