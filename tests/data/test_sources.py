"""Every source reader on tiny fixtures in the real formats (see conftest.py), the prepare
API, downloads through patched delegates, and every bad input giving one DataError."""
from __future__ import annotations

import pickle
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot.data import prepare as P
from fewshot.data.sources import cifar, mini_imagenet, omniglot, tiered_imagenet, tiny_imagenet
from fewshot.data.sources.learn2learn_bridge import from_dataset, to_uint8_hwc
from fewshot.data.store import ImageStore, open_split
from fewshot.errors import ConfigError, DataError

torch.manual_seed(0)


def _by_class(store):
    return {name: store.read(store.class_indices(c)) for c, name in enumerate(store.class_names)}


def _no_store(d):
    return not d.exists() or not [p for p in d.rglob("*") if p.suffix == ".h5" or ".tmp-" in p.name]


# ---------------------------------------------------------------------------------- CIFAR
def test_cifar10_round_trip(fake_cifar10, tmp_path):
    src, names, truth = fake_cifar10
    paths = P.prepare("cifar10", src, root=tmp_path / "root")
    assert [p.name for p in paths] == ["train.h5", "test.h5"]
    for split, (imgs, labels) in truth.items():
        s = open_split("cifar10", split, root=tmp_path / "root")
        assert s.class_names == names and s.image_shape == (32, 32, 3)
        order = np.argsort(labels, kind="stable")
        np.testing.assert_array_equal(s.images, imgs[order])  # channel-first rows -> HWC
        np.testing.assert_array_equal(s.labels, labels[order])
    assert len(open_split("cifar10", "train", root=tmp_path / "root")) == 30


