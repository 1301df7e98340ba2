"""ImageStore / StoreWriter / safe_load: round trips, atomicity, laziness, integrity."""
from __future__ import annotations

import collections
import hashlib
import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fewshot.data.safe_pickle import safe_load
from fewshot.data.store import (FORMAT_VERSION, ImageStore, StoreWriter, data_root,
                                fits_in_memory, open_split, store_path, write_store)
from fewshot.errors import DataError

torch.manual_seed(0)


def _arrays(rng, n=60, k=5, shape=(9, 7, 3)):
    x = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
    y = rng.permutation(np.arange(n) % k)
    return x, y, [f"c{i}" for i in range(k)]


def test_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("FEWSHOT_DATA", raising=False)
    assert data_root() == data_root(None) and str(data_root()) == "datasets"
    monkeypatch.setenv("FEWSHOT_DATA", str(tmp_path))
    assert store_path("omniglot", "train") == tmp_path / "omniglot" / "train.h5"
    assert store_path("x", "val", "/r") == data_root("/r") / "x" / "val.h5"


def test_round_trip_sorted_stats_checksum(tmp_path, rng):
    x, y, names = _arrays(rng)
    p = write_store(tmp_path / "a.h5", x, y, names, dataset="toy", split="train", source="mem")
    order = np.argsort(y, kind="stable")
    with ImageStore.open(p, in_memory=True) as s:
        assert s.in_memory and isinstance(s.images, np.ndarray)
        np.testing.assert_array_equal(s.images, x[order])
        np.testing.assert_array_equal(s.labels, y[order])
        assert s.labels.dtype == np.int64 and np.all(np.diff(s.labels) >= 0)
        np.testing.assert_array_equal(s.class_counts(), np.bincount(y))
        np.testing.assert_array_equal(s.class_offsets, np.r_[0, np.cumsum(np.bincount(y))])
        assert (s.dataset, s.split, s.source, s.class_names) == ("toy", "train", "mem", names)
        assert s.image_shape == (9, 7, 3) and len(s) == 60 and s.num_classes == 5
        ref = x.reshape(-1, 3).astype(np.float64) / 255
        np.testing.assert_allclose(s.mean, ref.mean(0), atol=1e-12)
        np.testing.assert_allclose(s.std, ref.std(0), atol=1e-12)
        assert s.checksum == "sha256:" + hashlib.sha256(x[order].tobytes()).hexdigest()
        t = s.images_tensor()
        assert t.dtype == torch.uint8 and t.data_ptr() == s.images.ctypes.data  # no copy
    with h5py.File(p, "r") as f:
        assert f.attrs["format_version"] == FORMAT_VERSION and bool(f.attrs["complete"])


def test_grayscale_and_class_info(tmp_path, rng):
    x = rng.integers(0, 256, (6, 5, 5), dtype=np.uint8)  # (n, H, W) -> C = 1
    with StoreWriter(tmp_path / "g.h5", ["a", "b"], dataset="d", split="s", source="t",
                     class_info={"alphabet": ["A", "B"]}) as w:
        w.add(x[:2], 0)
        w.add_class(1, x[2:])
    s = ImageStore.open(tmp_path / "g.h5")
    assert s.image_shape == (5, 5, 1) and s.class_info == {"alphabet": ["A", "B"]}
    np.testing.assert_array_equal(s.images[..., 0], x)


def test_lazy_reads_match_and_reopen_after_pickle(tmp_path, rng):
    x, y, names = _arrays(rng, n=80)
    p = write_store(tmp_path / "a.h5", x, y, names, dataset="toy", split="train", source="m")
    ref = ImageStore.open(p, in_memory=True).images
    s = ImageStore.open(p, in_memory=False)
    assert not s.in_memory and isinstance(s.images, h5py.Dataset)
    idx = np.array([79, 3, 3, 0, 41, 42, 43, 5])  # unsorted, repeated, runs
    np.testing.assert_array_equal(s.read(idx), ref[idx])
    np.testing.assert_array_equal(s.read(np.array([1, 2, 9])), ref[[1, 2, 9]])
    assert s.read(np.array([], dtype=np.int64)).shape == (0, 9, 7, 3)
    with pytest.raises(DataError, match="out of range"):
        s.read(np.array([80]))
    with pytest.raises(DataError, match="lazy"):
        s.images_tensor()
    clone = pickle.loads(pickle.dumps(s))  # DataLoader workers (spawn) reopen by path
    np.testing.assert_array_equal(clone.read(idx), ref[idx])
    s.close()
    clone.close()


