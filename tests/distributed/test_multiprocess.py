"""Two real processes on the gloo backend against one process doing the same work.

One ``torchrun --standalone --nproc_per_node=2`` launch (module-scoped fixture) trains
ProtoNet, MAML and MLTP with a per-rank meta-batch of M tasks (MLTP: each rank's task pair
is its rows of task_i and task_j of a global minibatch) and standard supervised training
on the ranks' rows of each global minibatch, and evaluates on sharded episodes. The tests
compare with one process that trains on the global meta-batch of 2M tasks (MLTP: the mean
of the two ranks' objectives J, then one optimiser step; standard: the global minibatch
itself, exact without BatchNorm) and evaluates every episode in order.
Failure tests launch the two ranks by hand (RANK/WORLD_SIZE/MASTER_*), since torchrun would
tear the survivor down itself.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fewshot.distributed import find_free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORKER = HERE / "_worker.py"

spec = importlib.util.spec_from_file_location("fewshot_dist_worker", WORKER)
W = importlib.util.module_from_spec(spec)
spec.loader.exec_module(W)


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    # these tests mean gloo on the CPU: a visible GPU would make "auto" pick cuda:LOCAL_RANK
    # (and fail with one GPU and two ranks); the workers also pass device="cpu" themselves
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _wait(procs, timeout):
    """Wait for our processes; kill (by their own process group id) any still running."""
    deadline = time.monotonic() + timeout
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
            out = (out or "") + "\n<killed after timeout>"
        outs.append(out or "")
    return outs


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_all")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max_restarts=0", str(WORKER), "all", str(out)]
    p = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    (log,) = _wait([p], timeout=240)
    if p.returncode != 0:
        pytest.fail(f"torchrun exited {p.returncode}:\n{log[-4000:]}")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def _reference_params(name):
    """One process, world 1: the same tasks, the global meta-batch in one train_step."""
    torch.set_num_threads(1)
    learner = W.build(name, seed=100)  # rank 0's seed: the weights broadcast to all ranks
    for step in range(W.STEPS):
        if name == "mltp":
            # meta-batch of the two ranks' task pairs: mean of their objectives J (eq. 4),
            # then one optimiser step, as the distributed step does
            opt = learner.optimizers["meta"]
            opt.zero_grad(set_to_none=True)
            for r in range(2):
                b = W.rank_share(name, step, r, 2)
                (learner.objective(b.x_i, b.y_i, b.x_j, b.y_j)["J"] / 2).backward()
            opt.step()
            learner._clamp_alpha()
        elif name == "standard":  # the global minibatch: task_i = first half, task_j = second
            x, y = W.global_minibatch(step, 2)
            h = x.shape[0] // 2
            learner.train_step(W.task_pair(x[:h], y[:h], x[h:], y[h:]))
        else:
            learner.train_step(W.global_meta_batch(step, 2))
    return {k: v.detach() for k, v in learner.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("name", W.LEARNERS)
def test_two_ranks_match_one_process_with_double_meta_batch(two_ranks, name):
    ref = _reference_params(name)
    initial = {k: v.detach() for k, v in W.build(name, seed=100).named_parameters()}
    for res in two_ranks:
        got = res["learners"][name]["params"]
        assert set(got) == set(ref)
        for k in ref:
            assert torch.allclose(got[k], ref[k], rtol=1e-4, atol=1e-6), (name, res["rank"], k)
    # the steps moved the weights (the comparison is not between two initialisations)
    moved = max(float((ref[k] - initial[k]).abs().max()) for k in ref)
    assert moved > 1e-3
    # rank 1 started from other weights and was overwritten by rank 0's
    assert two_ranks[1]["init_differs"][name] and not two_ranks[0]["init_differs"][name]


@pytest.mark.slow
def test_supervised_adapter_shares_train_like_the_global_minibatch(two_ranks):
    """SupervisedAdapter(rank, world_size): each rank's halves lie in the global task_i /
    task_j, and two ranks of standard training equal one process on the global batches."""
    glob = W.adapter_batches(0, 1)
    if glob is None or two_ranks[0]["adapter"] is None:
        pytest.skip("fewshot.data.supervised.SupervisedAdapter not available")
    shares = [W.adapter_batches(r, 2) for r in (0, 1)]
    for k, g in enumerate(glob):
        for part in ("x_i", "x_j"):
            rows = {tuple(x.flatten().tolist()) for x in getattr(g, part)}
            mine = [{tuple(x.flatten().tolist()) for x in getattr(s[k], part)} for s in shares]
            assert all(m <= rows for m in mine) and set().union(*mine) == rows, (k, part)
            assert all(len(m) == len(rows) // 2 for m in mine)
    torch.set_num_threads(1)
    learner = W.build("standard", seed=100)
    for b in glob:
        learner.train_step(b)
    ref = {k: v.detach() for k, v in learner.named_parameters()}
    for res in two_ranks:
        for k in ref:
            assert torch.allclose(res["adapter"][k], ref[k], rtol=1e-5, atol=1e-6), k


@pytest.mark.slow
def test_ranks_hold_identical_state_after_buffer_sync(two_ranks):
    for name in W.LEARNERS:
        s0, s1 = (res["learners"][name]["state"] for res in two_ranks)
        assert set(s0) == set(s1)
        for k in s0:
            assert torch.equal(s0[k], s1[k]), (name, k)
        # each rank's BatchNorm running statistics saw its own tasks; after the sync they
        # are the mean of the two (MAML's default BN policy is transductive: none kept)
        b0, b1 = (res["learners"][name]["buffers_before_sync"] for res in two_ranks)
        running = [k for k in b0 if "running_" in k]
        if name in ("maml", "standard"):  # transductive BN / no BN: no running statistics
            continue
        assert running, name
        for k in running:
            assert not torch.equal(b0[k], b1[k]), (name, k)
            assert torch.allclose(s0[k], (b0[k] + b1[k]) / 2, rtol=1e-6, atol=1e-7), (name, k)


@pytest.mark.slow
def test_sharded_evaluation_equals_single_process_table(two_ranks):
    torch.set_num_threads(1)
    learner = W.build("protonet", seed=7)
    ref = W.episode_scores(learner, W.eval_episodes())
    assert [res["eval_local_n"] for res in two_ranks] == [4, 3]  # 7 episodes: 0,2,4,6 | 1,3,5
    for res in two_ranks:
        got = res["eval"]
        assert len(got) == W.EVAL_EPISODES
        assert [a for a, _ in got] == [a for a, _ in ref]  # accuracies exactly
        for (_, lg), (_, lr) in zip(got, ref):  # per-episode losses pin the order down
            assert abs(lg - lr) <= 1e-6 * max(1.0, abs(lr))
    runner = [res["eval_runner"] for res in two_ranks]
    if runner[0] is not None:  # fewshot.evaluation.s sharded path gives the same table
        from fewshot.evaluation import evaluate_episodes

        single, _ = evaluate_episodes(learner, W.eval_episodes(), range(W.EVAL_EPISODES))
        assert runner[0] == runner[1] == single
    accs = [a for a, _ in ref]
    assert len(set(round(l, 6) for _, l in ref)) == W.EVAL_EPISODES  # order is observable
    assert 0.0 < sum(accs) / len(accs) < 1.0


@pytest.mark.slow
def test_object_collectives(two_ranks):
    from fewshot.distributed import rank_seed

    for res in two_ranks:
        assert res["world"] == 2
        assert res["broadcast"] == {"from": 0, "seed": rank_seed(5, 0)}
        assert res["gathered"] == [0, 10]
        assert res["metrics"] == {"loss": 0.5, "acc": 2.0}
        a, b = res["mean_grads"]  # rank r's gradients: r + 1; b: 4 on rank 0, none on rank 1
        assert torch.equal(a, torch.full((3,), 1.5))
        assert b.dtype == torch.float64 and torch.equal(b, torch.full((2,), 2.0, dtype=torch.float64))
        assert res["grad_none_everywhere_stays_none"]  # the optimiser skips it, as in 1 process


def _launch_failure(mode, tmp_path, timeout_s):
    port = find_free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), mode, str(tmp_path)], cwd=REPO,
                              env=_env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=2,
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                       FEWSHOT_TEST_TIMEOUT=timeout_s, FEWSHOT_TEST_HANG=60),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
             for r in (0, 1)]
    t0 = time.monotonic()
    logs = _wait(procs[:1], timeout=90)  # rank 0 must come back on its own
    elapsed = time.monotonic() - t0
    if procs[1].poll() is None:  # the hanging rank: ours, stopped by its own group id
        os.killpg(procs[1].pid, signal.SIGKILL)
    _wait(procs[1:], timeout=10)
    path = tmp_path / "rank0.json"
    assert path.exists(), f"rank 0 wrote no result (exit {procs[0].returncode}):\n{logs[0][-3000:]}"
    return json.loads(path.read_text()), elapsed


@pytest.mark.slow
def test_hung_rank_makes_the_other_raise_after_the_timeout(tmp_path):
    rec, elapsed = _launch_failure("hang", tmp_path, timeout_s=2)
    assert rec["type"] == "DistributedError", rec
    assert "gradient all-reduce" in rec["error"] and "rank 0 of 2" in rec["error"]
    assert "timed out" in rec["error"] and "timeout 2 s" in rec["error"]
    assert 1.5 <= rec["seconds"] <= 20.0  # waited for the timeout, not forever


@pytest.mark.slow
def test_dead_rank_makes_the_other_raise(tmp_path):
    rec, elapsed = _launch_failure("die", tmp_path, timeout_s=5)
    assert rec["type"] == "DistributedError", rec
    assert "rank 0 of 2" in rec["error"] and "another rank" in rec["error"]
    assert rec["seconds"] <= 20.0
