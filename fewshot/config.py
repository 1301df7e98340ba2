"""Run configuration: TOML files (read with :mod:`tomllib`) mapped to dataclasses.

A config has four tables::

    [data]     which dataset and splits to read
    [learner]  ``name`` plus the learner's own hyper-parameters (its ``Config`` dataclass)
    [train]    the training loop: episodes per run, task shape, validation, checkpoints, device
    [eval]     the N-way K-shot evaluation grid on fixed, seeded test episodes

Every key is documented in the ``doc`` metadata of its dataclass field; ``fewshot config
--explain`` prints them all. Unknown keys are errors naming the closest valid key; values
are type-checked (the message names the key, the expected type and the value found).
Overrides use dotted keys, ``--set train.episodes=500`` or ``--set learner.inner_lr=0.4``;
the value is parsed as a TOML value (``5``, ``0.1``, ``true``, ``[5, 20]``, ``"conv4"``)
and a bare word is taken as a string.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from fewshot.atomic import atomic_write_text
from fewshot.errors import ConfigError, closest
from fewshot.learners import get_learner
from fewshot.transductive import check_inference

__all__ = [
    "DataConfig", "LearnerSection", "TrainConfig", "EvalConfig", "RunConfig",
    "load_config", "config_from_dict", "apply_overrides", "parse_override", "dump_toml",
    "save_config", "config_hash", "explain", "check_type", "learner_options",
]


def _f(default, doc: str, **kw):
    """A dataclass field carrying its documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


@dataclass
class DataConfig:
    """[data]: the dataset the run reads (stores made by ``fewshot data prepare``)."""

    dataset: Union[str, List[str]] = _f(
        "glyphs", "dataset name, as given to `fewshot data prepare NAME`; a list = multi-source "
                  "episodic training (Meta-Dataset style): each episode from one source, every "
                  "source's images brought to the first source's size and channels")
    root: Optional[str] = _f(None, "data root holding <dataset>/<split>.h5; default $FEWSHOT_DATA "
                                   "or ./datasets")
    train_split: str = _f("train", "split used for training (meta-training classes)")
    val_split: str = _f("val", "split used for validation and best-checkpoint selection "
                               "(never the test split)")
    test_split: str = _f("test", "split evaluated by default (`fewshot eval --split` overrides)")
    in_memory: Optional[bool] = _f(None, "true: load stores into memory; false: read lazily from "
                                         "disk; unset: in memory when the store fits")
    augment: Optional[str] = _f(None, "training augmentation preset passed to the sampler "
                                      "(e.g. 'cifar', 'tiny'); unset: none")
    source_sampling: str = _f("uniform", "multi-source training: the source of each episode is "
                                         "drawn 'uniform' (Meta-Dataset's default) or by 'size' "
                                         "(proportional to its training classes)")

    @property
    def sources(self) -> List[str]:
        """The dataset names read for training (one, or several for multi-source training)."""
        return list(self.dataset) if isinstance(self.dataset, list) else [self.dataset]


