"""Checkpoints: atomic writes, RNG round trip, refusal of corrupt / foreign / mismatched files."""
from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch

from fewshot.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from fewshot.errors import CheckpointError
from fewshot.learners import get_learner


def _learner():
    torch.manual_seed(0)
    cls = get_learner("protonet")
    return cls(cls.Config(backbone_options={"hidden": 8}), in_channels=1, image_size=28)


class _Sampler:
    def __init__(self):
        self.n = 17

    def state_dict(self):
        return {"n": self.n, "gen": torch.Generator().manual_seed(5).get_state()}


def test_roundtrip_restores_weights_and_rngs(tmp_path):
    learner = _learner()
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    path = save_checkpoint(tmp_path / "c.pt", step=12, config_hash="abc", learner=learner,
                           sampler=_Sampler(), trainer={"best_val": 0.5})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    obj = load_checkpoint(path, expect_hash="abc", expect_learner="protonet")
    assert obj["step"] == 12 and obj["trainer"]["best_val"] == 0.5 and obj["sampler"]["n"] == 17
    set_rng_state(obj["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
    other = _learner()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.load_state_dict(obj["learner"])
    for p, q in zip(learner.parameters(), other.parameters()):
        assert torch.equal(p, q)
    assert not [p for p in tmp_path.iterdir() if p.name != "c.pt"]


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    learner = _learner()
    path = save_checkpoint(tmp_path / "c.pt", step=1, config_hash="h", learner=learner)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, step=2, config_hash="h", learner=learner)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_refuses_corrupt_foreign_and_mismatched(tmp_path):
    learner = _learner()
    good = save_checkpoint(tmp_path / "good.pt", step=1, config_hash="h", learner=learner)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="trunc.pt cannot be read safely"):
        load_checkpoint(trunc)
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"format": "fewshot-checkpoint", "x": Evil()}, fh, protocol=2)
    with pytest.raises(CheckpointError, match="evil.pt cannot be read safely"):
        load_checkpoint(evil)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(CheckpointError, match="not a fewshot checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="config hash h"):
        load_checkpoint(good, expect_hash="other")
    with pytest.raises(CheckpointError, match="holds learner 'protonet'"):
        load_checkpoint(good, expect_learner="maml")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
