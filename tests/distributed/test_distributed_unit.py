"""fewshot.distributed in one process: seeds, splits, shards, checks and environment errors."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from fewshot import distributed as D
from fewshot.errors import ConfigError, DataError, DistributedError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for k in TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


# ------------------------------------------------------------------ seeds
def test_rank_seed_is_the_seed_on_rank_zero_and_the_seedsequence_child_elsewhere():
    for s in (0, 1, 7, 2**40):
        assert D.rank_seed(s, 0) == s
        for r in (1, 2, 5):
            # the r-th child of SeedSequence(s), reached through spawn() instead of spawn_key
            child = np.random.SeedSequence(s).spawn(r + 1)[r]
            hi, lo = (int(v) for v in child.generate_state(2, dtype=np.uint32))
            assert D.rank_seed(s, r) == ((hi << 32) | lo) & (2**63 - 1)


def test_rank_seeds_differ_across_ranks_and_seeds():
    seeds = {(s, r): D.rank_seed(s, r) for s in range(4) for r in range(64)}
    assert len(set(seeds.values())) == len(seeds)  # no (seed, rank) pair shares a stream
    assert D.rank_seed(0, 1) != D.rank_seed(1, 0)  # unlike seed + rank
    assert all(0 <= v < 2**63 for v in seeds.values())  # valid for torch.Generator
    g = torch.Generator().manual_seed(D.rank_seed(3, 1))
    assert g.initial_seed() == D.rank_seed(3, 1)
    with pytest.raises(ConfigError):
        D.rank_seed(0, -1)


# ------------------------------------------------------------------ meta-batch
def test_split_meta_batch():
    assert D.split_meta_batch(8, 1) == 8
    assert D.split_meta_batch(8, 2) == 4
    assert D.split_meta_batch(6, 3) == 2
    with pytest.raises(DistributedError, match=r"meta-batch = 3 cannot be split over world size 2"):
        D.split_meta_batch(3, 2)
    with pytest.raises(DistributedError, match=r"set train.meta_batch to a multiple of 2 .*\(1, 3\)"):
        D.split_meta_batch(3, 2, what="train.meta_batch")
    with pytest.raises(DistributedError) as e:
        D.split_meta_batch(10, 4)
    msg = str(e.value)
    assert "10" in msg and "4" in msg and "multiple of 4" in msg and "8" in msg and "12" in msg
    with pytest.raises(DistributedError):
        D.split_meta_batch(4, 0)
    with pytest.raises(ConfigError):
        D.split_meta_batch(0, 2)


# ------------------------------------------------------------------ supervised rows
@pytest.mark.parametrize("batch,world", [(8, 1), (8, 2), (12, 3), (128, 4), (128, 8)])
def test_supervised_rows_are_parts_of_task_i_and_task_j(batch, world):
    half = batch // 2
    rows_i, rows_j = [], []
    for r in range(world):
        si, sj = D.supervised_rows(batch, r, world)
        ri, rj = list(range(batch))[si], list(range(batch))[sj]
        assert len(ri) == len(rj) == batch // (2 * world)  # equal halves on every rank
        assert all(i < half for i in ri) and all(j >= half for j in rj)  # ⊂ task_i, ⊂ task_j
        rows_i += ri
        rows_j += rj
    assert rows_i == list(range(half))  # ranks in order tile task_i exactly once
    assert rows_j == list(range(half, batch))


def test_split_supervised_batch_concatenates_back_to_the_global_halves():
    torch.manual_seed(0)
    x, y = torch.randn(12, 1, 4, 4), torch.randint(0, 5, (12,))
    parts = [D.split_supervised_batch(x, y, r, 3) for r in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x[:6])
    assert torch.equal(torch.cat([p[1] for p in parts]), y[:6])
    assert torch.equal(torch.cat([p[2] for p in parts]), x[6:])
    assert torch.equal(torch.cat([p[3] for p in parts]), y[6:])
    with pytest.raises(DataError, match="12 images but 11 labels"):
        D.split_supervised_batch(x, y[:11], 0, 3)


def test_supervised_rows_refuse_an_uneven_split():
    with pytest.raises(DistributedError, match=r"batch size 10 .*world size 3.*multiple of 2 x 3 = 6"):
        D.supervised_rows(10, 0, 3)
    with pytest.raises(DistributedError, match="batch size 6"):
        D.supervised_rows(6, 1, 2)  # 3 rows per half cannot go 1.5 per rank
    with pytest.raises(DistributedError, match="rank 2 outside 0..1"):
        D.supervised_rows(8, 2, 2)


# ------------------------------------------------------------------ evaluation shards
def test_shard_and_gather_in_one_process():
    items = list("abcdefg")
    assert D.shard(items, 0, 2) == ["a", "c", "e", "g"]
    assert D.shard(items, 1, 2) == ["b", "d", "f"]
    assert D.shard(items, 2, 3) == ["c", "f"]
    assert D.shard_indices(7, 1, 3) == [1, 4]
    # every index exactly once over the ranks
    assert sorted(i for r in range(3) for i in D.shard_indices(10, r, 3)) == list(range(10))
    with pytest.raises(DistributedError):
        D.shard(items, 2, 2)
    assert D.gather_per_episode([0.5, 0.25, 1.0], 3) == [0.5, 0.25, 1.0]
    with pytest.raises(DistributedError, match="has 2 per-episode values but its shard of 3"):
        D.gather_per_episode([0.5, 0.25], 3)


def test_single_process_collectives_are_identities():
    assert not D.is_distributed() and D.rank() == 0 and D.world_size() == 1 and D.is_main()
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    assert D.all_gather_object(3) == [3]
    m = {"loss": torch.tensor(2.0)}
    assert D.reduce_metrics(m)["loss"].item() == 2.0
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([1.0, -3.0])
    D.all_reduce_mean_grads([p])
    assert p.grad.tolist() == [1.0, -3.0]
    D.barrier()
    D.sync_buffers(torch.nn.BatchNorm1d(2))
    D.broadcast_module(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------ resume
def test_check_resume_world_size():
    D.check_resume_world_size(2, 2)
    D.check_resume_world_size(None, 1)  # older single-process checkpoints
    with pytest.raises(DistributedError) as e:
        D.check_resume_world_size(4, 2, path="runs/x/last.pt")
    msg = str(e.value)
    assert "runs/x/last.pt" in msg and "world size 4" in msg and "world size 2" in msg
    with pytest.raises(DistributedError, match="world size 1 but this run has world size 2"):
        D.check_resume_world_size(None, 2)


# ------------------------------------------------------------------ environment
def test_init_without_torchrun_is_a_single_process(clean_env):
    ctx = D.init_from_env(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.initialized, ctx.device.type) == (0, 1, False, "cpu")
    assert ctx.is_main and D.context() is ctx
    clean_env.setenv("WORLD_SIZE", "1")
    clean_env.setenv("RANK", "0")
    assert D.init_from_env(device="cpu").world_size == 1
    D.shutdown()


@pytest.mark.parametrize("env,match", [
    ({"WORLD_SIZE": "2"}, "RANK is not"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, r"RANK=2 is outside 0..1"),
    ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "1"}, "MASTER_ADDR and MASTER_PORT not set"),
    ({"RANK": "1"}, "RANK=1 but WORLD_SIZE is None"),
])
def test_init_refuses_an_incomplete_environment(clean_env, env, match):
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(DistributedError, match=match):
        D.init_from_env(device="cpu")


def test_init_refuses_bad_timeouts_and_missing_cuda(clean_env):
    with pytest.raises(ConfigError, match="timeout"):
        D.init_from_env(timeout_s=0)
    with pytest.raises(ConfigError, match="finite"):
        D.init_from_env(timeout_s=float("inf"))
    clean_env.setenv("FEWSHOT_DIST_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="FEWSHOT_DIST_TIMEOUT: .* got 'soon'"):
        D.init_from_env(device="cpu")
    clean_env.setenv("FEWSHOT_DIST_TIMEOUT", "42")
    assert D.init_from_env(device="cpu").timeout_s == 42.0
    clean_env.delenv("FEWSHOT_DIST_TIMEOUT")
    with pytest.raises(ConfigError, match="'gpu' is not a device"):
        D.init_from_env(device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(DistributedError, match="CUDA is not available"):
            D.init_from_env(device="cuda")


def test_init_times_out_when_the_other_ranks_never_come(clean_env):
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("RANK", "0")
    clean_env.setenv("MASTER_ADDR", "127.0.0.1")
    clean_env.setenv("MASTER_PORT", str(D.find_free_port()))
    t0 = time.monotonic()
    with pytest.raises(DistributedError, match=r"rank 0 of 2 could not join .*timeout 1 s"):
        D.init_from_env(device="cpu", timeout_s=1, init_timeout_s=1)
    assert time.monotonic() - t0 < 15
    assert not D.is_distributed()


@pytest.mark.parametrize("world,batch", [(2, 8), (4, 16)])
def test_distributed_sampler_halves_are_also_parts_of_the_global_halves(world, batch):
    """torch's DistributedSampler (rank r takes perm[r::W]) with a per-rank batch of B/W
    gives the strided counterpart of supervised_rows: rank r's first half of its batch k is
    rows k·B + r, r+W, ... < k·B + B/2 of the global permutation, i.e. part of task_i."""
    from torch.utils.data import DistributedSampler

    n, seed = 4 * batch, 3
    data = list(range(n))
    g = torch.Generator().manual_seed(seed)  # the permutation DistributedSampler draws (epoch 0)
    perm = torch.randperm(n, generator=g).tolist()
    per_rank = batch // world
    for k in range(n // batch):
        task_i, task_j = set(perm[k * batch:k * batch + batch // 2]), \
            set(perm[k * batch + batch // 2:(k + 1) * batch])
        got_i, got_j = set(), set()
        for r in range(world):
            idx = list(DistributedSampler(data, num_replicas=world, rank=r, shuffle=True,
                                          seed=seed))
            mine = idx[k * per_rank:(k + 1) * per_rank]
            hi, hj = set(mine[:per_rank // 2]), set(mine[per_rank // 2:])
            assert hi <= task_i and hj <= task_j
            got_i |= hi
            got_j |= hj
        assert got_i == task_i and got_j == task_j