def test_cifar100_superclasses(fake_cifar100, tmp_path):
    src, fine, coarse, truth = fake_cifar100
    out = tmp_path / "out"
    cifar.convert(src / "cifar-100-python", out, name="cifar100", splits=("test",))
    s = ImageStore.open(out / "test.h5")
    imgs, f = truth["test"]
    order = np.argsort(f, kind="stable")
    np.testing.assert_array_equal(s.images, imgs[order])
    assert s.class_names == fine
    for c in np.unique(f):
        assert s.class_info["superclass"][c] == coarse[c // 5]


def test_cifar_bad_inputs(fake_cifar10, tmp_path):
    src, _, _ = fake_cifar10
    root = src / "cifar-10-batches-py"
    with pytest.raises(DataError, match="unknown CIFAR split 'val'"):
        cifar.convert(src, tmp_path / "o", splits=("val",))
    with open(root / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, fh, protocol=2)
    with pytest.raises(DataError, match=r"data_batch_3: field 'labels' missing"):
        cifar.convert(src, tmp_path / "o")
    with open(root / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 1000), np.uint8), b"labels": [0, 1]}, fh, protocol=2)
    with pytest.raises(DataError, match=r"data_batch_3: field 'data' is uint8 \(2, 1000\)"):
        cifar.convert(src, tmp_path / "o")
    (root / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3: missing CIFAR batch"):
        cifar.convert(src, tmp_path / "o")
    assert _no_store(tmp_path / "o")
    with pytest.raises(DataError, match="no cifar-100-python"):
        cifar.convert(src / "cifar-10-batches-py", tmp_path / "o", name="cifar100")


# ---------------------------------------------------------------------------------- tiny-ImageNet
def test_tiny_imagenet_round_trip(fake_tiny, tmp_path):
    root, wnids, colours = fake_tiny
    paths = tiny_imagenet.convert(root.parent, tmp_path / "o", workers=1)
    assert [p.name for p in paths] == ["train.h5", "val.h5"]
    tr, va = ImageStore.open(paths[0]), ImageStore.open(paths[1])
    assert tr.class_names == wnids == va.class_names
    assert tr.class_info["words"] == ["shark", "goldfish", "frog"]
    np.testing.assert_array_equal(tr.class_counts(), [4, 4, 4])
    np.testing.assert_array_equal(va.class_counts(), [2, 2, 2])
    for store in (tr, va):
        for w, imgs in _by_class(store).items():
            assert imgs.shape[1:] == (64, 64, 3)
            colour = np.array(colours[w])
            good = imgs if w != "n01" or store is va else imgs[:3]  # n01_3 is gray 77
            assert np.abs(good.reshape(-1, 3).mean(0) - colour).max() < 4
    grey = _by_class(tr)["n01"][3]
    assert np.abs(grey.astype(int) - 77).max() <= 2  # grayscale JPEG converted to RGB
    small = tiny_imagenet.convert(root, tmp_path / "s", splits=("val",), image_size=32)
    assert ImageStore.open(small[0]).image_shape == (32, 32, 3)


def test_tiny_imagenet_bad_inputs(fake_tiny, tmp_path):
    root, _, _ = fake_tiny
    with pytest.raises(DataError, match="unknown tiny-imagenet split 'test'"):
        tiny_imagenet.convert(root, tmp_path / "o", splits=("test",))
    ann = root / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_x.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"val_annotations.txt:7: wnid 'n99'"):
        tiny_imagenet.convert(root, tmp_path / "o")
    ann.write_text("\n".join(ann.read_text().splitlines()[:6]) + "\n")
    (root / "train" / "n03" / "images" / "n03_2.JPEG").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(DataError, match=r"n03_2.JPEG: cannot decode image"):
        tiny_imagenet.convert(root, tmp_path / "o")
    assert _no_store(tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no wnids.txt"):
        tiny_imagenet.convert(tmp_path / "empty", tmp_path / "o")


# ---------------------------------------------------------------------------------- mini-ImageNet
def test_mini_imagenet_cache_round_trip(fake_mini_cache, tmp_path):
    src, truth = fake_mini_cache
    paths = P.prepare("mini-imagenet", src, root=tmp_path / "r")
    assert [p.stem for p in paths] == ["train", "val", "test"]
    for split, classes in truth.items():
        s = open_split("mini-imagenet", split, root=tmp_path / "r")
        assert s.class_names == sorted(classes)
        for w, imgs in _by_class(s).items():
            np.testing.assert_array_equal(imgs, classes[w])
    u = open_split("mini-imagenet", "val+test", root=tmp_path / "r")
    assert u.num_classes == 4 and len(u) == 16


def test_mini_imagenet_l2l_validation_name(fake_mini_cache, tmp_path):
    src, truth = fake_mini_cache
    (src / "mini-imagenet-cache-val.pkl").rename(src / "mini-imagenet-cache-validation.pkl")
    paths = mini_imagenet.convert(src, tmp_path / "o", splits=("val",))
    assert ImageStore.open(paths[0]).class_names == sorted(truth["val"])


def test_mini_imagenet_jpeg_folder(fake_mini_jpeg, tmp_path):
    src, truth = fake_mini_jpeg
    paths = mini_imagenet.convert(src, tmp_path / "o", image_size=16, workers=1)
    for p in paths:
        s = ImageStore.open(p)
        assert s.image_shape == (16, 16, 3) and s.class_names == sorted(truth[s.split])
        np.testing.assert_array_equal(s.class_counts(), [3, 3])
        for w, imgs in _by_class(s).items():
            assert np.abs(imgs.reshape(-1, 3).mean(0) - truth[s.split][w]).max() < 4


def test_mini_imagenet_from_imagenet_train_tree(tmp_path):
    """CSV name <wnid><k>.jpg = k-th image of the class in numeric order of <wnid>_<N>.JPEG."""
    tree = tmp_path / "train"
    shades = {5: 20, 12: 120, 100: 230}  # numeric order 5, 12, 100 (text order 100, 12, 5)
    for n, v in shades.items():
        (tree / "n01532829").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((50, 60, 3), v, np.uint8)).save(
            tree / "n01532829" / f"n01532829_{n}.JPEG", quality=95)
    (tmp_path / "test.csv").write_text("filename,label\nn0153282900000002.jpg,n01532829\n"
                                      "n0153282900000003.jpg,n01532829\n"
                                      "n0153282900000001.jpg,n01532829\n")
    (path,) = mini_imagenet.convert(tmp_path, tmp_path / "o", splits=("test",), image_size=8)
    got = ImageStore.open(path).images.reshape(3, -1).mean(1)
    np.testing.assert_allclose(got, [120, 230, 20], atol=3)
    (tmp_path / "test.csv").write_text("filename,label\nn0153282900000004.jpg,n01532829\n")
    with pytest.raises(DataError, match="asks for image 4 of class n01532829 but .* holds 3"):
        mini_imagenet.convert(tmp_path, tmp_path / "o", splits=("test",))