_MEASURE = r"""
import json, sys
import numpy as np
from fewshot.data.store import ImageStore

def rss():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

path = sys.argv[1]
gen = np.random.default_rng(1)
s = ImageStore.open(path, in_memory=False)
n = len(s)
s.read(gen.integers(0, n, 50))
before = rss()
for _ in range(100):
    assert s.read(gen.integers(0, n, 80)).shape[0] == 80
lazy = rss() - before
s.close()
before = rss()
m = ImageStore.open(path, in_memory=True)
print(json.dumps({"lazy": lazy, "in_memory": rss() - before, "lazy_flag": s.in_memory}))
"""


def test_lazy_memory_bounded(tmp_path):
    """Reading 100 episodes from a 42 MB lazy store (in a fresh process, so the heap is not
    pre-grown) keeps RSS growth far below the file size, while loading the same store into
    memory grows RSS by about the file size (so the check can fail)."""
    import json
    import subprocess
    import sys
    n, shape = 2000, (84, 84, 3)
    block = np.random.default_rng(0).integers(0, 256, (100,) + shape, dtype=np.uint8)
    with StoreWriter(tmp_path / "big.h5", [f"c{i}" for i in range(20)], dataset="big",
                     split="train", source="synthetic", num_images=n) as w:
        for c in range(20):
            w.add(block, c)
    nbytes = n * 84 * 84 * 3
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "big.h5")],
                         capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    got = json.loads(out.stdout)
    assert got["lazy_flag"] is False
    assert got["lazy"] < nbytes // 4, (got, nbytes)  # 4 MB chunk cache + episode arrays
    assert got["in_memory"] > nbytes * 0.9, (got, nbytes)


def test_fits_in_memory_env(monkeypatch):
    monkeypatch.setenv("FEWSHOT_IN_MEMORY_MAX", "1000")
    assert fits_in_memory(1000) and not fits_in_memory(1001)
    monkeypatch.setenv("FEWSHOT_IN_MEMORY_MAX", "lots")
    with pytest.raises(DataError, match="FEWSHOT_IN_MEMORY_MAX"):
        fits_in_memory(1)


def test_default_open_respects_limit(tmp_path, rng, monkeypatch):
    x, y, names = _arrays(rng)
    p = write_store(tmp_path / "a.h5", x, y, names, dataset="t", split="s", source="m")
    monkeypatch.setenv("FEWSHOT_IN_MEMORY_MAX", str(x.nbytes - 1))
    assert not ImageStore.open(p).in_memory
    monkeypatch.setenv("FEWSHOT_IN_MEMORY_MAX", str(x.nbytes))
    assert ImageStore.open(p).in_memory


def test_atomic_write_leaves_nothing_on_exception(tmp_path, rng):
    x, y, names = _arrays(rng)
    target = tmp_path / "d" / "train.h5"
    with pytest.raises(RuntimeError, match="boom"):
        with StoreWriter(target, names, dataset="t", split="train", source="m") as w:
            w.add(x[:10], 0)
            raise RuntimeError("boom")
    assert not target.exists() and list(target.parent.iterdir()) == []
    # an existing good store survives a failed rewrite untouched
    write_store(target, x, y, names, dataset="t", split="train", source="m")
    digest = ImageStore.open(target).checksum
    with pytest.raises(DataError, match="class order"):
        with StoreWriter(target, names, dataset="t", split="train", source="m") as w:
            w.add(x[:5], 3)
            w.add(x[5:10], 1)
    assert ImageStore.open(target).checksum == digest
    assert sorted(p.name for p in target.parent.iterdir()) == ["train.h5"]


def test_stale_temp_of_killed_writer_is_removed(tmp_path, rng):
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = tmp_path / f"train.h5.tmp-{int(dead.stdout)}"  # as left by `kill -9` mid-write
    stale.write_bytes(b"half a store")
    alive = tmp_path / f"train.h5.tmp-{os.getppid()}"  # a live writer's file is left alone
    alive.write_bytes(b"in progress")
    x, y, names = _arrays(rng)
    write_store(tmp_path / "train.h5", x, y, names, dataset="t", split="train", source="m")
    assert not stale.exists() and alive.exists()