@dataclass
class TrainConfig:
    """[train]: the training loop."""

    episodes: int = _f(1000, "outer steps (meta-updates) for episodic learners; each step draws "
                             "meta_batch tasks ('iterations' is accepted as an alias)")
    epochs: int = _f(0, "epochs over the training split for supervised learners (MLTP, standard); "
                        "ignored by episodic learners")
    batch_size: int = _f(128, "minibatch size for supervised learners (split into two half-batch tasks)")
    lr_milestones: List[int] = _f([], "supervised learners: epochs after which every learning rate "
                                      "is multiplied by lr_gamma")
    lr_gamma: float = _f(0.1, "learning-rate factor applied at each of lr_milestones")
    meta_batch: int = _f(4, "tasks per outer step (meta-batch size)")
    ways: Union[int, List[int]] = _f(5, "N: classes per training task; a list = any-way "
                                        "episodes, N drawn per episode from it")
    shots: Union[int, List[int]] = _f(1, "K: support examples per class; a list = any-shot episodes")
    queries: int = _f(15, "query examples per class in training tasks")
    variable: bool = _f(False, "Meta-Dataset-style variable-way variable-shot training episodes "
                               "(ways 5-50, <= 500 support images, <= 10 queries per class); "
                               "ways/shots/queries then only shape validation")
    pair: Dict[str, Any] = _f({}, "pairs learners (L2G): shape of the second task T_j as "
                                  "{ways=, shots=, queries=} (lists = any-way any-shot T_j) or "
                                  "{variable=true}; missing keys copy the first task's")
    val_every: int = _f(500, "validate every this many steps (episodic) or epochs (supervised); "
                             "0 = only at the end")
    val_episodes: int = _f(100, "fixed validation episodes (seeded, same every time)")
    val_ways: Optional[int] = _f(None, "ways of validation episodes; default: the training ways "
                                       "(the first one for any-way training)")
    val_shots: Optional[int] = _f(None, "shots of validation episodes; default: the training shots")
    checkpoint_every: int = _f(500, "write checkpoints/last.pt every this many steps (and at the "
                                    "end, and on Ctrl-C / SIGTERM); 0 = only then")
    log_every: int = _f(50, "sync metrics to the host and append them to metrics.jsonl every "
                            "this many steps")
    seed: int = _f(0, "seed of every random choice in training (episodes, init, augmentation)")
    device: str = _f("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    quiet: bool = _f(False, "no progress bar (for CI and logs)")
    amp: str = _f("off", "autocast for the learner step: off, bf16 or fp16 (only learners that "
                         "declare it safe)")
    threads: int = _f(0, "torch CPU threads; 0 = torch's default")
    memory_format: str = _f("auto", "layout of conv weights and images: auto (channels_last on "
                                    "a CPU for networks with 2-D convolutions, else contiguous), "
                                    "channels_last or contiguous; changes speed, not the math")


@dataclass
class EvalConfig:
    """[eval]: the N-way K-shot grid on fixed, seeded episodes of the test split."""

    ways: List[int] = _f([5], "N values of the grid")
    shots: List[int] = _f([1, 5], "K values of the grid")
    queries: int = _f(15, "query examples per class")
    episodes: int = _f(600, "episodes per grid cell (the same ones for every learner)")
    split: Optional[str] = _f(None, "split to evaluate; default: data.test_split")
    seed: int = _f(2024, "seed of the evaluation episodes; equal seeds = equal episodes")
    checkpoint: str = _f("best", "which weights to evaluate: best (on validation) or last")
    dataset: Optional[str] = _f(None, "dataset to evaluate (cross-domain evaluation: its images "
                                      "are brought to the run's size and channels); default: "
                                      "data.dataset (the first source of a multi-source run)")
    inference: str = _f("inductive", "inductive (the learner's predict), or transductive over each "
                                     "episode's query set: bd-cspn (BD-CSPN prototype "
                                     "rectification) or tim (TIM-GD); metric learners only")


@dataclass
class LearnerSection:
    """[learner]: ``name`` plus the learner's own hyper-parameters."""

    name: str = _f("protonet", "registered learner name (`fewshot learners` lists them)")
    options: Dict[str, Any] = _f({}, "every other key of [learner]: fields of the learner's "
                                     "Config dataclass (`fewshot learners NAME` shows them)")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    learner: LearnerSection = field(default_factory=LearnerSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    source: Optional[str] = None  # the file it came from (not part of the config)

    def to_dict(self) -> Dict[str, Any]:
        """The config as nested plain data (learner options flattened into [learner])."""
        d = {"data": asdict(self.data), "learner": {"name": self.learner.name,
                                                     **copy.deepcopy(self.learner.options)},
             "train": asdict(self.train), "eval": asdict(self.eval)}
        return d

    def eval_split(self) -> str:
        return self.eval.split or self.data.test_split

    def eval_dataset(self) -> str:
        """The dataset evaluated: eval.dataset, else data.dataset (its first source)."""
        return self.eval.dataset or self.data.sources[0]


SECTIONS = {"data": DataConfig, "train": TrainConfig, "eval": EvalConfig}
ALIASES = {("train", "iterations"): "episodes"}
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")  # train.memory_format


# --------------------------------------------------------------------------- types
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "none"
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, List, Sequence, tuple, Tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin in (dict, Dict, Mapping):
        return "table"
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return {int: "integer", float: "float", str: "string", bool: "boolean"}.get(tp, getattr(tp, "__name__", str(tp)))


class _Mismatch(Exception):
    pass


def _coerce(value, tp):
    """``value`` converted to ``tp`` when it is a loss-free conversion, else raise _Mismatch."""
    if tp is Any or tp is typing.Any:
        return value
    origin = typing.get_origin(tp)
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin is Union:
        return _coerce_union(value, typing.get_args(tp))
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise _Mismatch
    if origin in (list, List, Sequence, tuple, Tuple):
        return _coerce_sequence(value, tp, origin)
    if origin in (dict, Dict, Mapping) or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return dict(value)
    return _coerce_plain(value, tp)


def _coerce_union(value, args):
    # exact-type members first so 5 stays int in Union[int, List[int]] and 0.5 float in Union[int, float]
    for a in args:
        if a in (int, float, str, bool) and type(value) is a:
            return value
    for a in args:
        try:
            return _coerce(value, a)
        except _Mismatch:
            continue
    raise _Mismatch


def _coerce_sequence(value, tp, origin):
    """List[T] / Sequence[T] -> list; Tuple[T, ...] / Tuple[A, B] -> tuple of that shape."""
    if not isinstance(value, (list, tuple)):
        raise _Mismatch
    args = typing.get_args(tp)
    if origin in (list, List, Sequence):
        (inner,) = args or (Any,)
        return [_coerce(v, inner) for v in value]
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0]) for v in value)
    if args and len(args) != len(value):
        raise _Mismatch
    return tuple(_coerce(v, a) for v, a in zip(value, args)) if args else tuple(value)