def test_mini_imagenet_bad_inputs(fake_mini_cache, fake_mini_jpeg, tmp_path):
    src, _ = fake_mini_cache
    with open(src / "mini-imagenet-cache-train.pkl", "wb") as fh:
        pickle.dump({"image_data": np.zeros((2, 4, 4, 3), np.uint8)}, fh)
    with pytest.raises(DataError, match="cache-train.pkl: expected a dict with 'image_data' and "
                                        "'class_dict'"):
        mini_imagenet.convert(src, tmp_path / "o")
    with open(src / "mini-imagenet-cache-train.pkl", "wb") as fh:
        pickle.dump({"image_data": np.zeros((2, 4, 4, 3), np.uint8), "class_dict": {"a": [5]}}, fh)
    with pytest.raises(DataError, match="entry 'a' has indices outside 0..1"):
        mini_imagenet.convert(src, tmp_path / "o")
    with open(src / "mini-imagenet-cache-train.pkl", "wb") as fh:
        pickle.dump({"image_data": np.zeros((2, 4, 4), np.float32), "class_dict": {"a": [0]}}, fh)
    with pytest.raises(DataError, match="field 'image_data' is float32"):
        mini_imagenet.convert(src, tmp_path / "o")
    with pytest.raises(DataError, match="unknown mini-imagenet split 'dev'"):
        mini_imagenet.convert(src, tmp_path / "o", splits=("dev",))
    jsrc, _ = fake_mini_jpeg
    (jsrc / "val.csv").write_text("file,wnid\nx.jpg,n1\n")
    with pytest.raises(DataError, match=r"val.csv:1: expected the header 'filename,label'"):
        mini_imagenet.convert(jsrc, tmp_path / "o", splits=("val",))
    (jsrc / "val.csv").write_text("filename,label\nmissing.jpg,n1\n")
    with pytest.raises(DataError, match="missing.jpg: image listed in val.csv not found"):
        mini_imagenet.convert(jsrc, tmp_path / "o", splits=("val",))
    assert _no_store(tmp_path / "o")
    with pytest.raises(DataError, match="neither mini-imagenet-cache"):
        mini_imagenet.convert(jsrc / "images", tmp_path / "o")  # JPEGs but no CSVs


# ---------------------------------------------------------------------------------- tiered
def test_tiered_round_trip(fake_tiered, tmp_path):
    src, truth = fake_tiered
    paths = tiered_imagenet.convert(src, tmp_path / "o", splits=("train", "val"), workers=1)
    for p in paths:
        s = ImageStore.open(p)
        imgs, spec, gen = truth[s.split]
        assert s.class_names == [f"n{s.split}{c}" for c in range(len(s.class_names))]
        for c in range(s.num_classes):
            np.testing.assert_array_equal(s.read(s.class_indices(c)), imgs[spec == c])
            assert s.class_info["category"][c] == ["catA", "catB"][c % 2]


def test_tiered_bad_inputs(fake_tiered, tmp_path):
    src, truth = fake_tiered
    root = src / "tiered-imagenet"
    with open(root / "val_labels.pkl", "wb") as fh:
        pickle.dump({"label_general": [0]}, fh)
    with pytest.raises(DataError, match="val_labels.pkl: field 'label_specific' missing"):
        tiered_imagenet.convert(src, tmp_path / "o", splits=("val",))
    with open(root / "val_labels.pkl", "wb") as fh:
        pickle.dump({"label_specific": np.zeros(2, np.int64)}, fh)
    with pytest.raises(DataError, match="6 images but val_labels.pkl has 2 labels"):
        tiered_imagenet.convert(src, tmp_path / "o", splits=("val",))
    enc = pickle.load(open(root / "train_images_png.pkl", "rb"))
    enc[4] = np.frombuffer(b"\x89PNG broken", np.uint8)
    with open(root / "train_images_png.pkl", "wb") as fh:
        pickle.dump(enc, fh)
    with pytest.raises(DataError, match=r"train_images_png.pkl\[4\]: cannot decode image"):
        tiered_imagenet.convert(src, tmp_path / "o", splits=("train",))
    assert _no_store(tmp_path / "o")
    with pytest.raises(DataError, match="test_images_png.pkl not found"):
        tiered_imagenet.convert(src, tmp_path / "o", splits=("test",))


