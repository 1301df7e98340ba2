"""The supervised adapter: two half-batch tasks per minibatch, epochs, sharding, workers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fewshot.data.store import ImageStore
from fewshot.data.supervised import SupervisedAdapter, TaskPairBatch
from fewshot.errors import ConfigError


def coded_store(n=100, classes=10, size=4):
    """Images encoding their row (channel 0 = row % 256, channel 1 = row // 256)."""
    labels = np.repeat(np.arange(classes), n // classes)
    rows = np.arange(labels.size)
    img = np.zeros((labels.size, size, size, 3), dtype=np.uint8)
    img[..., 0] = (rows % 256)[:, None, None]
    img[..., 1] = (rows // 256)[:, None, None]
    img[..., 2] = 7
    return ImageStore.from_arrays(img, labels, [f"c{i}" for i in range(classes)])


def rows_of(x, store):
    """Decode rows from normalised images via the store statistics."""
    mean = torch.tensor(store.mean).view(1, 3, 1, 1)
    std = torch.tensor(store.std).view(1, 3, 1, 1)
    px = torch.round((x * std + mean)[:, :, 0, 0] * 255).long()
    return px[:, 0] + 256 * px[:, 1]


def test_halves_cover_an_epoch_once_with_right_labels():
    st = coded_store(100)
    ad = SupervisedAdapter(st, batch_size=16, seed=0)
    batches = list(ad)
    assert len(ad) == 6 == len(batches)  # 100 // 16, last partial batch dropped
    seen = []
    for b in batches:
        assert isinstance(b, TaskPairBatch) and len(b) == 16
        assert b.x_i.shape == (8, 3, 4, 4) and b.x_j.shape == (8, 3, 4, 4)
        ri, rj = rows_of(b.x_i, st), rows_of(b.x_j, st)
        assert torch.equal(b.y_i, torch.as_tensor(st.labels)[ri])
        assert torch.equal(b.y_j, torch.as_tensor(st.labels)[rj])
        assert torch.equal(b.x, torch.cat([b.x_i, b.x_j]))
        seen += ri.tolist() + rj.tolist()
    assert len(seen) == len(set(seen)) == 96
    assert seen != sorted(seen)  # shuffled
    assert ad.epoch == 1  # the next pass is a new epoch with another order
    nxt = [rows_of(b.x_i, st).tolist() for b in ad]
    assert nxt[0] != rows_of(batches[0].x_i, st).tolist()


def test_determinism_set_epoch_and_state():
    st = coded_store(64)
    a, b = SupervisedAdapter(st, 8, seed=3), SupervisedAdapter(st, 8, seed=3)
    a.set_epoch(5)
    b.load_state_dict({"seed": 3, "epoch": 5})
    for x, y in zip(a, b):
        assert torch.equal(x.x_i, y.x_i) and torch.equal(x.y_j, y.y_j)
    assert a.epoch == 5  # set_epoch pins it: the caller advances epochs
    c = SupervisedAdapter(st, 8, seed=4)
    c.set_epoch(5)
    assert not torch.equal(next(iter(c)).x_i, next(iter(a)).x_i)
    assert not torch.equal(c.permutation(5), a.permutation(5))
    assert a.state_dict() == {"sampler": "SupervisedAdapter", "seed": 3, "epoch": 5}


def test_drop_last_false_splits_the_last_batch():
    st = coded_store(100)
    ad = SupervisedAdapter(st, 16, seed=0, drop_last=False)
    batches = list(ad)
    assert len(ad) == 7 and len(batches[-1]) == 4
    assert batches[-1].y_i.numel() == 2 and batches[-1].y_j.numel() == 2
    rows = torch.cat([torch.cat([rows_of(b.x_i, st), rows_of(b.x_j, st)]) for b in batches])
    assert sorted(rows.tolist()) == list(range(100))


@pytest.mark.parametrize("n, world, last", [(99, 1, 2), (101, 2, 4), (99, 2, None), (97, 1, None)])
def test_drop_last_false_trims_the_last_batch_to_equal_halves(n, world, last):
    """An odd remainder (99 = 6 x 16 + 3) keeps 2 rows, 1 per task: the last row of the
    epoch's order is dropped; with 2 ranks the remainder is cut to a multiple of 4 (101: 5 -> 4;
    99: 3 -> no batch). Every batch then passes the learner's equal-halves check."""
    from torch import nn

    from fewshot.learners import get_learner

    st = coded_store(n, classes=1)
    shards = [SupervisedAdapter(st, 16, seed=0, drop_last=False, rank=r, world_size=world)
              for r in range(world)]
    per_rank = [list(a) for a in shards]
    assert all(len(a) == len(b) == 6 + (last is not None) for a, b in zip(shards, per_rank))
    if last is not None:
        tail = [b[-1] for b in per_rank]
        assert all(t.y_i.numel() == t.y_j.numel() == last // (2 * world) for t in tail)
    perm = shards[0].permutation(0)
    kept = len(perm) - (len(perm) % 16) + (last or 0)
    rows = sorted(int(r) for b in sum(per_rank, []) for r in torch.cat([rows_of(b.x_i, st),
                                                                        rows_of(b.x_j, st)]))
    assert rows == sorted(perm[:kept].tolist())  # exactly the last rows of the order are dropped

    class Flat(nn.Module):
        out_features = 3 * 4 * 4

        def forward(self, x):
            return x.flatten(1)

    cls = get_learner("standard")
    learner = cls(cls.Config(), in_channels=3, image_size=4, num_classes=2, backbone=Flat())
    for b in sum(per_rank, []):
        learner.check_batch(b)  # refuses unequal halves with a ConfigError


def test_odd_and_unshardable_batch_sizes_are_refused():
    st = coded_store(100)
    with pytest.raises(ConfigError, match="batch_size = 15.*two equal tasks.*even"):
        SupervisedAdapter(st, 15)
    with pytest.raises(ConfigError, match="world_size = 3"):
        SupervisedAdapter(st, 16, world_size=3)
    with pytest.raises(ConfigError, match="rank"):
        SupervisedAdapter(st, 16, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="larger than the 100 images"):
        SupervisedAdapter(st, 128)


def test_ranks_share_each_global_batch_and_keep_their_halves():
    st = coded_store(96)
    whole = list(SupervisedAdapter(st, 24, seed=1))
    shards = [list(SupervisedAdapter(st, 24, seed=1, rank=r, world_size=3)) for r in range(3)]
    for k, g in enumerate(whole):
        parts = [s[k] for s in shards]
        assert all(p.x_i.shape[0] == 4 and p.x_j.shape[0] == 4 for p in parts)
        gi, gj = rows_of(g.x_i, st).tolist(), rows_of(g.x_j, st).tolist()
        pi = sorted(sum((rows_of(p.x_i, st).tolist() for p in parts), []))
        pj = sorted(sum((rows_of(p.x_j, st).tolist() for p in parts), []))
        assert pi == sorted(gi) and pj == sorted(gj)  # task_i rows stay task_i on every rank
        assert rows_of(parts[1].x_i, st).tolist() == gi[1::3]  # strided as DistributedSampler


def test_workers_and_augmentation_are_deterministic():
    rng = np.random.default_rng(0)
    st = ImageStore.from_arrays(rng.integers(0, 256, (96, 8, 8, 3), dtype=np.uint8),
                                np.repeat(np.arange(4), 24), list("abcd"))
    one = list(SupervisedAdapter(st, 16, augment="cifar", seed=2))
    two = list(SupervisedAdapter(st, 16, augment="cifar", seed=2, num_workers=2))
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        assert torch.equal(a.x_i, b.x_i) and torch.equal(a.y_j, b.y_j)
    # "cifar": per-image standardisation -> every image has mean 0 and std 1
    x = one[0].x
    flat = x.reshape(x.shape[0], -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(1, unbiased=False), torch.ones(16), atol=1e-4, rtol=0)
    # augmentation changes images relative to the un-augmented test pipeline
    plain = list(SupervisedAdapter(st, 16, augment=None, seed=2))
    assert not torch.equal(plain[0].x_i, one[0].x_i)


def test_eval_batches_cover_the_store_in_order():
    st = coded_store(100)
    xs, ys = zip(*SupervisedAdapter.eval_batches(st, 30))
    assert [len(y) for y in ys] == [30, 30, 30, 10]
    assert torch.equal(torch.cat(ys), torch.as_tensor(st.labels))
    assert rows_of(torch.cat(xs), st).tolist() == list(range(100))
    ad = SupervisedAdapter(st, 16, augment="cifar")
    x, _ = next(iter(ad.eval_batches(st, 7)))  # the adapter's preset: per-image standardised
    torch.testing.assert_close(x.reshape(7, -1).mean(1), torch.zeros(7), atol=1e-5, rtol=0)
    x2, _ = next(iter(SupervisedAdapter.eval_batches(st, 7, augment="cifar")))
    assert torch.equal(x, x2)


def test_tiny_preset_normalises_test_images_with_the_training_statistics():
    """MLTP (sec. IV) standardises Tiny ImageNet's test images with the training set's mean/std."""
    rng = np.random.default_rng(0)
    train = ImageStore.from_arrays(rng.integers(0, 120, (40, 8, 8, 3), dtype=np.uint8),
                                   np.repeat(np.arange(4), 10), list("abcd"))
    test = ImageStore.from_arrays(rng.integers(100, 256, (8, 8, 8, 3), dtype=np.uint8),
                                  np.repeat(np.arange(4), 2), list("abcd"), split="test")
    assert not np.allclose(train.mean, test.mean)
    adapter = SupervisedAdapter(train, batch_size=8, augment="tiny")
    x, _ = next(adapter.eval_batches(test, 8))
    raw = torch.from_numpy(np.asarray(test.images)).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(train.mean).view(1, 3, 1, 1)
    std = torch.tensor(train.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (raw - mean) / std, rtol=1e-5, atol=1e-5)
    # the class-level call with explicit statistics agrees
    x2, _ = next(SupervisedAdapter.eval_batches(test, 8, augment="tiny",
                                                stats=(train.mean, train.std)))
    torch.testing.assert_close(x2, x)