def _coerce_plain(value, tp):
    """bool, int (never from a bool), float (from an int too), str, list and other classes."""
    if tp is bool and isinstance(value, bool):
        return value
    if tp in (int, float) and isinstance(value, bool):
        raise _Mismatch
    if tp is int and isinstance(value, int):
        return value
    if tp is float and isinstance(value, (int, float)):
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    if tp is list and isinstance(value, (list, tuple)):
        return list(value)
    if tp in (bool, int, float, str, list):
        raise _Mismatch
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch
    return value



def check_type(key: str, value, tp, where: str = "") -> Any:
    """``value`` checked (and losslessly converted, e.g. int -> float) against ``tp``.

    Raises :class:`ConfigError` naming the key, the expected type and the value found.
    """
    try:
        return _coerce(value, tp)
    except _Mismatch:
        src = f" in {where}" if where else ""
        raise ConfigError(f"config key '{key}'{src} expects {_type_name(tp)}, found "
                          f"{value!r} ({type(value).__name__}); fix the value") from None


def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _fill(cls, table: Mapping[str, Any], section: str, where: str):
    hints = _hints(cls)
    names = [f.name for f in fields(cls) if f.init]
    kwargs = {}
    for key, value in table.items():
        name = ALIASES.get((section, key), key)
        if name not in names:
            raise ConfigError(f"unknown config key '{section}.{key}'"
                              f"{' in ' + where if where else ''}.{closest(key, names)} "
                              f"Valid keys of [{section}]: {', '.join(names)}")
        if name in kwargs:
            raise ConfigError(f"config key '{section}.{name}' given twice (once as an alias)")
        kwargs[name] = check_type(f"{section}.{key}", value, hints[name], where)
    return cls(**kwargs)


def learner_options(name: str, options: Mapping[str, Any], where: str = ""):
    """The learner's ``Config`` built from ``options`` (unknown keys and types checked).

    Returns the Config instance. Raises :class:`ConfigError` for an unknown learner name,
    an unknown option (with the closest match) or a value of the wrong type.
    """
    cls = get_learner(name)
    Cfg = cls.Config
    hints = _hints(Cfg)
    names = [f.name for f in fields(Cfg) if f.init]
    kwargs = {}
    for key, value in options.items():
        if key not in names:
            raise ConfigError(f"unknown option 'learner.{key}' for learner '{name}'"
                              f"{' in ' + where if where else ''}.{closest(key, names)} "
                              f"Options of {name}: {', '.join(names)}")
        kwargs[key] = check_type(f"learner.{key}", value, hints[key], where)
    try:
        cfg = Cfg(**kwargs)
    except TypeError as e:
        raise ConfigError(f"learner '{name}': {e}") from None
    cfg.validate()
    return cfg