# ---------------------------------------------------------------------------------- Omniglot
def test_omniglot_official_exact_pixels(fake_omniglot, tmp_path):
    src, _, chars = fake_omniglot
    paths = omniglot.convert(src, tmp_path / "o", splits="official", image_size=105)
    assert [p.stem for p in paths] == ["background", "evaluation"]
    bg = ImageStore.open(paths[0])
    assert bg.class_names == ["Aa/character01", "Aa/character02", "Bb/character01",
                              "Bb/character02"]
    assert bg.class_info["alphabet"] == ["Aa", "Aa", "Bb", "Bb"]
    for name, imgs in _by_class(bg).items():
        a, c = name.split("/")
        # no resize: exactly the inverted 1-bit drawing (ink 255, background 0)
        np.testing.assert_array_equal(imgs[..., 0], np.where(chars[(a, c)], 0, 255))


def test_omniglot_resize_smooth_and_vinyals_lists(fake_omniglot, tmp_path):
    src, lists, chars = fake_omniglot
    paths = P.prepare("omniglot", src, root=tmp_path / "r", split_lists=lists)
    assert [p.stem for p in paths] == ["train", "val", "test"]
    tr = open_split("omniglot", "train", root=tmp_path / "r")
    assert tr.num_classes == 8 and tr.image_shape == (28, 28, 1)
    assert tr.class_names[:4] == [f"Aa/character01/rot{r:03d}" for r in (0, 90, 180, 270)]
    imgs = _by_class(tr)
    base = imgs["Aa/character01/rot000"]
    ink = 1.0 - chars[("Aa", "character01")].mean(axis=(1, 2))  # ink fraction of 105x105
    np.testing.assert_allclose(base[..., 0].mean(axis=(1, 2)) / 255.0, ink, atol=0.01)
    assert len(np.unique(base)) > 10  # anti-aliased grey levels, not thresholded
    for r in (90, 180, 270):  # counter-clockwise, as PIL's Image.rotate
        want = np.stack([np.asarray(Image.fromarray(b[..., 0]).rotate(r)) for b in base])
        np.testing.assert_array_equal(imgs[f"Aa/character01/rot{r:03d}"][..., 0], want)
    te = open_split("omniglot", "test", root=tmp_path / "r")
    assert te.class_names[0] == "Cc/character01/rot000" and te.num_classes == 8


def test_omniglot_builtin_vinyals_split(tmp_path, rng, omniglot_tools):
    omniglot_drawings, write_omniglot_zip = omniglot_tools
    bg = {("Angelic", "character01"): omniglot_drawings(rng, 2),
          ("Hebrew", "character03"): omniglot_drawings(rng, 2),
          ("Gurmukhi", "character41"): omniglot_drawings(rng, 2)}
    ev = {("Keble", "character01"): omniglot_drawings(rng, 2),
          ("Gurmukhi", "character42"): omniglot_drawings(rng, 2)}
    write_omniglot_zip(tmp_path / "images_background.zip", "images_background", bg)
    write_omniglot_zip(tmp_path / "images_evaluation.zip", "images_evaluation", ev)
    paths = omniglot.convert(tmp_path, tmp_path / "o", workers=1)  # auto -> vinyals
    got = {p.stem: sorted({n.rsplit("/", 1)[0] for n in ImageStore.open(p).class_names})
           for p in paths}
    assert got == {"train": ["Angelic/character01", "Gurmukhi/character41"],
                   "val": ["Hebrew/character03"],
                   "test": ["Gurmukhi/character42", "Keble/character01"]}
    assert ImageStore.open(paths[0]).num_classes == 8  # 2 characters x 4 rotations


