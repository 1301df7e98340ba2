"""Multi-source episodes (fewshot.data.multisource): source frequencies against p (uniform
and by classes) within 4 binomial standard deviations, every episode from one source with
global class ids, exact resume from the state, one image shape, and the one-line errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fewshot.data.conform import conform_store
from fewshot.data.episodes import EpisodeSampler, fixed_episodes
from fewshot.data.multisource import (MultiSourceSampler, chained_episodes, check_source_classes,
                                      source_probabilities, split_evenly)
from fewshot.data.store import ImageStore
from fewshot.errors import ConfigError, DataError

SPEC = {"ways": 3, "shots": 1, "queries": 2}


def _store(name, classes, size=6, channels=1, per_class=4, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (classes * per_class, size, size, channels), dtype=np.uint8)
    labels = np.repeat(np.arange(classes), per_class)
    return ImageStore.from_arrays(images, labels, [f"{name}{c}" for c in range(classes)],
                                  dataset=name, split="train")


@pytest.fixture
def stores():
    return [_store("a", 5, seed=1), _store("b", 15, seed=2), _store("c", 30, seed=3)]


@pytest.mark.parametrize("how", ["uniform", "size"])
def test_source_frequencies_match_the_probabilities(stores, how):
    p = source_probabilities(stores, how)
    want = [1 / 3] * 3 if how == "uniform" else [5 / 50, 15 / 50, 30 / 50]
    assert p == pytest.approx(want, abs=1e-15)
    sampler = MultiSourceSampler(stores, SPEC, p, seed=4)
    n = 20000
    freq = np.bincount([sampler.source_at(i) for i in range(n)], minlength=3) / n
    for f, q in zip(freq, want):
        assert abs(f - q) < 4 * math.sqrt(q * (1 - q) / n), (freq, want)


def test_every_episode_from_one_source_with_global_class_ids(stores):
    """Episode i = episode i of its source's own sampler (same seed), class ids shifted by
    the classes of the sources before it (0, 5, 20)."""
    p = source_probabilities(stores, "uniform")
    sampler = MultiSourceSampler(stores, SPEC, p, seed=7)
    own = [EpisodeSampler(s, 3, 1, 2, seed=7) for s in stores]
    offsets, sizes = [0, 5, 20], [5, 15, 30]
    seen = set()
    for i in range(60):
        ep = sampler.sample()
        s = sampler.source_at(i)
        seen.add(s)
        ref = own[s].episode(i)
        lo, hi = offsets[s], offsets[s] + sizes[s]
        assert ((ep.classes >= lo) & (ep.classes < hi)).all()
        assert ((ep.base_query_y >= lo) & (ep.base_query_y < hi)).all()
        assert torch.equal(ep.classes, ref.classes + lo)
        assert torch.equal(ep.base_support_y, ref.base_support_y + lo)
        assert torch.equal(ep.support_x, ref.support_x) and torch.equal(ep.query_x, ref.query_x)
        assert torch.equal(ep.query_y, ref.query_y)
    assert seen == {0, 1, 2}


def test_resume_from_the_state_gives_the_same_episodes(stores):
    p = source_probabilities(stores, "size")
    a = MultiSourceSampler(stores, SPEC, p, seed=3)
    a.sample_batch(7)
    state = a.state_dict()
    assert state == {"sampler": "MultiSourceSampler", "seed": 3, "index": 7,
                     "sources": ["a", "b", "c"]}
    b = MultiSourceSampler(stores, SPEC, p, seed=99)
    b.load_state_dict(state)
    for ea, eb in zip(a.sample_batch(5), b.sample_batch(5)):
        assert torch.equal(ea.classes, eb.classes)
        assert torch.equal(ea.support_x, eb.support_x) and torch.equal(ea.query_x, eb.query_x)
    with pytest.raises(ConfigError, match=r"state of sources \['a', 'b', 'c'\], this sampler "
                                          r"reads \['a', 'b'\]"):
        MultiSourceSampler(stores[:2], SPEC, [0.5, 0.5]).load_state_dict(state)


def test_sources_of_other_shapes_are_conformed_to_one(stores):
    rgb = _store("d", 6, size=9, channels=3, seed=5)
    with pytest.raises(DataError, match="different image shapes"):
        MultiSourceSampler([stores[0], rgb], SPEC, [0.5, 0.5])
    both = [stores[0], conform_store(rgb, stores[0].image_shape)]
    sampler = MultiSourceSampler(both, SPEC, [0.5, 0.5], seed=0)
    shapes = {tuple(sampler.episode(i).support_x.shape[1:]) for i in range(20)}
    assert shapes == {(1, 6, 6)}


def test_validation_episodes_split_evenly_over_the_sources(stores):
    assert split_evenly(10, 3) == [4, 3, 3] and sum(split_evenly(7, 7)) == 7
    eps = chained_episodes(stores, 3, 1, 2, 10, seed=5)
    assert len(eps) == 10
    # episodes 0-3 from a, 4-6 from b, 7-9 from c: each source's own fixed episodes
    for lo, hi, s in ((0, 4, 0), (4, 7, 1), (7, 10, 2)):
        own = fixed_episodes(stores[s], 3, 1, 2, hi - lo, seed=5)
        for j in range(lo, hi):
            assert torch.equal(eps[j].classes, own[j - lo].classes)
            assert torch.equal(eps[j].support_x, own[j - lo].support_x)


def test_errors_name_the_source_split_and_counts(stores):
    with pytest.raises(DataError, match=r"source 'a': split 'train' has 5 classes, fewer than the "
                                        r"8 ways of train.ways"):
        check_source_classes(stores, 8, "train.ways")
    with pytest.raises(ConfigError, match="must be 'uniform' or 'size'"):
        source_probabilities(stores, "classes")
    with pytest.raises(ConfigError, match="non-negative numbers summing to 1"):
        MultiSourceSampler(stores, SPEC, [0.5, 0.5, 0.5])
