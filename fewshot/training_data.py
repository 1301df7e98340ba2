"""What the trainer trains on: the stores of every source, the checks that the configured
tasks fit them (before any step runs), and the sampler a learner's ``input_kind`` asks for.

``episodes`` -> meta-batches from :func:`~fewshot.data.episodes.make_sampler` (an
:class:`EpisodeSampler`, or :class:`AnyWayAnyShotSampler` when ways/shots are lists, or
Meta-Dataset variable episodes), or a :class:`~fewshot.data.multisource.MultiSourceSampler`
when ``data.dataset`` lists several sources (their train and val stores brought to the first
source's image shape); ``pairs`` -> :class:`DisjointPairSampler` (T_i, T_j) pairs;
``supervised`` -> :class:`SupervisedAdapter` epochs.

Imports: config, evaluation (grid checks), data, errors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List

from fewshot.data.conform import conform_store
from fewshot.data.episodes import DisjointPairSampler, make_sampler
from fewshot.data.multisource import (MultiSourceSampler, chained_episodes, check_source_classes,
                                      check_sources_prepared, source_probabilities)
from fewshot.data.store import open_split
from fewshot.data.supervised import SupervisedAdapter
from fewshot.errors import ConfigError
from fewshot.evaluation import check_grid

__all__ = ["TrainingData", "open_training_data", "check_feasible", "check_learner_tasks",
           "build_sampler", "validation_episodes"]


def _as_list(v) -> List[int]:
    return list(v) if isinstance(v, (list, tuple)) else [int(v)]


def _task_spec(ways, shots, queries, variable: bool = False) -> Dict[str, Any]:
    """A sampler spec for :func:`fewshot.data.episodes.make_sampler`: N-way K-shot (ints),
    any-way any-shot (lists) or Meta-Dataset variable episodes."""
    if variable:
        return {"variable": True}
    return {"ways": ways, "shots": shots, "queries": queries}


@dataclass
class TrainingData:
    """The train and val stores of every source (one, or several for multi-source training),
    each conformed to the first source's training image shape, and the validation task."""

    train_stores: List
    val_stores: List
    image_shape: List[int]  # (H, W, C) of the first source's training images
    data_shape: Dict[str, int]  # in_channels, image_size, num_classes (over all sources)
    val_ways: int
    val_shots: int

    @property
    def train_store(self):
        return self.train_stores[0]

    @property
    def val_store(self):
        return self.val_stores[0]


def open_training_data(config) -> TrainingData:
    """:class:`TrainingData` of ``config``: its sources' train and val splits opened."""
    d, t = config.data, config.train
    if len(d.sources) > 1:
        check_sources_prepared(d.sources, d.root)
    train = [open_split(n, d.train_split, d.root, d.in_memory) for n in d.sources]
    shape = train[0].image_shape
    train = [conform_store(s, shape, d.in_memory) for s in train]
    val = [conform_store(open_split(n, d.val_split, d.root, d.in_memory), shape, d.in_memory)
           for n in d.sources]
    data_shape = {"in_channels": int(shape[2]), "image_size": int(shape[0]),
                  "num_classes": int(sum(s.num_classes for s in train))}
    return TrainingData(train, val, [int(v) for v in shape], data_shape,
                        t.val_ways or _as_list(t.ways)[0], t.val_shots or _as_list(t.shots)[0])


def check_feasible(config, data: TrainingData, learner_kind: str) -> None:
    """The eval grid, the training tasks and the validation episodes fit their stores
    (a one-line error naming the split, the option and the counts otherwise)."""
    t, e, d = config.train, config.eval, config.data
    test = open_split(config.eval_dataset(), config.eval_split(), d.root, in_memory=False)
    try:
        if learner_kind != "supervised":
            check_grid(test, e.ways, e.shots, e.queries,
                       what=f"eval grid on split '{config.eval_split()}' (eval.ways/shots/queries)")
    finally:
        test.close()
    if learner_kind == "supervised":
        return
    multi = len(data.train_stores) > 1
    if not t.variable:
        if multi:
            check_source_classes(data.train_stores, max(_as_list(t.ways)), "train.ways")
        for store in data.train_stores:
            check_grid(store, _as_list(t.ways), _as_list(t.shots), t.queries,
                       what="training tasks (train.ways/shots/queries)")
    if learner_kind == "pairs" and t.pair and not t.pair.get("variable", t.variable):
        check_grid(data.train_store, _as_list(t.pair.get("ways", t.ways)),
                   _as_list(t.pair.get("shots", t.shots)), t.pair.get("queries", t.queries),
                   what="second training task (train.pair)")
    if multi:
        check_source_classes(data.val_stores, data.val_ways, "validation (train.val_ways)")
    for store in data.val_stores:
        check_grid(store, [data.val_ways], [data.val_shots], t.queries,
                   what=f"validation episodes on split '{d.val_split}' (train.val_ways/val_shots)")


def check_learner_tasks(config, learner, kind: str) -> None:
    """A learner's own limits on its training tasks (e.g. MTL's k sub-batches), checked
    before the run directory is written and before any training step."""
    t = config.train
    if kind == "supervised" or t.variable or not hasattr(learner, "validate_task"):
        return
    for ways in _as_list(t.ways):
        for shots in _as_list(t.shots):
            learner.validate_task(ways, shots, t.queries)


def build_sampler(config, data: TrainingData, kind: str, *, seed: int, device,
                  channels_last: bool, rank: int = 0, world: int = 1):
    """The sampler of ``kind`` over the training stores, drawing with ``seed`` (this rank's)."""
    t, aug, cl = config.train, config.data.augment, channels_last
    first = _task_spec(t.ways, t.shots, t.queries, t.variable)
    if kind == "episodes" and len(data.train_stores) > 1:
        p = source_probabilities(data.train_stores, config.data.source_sampling)
        return MultiSourceSampler(data.train_stores, first, p, seed=seed, device=device,
                                  augment=aug, channels_last=cl)
    if kind == "episodes":
        return make_sampler(data.train_store, first, seed=seed, device=device, augment=aug,
                            channels_last=cl)
    if kind == "pairs":
        second = _task_spec(t.pair.get("ways", t.ways), t.pair.get("shots", t.shots),
                            t.pair.get("queries", t.queries), t.pair.get("variable", t.variable))
        return DisjointPairSampler(data.train_store, first, second, seed=seed, device=device,
                                   augment=aug, channels_last=cl)
    if kind == "supervised":
        # the adapter takes the global batch and this rank's share of each of its halves;
        # every rank shuffles with the global seed (the same permutation on all ranks)
        return SupervisedAdapter(data.train_store, batch_size=t.batch_size, augment=aug,
                                 seed=t.seed, device=device, rank=rank, world_size=world,
                                 channels_last=cl)
    raise ConfigError(f"learner '{config.learner.name}' has input_kind {kind!r}; the "
                      f"trainer knows episodes, pairs and supervised")


def validation_episodes(config, data: TrainingData, device):
    """The fixed, seeded validation episodes, split evenly over the sources' val splits."""
    t = config.train
    return chained_episodes(data.val_stores, data.val_ways, data.val_shots, t.queries,
                            t.val_episodes, t.seed + 7919, device=device)
