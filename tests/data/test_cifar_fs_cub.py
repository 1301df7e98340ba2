"""CIFAR-FS, FC100 and CUB on generated fixtures shaped like the official files: the class
lists must be the published ones (written out here from the papers' repositories, not read
from the shipped files) and the images those of the right classes."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from fewshot.data import prepare as P
from fewshot.data.sources import cifar_fs, cub
from fewshot.data.store import open_split
from fewshot.errors import DataError

#: CIFAR-100's 20 superclasses (coarse label order) and their 5 fine classes each, as on
#: https://www.cs.toronto.edu/~kriz/cifar.html (names as in the python version's meta)
CIFAR100 = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}
#: Bertinetto et al.'s R2D2 repository, data/cifar-fs/splits/bertinetto/{val,test}.txt
CIFAR_FS_VAL = ["beaver", "otter", "flatfish", "shark", "lamp", "television", "beetle",
                "butterfly", "sea", "camel", "cattle", "crab", "crocodile", "maple_tree",
                "motorcycle", "tractor"]
CIFAR_FS_TEST = ["whale", "poppy", "rose", "sweet_pepper", "telephone", "bed", "table",
                 "wardrobe", "leopard", "plain", "chimpanzee", "fox", "snail", "worm", "baby",
                 "man", "woman", "bicycle", "pickup_truck", "rocket"]
#: Oreshkin et al. (TADAM): FC100 superclasses by coarse label index
FC100 = {"train": [1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19], "val": [8, 11, 13, 16],
         "test": [0, 7, 12, 14]}


@pytest.fixture
def cifar100_real_names(tmp_path):
    """cifar-100-python/ with the real fine/coarse names and mapping, 3 train + 1 test image
    of every class (random pixels); -> (folder parent, {fine name: (4, 32, 32, 3) images in
    train-then-test order})."""
    rng = np.random.default_rng(0)
    coarse_names = list(CIFAR100)
    fine_names = sorted(n for v in CIFAR100.values() for n in v)
    coarse_of = {f: coarse_names.index(c) for c, v in CIFAR100.items() for f in v}
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    with open(root / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [n.encode() for n in fine_names],
                     b"coarse_label_names": [n.encode() for n in coarse_names]}, fh, protocol=2)
    truth = {n: [] for n in fine_names}
    for split, per in (("train", 3), ("test", 1)):
        fine = rng.permutation(np.repeat(np.arange(100), per))
        imgs = rng.integers(0, 256, (fine.size, 32, 32, 3), dtype=np.uint8)
        for f, im in zip(fine, imgs):
            truth[fine_names[f]].append(im)
        with open(root / split, "wb") as fh:
            pickle.dump({b"data": imgs.transpose(0, 3, 1, 2).reshape(fine.size, 3072),
                         b"fine_labels": fine.tolist(),
                         b"coarse_labels": [coarse_of[fine_names[f]] for f in fine]}, fh,
                        protocol=2)
    return tmp_path, {n: np.stack(v) for n, v in truth.items()}


def test_cifar_fs_published_classes_and_images(cifar100_real_names, tmp_path):
    src, truth = cifar100_real_names
    paths = P.prepare("cifar-fs", src, root=tmp_path / "r")
    assert [p.name for p in paths] == ["train.h5", "val.h5", "test.h5"]
    st = {s: open_split("cifar-fs", s, root=tmp_path / "r") for s in ("train", "val", "test")}
    assert st["val"].class_names == sorted(CIFAR_FS_VAL)
    assert st["test"].class_names == sorted(CIFAR_FS_TEST)
    rest = sorted(set(truth) - set(CIFAR_FS_VAL) - set(CIFAR_FS_TEST))
    assert st["train"].class_names == rest and len(rest) == 64
    assert [s.num_classes for s in st.values()] == [64, 16, 20]
    P.prepare("cifar-fs", src, root=tmp_path / "r", splits="val")  # other splits are kept
    assert sorted(p.name for p in (tmp_path / "r" / "cifar-fs").glob("*.h5")) == \
        ["test.h5", "train.h5", "val.h5"]
    for s in st.values():
        for c, name in enumerate(s.class_names):
            np.testing.assert_array_equal(s.read(s.class_indices(c)), truth[name])
    assert st["test"].class_info["superclass"][st["test"].class_names.index("baby")] == "people"
    ver = P.verify("cifar-fs", root=tmp_path / "r")
    assert ver["ok"] and ver["splits"]["val"]["reference"] == {"classes": 16, "per_class": 600}
    assert ver["splits"]["val"]["matches_reference"] is False  # 4 images per class, not 600


def test_fc100_superclass_split(cifar100_real_names, tmp_path):
    src, truth = cifar100_real_names
    P.prepare("fc100", src / "cifar-100-python", root=tmp_path / "r")
    coarse = list(CIFAR100)
    for split, idx in FC100.items():
        s = open_split("fc100", split, root=tmp_path / "r")
        want = sorted(f for i in idx for f in CIFAR100[coarse[i]])
        assert s.class_names == want and s.num_classes == 5 * len(idx)
        assert set(s.class_info["superclass"]) == {coarse[i] for i in idx}
        c = s.class_names.index(want[0])
        np.testing.assert_array_equal(s.read(s.class_indices(c)), truth[want[0]])
    test = open_split("fc100", "test", root=tmp_path / "r").class_names
    assert {"whale", "dolphin", "bee", "fox", "baby"} <= set(test)
    assert "aquarium_fish" in open_split("fc100", "train", root=tmp_path / "r").class_names


def test_shipped_lists_are_checked(fake_cifar100, tmp_path):
    lists = cifar_fs.published_lists("cifar-fs")
    names = [n for v in lists.values() for n in v]
    assert [len(v) for v in lists.values()] == [64, 16, 20] and len(set(names)) == 100
    assert sorted(names) == sorted(n for v in CIFAR100.values() for n in v)
    fc = cifar_fs.published_lists("fc100")
    assert {s: sorted(v) for s, v in fc.items()} == \
        {s: sorted(list(CIFAR100)[i] for i in idx) for s, idx in FC100.items()}
    src = fake_cifar100[0]  # fine00..fine99: not CIFAR-100's names
    with pytest.raises(DataError, match=r"meta: its 100 fine label names differ from the "
                                        r"published cifar-fs lists"):
        P.prepare("cifar-fs", src, root=tmp_path / "r")
    with pytest.raises(DataError, match="coarse label names differ from the published fc100"):
        P.prepare("fc100", src, root=tmp_path / "r")
    assert not (tmp_path / "r" / "cifar-fs").exists()


# ------------------------------------------------------------------------------------ CUB
@pytest.fixture
def fake_cub(tmp_path):
    """CUB_200_2011/ with 200 class folders listed in classes.txt, 2 flat-colour 16x12 JPEGs each whose red channel encodes the class index."""
    root = tmp_path / "CUB_200_2011"
    names = [f"{i + 1:03d}.Bird_{chr(65 + i % 26)}{i}" for i in range(200)]
    lines = [f"{i + 1} {n}" for i, n in enumerate(names)]
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(lines) + "\n")
    (root / "bounding_boxes.txt").write_text("")
    for i, n in enumerate(names):
        (root / "images" / n).mkdir()
        for k in range(2):
            Image.fromarray(np.full((12, 16, 3), (i, 255 - i, 40 * k), np.uint8)).save(
                root / "images" / n / f"{n[4:]}_{k:04d}.jpg", quality=95)
    return tmp_path, names


def test_cub_chen_split(fake_cub, tmp_path):
    src, names = fake_cub
    P.prepare("cub", src, root=tmp_path / "r", image_size="8")
    st = {s: open_split("cub", s, root=tmp_path / "r") for s in ("train", "val", "test")}
    ordered = sorted(names)
    assert st["train"].class_names == ordered[0::2]  # Chen et al.: i % 2 == 0 -> base
    assert st["val"].class_names == ordered[1::4]    # i % 4 == 1 -> val
    assert st["test"].class_names == ordered[3::4]   # i % 4 == 3 -> novel
    assert [s.num_classes for s in st.values()] == [100, 50, 50]
    assert st["val"].class_names[:2] == ["002.Bird_B1", "006.Bird_F5"]
    for s in st.values():
        assert s.image_shape == (8, 8, 3) and s.class_counts().tolist() == [2] * s.num_classes
        red = s.read(np.arange(len(s)))[:, 4, 4, 0].astype(int)
        want = np.repeat([int(n[:3]) - 1 for n in s.class_names], 2)
        assert np.abs(red - want).max() <= 3  # JPEG of a flat colour: within 3 levels
    assert P.verify("cub", root=tmp_path / "r")["splits"]["val"]["reference"] == \
        {"classes": 50, "per_class": None}


def test_cub_bad_inputs(fake_cub, tmp_path):
    src, names = fake_cub
    root = src / "CUB_200_2011"
    with pytest.raises(DataError, match="no images/ folder and classes.txt"):
        cub.convert(root / "images", tmp_path / "o")
    for f in (root / "images" / names[7]).iterdir():
        f.unlink()
    (root / "images" / names[7]).rmdir()
    with pytest.raises(DataError, match=r"008.Bird_H7: class folder listed in classes.txt not "
                                        r"found \(1 missing\)"):
        cub.convert(src, tmp_path / "o")
    (root / "classes.txt").write_text("1 001.x\n")
    with pytest.raises(DataError, match="1 distinct classes, expected 200"):
        cub.convert(src, tmp_path / "o")
    assert not (tmp_path / "o").exists()