def _validate_amp(cfg: RunConfig) -> None:
    """Autocast only for learners that declare it safe (no second-order or fine-tuned
    gradients); fp16 on a CPU-only config is refused here, on a CPU-only machine by the trainer."""
    t = cfg.train
    if t.amp != "off" and not getattr(get_learner(cfg.learner.name), "supports_autocast", False):
        raise ConfigError(f"train.amp = {t.amp!r}: learner '{cfg.learner.name}' does not "
                          f"declare autocast safe (second-order or fine-tuned gradients); "
                          f"set train.amp = \"off\"")
    if t.amp == "fp16" and t.device == "cpu":
        raise ConfigError("train.amp = 'fp16' needs a CUDA device; use 'bf16' on CPU")


def _validate(cfg: RunConfig, where: str) -> None:
    t, e = cfg.train, cfg.eval
    src = f" ({where})" if where else ""

    def positive(key, v, allow_zero=False):
        if (v < 0) if allow_zero else (v <= 0):
            raise ConfigError(f"config key '{key}' must be {'>= 0' if allow_zero else '> 0'}, "
                              f"found {v}{src}")

    for key in ("episodes", "meta_batch", "queries", "val_episodes", "log_every", "batch_size"):
        positive(f"train.{key}", getattr(t, key))
    for key in ("epochs", "val_every", "checkpoint_every", "threads"):
        positive(f"train.{key}", getattr(t, key), allow_zero=True)
    for key in ("ways", "shots"):
        v = getattr(t, key)
        for x in (v if isinstance(v, list) else [v]):
            positive(f"train.{key}", x)
        if isinstance(v, list) and not v:
            raise ConfigError(f"config key 'train.{key}' is an empty list{src}")
    if t.ways == 1 or t.ways == [1]:
        raise ConfigError(f"config key 'train.ways' must be >= 2 (a 1-way task has nothing to "
                          f"classify){src}")
    pair_keys = ["ways", "shots", "queries", "variable"]
    unknown_pair = set(t.pair) - set(pair_keys)
    if unknown_pair:
        k = sorted(unknown_pair)[0]
        raise ConfigError(f"unknown config key 'train.pair.{k}'{src}.{closest(k, pair_keys)} "
                          f"Valid keys: {', '.join(pair_keys)}")
    for k, v in t.pair.items():
        tp = {"queries": int, "variable": bool}.get(k, Union[int, List[int]])
        check_type(f"train.pair.{k}", v, tp, where)
    if t.device != "auto" and t.device != "cpu" and not t.device.startswith("cuda"):
        raise ConfigError(f"config key 'train.device' must be auto, cpu, cuda or cuda:N, found "
                          f"{t.device!r}{src}")
    if t.memory_format not in MEMORY_FORMATS:
        raise ConfigError(f"config key 'train.memory_format' must be one of "
                          f"{', '.join(MEMORY_FORMATS)}, found {t.memory_format!r}{src}")
    if t.amp not in ("off", "bf16", "fp16"):
        raise ConfigError(f"config key 'train.amp' must be off, bf16 or fp16, found {t.amp!r}{src}")
    _validate_amp(cfg)
    if not (t.lr_gamma > 0) or math.isnan(t.lr_gamma):
        raise ConfigError(f"config key 'train.lr_gamma' must be > 0, found {t.lr_gamma}{src}")
    if not e.ways or not e.shots:
        raise ConfigError(f"config keys 'eval.ways' and 'eval.shots' must be non-empty lists{src}")
    for key in ("ways", "shots"):
        for x in getattr(e, key):
            positive(f"eval.{key}", x)
    positive("eval.queries", e.queries)
    positive("eval.episodes", e.episodes)
    _validate_sources(cfg, src)
    if e.checkpoint not in ("best", "last"):
        raise ConfigError(f"config key 'eval.checkpoint' must be 'best' or 'last', found "
                          f"{e.checkpoint!r}{src}")
    check_inference(e.inference, cfg.learner.name)


def _validate_sources(cfg: RunConfig, src: str) -> None:
    """data.dataset (one name or a non-empty list of distinct names), data.source_sampling and
    eval.dataset; multi-source training is episodic only."""
    d = cfg.data
    names = d.sources
    if not names or any(not n.strip() for n in names):
        raise ConfigError(f"config key 'data.dataset' must name a dataset or a non-empty list of "
                          f"datasets, found {d.dataset!r}{src}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"config key 'data.dataset' lists {dup[0]!r} twice{src}; name each "
                          f"source once")
    if d.source_sampling not in ("uniform", "size"):
        raise ConfigError(f"config key 'data.source_sampling' must be 'uniform' or 'size', found "
                          f"{d.source_sampling!r}{src}")
    if cfg.eval.dataset is not None and not cfg.eval.dataset.strip():
        raise ConfigError(f"config key 'eval.dataset' is empty{src}; name a prepared dataset or "
                          f"leave it unset")
    kind = getattr(get_learner(cfg.learner.name), "input_kind", "episodes") if len(names) > 1 \
        else "episodes"
    if kind != "episodes":
        raise ConfigError(f"data.dataset = {names}: multi-source training draws single episodes, "
                          f"but learner '{cfg.learner.name}' trains on {kind} batches{src}; give "
                          f"one dataset")