def test_omniglot_vinyals_refuses_foreign_alphabets(fake_omniglot, tmp_path):
    src, _, _ = fake_omniglot  # alphabets Aa/Bb/Cc: none of the Vinyals val/test alphabets
    with pytest.raises(DataError, match="no characters for the Vinyals 'val' split"):
        omniglot.convert(src, tmp_path / "o", splits="vinyals")
    assert _no_store(tmp_path / "o")


def test_omniglot_parallel_equals_serial(tmp_path, rng, omniglot_tools):
    omniglot_drawings, write_omniglot_zip = omniglot_tools
    chars = {(f"Al{a}", f"character{c:02d}"): omniglot_drawings(rng, 20)
             for a in range(2) for c in range(1, 8)}  # 280 PNGs: above the pool threshold
    write_omniglot_zip(tmp_path / "images_background.zip", "images_background", chars)
    one = omniglot.convert(tmp_path / "images_background.zip", tmp_path / "w1", workers=1)
    two = omniglot.convert(tmp_path / "images_background.zip", tmp_path / "w2", workers=2)
    s1, s2 = ImageStore.open(one[0]), ImageStore.open(two[0])
    assert s1.checksum == s2.checksum and len(s1) == 280 and s1.num_classes == 14


def test_omniglot_bad_inputs(fake_omniglot, tmp_path):
    src, lists, _ = fake_omniglot
    with pytest.raises(DataError, match="unknown omniglot split scheme 'vinyal'"):
        omniglot.convert(src, tmp_path / "o", splits="vinyal")
    (lists / "val.txt").write_text("Bb/character01/rot000\nBb/character01/rot045\n")
    with pytest.raises(DataError, match=r"val.txt:2: expected 'Alphabet/characterNN/rotDDD'"):
        omniglot.convert(src, tmp_path / "o", split_lists=lists)
    (lists / "val.txt").write_text("Bb/character09/rot000\n")
    with pytest.raises(DataError, match=r"val.txt:1: character 'Bb/character09' is not in"):
        omniglot.convert(src, tmp_path / "o", split_lists=lists)
    (lists / "val.txt").write_text("Aa/character01/rot000\n")
    with pytest.raises(DataError, match=r"val.txt:1: class Aa/character01/rot000 also listed in "
                                        "train.txt"):
        omniglot.convert(src, tmp_path / "o", split_lists=lists)
    only_bg = tmp_path / "bg"
    only_bg.mkdir()
    (src / "images_background.zip").rename(only_bg / "images_background.zip")
    with pytest.raises(DataError, match="missing images_evaluation.zip"):
        omniglot.convert(only_bg, tmp_path / "o", splits="vinyals")
    bad = tmp_path / "images_flat.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("a.png", b"x")
    with pytest.raises(DataError, match=r"images_flat.zip!a.png: not in <Alphabet>/characterNN/"):
        omniglot.convert(bad, tmp_path / "o")
    corrupt = tmp_path / "images_corrupt.zip"
    with zipfile.ZipFile(corrupt, "w") as z:
        z.writestr("images_corrupt/Al/character01/0001_01.png", b"\x89PNG\r\nnope")
    with pytest.raises(DataError, match=r"0001_01.png: cannot decode image"):
        omniglot.convert(corrupt, tmp_path / "o")
    (tmp_path / "nozip.zip").write_bytes(b"PK nonsense")
    with pytest.raises(DataError, match="not a readable zip"):
        omniglot.convert(tmp_path / "nozip.zip", tmp_path / "o")
    assert _no_store(tmp_path / "o")