def test_writer_refuses_bad_input(tmp_path, rng):
    x, _, names = _arrays(rng)
    p = tmp_path / "b.h5"
    cases = [
        (lambda w: w.add(x.astype(np.float32), 0), "uint8"),
        (lambda w: w.add(x[:3], [0, 1]), "3 images but 2 labels"),
        (lambda w: w.add(x[:3], 9), "outside"),
        (lambda w: (w.add(x[:3], 0), w.add(x[:3, :4], 1)), "resize"),
        (lambda w: w.add(x[:3], 0), "no images"),  # classes 1..4 empty
    ]
    for action, msg in cases:
        with pytest.raises(DataError, match=msg):
            with StoreWriter(p, names, dataset="t", split="s", source="m") as w:
                action(w)
        assert not p.exists() and not list(tmp_path.glob("*.tmp-*"))
    with pytest.raises(DataError, match="duplicate"):
        StoreWriter(p, ["a", "a"], dataset="t", split="s", source="m")


def test_open_refuses_foreign_incomplete_wrong_version(tmp_path, rng):
    x, y, names = _arrays(rng)
    good = write_store(tmp_path / "g.h5", x, y, names, dataset="t", split="s", source="m")
    with pytest.raises(DataError, match="not found"):
        ImageStore.open(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(DataError, match="not a readable HDF5"):
        ImageStore.open(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["images"] = np.zeros((1, 2, 2, 1), np.uint8)
    with pytest.raises(DataError, match="not a fewshot image store"):
        ImageStore.open(tmp_path / "foreign.h5")
    for attr, value, msg in (("complete", False, "incomplete"),
                             ("format_version", FORMAT_VERSION + 1, "format version")):
        bad = tmp_path / f"{attr}.h5"
        bad.write_bytes(good.read_bytes())
        with h5py.File(bad, "r+") as f:
            f.attrs[attr] = value
        with pytest.raises(DataError, match=msg):
            ImageStore.open(bad)


def test_verify_detects_corruption(tmp_path, rng):
    x, y, names = _arrays(rng)
    p = write_store(tmp_path / "v.h5", x, y, names, dataset="t", split="s", source="m")
    rep = ImageStore.open(p).verify()
    assert rep["ok"] and rep["images"] == 60 and rep["classes"] == 5
    assert (rep["per_class_min"], rep["per_class_max"]) == (12, 12)
    with h5py.File(p, "r+") as f:
        f["images"][7, 0, 0, 0] ^= 1
    with pytest.raises(DataError, match="checksum mismatch"):
        ImageStore.open(p, in_memory=False).verify()
    p2 = write_store(tmp_path / "w.h5", x, y, names, dataset="t", split="s", source="m")
    with h5py.File(p2, "r+") as f:
        lab = f["labels"][()]
        f["labels"][...] = lab[::-1]
    with pytest.raises(DataError, match="not sorted"):
        ImageStore.open(p2).verify()


def test_union_renumbers_and_pools_statistics(tmp_path, rng):
    xa, ya, _ = _arrays(rng, n=32, k=16, shape=(6, 6, 3))
    xb, yb, _ = _arrays(rng, n=40, k=20, shape=(6, 6, 3))
    pa = write_store(tmp_path / "val.h5", xa, ya, [f"v{i}" for i in range(16)],
                     dataset="mini", split="val", source="m")
    pb = write_store(tmp_path / "test.h5", xb, yb, [f"t{i}" for i in range(20)],
                     dataset="mini", split="test", source="m")
    for lazy in (False, True):
        a, b = ImageStore.open(pa, in_memory=not lazy), ImageStore.open(pb, in_memory=not lazy)
        u = ImageStore.union([a, b], "val+test")
        assert u.num_classes == 36 and len(u) == 72 and u.split == "val+test"
        assert u.in_memory is (not lazy)
        np.testing.assert_array_equal(u.labels, np.r_[a.labels, b.labels + 16])
        assert u.class_names == a.class_names + b.class_names
        idx = np.array([71, 0, 40, 31, 32])
        both = np.concatenate([a.read(np.arange(32)), b.read(np.arange(40))])
        np.testing.assert_array_equal(u.read(idx), both[idx])
        pix = both.reshape(-1, 3) / 255.0
        np.testing.assert_allclose(u.mean, pix.mean(0), atol=1e-12)
        np.testing.assert_allclose(u.std, pix.std(0), atol=1e-12)
        assert u.verify()["classes"] == 36
        u.close()
    with pytest.raises(DataError, match="disjoint"):
        ImageStore.union([ImageStore.open(pa), ImageStore.open(pa)], "x")
    c = ImageStore.from_arrays(np.zeros((2, 5, 5, 3), np.uint8), [0, 1], ["p", "q"])
    with pytest.raises(DataError, match="image shapes differ"):
        ImageStore.union([ImageStore.open(pa), c], "x")


def test_open_split_and_plus_syntax(tmp_path, rng):
    x, y, names = _arrays(rng, n=20, k=4)
    for split, pre in (("val", "v"), ("test", "t")):
        write_store(store_path("mini", split, tmp_path), x, y, [pre + n for n in names],
                    dataset="mini", split=split, source="m")
    s = open_split("mini", "val+test", root=tmp_path)
    assert s.num_classes == 8 and len(s) == 40
    with pytest.raises(DataError, match="no split 'train'.*val"):
        open_split("mini", "train", root=tmp_path)
    with pytest.raises(DataError, match="fewshot data prepare omniglot --from PATH"):
        open_split("omniglot", "train", root=tmp_path)
    with pytest.raises(DataError, match=r"fewshot data prepare glyphs`"):
        open_split("glyphs", "train", root=tmp_path)


def test_from_arrays_sorts(rng):
    x, y, names = _arrays(rng, n=10, k=2)
    s = ImageStore.from_arrays(x, y, names)
    order = np.argsort(y, kind="stable")
    np.testing.assert_array_equal(s.images, x[order])
    assert s.in_memory and s.path is None
    with pytest.raises(DataError, match="labels must lie"):
        ImageStore.from_arrays(x, y + 5, names)


# ---------------------------------------------------------------------------------- safe_load
class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_safe_load_refuses_code(tmp_path):
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps({"image_data": _Evil()}))
    with pytest.raises(DataError) as e:
        safe_load(p)
    assert str(p) in str(e.value) and "system" in str(e.value) and "forbidden" in str(e.value)
    evil_eval = b"cbuiltins\neval\n(V__import__('os')\ntR."
    with pytest.raises(DataError, match="builtins.eval"):
        safe_load(evil_eval)
    with pytest.raises(DataError, match="posix.system|os.system"):
        safe_load(pickle.dumps(_Evil(), protocol=0))


def test_safe_load_accepts_dataset_pickles(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    obj = {"a": arr, "b": [1, 2.5, "s", b"raw", None, True], "c": (np.float32(1.5),),
           "d": collections.OrderedDict(x=np.dtype("int64")), "e": {1, 2}}
    for proto in (0, 2, 4, 5):
        got = safe_load(pickle.dumps(obj, protocol=proto))
        np.testing.assert_array_equal(got["a"], arr)
        assert got["b"] == obj["b"] and got["d"]["x"] == np.dtype("int64") and got["e"] == {1, 2}
    dd = collections.defaultdict(list, {"k": [1]})
    assert safe_load(pickle.dumps(dd))["k"] == [1]
    # Python 2 style: str keys are bytes under encoding="bytes" (CIFAR batches)
    py2 = (b"\x80\x02}q\x00(U\x04dataq\x01]q\x02(K\x01K\x02eU\x06labelsq\x03]q\x04K\x07au.")
    assert safe_load(py2, encoding="bytes") == {b"data": [1, 2], b"labels": [7]}
    assert safe_load(py2) == {"data": [1, 2], "labels": [7]}


def test_safe_load_bad_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        safe_load(tmp_path / "nope.pkl")
    p = tmp_path / "cut.pkl"
    p.write_bytes(pickle.dumps({"x": list(range(100))})[:-10])
    with pytest.raises(DataError, match=f"{p}.*not a valid pickle"):
        safe_load(p)


# ------------------------------------------------------------------ per-chunk checksums (fletcher32)
def _flip_byte_in_chunk(path: Path, dataset: str, chunk: int, at: int = 5) -> tuple:
    """Flip one byte inside chunk number ``chunk`` of ``dataset``, located on disk with h5py's
    low-level API; returns the chunk's logical offset (first row it holds)."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(chunk)
        assert info.size > at
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + at)
        b = fh.read(1)[0]
        fh.seek(info.byte_offset + at)
        fh.write(bytes([b ^ 0x40]))
    return info.chunk_offset


def test_images_and_labels_are_written_with_chunk_checksums(tmp_path, rng):
    x, y, names = _arrays(rng, n=60, shape=(28, 28, 1))
    p = write_store(tmp_path / "c.h5", x, y, names, dataset="omniglot", split="s", source="m")
    with h5py.File(p, "r") as f:
        for key in ("images", "labels"):
            assert f[key].fletcher32 and f[key].chunks is not None, key
        assert f["images"].chunks == (20, 28, 28, 1)  # 16 KiB chunks: 20 images of 784 bytes


def test_flipped_byte_in_a_chunk_fails_every_read_with_one_line(tmp_path, rng):
    x, y, names = _arrays(rng, n=60, shape=(28, 28, 1))
    p = write_store(tmp_path / "omniglot" / "train.h5", x, y, names, dataset="omniglot",
                    split="train", source="m")
    row0 = _flip_byte_in_chunk(p, "images", chunk=1)[0]  # rows 20..39
    fix = "re-run `fewshot data prepare omniglot --from PATH`"
    with pytest.raises(DataError) as e:
        ImageStore.open(p, in_memory=True)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(p)) and "Fletcher-32" in msg and fix in msg
    with ImageStore.open(p, in_memory=False) as lazy:
        assert row0 == 20
        good = [i for i in range(60) if not 20 <= i < 40]
        order = np.argsort(y, kind="stable")
        assert np.array_equal(lazy.read(good), x[order][good])  # other chunks still read
        for rows in ([22], [0, 39, 50]):  # an episode touching the chunk
            with pytest.raises(DataError) as e:
                lazy.read(rows)
            assert str(e.value) == msg
        with pytest.raises(DataError, match="Fletcher-32.*fewshot data prepare omniglot"):
            lazy.verify()  # `fewshot data verify`
    from fewshot.data import prepare as P
    with pytest.raises(DataError, match="Fletcher-32"):
        P.verify("omniglot", root=tmp_path)


def test_flipped_byte_in_the_labels_fails_open(tmp_path, rng):
    x, y, names = _arrays(rng)
    p = write_store(tmp_path / "l.h5", x, y, names, dataset="glyphs", split="s", source="m")
    _flip_byte_in_chunk(p, "labels", chunk=0, at=8 * 13)
    for in_memory in (True, False):
        with pytest.raises(DataError, match=r"Fletcher-32.*`fewshot data prepare glyphs`$"):
            ImageStore.open(p, in_memory=in_memory)


@pytest.mark.parametrize("layout", ["contiguous", "chunked"])
def test_stores_written_without_checksums_still_open(tmp_path, rng, layout):
    """A store as written before the checksums: no fletcher32, contiguous or chunked."""
    x, y, names = _arrays(rng)
    new = write_store(tmp_path / "new.h5", x, y, names, dataset="t", split="s", source="m")
    old = tmp_path / "old.h5"
    with h5py.File(new, "r") as src, h5py.File(old, "w") as dst:
        for key in src:
            # the old writer's chunks: at least 4 KiB, here 21 images of 9*7*3 bytes
            kw = {"chunks": (21, 9, 7, 3)} if layout == "chunked" and key == "images" else {}
            dst.create_dataset(key, data=src[key][()], dtype=src[key].dtype, **kw)
        dst.attrs.update(dict(src.attrs))
    with h5py.File(old, "r") as f:
        assert not f["images"].fletcher32 and not f["labels"].fletcher32
        assert (f["images"].chunks is None) == (layout == "contiguous")
    ref = ImageStore.open(new, in_memory=True)
    for in_memory in (True, False):
        with ImageStore.open(old, in_memory=in_memory) as s:
            assert np.array_equal(s.read(np.arange(60)), ref.images)
            assert np.array_equal(s.labels, ref.labels) and s.verify()["ok"]
