"""Every config shipped in ``configs/`` loads, validates its learner options and builds its
learner (a config that no longer fits its learner fails here, not in a user's first run)."""
from pathlib import Path

import pytest

from fewshot.config import load_config
from fewshot.run import build_learner

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.toml"))


def test_configs_are_shipped():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_builds_its_learner(path):
    cfg = load_config(path)
    learner = build_learner(cfg, in_channels=1, image_size=28, num_classes=20)
    assert learner.name == cfg.learner.name
    for key, value in cfg.learner.options.items():
        assert getattr(learner.config, key) == value, key
    assert sum(p.numel() for p in learner.parameters()) > 0