def config_from_dict(raw: Mapping[str, Any], where: str = "", check_learner: bool = True) -> RunConfig:
    """A :class:`RunConfig` from nested plain data (the parsed TOML).

    ``check_learner`` validates the [learner] options against the learner's Config
    (needs the learner registered); without it only the name's type is checked.
    """
    raw = dict(raw)
    known = list(SECTIONS) + ["learner"]
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown config table '[{key}]'{' in ' + where if where else ''}."
                              f"{closest(key, known)} Valid tables: {', '.join(known)}")
        if not isinstance(raw[key], dict):
            raise ConfigError(f"config key '{key}' must be a table ([{key}]), found {raw[key]!r}")
    out = RunConfig(source=where or None)
    for name, cls in SECTIONS.items():
        setattr(out, name, _fill(cls, raw.get(name, {}), name, where))
    lraw = dict(raw.get("learner", {}))
    name = lraw.pop("name", LearnerSection().name)
    name = check_type("learner.name", name, str, where)
    if "options" in lraw and isinstance(lraw["options"], dict) and len(lraw) == 1:
        lraw = dict(lraw["options"])  # an explicit [learner.options] table
    out.learner = LearnerSection(name=name, options=lraw)
    if check_learner:
        _link_learner_task(out, raw.get("train", {}), lraw, where)
        cfg = learner_options(name, lraw, where)
        # store the resolved, fully defaulted options so the saved config is complete
        out.learner.options = _plain(asdict(cfg))
    _validate(out, where)
    return out


def _link_learner_task(out: RunConfig, train_raw: Mapping[str, Any], lraw: Dict[str, Any],
                       where: str) -> None:
    """Keep the learner's own ``ways`` / ``meta_batch`` options (e.g. MAML's N-way head) and
    [train] consistent: a value given on one side only is copied to the other; two
    different explicit values are an error."""
    names = {f.name for f in fields(get_learner(out.learner.name).Config)}
    src = f" ({where})" if where else ""
    for key in ("ways", "meta_batch"):
        if key not in names:
            continue
        in_train = key in train_raw
        if key in lraw and in_train and lraw[key] != getattr(out.train, key):
            raise ConfigError(f"learner.{key} = {lraw[key]!r} but train.{key} = "
                              f"{getattr(out.train, key)!r}{src}; give it once, in [train]")
        if key in lraw and not in_train:
            setattr(out.train, key, check_type(f"learner.{key}", lraw[key], int, where))
        elif key not in lraw:
            value = getattr(out.train, key)
            if key == "ways" and isinstance(value, list):
                raise ConfigError(f"learner '{out.learner.name}' has a fixed N-way head "
                                  f"(learner.ways) and cannot train on any-way episodes "
                                  f"(train.ways = {value}){src}; give one integer")
            lraw[key] = value


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def load_config(path_or_dict: Union[str, os.PathLike, Mapping[str, Any], RunConfig],
                overrides: Sequence[str] = (), check_learner: bool = True) -> RunConfig:
    """Read a TOML config (or take a dict / RunConfig), apply ``--set`` overrides, validate."""
    if isinstance(path_or_dict, RunConfig):
        raw, where = path_or_dict.to_dict(), path_or_dict.source or ""
    elif isinstance(path_or_dict, Mapping):
        raw, where = copy.deepcopy(dict(path_or_dict)), ""
    else:
        path = Path(path_or_dict)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; give the path of a TOML file "
                              f"(examples in configs/)")
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, where, check_learner=check_learner)