# ---------------------------------------------------------------------------------- prepare API
def test_prepare_api_errors(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'omniglott'. Did you mean 'omniglot'"):
        P.prepare("omniglott", tmp_path)
    with pytest.raises(DataError, match="needs --from PATH"):
        P.prepare("cifar10", None, root=tmp_path)
    with pytest.raises(ConfigError, match="option 'splitz'.*Did you mean 'splits'"):
        P.prepare("omniglot", tmp_path, root=tmp_path, splitz="x")
    with pytest.raises(DataError, match="not prepared; run `fewshot data prepare cifar100 --from"):
        P.info("cifar100", root=tmp_path)
    with pytest.raises(DataError, match="not prepared"):
        P.verify("tiny-imagenet", root=tmp_path)
    with pytest.raises(ConfigError, match="read no files"):
        P.prepare("glyphs", tmp_path, root=tmp_path)


def test_prepare_info_verify(fake_cifar10, tmp_path):
    src, _, _ = fake_cifar10
    P.prepare("cifar10", src, root=tmp_path / "r")
    inf = P.info("cifar10", root=tmp_path / "r")
    assert list(inf["splits"]) == ["train", "test"] and inf["image_shape"] == [32, 32, 3]
    tr = inf["splits"]["train"]
    assert tr["images"] == 30 and tr["classes"] == 10 and inf["classes"] == 20
    assert tr["per_class_min"] <= tr["per_class_max"] and tr["checksum"].startswith("sha256:")
    ver = P.verify("cifar10", root=tmp_path / "r")
    assert ver["ok"] and ver["splits"]["train"]["matches_reference"] is False  # 30 != 50000
    assert ver["splits"]["test"]["reference"] == {"classes": 10, "per_class": 1000}


def test_prepare_option_strings_are_coerced(fake_mini_jpeg, tmp_path):
    src, _ = fake_mini_jpeg
    paths = P.prepare("mini-imagenet", src, root=tmp_path / "r", image_size="20", workers="1",
                      splits="val")
    assert [p.stem for p in paths] == ["val"]
    assert ImageStore.open(paths[0]).image_shape == (20, 20, 3)


# ---------------------------------------------------------------------------------- downloads
def test_download_cifar10_through_patched_torchvision(fake_cifar10, tmp_path, monkeypatch):
    import shutil
    import torchvision.datasets as tvd
    src, _, truth = fake_cifar10
    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train=True, download=False, **kw):
            calls.append((root, download))
            shutil.copytree(src / "cifar-10-batches-py", f"{root}/cifar-10-batches-py",
                            dirs_exist_ok=True)

    monkeypatch.setattr(tvd, "CIFAR10", FakeCIFAR10)
    paths = P.download("cifar10", root=tmp_path / "r")
    assert calls == [(str(tmp_path / "r" / "cifar10" / "raw"), True)]
    assert [p.stem for p in paths] == ["train", "test"]
    assert len(ImageStore.open(paths[1])) == len(truth["test"][1])


def test_download_mini_through_patched_learn2learn(fake_mini_cache, tmp_path, monkeypatch):
    import shutil
    src, truth = fake_mini_cache
    modes = []

    class FakeMini:
        def __init__(self, root, mode="train", download=False):
            modes.append(mode)
            name = {"validation": "validation"}.get(mode, mode)
            s = {"validation": "val"}.get(mode, mode)
            shutil.copy(src / f"mini-imagenet-cache-{s}.pkl",
                        f"{root}/mini-imagenet-cache-{name}.pkl")

    fake = types.SimpleNamespace(vision=types.SimpleNamespace(
        datasets=types.SimpleNamespace(MiniImagenet=FakeMini)))
    monkeypatch.setitem(sys.modules, "learn2learn", fake)
    paths = P.download("mini-imagenet", root=tmp_path / "r")
    assert modes == ["train", "validation", "test"]
    assert ImageStore.open(paths[1]).class_names == sorted(truth["val"])


def test_download_omniglot_and_tiered_through_patched_delegates(fake_omniglot, fake_tiered,
                                                                 tmp_path, monkeypatch):
    import shutil
    import torchvision.datasets as tvd
    src, _, _ = fake_omniglot
    calls = []

    class FakeOmniglot:  # torchvision keeps the zips in <root>/omniglot-py/
        def __init__(self, root, background=True, download=False, **kw):
            calls.append((background, download))
            name = "images_background.zip" if background else "images_evaluation.zip"
            Path(root, "omniglot-py").mkdir(exist_ok=True)
            shutil.copy(src / name, Path(root, "omniglot-py", name))

    monkeypatch.setattr(tvd, "Omniglot", FakeOmniglot)
    paths = P.download("omniglot", root=tmp_path / "r", splits="official")
    assert calls == [(True, True), (False, True)]
    assert [p.stem for p in paths] == ["background", "evaluation"]

    tsrc, truth = fake_tiered
    modes = []

    class FakeTiered:  # learn2learn keeps the pickles in <root>/tiered-imagenet/
        def __init__(self, root, mode="train", download=False):
            modes.append((mode, download))
            shutil.copytree(tsrc / "tiered-imagenet", Path(root, "tiered-imagenet"),
                            dirs_exist_ok=True)

    fake = types.SimpleNamespace(vision=types.SimpleNamespace(
        datasets=types.SimpleNamespace(TieredImagenet=FakeTiered)))
    monkeypatch.setitem(sys.modules, "learn2learn", fake)
    paths = P.download("tiered-imagenet", root=tmp_path / "r", splits="train,val")
    assert [m for m, _ in modes] == ["train", "validation", "test"] and all(d for _, d in modes)
    assert ImageStore.open(paths[0]).num_classes == 3


