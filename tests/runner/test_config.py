"""Config parsing: types, unknown keys with the closest match, overrides, round trip, hash."""
from __future__ import annotations

import tomllib

import pytest

from fewshot.config import (apply_overrides, config_hash, dump_toml, explain, load_config,
                            parse_override)
from fewshot.errors import ConfigError


def test_defaults_fill_learner_options_and_roundtrip(tmp_path):
    cfg = load_config({"learner": {"name": "protonet", "lr": 0.002}})
    assert cfg.learner.options["lr"] == 0.002
    assert cfg.learner.options["backbone"] == "conv4"  # default filled from ProtoNet.Config
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(cfg.to_dict()))
    again = load_config(path)
    assert again.to_dict() == cfg.to_dict()
    assert config_hash(again) == config_hash(cfg)


@pytest.mark.parametrize("raw, fragment", [
    ({"train": {"episods": 5}}, "unknown config key 'train.episods'. Did you mean 'episodes'?"),
    ({"evall": {}}, "unknown config table '[evall]'. Did you mean 'eval'?"),
    ({"learner": {"name": "protonet", "lrr": 1.0}}, "unknown option 'learner.lrr' for learner 'protonet'. Did you mean 'lr'?"),
    ({"learner": {"name": "protonett"}}, "unknown learner 'protonett'. Did you mean 'protonet'?"),
    ({"train": {"episodes": "5"}}, "config key 'train.episodes' expects integer, found '5' (str)"),
    ({"train": {"quiet": 1}}, "config key 'train.quiet' expects boolean, found 1 (int)"),
    ({"learner": {"name": "protonet", "lr": "fast"}}, "config key 'learner.lr' expects float, found 'fast'"),
    ({"eval": {"ways": 5}}, "config key 'eval.ways' expects list of integer, found 5 (int)"),
    ({"train": {"ways": 1}}, "'train.ways' must be >= 2"),
    ({"train": {"device": "tpu"}}, "'train.device' must be auto, cpu, cuda"),
    ({"eval": {"checkpoint": "latest"}}, "'eval.checkpoint' must be 'best' or 'last'"),
    ({"train": {"pair": {"way": 5}}}, "unknown config key 'train.pair.way'. Did you mean 'ways'?"),
])
def test_errors_name_key_type_and_value(raw, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(raw)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_int_is_accepted_for_float_and_lists_for_any_way():
    cfg = load_config({"learner": {"name": "protonet", "lr": 1}, "train": {"ways": [5, 10], "shots": [1, 5]}})
    assert isinstance(cfg.learner.options["lr"], float) and cfg.learner.options["lr"] == 1.0
    assert cfg.train.ways == [5, 10] and cfg.train.shots == [1, 5]


def test_overrides_parse_toml_values_and_type_check():
    assert parse_override("train.episodes=500") == (["train", "episodes"], 500)
    assert parse_override("eval.ways=[5, 20]") == (["eval", "ways"], [5, 20])
    assert parse_override("learner.backbone=resnet12") == (["learner", "backbone"], "resnet12")
    cfg = load_config({}, ["train.episodes=7", "learner.backbone_options.hidden=32", "train.amp=bf16"])
    assert cfg.train.episodes == 7 and cfg.train.amp == "bf16"
    assert cfg.learner.options["backbone_options"] == {"hidden": 32}
    with pytest.raises(ConfigError, match="'train.episodes' expects integer, found 'many'"):
        load_config({}, ["train.episodes=many"])
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config({}, ["train.episodes"])
    with pytest.raises(ConfigError, match="unknown table 'trian'. Did you mean 'train'"):
        apply_overrides({}, ["trian.episodes=5"])


def test_learner_head_ways_follow_train_ways_and_conflicts_are_refused():
    cfg = load_config({"learner": {"name": "fomaml"}, "train": {"ways": 20}})
    assert cfg.learner.options["ways"] == 20
    cfg = load_config({"learner": {"name": "fomaml", "ways": 10}})
    assert cfg.train.ways == 10
    with pytest.raises(ConfigError, match="learner.ways = 10 but train.ways = 5"):
        load_config({"learner": {"name": "fomaml", "ways": 10}, "train": {"ways": 5}})
    with pytest.raises(ConfigError, match="fixed N-way head"):
        load_config({"learner": {"name": "fomaml"}, "train": {"ways": [5, 10]}})


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepisodes = 5\n")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        load_config(bad)
    src = tmp_path / "typo.toml"
    src.write_text("[train]\nepisodes = 5.5\n")
    with pytest.raises(ConfigError, match=r"'train.episodes' in .*typo.toml expects integer, found 5.5"):
        load_config(src)


def test_hash_ignores_run_length_but_not_hyperparameters():
    a = load_config({})
    assert config_hash(a) == config_hash(load_config({}, ["train.episodes=99", "train.quiet=true"]))
    assert config_hash(a) != config_hash(load_config({}, ["learner.lr=0.5"]))
    assert config_hash(a) != config_hash(load_config({}, ["train.seed=1"]))


def test_explain_documents_every_key():
    from dataclasses import fields

    from fewshot.config import DataConfig, EvalConfig, TrainConfig

    text = explain()
    for cls in (DataConfig, TrainConfig, EvalConfig):
        for f in fields(cls):
            assert f"  {f.name} (" in text
            assert f.metadata["doc"]
    assert tomllib.loads(dump_toml({"t": {"a": 1.5, "b": "x\"y", "c": [1, 2], "d": None}})) == \
        {"t": {"a": 1.5, "b": "x\"y", "c": [1, 2]}}