def parse_override(text: str) -> Tuple[List[str], Any]:
    """``"train.episodes=500"`` -> (["train", "episodes"], 500); values parsed as TOML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.sub=value, e.g. --set train.episodes=500")
    key, value = text.split("=", 1)
    key = key.strip()
    parts = [p for p in key.split(".")]
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: the key must name a table and a key, e.g. "
                          f"train.episodes or learner.lr")
    value = value.strip()
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare word: a string
    return parts, parsed


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[Union[str, Tuple[str, Any]]]) -> Dict[str, Any]:
    """``raw`` with each ``key.sub=value`` override set (types are checked on validation)."""
    out = copy.deepcopy(dict(raw))
    for ov in overrides:
        if isinstance(ov, tuple):
            parts, value = ov[0].split("."), ov[1]
        else:
            parts, value = parse_override(ov)
        if parts[0] not in list(SECTIONS) + ["learner"]:
            known = list(SECTIONS) + ["learner"]
            raise ConfigError(f"--set {'.'.join(parts)}: unknown table '{parts[0]}'."
                              f"{closest(parts[0], known)} Valid tables: {', '.join(known)}")
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {'.'.join(parts)}: '{p}' is not a table")
            node = nxt
        node[parts[-1]] = value
    return out


# ------------------------------------------------------------------------ writing
def _toml_key(k: str) -> str:
    import re

    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()
                               if x is not None) + "}"
    raise ConfigError(f"cannot write {v!r} ({type(v).__name__}) to TOML")


def dump_toml(data: Mapping[str, Mapping[str, Any]], header: str = "") -> str:
    """Nested dict (tables of values) as TOML text; None values are left out (= default)."""
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    for table, values in data.items():
        if lines:
            lines.append("")
        lines.append(f"[{table}]")
        for k, v in values.items():
            if v is None:
                continue
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def save_config(cfg: RunConfig, path: Union[str, os.PathLike]) -> Path:
    """Write the resolved config (every key, defaults included) as TOML, atomically."""
    header = "Resolved fewshot config (every key, defaults filled in).\n" \
             f"config hash: {config_hash(cfg)}"
    return atomic_write_text(path, dump_toml(cfg.to_dict(), header))


#: keys that do not change the trained weights (a resume may change them)
NON_SEMANTIC = {("train", "episodes"), ("train", "epochs"), ("train", "quiet"),
                ("train", "log_every"), ("train", "checkpoint_every"), ("train", "device"),
                ("train", "threads"), ("train", "memory_format"), ("train", "val_every"),
                ("data", "root"), ("data", "in_memory")}
#: learner options that choose how a step is computed, not what it computes (task batching
#: gives the sequential meta-gradients to float rounding, inner_checkpoint the unrolled ones):
#: left out of the hash like the device, so a run can be resumed with them changed
NON_SEMANTIC_LEARNER = {"task_batching", "inner_checkpoint"}


def config_hash(cfg: RunConfig) -> str:
    """SHA-256 (first 16 hex digits) of everything in the config that shapes the weights.

    The [eval] table, ``data.source_sampling`` of a single-source run, and the keys in
    :data:`NON_SEMANTIC` (run length, logging, device, data location) and
    :data:`NON_SEMANTIC_LEARNER` are left out, so a run may be resumed with more episodes or on
    another device.
    """
    d = cfg.to_dict()
    d.pop("eval")
    if len(cfg.data.sources) == 1:  # no effect with one source (and hashes of older runs hold)
        d["data"].pop("source_sampling", None)
    for table, key in NON_SEMANTIC:
        d[table].pop(key, None)
    for key in NON_SEMANTIC_LEARNER:
        d["learner"].pop(key, None)
        if isinstance(d["learner"].get("options"), dict):
            d["learner"]["options"].pop(key, None)
    text = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def explain() -> str:
    """Documentation of every config key (``fewshot config --explain``)."""
    out = ["fewshot run config (TOML). Tables and keys, with defaults:", ""]
    for table, cls in (("data", DataConfig), ("learner", LearnerSection), ("train", TrainConfig),
                       ("eval", EvalConfig)):
        out.append(f"[{table}]  {cls.__doc__.splitlines()[0].split(': ', 1)[-1]}")
        hints = _hints(cls)
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()
            shown = "unset" if default is None else _toml_value(default)
            out.append(f"  {f.name} ({_type_name(hints[f.name])}, default {shown})")
            out.append(f"      {f.metadata.get('doc', '')}")
        out.append("")
    out.append("Overrides: --set table.key=value (value parsed as TOML; bare words are strings).")
    out.append("`fewshot learners NAME` lists a learner's own options and defaults.")
    return "\n".join(out)
