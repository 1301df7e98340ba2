"""The MLTP paper specs (benchmarks/mltp_*.toml) hold the paper's settings and build valid runs."""
from __future__ import annotations

from pathlib import Path

import pytest

from fewshot.bench import load_spec
from fewshot.config import config_from_dict

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"


def runs(spec):
    return [(e, config_from_dict(spec.run_config(e, s), where=spec.source))
            for e in spec.learners for s in spec.seeds]


def _build(cfg):
    from fewshot.learners import get_learner

    cls = get_learner(cfg.learner.name)
    return cls(cls.Config(**cfg.learner.options), in_channels=3, image_size=32, num_classes=10)


@pytest.mark.parametrize("file", ["mltp_cifar10.toml", "mltp_cifar100.toml"])
def test_cifar_spec_learners_adapt_the_layers_their_variant_names(file):
    """Each learner built from a CIFAR spec: MLTP_conv's inner step moves only convolutions,
    MLTP_fc's only fully-connected layers, MLTP / MLTP_FO all of them (FO without second
    derivatives); α is learned; weight decay reaches w (and not α) only where the spec gives it."""
    import torch
    from torch import nn

    spec = load_spec(BENCH / file)
    for e, cfg in runs(spec)[::len(spec.seeds)]:
        learner = _build(cfg)
        opt = learner.optimizers["meta"]
        decays = [g["weight_decay"] for g in opt.param_groups]
        assert decays[0] == cfg.learner.options.get("weight_decay", 0.0) and set(decays[1:]) <= {0.0}
        if cfg.learner.name == "standard":
            continue
        kinds = {type(learner.model.get_submodule(g)) for g in learner.inner.group_names}
        want = {"mltp_conv": {nn.Conv2d}, "mltp_fc": {nn.Linear}}.get(cfg.learner.name,
                                                                     {nn.Conv2d, nn.Linear})
        assert kinds == want, (e.label, kinds)
        assert learner.inner.first_order == (cfg.learner.name == "mltp_fo")
        assert learner.inner.alpha.requires_grad
        assert any(p is learner.inner.alpha for g in opt.param_groups for p in g["params"])
        x = torch.randn(4, 3, 32, 32)
        assert learner.predict_batch(x).shape == (4, 10)


@pytest.mark.parametrize("file", ["mltp_omniglot.toml", "mltp_glyphs.toml"])
def test_reduced_specs_build_valid_runs(file):
    if not (BENCH / file).is_file():
        pytest.skip(f"{file} not written yet")
    for quick in (False, True):
        spec = load_spec(BENCH / file, quick=quick)
        names = {cfg.learner.name for _, cfg in runs(spec)}
        assert {"standard", "mltp", "mltp_fo"} <= names
        assert len(spec.seeds) == (3 if not quick else len(spec.seeds))


# --------------------------------------------------- the specs' stores from the official formats
def _pickle(obj) -> bytes:
    import pickle

    return pickle.dumps(obj, protocol=2)


def _extracted(tmp, prefix, members):
    """The folder that extracting the official tarball gives (what the converter reads)."""
    folder = tmp / prefix
    folder.mkdir(parents=True)
    for name, data in members.items():
        (folder / name).write_bytes(data)
    return tmp


