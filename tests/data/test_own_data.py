"""`fewshot data prepare folder|csv NAME`: a user's own images into stores. Every fixture is a
small generated image tree in tmp_path; expected pixels come from Pillow called directly,
expected splits from the documented rule written out here."""
from __future__ import annotations

import unicodedata

import numpy as np
import pytest
from PIL import Image

from fewshot.cli import main
from fewshot.data import prepare as P
from fewshot.data.sources import class_split
from fewshot.data.store import ImageStore, open_split
from fewshot.errors import ConfigError, DataError


def _save(path, arr, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def _tree(root, classes, per_class=3, size=(12, 10), seed=0):
    """root/<class>/<i>.png of random RGB pixels; -> {class: [paths]}."""
    rng = np.random.default_rng(seed)
    out = {}
    for c in classes:
        out[c] = [_save(root / c / f"{i}.png", rng.integers(0, 256, size + (3,), dtype=np.uint8))
                  for i in range(per_class)]
    return out


def _stores(root, name):
    return {s: open_split(name, s, root=root) for s in ("train", "val", "test")
            if (root / name / f"{s}.h5").exists()}


def _no_store(root, name):
    return not list(root.glob(f"{name}/*.h5")) and not list(root.glob(f".{name}.tmp-*"))


# ------------------------------------------------------------------------------------ folder
def test_folder_odd_names_nested_folders_and_provenance(tmp_path):
    src = tmp_path / "my images"
    decomposed = unicodedata.normalize("NFD", "café crème")  # as macOS writes folder names
    _tree(src, ["class with spaces", decomposed, "Zebra"], per_class=2)
    rng = np.random.default_rng(1)
    nested = [_save(src / "deep" / "a" / "b" / "x.JPG", rng.integers(0, 256, (9, 9, 3), np.uint8),
                    "JPEG"),
              _save(src / "deep" / "a" / "y.Jpeg", rng.integers(0, 256, (9, 9, 3), np.uint8),
                    "JPEG"),
              _save(src / "deep" / "z.webp", rng.integers(0, 256, (9, 9, 3), np.uint8), "WEBP"),
              _save(src / "deep" / "w.gif", rng.integers(0, 256, (9, 9, 3), np.uint8), "GIF")]
    (src / "deep" / "notes.txt").write_text("not an image")
    (src / "deep" / "._x.jpg").write_bytes(b"AppleDouble fork, not an image")
    (src / ".hidden").mkdir()
    _save(src / ".hidden" / "h.png", np.zeros((4, 4, 3), np.uint8))
    res = P.prepare_custom("folder", "mine", src, root=tmp_path / "r", split="0.5,0.25,0.25",
                           min_classes=1, image_size=8)
    assert [p.name for p in res.paths] == ["train.h5", "val.h5", "test.h5"] and not res.skipped
    stores = _stores(tmp_path / "r", "mine")
    names = sorted(n for s in stores.values() for n in s.class_names)
    assert names == sorted(["class with spaces", "café crème", "Zebra", "deep"])
    assert unicodedata.is_normalized("NFC", "".join(names))
    by_name = {n: (s, c) for s in stores.values() for c, n in enumerate(s.class_names)}
    deep_store, deep_id = by_name["deep"]
    assert deep_store.class_counts()[deep_id] == len(nested)  # found recursively, 2 ignored
    assert deep_store.source == str(src.resolve())
    assert deep_store.class_info["origin"][deep_id] == str((src / "deep").resolve())
    assert all(s.image_shape == (8, 8, 3) for s in stores.values())
    info = P.info("mine", root=tmp_path / "r")
    assert info["classes"] == 4 and info["splits"]["train"]["source"] == str(src.resolve())
    assert P.verify("mine", root=tmp_path / "r")["ok"]


def test_exact_pixels_against_pillow(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "src"
    rgb = _save(src / "a" / "0.png", rng.integers(0, 256, (40, 50, 3), np.uint8))
    _save(src / "b" / "0.png", rng.integers(0, 256, (40, 50, 3), np.uint8))
    P.prepare_custom("folder", "px", src, root=tmp_path / "r", split="1,0,0", min_classes=1,
                     min_images=1)
    s = open_split("px", "train", root=tmp_path / "r")
    want = np.asarray(Image.open(rgb).convert("RGB").resize((84, 84), Image.LANCZOS))
    np.testing.assert_array_equal(s.read(s.class_indices(0))[0], want)

    # a 1-bit image: converted to L before resizing, so the bilinear filter really applies
    bits = rng.integers(0, 2, (30, 30), dtype=np.uint8).astype(bool)
    one = tmp_path / "one"
    for c in ("a", "b"):
        (one / c).mkdir(parents=True)
        Image.fromarray(bits).convert("1").save(one / c / "0.png")
    P.prepare_custom("folder", "bits", one, root=tmp_path / "r", split="1,0,0", min_classes=1,
                     min_images=1, mode="L", resample="bilinear", image_size="12,16")
    got = open_split("bits", "train", root=tmp_path / "r").read(np.array([0]))[0, :, :, 0]
    img = Image.open(one / "a" / "0.png")
    assert img.mode == "1"
    np.testing.assert_array_equal(got, np.asarray(img.convert("L").resize((16, 12),
                                                                           Image.BILINEAR)))
    naive = np.asarray(img.resize((16, 12), Image.BILINEAR).convert("L"))
    assert set(np.unique(naive)) <= {0, 255} and len(np.unique(got)) > 2  # smoothed, not NN

    keep = tmp_path / "keep"
    raw = {c: rng.integers(0, 256, (7, 5, 3), np.uint8) for c in ("a", "b")}
    for c, arr in raw.items():
        _save(keep / c / "0.png", arr)
    P.prepare_custom("folder", "raw", keep, root=tmp_path / "r", split="1,0,0", min_classes=1,
                     min_images=1, image_size="original")
    s = open_split("raw", "train", root=tmp_path / "r")
    np.testing.assert_array_equal(s.read(np.array([0, 1])), np.stack([raw["a"], raw["b"]]))


def test_corrupt_image_fails_or_is_skipped_and_counted(tmp_path, capsys):
    src = tmp_path / "src"
    _tree(src, ["a", "b", "c"], per_class=3)
    bad = src / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    root = tmp_path / "r"
    with pytest.raises(DataError, match=r"broken\.png: cannot decode image"):
        P.prepare_custom("folder", "c", src, root=root, split="1,0,0", min_classes=1)
    assert _no_store(root, "c")
    res = P.prepare_custom("folder", "c", src, root=root, split="1,0,0", min_classes=1,
                           on_error="skip", image_size=8)
    assert len(res.skipped) == 1 and "broken.png" in res.skipped[0]
    s = open_split("c", "train", root=root)
    assert s.class_counts().tolist() == [3, 3, 3]  # broken.png left out of class b's 4
    import h5py
    with h5py.File(root / "c" / "train.h5") as f:
        assert f.attrs["extra_skipped_images"] == 1
    # the CLI reports the count on stderr
    assert main(["data", "prepare", "folder", "c2", "--from", str(src), "--root", str(root),
                 "--opt", "split=1,0,0", "--opt", "min_classes=1", "--opt", "on_error=skip",
                 "--opt", "image_size=8"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(root / "c2" / "train.h5")
    assert "skipped 1 unreadable image(s)" in out.err and "broken.png" in out.err
    # skipping may leave a class too small: a DataError naming it, and no store
    for i in range(3):
        (src / "a" / f"{i}.png").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"class 'a' .*keeps 0 image\(s\) after skipping 3"):
        P.prepare_custom("folder", "c3", src, root=root, split="1,0,0", min_classes=1,
                         on_error="skip")
    assert _no_store(root, "c3")


def test_failed_reconversion_keeps_the_previous_stores(tmp_path):
    src = tmp_path / "src"
    _tree(src, [f"k{i}" for i in range(10)], per_class=2)
    root = tmp_path / "r"
    P.prepare_custom("folder", "d", src, root=root, min_classes=2, image_size=8)
    before = {p.name: ImageStore.open(p).checksum for p in (root / "d").glob("*.h5")}
    (src / "k9" / "1.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="1.png: cannot decode"):
        P.prepare_custom("folder", "d", src, root=root, min_classes=2, image_size=8)
    after = {p.name: ImageStore.open(p).checksum for p in (root / "d").glob("*.h5")}
    assert after == before and len(before) == 3
    assert not list(root.glob(".d.tmp-*"))
    (src / "k9" / "1.png").unlink()  # a successful conversion redefines the whole dataset
    P.prepare_custom("folder", "d", src, root=root, split="0,0,1", min_images=1, image_size=8)
    assert sorted(p.name for p in (root / "d").glob("*.h5")) == ["test.h5"]


def test_folder_bad_inputs(tmp_path):
    root = tmp_path / "r"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty folder, no class sub-folders"):
        P.prepare_custom("folder", "e", empty, root=root)
    src = tmp_path / "src"
    _tree(src, ["a", "b"], per_class=2)
    (src / "nothing").mkdir()
    (src / "nothing" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"class 'nothing' has no images .*1 of 3 classes"):
        P.prepare_custom("folder", "e", src, root=root)
    (src / "nothing" / "readme.txt").unlink()
    (src / "nothing").rmdir()
    _tree(src, ["A"], per_class=2)
    with pytest.raises(DataError, match="class 'a' and class 'A'.*duplicate class names"):
        P.prepare_custom("folder", "e", src, root=root)
    for f in (src / "A").iterdir():
        f.unlink()
    (src / "A").rmdir()
    nfd = unicodedata.normalize("NFD", "é")
    _tree(src, ["é", nfd], per_class=2)  # two folders on Linux, one name on screen
    with pytest.raises(DataError, match="class 'é' and class folder .* are duplicate class "
                                        "names .*two Unicode forms"):
        P.prepare_custom("folder", "e", src, root=root)
    for c in ("é", nfd):
        for f in (src / c).iterdir():
            f.unlink()
        (src / c).rmdir()
    _save(src / "loose.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError, match=r"1 image\(s\) directly in the folder"):
        P.prepare_custom("folder", "e", src, root=root)
    (src / "loose.png").unlink()
    (src / "a" / "1.png").unlink()
    with pytest.raises(DataError, match=r"class 'a' \(split 'train'\) has 1 image\(s\), fewer "
                                        r"than min_images=2"):
        P.prepare_custom("folder", "e", src, root=root, split="1,0,0", min_classes=1)
    with pytest.raises(DataError, match=r"split 'train' gets 2 of 2 classes .*fewer than "
                                        r"min_classes=5"):
        P.prepare_custom("folder", "e", src, root=root, split="1,0,0", min_images=1)
    with pytest.raises(ConfigError, match="split='0.5,0.4': expected three fractions"):
        P.prepare_custom("folder", "e", src, root=root, split="0.5,0.4")
    with pytest.raises(ConfigError, match="fractions sum to 0.9"):
        P.prepare_custom("folder", "e", src, root=root, split="0.5,0.2,0.2")
    with pytest.raises(ConfigError, match="on_error='ignore'.*fail, skip"):
        P.prepare_custom("folder", "e", src, root=root, on_error="ignore")
    with pytest.raises(ConfigError, match="mode='CMYK'"):
        P.prepare_custom("folder", "e", src, root=root, mode="CMYK")
    with pytest.raises(ConfigError, match="resample='cubic' is not understood; use one of "
                                          "lanczos, bicubic"):
        P.prepare_custom("folder", "e", src, root=root, resample="cubic")
    with pytest.raises(ConfigError, match="image_size='big'"):
        P.prepare_custom("folder", "e", src, root=root, image_size="big")
    with pytest.raises(ConfigError, match="'omniglot' is a built-in dataset name"):
        P.prepare_custom("folder", "omniglot", src, root=root)
    assert _no_store(root, "e")


# ------------------------------------------------------------------------------------ splits
def test_fraction_counts_largest_remainder():
    assert class_split.fraction_counts(100, (0.64, 0.16, 0.2)) == [64, 16, 20]
    assert class_split.fraction_counts(10, (0.64, 0.16, 0.2)) == [6, 2, 2]  # 6.4 1.6 2
    assert class_split.fraction_counts(7, (1 / 3, 1 / 3, 1 / 3)) == [3, 2, 2]
    assert class_split.fraction_counts(5, (0, 0, 1)) == [0, 0, 5]


def test_seeded_split_is_deterministic_and_class_level(tmp_path):
    names = [f"c{i:02d}" for i in range(20)]
    files = _tree(tmp_path / "src", names, per_class=2, size=(4, 4))
    (tmp_path / "src" / "c07" / "1.png").unlink()  # classes of different sizes
    kw = dict(split="0.6,0.2,0.2", min_classes=2, min_images=1, image_size=4)
    P.prepare_custom("folder", "s0", tmp_path / "src", root=tmp_path / "r", seed=0, **kw)
    P.prepare_custom("folder", "s0b", tmp_path / "src", root=tmp_path / "r", seed=0, **kw)
    P.prepare_custom("folder", "s1", tmp_path / "src", root=tmp_path / "r", seed=1, **kw)
    got = {n: {s: st.class_names for s, st in _stores(tmp_path / "r", n).items()}
           for n in ("s0", "s0b", "s1")}
    assert got["s0"] == got["s0b"] and got["s0"] != got["s1"]
    perm = np.random.default_rng(0).permutation(20)  # the documented rule, written out
    assert got["s0"] == {"train": sorted(names[i] for i in perm[:12]),
                         "val": sorted(names[i] for i in perm[12:16]),
                         "test": sorted(names[i] for i in perm[16:])}
    seen = [n for v in got["s0"].values() for n in v]
    assert sorted(seen) == names  # disjoint and complete: whole classes only
    for st in _stores(tmp_path / "r", "s0").values():
        for c, n in enumerate(st.class_names):  # every image of a class is in its one store
            assert st.class_counts()[c] == (1 if n == "c07" else len(files[n]))


def test_split_lists(tmp_path):
    src = tmp_path / "src"
    _tree(src, ["ant", "bee", "cat", "dog", "eel", "fox"], per_class=2, size=(4, 4))
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("dog\nant\ncat\n")
    (lists / "test.txt").write_text("bee\n\neel\n")
    (lists / "trainval.txt").write_text("dog\nant\ncat\nbee\n")  # not read
    res = P.prepare_custom("folder", "l", src, root=tmp_path / "r", split_lists=str(lists),
                           min_classes=2, image_size=4)
    st = _stores(tmp_path / "r", "l")
    assert {s: v.class_names for s, v in st.items()} == {"train": ["dog", "ant", "cat"],
                                                         "test": ["bee", "eel"]}
    assert res.unused == ["fox"]
    (lists / "test.txt").write_text("bee\nelk\n")
    with pytest.raises(DataError, match=r"test.txt:2: class 'elk' is not in .*6 classes\)\. "
                                        r"Did you mean 'eel'"):
        P.prepare_custom("folder", "l2", src, root=tmp_path / "r", split_lists=str(lists))
    (lists / "test.txt").write_text("bee\ndog\n")
    with pytest.raises(DataError, match=r"test.txt:2: class 'dog' is listed twice \(first in "
                                        r"train.txt:1\)"):
        P.prepare_custom("folder", "l2", src, root=tmp_path / "r", split_lists=str(lists))
    with pytest.raises(ConfigError, match="split_lists and split both define the splits"):
        P.prepare_custom("folder", "l2", src, root=tmp_path / "r", split_lists=str(lists),
                         split="0.5,0.5,0")
    assert _no_store(tmp_path / "r", "l2")


# ------------------------------------------------------------------------------------ CSV
def test_csv_with_images_dir_and_split_column(tmp_path):
    imgs = tmp_path / "pictures"
    files = _tree(imgs, ["x", "y", "z"], per_class=2, size=(6, 6))
    csv_path = tmp_path / "meta" / "list.csv"
    csv_path.parent.mkdir()
    rows = ["Label,note,Split,PATH"]  # any column order and case, extra columns ignored
    for c, split in (("y", "train"), ("x", "train"), ("z", "test")):
        rows += [f"{c},n,{split},{c}/{i}.png" for i in (1, 0)]
    csv_path.write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")  # Excel's BOM
    res = P.prepare_custom("csv", "t", csv_path, root=tmp_path / "r", images=str(imgs),
                           min_classes=1, image_size="original")
    st = _stores(tmp_path / "r", "t")
    assert [p.stem for p in res.paths] == ["train", "test"]
    assert st["train"].class_names == ["x", "y"] and st["test"].class_names == ["z"]
    want = np.stack([np.asarray(Image.open(files["y"][i])) for i in (1, 0)])  # CSV row order
    np.testing.assert_array_equal(st["train"].read(st["train"].class_indices(1)), want)
    assert st["train"].class_info["origin"] == [f"{csv_path.resolve()}:4",
                                                f"{csv_path.resolve()}:2"]
    assert st["test"].source == str(csv_path.resolve())


def test_csv_bad_inputs(tmp_path):
    files = _tree(tmp_path, ["x", "y"], per_class=2, size=(4, 4))
    assert files
    c = tmp_path / "l.csv"

    def run(text, **kw):
        c.write_text(text)
        return P.prepare_custom("csv", "b", c, root=tmp_path / "r", min_classes=1,
                                min_images=1, image_size=4, **kw)

    with pytest.raises(DataError, match=r"l.csv:1: header 'file,label' lacks the column\(s\) "
                                        "path"):
        run("file,label\nx/0.png,x\n")
    with pytest.raises(DataError, match=r"l.csv:3: class 'x' is in split 'test' here but in "
                                        r"'train' on line 2; splits are by class"):
        run("path,label,split\nx/0.png,x,train\nx/1.png,x,test\n")
    with pytest.raises(DataError, match=r"l.csv:3: image 'x/0.png' is listed again \(first on "
                                        "line 2\\)"):
        run("path,label\nx/0.png,x\nx/0.png,y\n")
    with pytest.raises(DataError, match=r"l.csv:3: class 'X' and class 'x' \(.*l.csv:2\) are "
                                        "duplicate class names"):
        run("path,label\nx/0.png,x\nx/1.png,X\n")
    with pytest.raises(DataError, match=r"l.csv:3: image file .*nope.png not found \(1 listed "
                                        "files missing\\)"):
        run("path,label\nx/0.png,x\nx/nope.png,x\ny/0.png,y\n", split="1,0,0")
    res = run("path,label\nx/0.png,x\nx/nope.png,x\ny/0.png,y\n", split="1,0,0",
              on_error="skip")
    assert len(res.skipped) == 1 and "nope.png" in res.skipped[0]
    with pytest.raises(ConfigError, match="a split column and split both define the splits"):
        run("path,label,split\nx/0.png,x,train\n", split="1,0,0")
    with pytest.raises(DataError, match="no rows after the header"):
        run("path,label\n")
    with pytest.raises(DataError, match="expected a CSV file of path,label rows, not a folder"):
        P.prepare_custom("csv", "b", tmp_path, root=tmp_path / "r")


# ------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("argv,message", [
    (["folder", "--from", "{src}"], "needs a NAME for the new dataset"),
    (["folder", "new", "--from", "{empty}"], "empty folder, no class sub-folders"),
    (["folder", "new"], "needs --from PATH"),
    (["csv", "new", "--from", "{src}"], "expected a CSV file"),
    (["folder", "cub", "--from", "{src}"], "'cub' is a built-in dataset name"),
    (["folder", "new", "--from", "{src}", "--opt", "splits=1,0,0"],
     "option 'splits' is not understood .*Did you mean 'split'"),
    (["folder", "new", "--from", "{src}", "--images", "{src}"], "--images is for `prepare csv`"),
    (["cifar10", "extra", "--from", "{src}"], "unexpected 'extra'"),
    (["folder", "new", "--from", "{src}", "--opt", "min_classes=3"],
     r"split 'train' gets 2 of 3 classes \(split=0.64,0.16,0.2 seed=0\), fewer than "
     r"min_classes=3"),
    (["folder", "new", "--from", "{src}", "--opt", "min_classes=1"],
     r"split 'val' gets 0 of 3 classes"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, argv, message):
    import re

    src = tmp_path / "src"
    _tree(src, ["a", "b", "c"], per_class=2, size=(4, 4))
    (tmp_path / "empty").mkdir()
    argv = [a.format(src=src, empty=tmp_path / "empty") for a in argv]
    assert main(["data", "prepare"] + argv + ["--root", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fewshot: error: ")
    assert re.search(message, err), err


def test_tolerant_decoding_in_the_pool_equals_serial(tmp_path):
    from fewshot.data.sources import POOL_MIN_JOBS, Decoder

    files = _tree(tmp_path, ["a"], per_class=POOL_MIN_JOBS + 20, size=(6, 5))["a"]
    files[7].write_bytes(b"junk")
    items = [(str(f), f) for f in files]
    with Decoder((4, 4), workers=2) as pool, Decoder((4, 4), workers=1) as serial:
        got = pool.decode_some(items)
        want = serial.decode_some(items)
        assert pool._pool is not None  # the pool really ran
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1].tolist() == want[1].tolist() == [i != 7 for i in range(len(files))]
    assert got[2] == want[2] and "7.png: cannot decode" in got[2][0]
    ref = np.asarray(Image.open(files[8]).convert("RGB").resize((4, 4), Image.LANCZOS))
    np.testing.assert_array_equal(got[0][7], ref)  # row 7 is file 8: the bad one left out


def test_prepare_a_builtin_name_that_is_not_one_hints_at_folder(tmp_path):
    with pytest.raises(DataError, match=r"unknown dataset 'pets'.*prepare folder pets --from"):
        P.prepare("pets", tmp_path, root=tmp_path)


def test_info_of_an_unprepared_own_name(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'pets'.*prepare folder pets --from DIR"):
        P.info("pets", root=tmp_path)
    with pytest.raises(DataError, match="not a plain folder name"):
        P.info("../x", root=tmp_path)


def test_real_omniglot_alphabet_as_a_class_folder(tmp_path):
    """Real 1-bit PNGs (../shared/data, skipped when absent): the Greek alphabet's 24
    characters as class folders, grey 28x28, against Pillow on every image."""
    import zipfile
    from pathlib import Path

    zpath = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "omniglot" / \
        "images_background.zip"
    if not zpath.exists():
        pytest.skip(f"real Omniglot data not available ({zpath} missing)")
    with zipfile.ZipFile(zpath) as z:
        z.extractall(tmp_path, [n for n in z.namelist() if "/Greek/" in n])
    src = tmp_path / "images_background" / "Greek"
    P.prepare_custom("folder", "greek", src, root=tmp_path / "r", mode="L", image_size=28,
                     split="0.5,0.25,0.25", seed=3)
    stores = _stores(tmp_path / "r", "greek")
    assert [s.num_classes for s in stores.values()] == [12, 6, 6]
    assert sorted(n for s in stores.values() for n in s.class_names) == \
        [f"character{i:02d}" for i in range(1, 25)]
    for s in stores.values():
        assert s.class_counts().tolist() == [20] * s.num_classes and s.image_shape == (28, 28, 1)
        for c, name in enumerate(s.class_names):
            files = sorted((src / name).iterdir())
            want = np.stack([np.asarray(Image.open(f).convert("L").resize((28, 28),
                                                                          Image.LANCZOS))
                             for f in files])
            np.testing.assert_array_equal(s.read(s.class_indices(c))[..., 0], want)
