"""train.memory_format: the layout the trainer picks per device, and that it changes no number
beyond float rounding (CPU, one thread)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn


def test_auto_picks_channels_last_on_a_cpu_for_convolutional_networks_only():
    from fewshot.run import resolve_memory_format

    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())
    mlp = nn.Sequential(nn.Linear(4, 2))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_memory_format("auto", cpu, conv) is torch.channels_last
    assert resolve_memory_format("auto", cpu, mlp) is torch.contiguous_format
    assert resolve_memory_format("auto", cuda, conv) is torch.contiguous_format
    assert resolve_memory_format("channels_last", cuda, conv) is torch.channels_last
    assert resolve_memory_format("contiguous", cpu, conv) is torch.contiguous_format


def test_a_bad_memory_format_is_one_config_error(glyphs_root, tmp_path, write_config):
    from fewshot.config import load_config
    from fewshot.errors import ConfigError

    cfg = write_config(tmp_path / "c.toml", glyphs_root, memory_format="nhwc")
    with pytest.raises(ConfigError, match=r"train.memory_format' must be one of auto, "
                                          r"channels_last, contiguous, found 'nhwc'"):
        load_config(cfg)


def _trained(cfg, out, **overrides):
    from fewshot.trainer import Trainer

    sets = [f"train.{k}={v}" for k, v in overrides.items()]
    trainer = Trainer(cfg, out, overrides=sets)
    run = trainer.run(evaluate=False)
    return trainer, run


@pytest.mark.parametrize("learner", ["protonet", "fomaml"])
def test_channels_last_training_follows_the_contiguous_run(glyphs_root, tmp_path, write_config,
                                                           learner):
    """Under ``auto`` on a CPU the conv weights train in channels_last (run.json says so). The
    first step (same weights, same episodes) gives the contiguous loss to float rounding (CPU
    BatchNorm sums its NHWC batch statistics less exactly: ~1e-5 relative, amplified by the
    squared-distance logits); later steps stay on the same trajectory: Adam's first steps are
    ±lr per entry, so entries whose gradient is rounding noise (conv biases before BatchNorm:
    exactly 0 in exact arithmetic) move differently in any two float orders."""
    cfg = write_config(tmp_path / "c.toml", glyphs_root, learner=learner, episodes=4,
                       val_every=0, checkpoint_every=0)
    fast, fast_run = _trained(cfg, tmp_path / "auto")
    ref, ref_run = _trained(cfg, tmp_path / "contiguous", memory_format="contiguous")
    convs = [p for p in fast.learner.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert all(not p.is_contiguous() for p in convs if p.shape[1] > 1)  # NHWC strides
    assert all(p.is_contiguous() for p in ref.learner.parameters())
    assert fast_run.state["memory_format"] == "channels_last"
    assert ref_run.state["memory_format"] == "contiguous"
    got = [r["loss"] for r in fast_run.metrics("train")]
    want = [r["loss"] for r in ref_run.metrics("train")]
    assert len(got) == 4 and got[0] == pytest.approx(want[0], rel=3e-4)
    assert got == pytest.approx(want, rel=1e-2)


def test_resume_under_auto_keeps_the_layout_the_run_started_with(glyphs_root, tmp_path,
                                                                 write_config):
    """A run started contiguous (run.json without the key: before the option existed) resumes
    contiguous; one started channels_last resumes channels_last."""
    from fewshot.trainer import Trainer

    cfg = write_config(tmp_path / "c.toml", glyphs_root, episodes=2, val_every=0,
                       checkpoint_every=0)
    for started in ("contiguous", "channels_last"):
        out = tmp_path / started
        _trained(cfg, out, memory_format=started)
        state = json.loads((out / "run.json").read_text())
        if started == "contiguous":
            del state["memory_format"]
            (out / "run.json").write_text(json.dumps(state))
        resumed = Trainer(None, out, resume=True, overrides=["train.episodes=3"])
        run = resumed.run(evaluate=False)
        assert run.step == 3 and run.state["memory_format"] == started
        conv = next(p for p in resumed.learner.parameters() if p.dim() == 4 and p.shape[1] > 1)
        assert conv.is_contiguous(memory_format=torch.channels_last) != conv.is_contiguous()
        assert conv.is_contiguous() == (started == "contiguous")


@pytest.mark.parametrize("sources", [1, 2])
def test_samplers_deliver_the_layout_the_weights_train_in(glyphs_root, tmp_path, write_config,
                                                          sources):
    """The sampler the trainer builds (one store, or a multi-source sampler over two) delivers
    NHWC images when the weights train in channels_last, and NCHW otherwise (RGB images: with
    one channel the two layouts have the same strides)."""
    import numpy as np

    from fewshot.config import load_config
    from fewshot.data.store import open_split, write_store
    from fewshot.training_data import TrainingData, build_sampler

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 12, 12, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(6), 10)
    write_store(tmp_path / "rgb" / "train.h5", images, labels, [f"c{k}" for k in range(6)],
                dataset="rgb", split="train", source="test")
    cfg = load_config(write_config(tmp_path / "c.toml", glyphs_root, episodes=2))
    train = [open_split("rgb", "train", tmp_path) for _ in range(sources)]
    data = TrainingData(train, train, [12, 12, 3], {}, 5, 1)
    for channels_last in (True, False):
        sampler = build_sampler(cfg, data, "episodes", seed=0, device="cpu",
                                channels_last=channels_last)
        ep = sampler.sample()
        for x in (ep.support_x, ep.query_x):
            assert x.shape[1] == 3
            assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
            assert x.is_contiguous() == (not channels_last)