def test_download_failure_is_one_data_error(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    class Offline:
        def __init__(self, *a, **k):
            raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(tvd, "CIFAR100", Offline)
    with pytest.raises(DataError, match="downloading cifar100 .* failed .*datasets/cifar100"):
        P.download("cifar100", root=tmp_path)


# ---------------------------------------------------------------------------------- bridge
def test_bridge_torch_dataset_in_memory_and_written(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, 5, 5, generator=g)
    y = torch.tensor([2, 0, 1] * 4)
    ds = torch.utils.data.TensorDataset(x, y)
    s = from_dataset(ds, name="toy", split="train")
    assert s.in_memory and s.class_names == ["0", "1", "2"] and s.image_shape == (5, 5, 3)
    want = torch.round(x * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(s.images, want[np.argsort(y.numpy(), kind="stable")])
    p = from_dataset(ds, name="toy", split="val", path=tmp_path / "v.h5")
    np.testing.assert_array_equal(ImageStore.open(p).images, s.images)


def test_bridge_targets_and_pil(tmp_path):
    class PilSet(torch.utils.data.Dataset):
        targets = ["b", "a", "b"]

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return Image.fromarray(np.full((4, 4), 10 * i, np.uint8)), self.targets[i]

    s = from_dataset(PilSet(), image_size=2)
    assert s.class_names == ["a", "b"] and s.image_shape == (2, 2, 1)
    np.testing.assert_array_equal(s.images[:, 0, 0, 0], [10, 0, 20])
    with pytest.raises(DataError, match="expected an \\(image, label\\) pair"):
        from_dataset([np.zeros((2, 2))])
    with pytest.raises(DataError, match="image of shape"):
        to_uint8_hwc(np.zeros((2, 2, 2, 2)))


def test_bridge_learn2learn_metadataset(tmp_path):
    l2l = pytest.importorskip("learn2learn")
    x = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8)
    y = torch.tensor([3, 1, 3, 1, 7, 7, 1, 3, 7, 1])
    meta = l2l.data.MetaDataset(torch.utils.data.TensorDataset(x, y))
    p = from_dataset(meta, name="l2l", split="train", path=tmp_path / "m.h5")
    s = ImageStore.open(p)
    assert s.class_names == ["1", "3", "7"]
    np.testing.assert_array_equal(s.class_counts(), [4, 3, 3])
    for c, lab in enumerate((1, 3, 7)):
        np.testing.assert_array_equal(s.read(s.class_indices(c))[..., 0],
                                      x[y == lab][:, 0].numpy())


def test_prepare_glyphs_dispatch(tmp_path):
    paths = P.prepare("glyphs", root=tmp_path, splits=(("train", 4), ("val", 2), ("test", 2)),
                      per_class="3", seed="1")
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "glyphs/train.h5", "glyphs/val.h5", "glyphs/test.h5"]
    inf = P.info("glyphs", root=tmp_path)
    assert [inf["splits"][s]["classes"] for s in ("train", "val", "test")] == [4, 2, 2]
    assert inf["splits"]["train"]["per_class_min"] == 3 and inf["image_shape"] == [28, 28, 1]
    assert P.verify("glyphs", root=tmp_path)["splits"]["val"]["matches_reference"] is False
    with pytest.raises(ConfigError, match="option 'perclass'"):
        P.prepare("glyphs", root=tmp_path, perclass=3)
