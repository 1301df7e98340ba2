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


@pytest.mark.parametrize("file,prefix,dataset", [("mltp_cifar10.toml", "cnet", "cifar10"),
                                                 ("mltp_cifar100.toml", "ccnet", "cifar100")])
def test_cifar_specs_are_the_papers_settings(file, prefix, dataset):
    spec = load_spec(BENCH / file)
    assert spec.seeds == [0, 1, 2]
    pairs = set()
    for e, cfg in runs(spec):
        t, o = cfg.train, cfg.learner.options
        assert (cfg.data.dataset, cfg.data.augment, cfg.data.val_split) == (dataset, "cifar", "test")
        assert (t.epochs, t.batch_size, t.lr_milestones, t.lr_gamma) == (150, 128, [50, 100], 0.1)
        assert cfg.eval.checkpoint == "last" and t.val_every == 1
        assert (o["optimizer"], o["lr"]) == ("adam", 1e-3)
        assert o["weight_decay"] == (1e-4 if o["backbone"] == f"{prefix}4" else 0.0)
        if cfg.learner.name != "standard":
            assert (o["eta"], o["alpha_mean"], o["alpha_std"], o["learn_alpha"]) == (1.0, 1e-3, 1e-3, True)
        pairs.add((o["backbone"], cfg.learner.name))
    every = ["standard", "mltp", "mltp_conv", "mltp_fc", "mltp_fo"]
    want = {(f"{prefix}{k}", m) for k in (1, 2, 3) for m in every}
    want |= {(f"{prefix}4", "standard"), (f"{prefix}4", "mltp_fo")}
    assert pairs == want  # Tables I/II: FO only for the fourth network
    quick = load_spec(BENCH / file, quick=True)
    assert quick.seeds == [0] and all(c.train.epochs == 2 for _, c in runs(quick))


def test_tiny_imagenet_spec_is_the_papers_settings():
    spec = load_spec(BENCH / "mltp_tiny.toml")
    assert spec.seeds == [0, 1, 2]
    pairs = set()
    for e, cfg in runs(spec):
        t, o = cfg.train, cfg.learner.options
        assert (cfg.data.dataset, cfg.data.augment) == ("tiny-imagenet", "tiny")
        assert (t.epochs, t.batch_size, t.lr_milestones) == (90, 128, [30, 60])
        assert (o["optimizer"], o["lr"], o["momentum"], o["weight_decay"]) == ("sgd", 0.05, 0.9, 1e-5)
        assert o["backbone_options"] == {"drop_maxpool": True}
        if cfg.learner.name == "mltp_fo":
            assert (o["eta"], o["alpha_mean"], o["alpha_std"]) == (0.5, 1e-2, 1e-2)
        pairs.add((o["backbone"], cfg.learner.name))
    assert pairs == {(n, m) for n in ("resnet18", "resnet34") for m in ("standard", "mltp_fo")}


@pytest.mark.parametrize("file", ["mltp_omniglot.toml", "mltp_glyphs.toml"])
def test_reduced_specs_build_valid_runs(file):
    if not (BENCH / file).is_file():
        pytest.skip(f"{file} not written yet")
    for quick in (False, True):
        spec = load_spec(BENCH / file, quick=quick)
        names = {cfg.learner.name for _, cfg in runs(spec)}
        assert {"standard", "mltp", "mltp_fo"} <= names
        assert len(spec.seeds) == (3 if not quick else len(spec.seeds))
