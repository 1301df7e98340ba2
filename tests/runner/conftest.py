"""Shared fixtures of the runner tests: a small glyphs dataset prepared once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

#: small glyphs splits: enough classes for 20-way evaluation, 20 images per class
SMALL_SPLITS = (("train", 40), ("val", 20), ("test", 25))


@pytest.fixture(scope="session")
def glyphs_root(tmp_path_factory) -> Path:
    """A data root holding glyphs/{train,val,test}.h5 (40/20/25 classes of 20 images)."""
    from fewshot.data.sources import glyphs

    root = tmp_path_factory.mktemp("data")
    glyphs.prepare(root / "glyphs", splits=SMALL_SPLITS)
    return root


@pytest.fixture(scope="session")
def write_config():
    """``write_config(path, root, learner="protonet", **train)``: a tiny config file."""
    return _write_config


def _write_config(path: Path, root: Path, learner: str = "protonet", **train) -> Path:
    """A tiny, fast config on the small glyphs data (Conv-4 with 8 channels)."""
    t = {"episodes": 6, "meta_batch": 2, "ways": 5, "shots": 1, "queries": 5, "val_every": 3,
         "val_episodes": 4, "checkpoint_every": 3, "log_every": 1, "seed": 0, "quiet": True,
         "device": "cpu", "threads": 1}
    t.update(train)
    from fewshot.config import dump_toml

    path.write_text(dump_toml({
        "data": {"dataset": "glyphs", "root": str(root)},
        "learner": {"name": learner, "backbone_options": {"hidden": 8}},
        "train": t,
        "eval": {"ways": [5, 20], "shots": [1, 2], "queries": 3, "episodes": 8, "seed": 11},
    }))
    return path
