"""Episode samplers: labels, balance, disjointness, determinism, budgets, feasibility errors.

Every image of the test stores encodes its own store row in its pixels (channel 0 = row % 256,
channel 1 = row // 256, channel 2 = class), so what a sampler delivered can be decoded and
checked independently of the sampler's own index bookkeeping.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fewshot.data.episodes import (AnyWayAnyShotSampler, DisjointPairSampler, Episode,
                                   EpisodeSampler, EpisodeSpecError, VariableEpisodeSampler,
                                   episode_loader, fixed_episodes, make_sampler)
from fewshot.data.store import ImageStore, write_store
from fewshot.data import transforms as T
from fewshot.errors import ConfigError, DataError


def coded_store(counts, size=4, split="train"):
    """An in-memory store whose images encode (row, class); ``counts[c]`` images of class c."""
    labels = np.repeat(np.arange(len(counts)), counts)
    rows = np.arange(labels.size)
    img = np.zeros((labels.size, size, size, 3), dtype=np.uint8)
    img[..., 0] = (rows % 256)[:, None, None]
    img[..., 1] = (rows // 256)[:, None, None]
    img[..., 2] = labels[:, None, None]
    names = [f"cls{c:02d}" for c in range(len(counts))]
    return ImageStore.from_arrays(img, labels, names, dataset="coded", split=split)


def decode(x: torch.Tensor):
    """(rows, classes) from un-normalised (x/255) images."""
    px = torch.round(x[:, :, 0, 0] * 255).long()
    return px[:, 0] + 256 * px[:, 1], px[:, 2]


@pytest.fixture(scope="module")
def store():
    return coded_store([30] * 20)


def test_episode_shapes_labels_and_remapping(store):
    ep = EpisodeSampler(store, 5, 3, 4, seed=0, normalize=False).sample()
    assert ep.support_x.shape == (15, 3, 4, 4) and ep.query_x.shape == (20, 3, 4, 4)
    assert ep.support_x.dtype == torch.float32
    assert torch.equal(ep.support_y, torch.arange(5).repeat_interleave(3))
    assert torch.equal(ep.query_y, torch.arange(5).repeat_interleave(4))
    assert ep.ways == 5 and torch.equal(ep.shots, torch.full((5,), 3))
    s_rows, s_cls = decode(ep.support_x)
    q_rows, q_cls = decode(ep.query_x)
    # the pixels' class is the store class of the episode label, and base labels agree
    assert torch.equal(s_cls, ep.classes[ep.support_y]) and torch.equal(s_cls, ep.base_support_y)
    assert torch.equal(q_cls, ep.classes[ep.query_y]) and torch.equal(q_cls, ep.base_query_y)
    assert torch.equal(torch.as_tensor(store.labels)[s_rows], s_cls)
    assert len(set(ep.classes.tolist())) == 5


def test_no_query_image_in_support_and_no_repeats(store):
    sampler = EpisodeSampler(store, 5, 5, 10, seed=1, normalize=False)
    for _ in range(200):
        ep = sampler.sample()
        s_rows, _ = decode(ep.support_x)
        q_rows, _ = decode(ep.query_x)
        rows = torch.cat([s_rows, q_rows]).tolist()
        assert len(set(rows)) == len(rows) == 75


def test_class_and_image_balance_over_many_episodes(store):
    """Classes and images are drawn uniformly: chi-square statistics below the 0.1% critical
    values (df=19: 43.82; per-class image choice df=29: 58.30)."""
    sampler = EpisodeSampler(store, 5, 2, 3, seed=2, normalize=False)
    class_hits = np.zeros(20)
    image_hits = np.zeros(30)
    n = 2000
    for _ in range(n):
        plan = sampler.plan_at(sampler.index)
        sampler.index += 1
        class_hits[plan.classes.numpy()] += 1
        rows = torch.cat([plan.support_rows, plan.query_rows]).numpy()
        own = rows[store.labels[rows] == 0]  # images of class 0 when it was drawn
        image_hits[own - store.class_offsets[0]] += 1
    expected = n * 5 / 20
    assert ((class_hits - expected) ** 2 / expected).sum() < 43.82
    e_img = image_hits.sum() / 30
    assert image_hits.sum() == class_hits[0] * 5
    assert ((image_hits - e_img) ** 2 / e_img).sum() < 58.30


def test_normalisation_against_store_statistics(store):
    ep = EpisodeSampler(store, 3, 1, 1, seed=0).sample()
    raw = EpisodeSampler(store, 3, 1, 1, seed=0, normalize=False).sample()
    pix = store.images.reshape(-1, 3) / 255.0
    mean, std = pix.mean(0), pix.std(0)
    np.testing.assert_allclose(store.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(store.std, std, rtol=1e-6)
    want = (raw.support_x - torch.tensor(mean).view(1, 3, 1, 1).float()) / \
        torch.tensor(std).view(1, 3, 1, 1).float()
    torch.testing.assert_close(ep.support_x, want, rtol=1e-5, atol=1e-5)


def test_channels_last_delivers_same_values(store):
    a = EpisodeSampler(store, 4, 2, 2, seed=5).sample()
    b = EpisodeSampler(store, 4, 2, 2, seed=5, channels_last=True).sample()
    assert b.support_x.is_contiguous(memory_format=torch.channels_last)
    assert a.support_x.is_contiguous()
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)


def test_determinism_resume_and_seeds(store):
    a = EpisodeSampler(store, 5, 1, 2, seed=7)
    b = EpisodeSampler(store, 5, 1, 2, seed=7)
    c = EpisodeSampler(store, 5, 1, 2, seed=8)
    ea = [a.sample() for _ in range(5)]
    eb = [b.sample() for _ in range(5)]
    ec = [c.sample() for _ in range(5)]
    for x, y in zip(ea, eb):
        assert torch.equal(x.support_x, y.support_x) and torch.equal(x.query_x, y.query_x)
        assert torch.equal(x.classes, y.classes)
    assert any(not torch.equal(x.classes, z.classes) for x, z in zip(ea, ec))
    state = a.state_dict()
    assert state["index"] == 5
    nxt = a.sample()
    fresh = EpisodeSampler(store, 5, 1, 2, seed=0)
    fresh.load_state_dict(state)
    again = fresh.sample()
    assert torch.equal(nxt.support_x, again.support_x) and torch.equal(nxt.classes, again.classes)
    assert torch.equal(a.episode(2).query_x, ea[2].query_x)
    with pytest.raises(ConfigError, match="not a sampler state"):
        fresh.load_state_dict({"x": 1})


def test_episode_sequence_is_pinned_across_machines(store):
    """The first episode of seed 0 is fixed by the splitmix64 seeding and torch's CPU
    generator, so it must be these classes on every machine (a regression pin)."""
    classes = [EpisodeSampler(store, 5, 1, 1, seed=0).episode(i).classes.tolist() for i in (0, 1)]
    again = [EpisodeSampler(store, 5, 1, 1, seed=0).episode(i).classes.tolist() for i in (0, 1)]
    assert classes == again and classes[0] != classes[1]
    g = torch.Generator()
    from fewshot.data.episodes import episode_seed
    g.manual_seed(episode_seed(0, 0))
    assert torch.randperm(20, generator=g)[:5].tolist() == classes[0]


def test_any_way_any_shot_draws_from_the_sets(store):
    sampler = AnyWayAnyShotSampler(store, ways=(5, 7, 10), shots=(1, 5, 10), queries=3, seed=0,
                                   normalize=False)
    seen_w, seen_s = set(), set()
    for _ in range(120):
        ep = sampler.sample()
        shots = ep.shots
        assert ep.ways in (5, 7, 10)
        assert int(shots[0]) in (1, 5, 10) and torch.all(shots == shots[0])
        assert torch.equal(torch.bincount(ep.query_y, minlength=ep.ways),
                           torch.full((ep.ways,), 3))
        assert decode(ep.support_x)[1].tolist() == ep.base_support_y.tolist()
        seen_w.add(ep.ways)
        seen_s.add(int(shots[0]))
    assert seen_w == {5, 7, 10} and seen_s == {1, 5, 10}


def test_variable_episodes_respect_meta_dataset_budgets():
    counts = [2, 3, 7, 15, 40, 80, 150, 300] * 8  # 64 classes, very unbalanced sizes
    st = coded_store(counts)
    sampler = VariableEpisodeSampler(st, seed=3, normalize=False)
    ways_seen, unbalanced = [], 0
    for _ in range(60):
        ep = sampler.sample()
        n = ep.ways
        shots = ep.shots
        q = torch.bincount(ep.query_y, minlength=n)
        sizes = torch.as_tensor(np.diff(st.class_offsets))[ep.classes]
        assert 5 <= n <= 50
        assert int(shots.sum()) <= 500 and int(shots.max()) <= 100 and int(shots.min()) >= 1
        assert torch.all(q == q[0]) and 1 <= int(q[0]) <= 10
        assert int(q[0]) == min(10, int((sizes // 2).min()))  # Meta-Dataset's query size
        assert torch.all(shots + q <= sizes)
        rows = torch.cat([decode(ep.support_x)[0], decode(ep.query_x)[0]]).tolist()
        assert len(set(rows)) == len(rows)
        ways_seen.append(n)
        unbalanced += int(shots.max() > shots.min())
    assert min(ways_seen) < 15 and max(ways_seen) > 40  # uniform over [5, 50]
    assert unbalanced > 50
    # ways are capped by the classes available
    small = VariableEpisodeSampler(coded_store([20] * 8), seed=0)
    assert all(5 <= small.sample().ways <= 8 for _ in range(20))


def test_disjoint_pairs_never_share_classes(store):
    pairs = DisjointPairSampler(store, {"ways": 5, "shots": 5, "queries": 2},
                                {"ways": [5, 7, 10], "shots": [1, 5], "queries": 2}, seed=0)
    sizes = set()
    for ti, tj in pairs.sample_batch(300):
        assert not set(ti.classes.tolist()) & set(tj.classes.tolist())
        assert ti.ways == 5 and int(ti.shots[0]) == 5
        sizes.add(tj.ways)
        assert set(tj.base_query_y.tolist()) == set(tj.classes.tolist())
    assert sizes == {5, 7, 10}
    # the two-sampler form, deterministic per seed
    a = DisjointPairSampler(EpisodeSampler(store, 10, 1, 1), EpisodeSampler(store, 10, 1, 1), seed=4)
    b = DisjointPairSampler(EpisodeSampler(store, 10, 1, 1), EpisodeSampler(store, 10, 1, 1), seed=4)
    for _ in range(50):
        (ai, aj), (bi, bj) = a.sample(), b.sample()
        assert sorted(ai.classes.tolist() + aj.classes.tolist()) == list(range(20))
        assert torch.equal(ai.classes, bi.classes) and torch.equal(aj.query_x, bj.query_x)
    assert a.state_dict()["index"] == 50
    # a variable (Meta-Dataset) T_j takes N from the classes T_i left: capped, never overlapping
    var = DisjointPairSampler(store, {"ways": 12, "shots": 1, "queries": 1},
                              {"variable": True, "min_ways": 3}, seed=0)
    for ti, tj in var.sample_batch(30):
        assert 3 <= tj.ways <= 8 and not set(ti.classes.tolist()) & set(tj.classes.tolist())


def test_feasibility_errors_name_counts_and_classes():
    st = coded_store([10, 10, 4, 10, 10, 10])
    with pytest.raises(EpisodeSpecError, match=r"7 classes requested but store coded/train has 6"):
        EpisodeSampler(st, 7, 1, 1)
    with pytest.raises(ConfigError, match=r"class 'cls02' \(id 2\).* has only 4"):
        EpisodeSampler(st, 5, 2, 3)
    with pytest.raises(DataError, match=r"shots \+ queries = 5 images per class"):
        EpisodeSampler(st, 5, 2, 3)
    with pytest.raises(EpisodeSpecError, match=r"up to 10 ways|10 classes requested"):
        AnyWayAnyShotSampler(st, ways=(5, 10), shots=(1,), queries=1)
    with pytest.raises(EpisodeSpecError, match=r"3 \+ 4 = 7 distinct classes .* has 6"):
        DisjointPairSampler(st, {"ways": 3, "shots": 1, "queries": 1},
                            {"ways": 4, "shots": 1, "queries": 1})
    with pytest.raises(EpisodeSpecError, match=r"up to 5 ways plus T_j of up to 2 ways.* 6 classes"):
        DisjointPairSampler(st, {"ways": [1, 5], "shots": 1, "queries": 1},
                            {"ways": 2, "shots": 1, "queries": 1})
    with pytest.raises(EpisodeSpecError, match="has only 1"):
        VariableEpisodeSampler(coded_store([1] + [5] * 9), min_ways=2)
    with pytest.raises(ConfigError, match="ways must be >= 1"):
        EpisodeSampler(st, 0, 1, 1)
    with pytest.raises(ConfigError, match="unknown key 'way'"):
        make_sampler(st, {"way": 5, "shots": 1, "queries": 1})
    with pytest.raises(ConfigError, match="min_ways"):
        VariableEpisodeSampler(st, min_ways=6, max_ways=5)


def test_fixed_episodes_are_reproducible_and_lazy(store):
    a = fixed_episodes(store, 5, 2, 3, n=40, seed=11)
    b = fixed_episodes(store, 5, 2, 3, n=40, seed=11)
    c = fixed_episodes(store, 5, 2, 3, n=40, seed=12)
    assert len(a) == 40
    # only index lists are held: every plan is (5*2 + 5*3) rows, no image tensors
    assert all(p.support_rows.numel() == 10 and p.query_rows.numel() == 15 for p in a.plans)
    for i in (0, 17, 39, -1):
        assert torch.equal(a[i].query_x, b[i].query_x) and torch.equal(a[i].classes, b[i].classes)
        assert torch.equal(a[i].support_x, a[i].support_x)
    assert any(not torch.equal(a[i].classes, c[i].classes) for i in range(40))
    assert len(a[2:5]) == 3 and torch.equal(a[2:5][0].classes, a[2].classes)
    any_eps = fixed_episodes(store, [5, 10], [1, 5], 2, n=30, seed=0)
    assert {e.ways for e in any_eps} == {5, 10}
    with pytest.raises(IndexError):
        a[40]


def test_lazy_store_gives_the_same_episodes(tmp_path, store):
    path = write_store(tmp_path / "coded.h5", store.images, store.labels, store.class_names,
                       dataset="coded", split="train", source="test")
    with ImageStore.open(path, in_memory=False) as lazy:
        assert not lazy.in_memory
        a = [EpisodeSampler(store, 5, 2, 2, seed=3).episode(i) for i in range(5)]
        b = [EpisodeSampler(lazy, 5, 2, 2, seed=3).episode(i) for i in range(5)]
        for x, y in zip(a, b):
            torch.testing.assert_close(x.support_x, y.support_x)
            torch.testing.assert_close(x.query_x, y.query_x)


def test_union_of_splits(store):
    other = coded_store([30] * 16, split="val")
    other.class_names = [f"other{c}" for c in range(16)]
    u = ImageStore.union([store, other], split="val+test")
    sampler = EpisodeSampler(u, 35, 1, 1, seed=0)
    ep = sampler.sample()
    assert sorted(ep.classes.tolist()) == [c for c in range(36) if c in ep.classes.tolist()]
    assert ep.ways == 35 and max(ep.classes.tolist()) >= 20


def test_dataloader_workers_give_the_same_stream(store):
    sampler = EpisodeSampler(store, 5, 1, 2, seed=9)
    sampler.index = 3
    loader = episode_loader(sampler, num_workers=2, length=6)
    got = list(loader)
    assert len(got) == 6 and isinstance(got[0], Episode)
    for k, ep in enumerate(got):
        want = sampler.episode(3 + k)
        assert torch.equal(ep.support_x, want.support_x) and torch.equal(ep.classes, want.classes)
    with pytest.raises(ConfigError, match="device='cpu'"):
        episode_loader(EpisodeSampler(store, 5, 1, 1, device="meta"), num_workers=0)


def test_augmentation_is_per_image_and_seeded():
    rng = np.random.default_rng(0)
    store = ImageStore.from_arrays(rng.integers(0, 256, (100, 6, 6, 3), dtype=np.uint8),
                                   np.repeat(np.arange(10), 10), [str(c) for c in range(10)])
    aug = EpisodeSampler(store, 5, 4, 4, seed=0, augment=T.Compose([T.RandomHorizontalFlip()]),
                         normalize=False)
    ep = aug.sample()
    plain = EpisodeSampler(store, 5, 4, 4, seed=0, normalize=False).sample()
    flipped = [not torch.equal(a, b) for a, b in zip(ep.support_x, plain.support_x)]
    for a, b, f in zip(ep.support_x, plain.support_x, flipped):
        assert torch.equal(a, b.flip(-1) if f else b)
    assert 0 < sum(flipped) < len(flipped)
    again = EpisodeSampler(store, 5, 4, 4, seed=0, augment=T.Compose([T.RandomHorizontalFlip()]),
                           normalize=False).sample()
    assert torch.equal(ep.support_x, again.support_x)


def test_random_flip_and_crop_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(64 * 3 * 5 * 5, dtype=torch.float32).view(64, 3, 5, 5)
    f = T.RandomHorizontalFlip()(x, generator=g)
    flips = [torch.equal(a, b.flip(-1)) for a, b in zip(f, x)]
    assert all(torch.equal(a, b) or fl for a, b, fl in zip(f, x, flips))
    assert 15 < sum(flips) < 49  # ~Binomial(64, 0.5)
    crop = T.RandomCropPad(2)(x, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = set()
    for a, p in zip(crop, padded):  # each crop is one window of its own padded image
        hits = [(i, j) for i in range(5) for j in range(5) if torch.equal(a, p[:, i:i + 5, j:j + 5])]
        assert len(hits) == 1
        offsets.add(hits[0])
    assert len(offsets) > 10


def test_per_image_standardization_matches_tensorflow_formula():
    x = torch.rand(4, 3, 6, 6, dtype=torch.float64)
    x[3] = 0.5  # constant image: std floored at 1/sqrt(N)
    out = T.per_image_standardization(x)
    for a, b in zip(out, x):
        v = b.numpy().ravel()
        adj = max(v.std(), 1.0 / np.sqrt(v.size))
        np.testing.assert_allclose(a.numpy().ravel(), (v - v.mean()) / adj, rtol=1e-10, atol=1e-12)
    with pytest.raises(ConfigError, match="unknown augmentation preset 'cifr'. Did you mean 'cifar'"):
        T.get_preset("cifr")


def test_torchvision_transforms_per_image_and_seeded():
    from torchvision.transforms import v2

    x = torch.arange(40 * 3 * 4 * 4, dtype=torch.float32).view(40, 3, 4, 4)
    t = T.PerImage(v2.RandomHorizontalFlip())
    a = t(x, generator=torch.Generator().manual_seed(0))
    b = t(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    flips = [torch.equal(u, v.flip(-1)) for u, v in zip(a, x)]
    assert all(torch.equal(u, v) or f for u, v, f in zip(a, x, flips))
    assert 5 < sum(flips) < 35  # drawn per image, not once for the batch
