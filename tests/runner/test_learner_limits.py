"""A learner's own limits on its training tasks are checked before any training starts."""
import pytest

from fewshot.errors import ConfigError
from fewshot.trainer import Trainer


def test_mtl_sub_batches_larger_than_the_task_are_refused_before_training(tmp_path, glyphs_root,
                                                                          write_config):
    cfg = write_config(tmp_path / "mtl.toml", glyphs_root, learner="mtl+reptile", ways=5, shots=1,
                       queries=1)
    # 5-way 1-shot 1-query: 10 examples, fewer than MTL's default inner batch of 20
    trainer = Trainer(cfg, tmp_path / "run", overrides=["learner.inner_batch=20"])
    with pytest.raises(ConfigError, match="inner_batch|sub-batch|examples"):
        trainer.run()
    # refused while checking feasibility: the run never started (no env.json, no run.json)
    assert not (tmp_path / "run" / "env.json").exists()
    assert not (tmp_path / "run" / "run.json").exists()