def cifar10_tar(tmp, per_class=2, seed=0):
    """cifar-10-python.tar.gz, extracted: the official layout: 5 data batches, test_batch, batches.meta
    (dicts with bytes keys, data (N, 3072) uint8 in CHW order, labels a list of ints)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    members, images = {}, {}
    for b, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        labels = list(np.repeat(np.arange(10), per_class).tolist())
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        images[name] = (data, labels)
        members[name] = _pickle({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                                 b"filenames": [f"{name}_{i}.png".encode() for i in range(len(labels))]})
    members["batches.meta"] = _pickle({b"num_cases_per_batch": 10 * per_class,
                                       b"label_names": names, b"num_vis": 3072})
    return _extracted(tmp, "cifar-10-batches-py", members), images


def cifar100_tar(tmp, per_class=2, seed=0):
    """cifar-100-python.tar.gz, extracted: train, test, meta (fine/coarse labels and names)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    members, images = {}, {}
    for name in ("train", "test"):
        fine = np.repeat(np.arange(100), per_class).tolist()
        data = rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8)
        images[name] = (data, fine)
        members[name] = _pickle({b"filenames": [f"{name}_{i}.png".encode() for i in range(len(fine))],
                                 b"batch_label": name.encode(), b"fine_labels": fine,
                                 b"coarse_labels": [f // 5 for f in fine], b"data": data})
    members["meta"] = _pickle({b"fine_label_names": [f"class{i:03d}".encode() for i in range(100)],
                               b"coarse_label_names": [f"super{i:02d}".encode() for i in range(20)]})
    return _extracted(tmp, "cifar-100-python", members), images


def tiny_zip(tmp, classes=3, per_class=2, seed=0):
    """tiny-imagenet-200.zip, extracted: wnids.txt, words.txt, train/<wnid>/images/*.JPEG + boxes,
    val/images/*.JPEG + val_annotations.txt, test/images/*.JPEG."""
    import io
    import zipfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    wnids = [f"n{1440764 + k:08d}" for k in range(classes)]

    def jpeg():
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
        return buf.getvalue()

    path = tmp / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(path, "w") as z:
        root = "tiny-imagenet-200"
        z.writestr(f"{root}/wnids.txt", "\n".join(wnids) + "\n")
        z.writestr(f"{root}/words.txt", "".join(f"{w}\tthing {k}\n" for k, w in enumerate(wnids)))
        ann = []
        for k, w in enumerate(wnids):
            boxes = []
            for i in range(per_class):
                z.writestr(f"{root}/train/{w}/images/{w}_{i}.JPEG", jpeg())
                boxes.append(f"{w}_{i}.JPEG\t0\t0\t63\t63")
            z.writestr(f"{root}/train/{w}/{w}_boxes.txt", "\n".join(boxes) + "\n")
            for i in range(per_class):
                name = f"val_{k * per_class + i}.JPEG"
                z.writestr(f"{root}/val/images/{name}", jpeg())
                ann.append(f"{name}\t{w}\t0\t0\t63\t63")
        z.writestr(f"{root}/val/val_annotations.txt", "\n".join(ann) + "\n")
        z.writestr(f"{root}/test/images/test_0.JPEG", jpeg())
    with zipfile.ZipFile(path) as z:
        z.extractall(tmp / "extracted")
    return tmp / "extracted"


def _prepare_module(name):
    prep = pytest.importorskip("fewshot.data.prepare", reason="the data layer's prepare() has not landed")
    if name not in getattr(prep, "DATASETS", ()):
        pytest.skip(f"no converter for '{name}' in fewshot.data.prepare yet")
    return prep


@pytest.mark.parametrize("file,maker,classes", [("mltp_cifar10.toml", cifar10_tar, 10),
                                                ("mltp_cifar100.toml", cifar100_tar, 100)])
def test_cifar_spec_stores_resolve_from_official_pickles(tmp_path, file, maker, classes):
    import numpy as np

    from fewshot.data.store import open_split

    spec = load_spec(BENCH / file)
    cfg = config_from_dict(spec.run_config(spec.learners[0], 0))
    prep = _prepare_module(cfg.data.dataset)
    src, images = maker(tmp_path)
    root = tmp_path / "data"
    prep.prepare(cfg.data.dataset, from_path=src, root=root)
    train = open_split(cfg.data.dataset, cfg.data.train_split, root)
    test = open_split(cfg.data.dataset, cfg.eval_split(), root)
    assert cfg.data.val_split == cfg.eval_split()
    for store, n in ((train, 10 * classes if classes == 10 else 2 * classes), (test, 2 * classes)):
        assert store.num_classes == classes and store.image_shape == (32, 32, 3)
        assert len(store) == n and np.all(store.class_counts() == n // classes)
    # pixels: the first test image of class 0 is the official row, CHW -> HWC
    data, labels = images["test_batch" if classes == 10 else "test"]
    first = data[labels.index(0)].reshape(3, 32, 32).transpose(1, 2, 0)
    got = test.read(np.array([int(test.class_offsets[0])]))[0]
    assert np.array_equal(got, first)


def test_tiny_spec_stores_resolve_from_official_zip(tmp_path):
    from fewshot.data.store import open_split

    spec = load_spec(BENCH / "mltp_tiny.toml")
    cfg = config_from_dict(spec.run_config(spec.learners[0], 0))
    prep = _prepare_module(cfg.data.dataset)
    root = tmp_path / "data"
    prep.prepare(cfg.data.dataset, from_path=tiny_zip(tmp_path), root=root)
    train = open_split(cfg.data.dataset, cfg.data.train_split, root)
    test = open_split(cfg.data.dataset, cfg.eval_split(), root)
    assert train.class_names == test.class_names  # the same 200 (here 3) classes
    for store in (train, test):
        assert store.num_classes == 3 and store.image_shape == (64, 64, 3) and len(store) == 6


def test_missing_cifar_store_is_a_clear_error(tmp_path):
    from fewshot.data.store import open_split
    from fewshot.errors import DataError

    spec = load_spec(BENCH / "mltp_cifar10.toml")
    cfg = config_from_dict(spec.run_config(spec.learners[0], 0))
    with pytest.raises(DataError, match="fewshot data prepare cifar10"):
        open_split(cfg.data.dataset, cfg.data.train_split, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("file,label,maker", [
    ("mltp_cifar10.toml", "CNet1 MLTP_FO", "cifar10"),
    ("mltp_tiny.toml", "ResNet-18 MLTP_FO", "tiny"),
])
def test_spec_trains_end_to_end_on_official_format_fixture(tmp_path, file, label, maker):
    """The spec's own config (one learner, one epoch, small batches) through the trainer."""
    import torch

    from fewshot.trainer import Trainer

    spec = load_spec(BENCH / file)
    entry = next(e for e in spec.learners if e.label == label)
    raw = spec.run_config(entry, 0)
    prep = _prepare_module(raw["data"]["dataset"])
    src = cifar10_tar(tmp_path)[0] if maker == "cifar10" else tiny_zip(tmp_path)
    root = tmp_path / "data"
    prep.prepare(raw["data"]["dataset"], from_path=src, root=root)
    raw["data"]["root"] = str(root)
    raw["train"].update(epochs=1, batch_size=20 if maker == "cifar10" else 6, lr_milestones=[],
                        threads=1, quiet=True, log_every=1, device="cpu")
    threads = torch.get_num_threads()
    try:
        run = Trainer(config_from_dict(raw), tmp_path / "run").run()
    finally:
        torch.set_num_threads(threads)
    assert run.state["complete"] and run.state["input_kind"] == "supervised"
    steps = 100 // 20 if maker == "cifar10" else 1
    assert run.step == steps
    train_rows = run.metrics("train")
    assert len(train_rows) == steps and all("alpha_mean" in r for r in train_rows)
    (cell,) = run.results.cells
    assert cell.ways == (10 if maker == "cifar10" else 3) and len(cell.accuracies) == (20 if maker == "cifar10" else 6)
