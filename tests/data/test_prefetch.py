"""BatchFeed: the same batches in the same order with and without prefetch, an exact resume
state although one batch was drawn ahead, producer errors surfacing at the batch they belong
to, and (on CUDA) side-stream copies that the consumer sees complete."""
from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from fewshot.data.episodes import EpisodeSampler
from fewshot.data.prefetch import BatchFeed, tensors_in
from fewshot.data.store import ImageStore


def small_store():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 5)
    img = rng.integers(0, 256, (labels.size, 6, 6, 1), dtype=np.uint8)
    return ImageStore.from_arrays(img, labels, [f"c{k}" for k in range(6)], dataset="t", split="train")


def meta_batches(sampler, n):
    return lambda: [sampler.sample() for _ in range(n)]


@pytest.mark.parametrize("prefetch", [False, True])
def test_same_batches_in_order(prefetch):
    store = small_store()
    plain = EpisodeSampler(store, ways=3, shots=1, queries=2, seed=5)
    fed = EpisodeSampler(store, ways=3, shots=1, queries=2, seed=5)
    with BatchFeed(meta_batches(fed, 2), state=fed.state_dict, prefetch=prefetch) as feed:
        for _ in range(4):
            want, got = meta_batches(plain, 2)(), next(feed)
            for a, b in zip(want, got):
                assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)


def test_state_is_that_of_the_first_unconsumed_batch():
    store = small_store()
    sampler = EpisodeSampler(store, ways=3, shots=1, queries=2, seed=1)
    made = threading.Semaphore(0)

    def produce():
        batch = meta_batches(sampler, 2)()
        made.release()
        return batch

    feed = BatchFeed(produce, state=sampler.state_dict, prefetch=True)
    for _ in range(3):
        next(feed)
    for _ in range(4):
        assert made.acquire(timeout=30)  # the fourth batch is made while nobody asks for it
    assert sampler.index == 8          # three consumed batches of 2, one more drawn ahead
    state = feed.state_dict()
    assert state["index"] == 6         # ... but a checkpoint resumes after the consumed ones
    feed.close()

    resumed = EpisodeSampler(store, ways=3, shots=1, queries=2, seed=1)
    resumed.load_state_dict(state)
    reference = EpisodeSampler(store, ways=3, shots=1, queries=2, seed=1)
    reference.load_state_dict({"index": 6})
    assert torch.equal(resumed.sample().support_x, reference.sample().support_x)


def test_state_without_prefetch_is_the_producers():
    store = small_store()
    sampler = EpisodeSampler(store, ways=3, shots=1, queries=2, seed=1)
    feed = BatchFeed(meta_batches(sampler, 2), state=sampler.state_dict, prefetch=False)
    next(feed)
    assert feed.state_dict()["index"] == 2 == sampler.index


def test_producer_error_surfaces_at_its_batch():
    calls = {"n": 0}

    def produce():
        calls["n"] += 1
        if calls["n"] == 2:
            raise ValueError("bad batch 2")
        return calls["n"]

    feed = BatchFeed(produce, prefetch=True)
    assert next(feed) == 1             # batch 2 failed in the worker, but batch 1 is fine
    with pytest.raises(ValueError, match="bad batch 2"):
        next(feed)
    assert next(feed) == 3
    feed.close()


def test_discard_drops_the_batch_drawn_ahead():
    counter = iter(range(100))
    feed = BatchFeed(lambda: next(counter), prefetch=True)
    assert next(feed) == 0
    feed.discard()                     # batch 1 was made ahead and is thrown away
    assert next(feed) == 2
    feed.close()


def test_tensors_in_walks_nested_batches():
    store = small_store()
    ep = EpisodeSampler(store, ways=2, shots=1, queries=1, seed=0).sample()
    found = list(tensors_in([(ep, ep), {"x": torch.zeros(1)}]))
    assert len(found) == 2 * sum(1 for _ in tensors_in(ep)) + 1
    assert all(isinstance(t, torch.Tensor) for t in found)


def test_default_is_no_prefetch_on_cpu():
    assert BatchFeed(lambda: 0, device="cpu").prefetch is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_side_stream_batches_equal_synchronous_ones():
    store = small_store()
    plain = EpisodeSampler(store, ways=3, shots=2, queries=3, seed=9, device="cuda")
    fed = EpisodeSampler(store, ways=3, shots=2, queries=3, seed=9, device="cuda")
    with BatchFeed(meta_batches(fed, 4), state=fed.state_dict, device="cuda") as feed:
        assert feed.prefetch
        for _ in range(5):
            want, got = meta_batches(plain, 4)(), next(feed)
            # consumed on the default stream right away: must see the finished copy
            for a, b in zip(want, got):
                assert torch.equal(a.support_x, b.support_x)
                assert torch.equal(a.query_y, b.query_y)


def test_sampler_episodes_are_checked_on_the_host_and_learners_trust_them():
    """Labels are checked once, on the host, when the sampler makes the episode (before any
    copy); learners skip re-reading them, so a step needs no label read on the device."""
    from fewshot.data.episodes import EpisodePlan, _check_plan_labels
    from fewshot.errors import ConfigError, DataError
    from fewshot.learners import get_learner

    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 4)
    store = ImageStore.from_arrays(rng.integers(0, 256, (16, 16, 16, 1), dtype=np.uint8), labels,
                                   [f"c{k}" for k in range(4)], dataset="t", split="train")
    ep = EpisodeSampler(store, ways=3, shots=1, queries=2, seed=0).sample()
    assert ep.checked and ep.to("cpu").checked
    cls = get_learner("protonet")
    learner = cls(cls.Config(backbone_options={"hidden": 4}), in_channels=1, image_size=16)
    bad_y = torch.tensor([0, 1, 7])
    learner.check_episode(dataclasses.replace(ep, support_y=bad_y))  # trusted: not re-read
    with pytest.raises(ConfigError, match=r"labels must lie in 0..2, found 0..7"):
        learner.check_episode(dataclasses.replace(ep, support_y=bad_y, checked=False))
    plan = EpisodePlan(support_rows=torch.arange(3), support_y=bad_y, query_rows=torch.arange(3),
                       query_y=torch.tensor([0, 1, 2]), classes=torch.arange(3))
    with pytest.raises(DataError, match="support labels 0..7 for a 3-way episode"):
        _check_plan_labels(plan)
    no_shot = dataclasses.replace(plan, support_y=torch.tensor([0, 0, 1]))
    with pytest.raises(DataError, match="class without support examples"):
        _check_plan_labels(no_shot)
