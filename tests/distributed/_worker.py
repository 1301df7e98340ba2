"""One rank of the multi-process tests (run as a script by tests/distributed/*.py).

    RANK=r WORLD_SIZE=W MASTER_ADDR=... MASTER_PORT=... python _worker.py SCENARIO OUT_DIR

(or under ``torchrun``). Scenarios:

* ``all``: trains ProtoNet, MAML and MLTP for a few steps on this rank's share of fixed
  global meta-batches (rank r of W takes tasks [r·M, (r+1)·M) of each global meta-batch of
  W·M tasks; MLTP takes ``split_supervised_batch`` rows of each global minibatch), evaluates
  a ProtoNet on sharded fixed episodes and exercises the object collectives; writes
  ``OUT_DIR/rank{r}.pt``.
* ``die``: rank 1 exits right after joining; rank 0 attempts a gradient all-reduce.
* ``hang``: rank 1 sleeps; rank 0 attempts a gradient all-reduce.
  Both write ``OUT_DIR/rank0.json`` with the error rank 0 got and how long it took.

Everything the parent needs to rebuild the same tasks and models in one process lives in
the functions below (the parent imports this file by path).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

STEPS = 3          # outer steps per learner
M = 2              # tasks per rank
IMAGE = 16
WAYS = 3
MLTP_BATCH = 8     # global supervised minibatch (two halves of 4)
MLTP_CLASSES = 4
EVAL_EPISODES = 7  # odd: the two ranks' shards differ in size


class TinyNet(nn.Module):
    """conv3x3(hidden, no bias) - BN - ReLU - avgpool4 - flatten, with ``out_features``.

    Every parameter has a gradient that is not zero in exact arithmetic. (A parameter
    whose true gradient is zero, such as a convolution bias in front of BatchNorm or, for
    ProtoNet, a BatchNorm bias in front of ReLU + max-pool, which translates all embeddings
    alike, carries pure rounding noise that Adam's m/√v blows up to a step of ±lr,
    differently for any two summation orders; no comparison could hold there.)
    """

    def __init__(self, in_channels: int = 1, image_size: int = IMAGE, hidden: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.out_features = hidden * (image_size // 4) ** 2

    def forward(self, x):
        return torch.flatten(F.avg_pool2d(torch.relu(self.bn(self.conv(x))), 4), 1)


class MLPNet(nn.Module):
    """flatten - linear(16) - tanh: a backbone without BatchNorm (batch statistics over a
    rank's rows would differ from those over the global batch)."""

    def __init__(self, in_channels: int = 1, image_size: int = IMAGE, hidden: int = 16):
        super().__init__()
        self.fc = nn.Linear(in_channels * image_size * image_size, hidden)
        self.out_features = hidden

    def forward(self, x):
        return torch.tanh(self.fc(torch.flatten(x, 1)))


def make_episode(g: torch.Generator, ways: int = WAYS, shots: int = 1, queries: int = 2,
                 noise: float = 0.8):
    """An N-way K-shot episode of Gaussian images around per-class means (seeded by ``g``)."""
    from fewshot.data.episodes import Episode

    means = torch.randn(ways, 1, IMAGE, IMAGE, generator=g)

    def part(k):
        y = torch.arange(ways).repeat_interleave(k)
        return means[y] + noise * torch.randn(len(y), 1, IMAGE, IMAGE, generator=g), y

    sx, sy = part(shots)
    qx, qy = part(queries)
    classes = torch.randperm(20, generator=g)[:ways]
    return Episode(sx, sy, qx, qy, classes, base_support_y=classes[sy], base_query_y=classes[qy])


def global_meta_batch(step: int, world: int):
    """The W·M tasks of outer step ``step`` (identical on every rank and in the reference)."""
    g = torch.Generator().manual_seed(1000 + step)
    return [make_episode(g) for _ in range(world * M)]


def global_minibatch(step: int, world: int):
    """(x, y) of the global supervised minibatch of step ``step``: B = MLTP_BATCH · W / 2 rows."""
    g = torch.Generator().manual_seed(2000 + step)
    b = MLTP_BATCH * world // 2
    return (torch.randn(b, 1, IMAGE, IMAGE, generator=g),
            torch.randint(0, MLTP_CLASSES, (b,), generator=g))


def eval_episodes():
    g = torch.Generator().manual_seed(3000)
    return [make_episode(g, queries=5, noise=2.0) for _ in range(EVAL_EPISODES)]


def task_pair(x_i, y_i, x_j, y_j):
    try:
        from fewshot.data.supervised import TaskPairBatch
        return TaskPairBatch(x_i, y_i, x_j, y_j)
    except Exception:  # sampler module not there yet (or another signature)
        from types import SimpleNamespace
        return SimpleNamespace(x_i=x_i, y_i=y_i, x_j=x_j, y_j=y_j)


def build(name: str, seed: int):
    """The learner ``name`` with weights drawn from ``seed`` (ranks use different seeds;
    ``broadcast_module`` must make them equal)."""
    from fewshot.learners import get_learner

    torch.manual_seed(seed)
    cls = get_learner(name)
    if name == "protonet":
        cfg = cls.Config(lr=1e-2, lr_halve_every=0)
        return cls(cfg, in_channels=1, image_size=IMAGE, backbone=TinyNet(hidden=8))
    if name == "maml":
        cfg = cls.Config(lr=1e-2, ways=WAYS, inner_steps=1, inner_lr=0.1, eval_steps=1,
                         meta_batch=M)
        return cls(cfg, in_channels=1, image_size=IMAGE, backbone=TinyNet(hidden=8))
    if name == "mltp":
        # SGD (momentum): unlike Adam it is not invariant to the gradient's scale, so a
        # sum over ranks in place of the mean would show
        cfg = cls.Config(lr=0.05, optimizer="sgd", momentum=0.9, alpha_mean=0.05,
                         alpha_std=0.01)
        return cls(cfg, in_channels=1, image_size=IMAGE, num_classes=MLTP_CLASSES,
                   backbone=TinyNet())
    if name == "standard":
        cfg = cls.Config(lr=0.1, optimizer="sgd", momentum=0.9)
        return cls(cfg, in_channels=1, image_size=IMAGE, num_classes=MLTP_CLASSES,
                   backbone=MLPNet())
    raise ValueError(name)


LEARNERS = ("protonet", "maml", "mltp", "standard")


def rank_share(name: str, step: int, rank: int, world: int):
    """What rank ``rank`` of ``world`` feeds ``train_step`` at outer step ``step``."""
    from fewshot.distributed import split_meta_batch, split_supervised_batch

    if name in ("mltp", "standard"):
        x, y = global_minibatch(step, world)
        return task_pair(*split_supervised_batch(x, y, rank, world))
    eps = global_meta_batch(step, world)
    m = split_meta_batch(len(eps), world)
    return eps[rank * m:(rank + 1) * m]


def adapter_batches(rank: int, world: int):
    """The first STEPS TaskPairBatches of rank ``rank`` from fewshot's SupervisedAdapter over a
    small seeded store (global minibatch of MLTP_BATCH rows, no augmentation), or None when
    the adapter is not available."""
    try:
        import numpy as np

        from fewshot.data.store import ImageStore
        from fewshot.data.supervised import SupervisedAdapter
    except ImportError:
        return None
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(40, IMAGE, IMAGE, 1), dtype=np.uint8)
    labels = np.arange(40) % MLTP_CLASSES
    store = ImageStore.from_arrays(images, labels, [f"c{k}" for k in range(MLTP_CLASSES)])
    adapter = SupervisedAdapter(store, batch_size=MLTP_BATCH, seed=11, rank=rank,
                                world_size=world)
    it = iter(adapter)
    return [next(it) for _ in range(STEPS)]


def state(learner):
    return {k: v.detach().clone() for k, v in learner.state_dict()["modules"].items()}


def episode_scores(learner, episodes):
    """(accuracy, query loss) of each episode, in order."""
    out = []
    learner.eval()
    for ep in episodes:
        logits = learner.predict(ep)
        out.append(((logits.argmax(-1) == ep.query_y).float().mean().item(),
                    F.cross_entropy(logits, ep.query_y).item()))
    return out


def scenario_all(out: Path) -> None:
    from fewshot import distributed as D

    ctx = D.init_from_env(timeout_s=60, device="cpu")  # gloo/CPU semantics, GPU or not
    r, w = ctx.rank, ctx.world_size
    result = {"rank": r, "world": w, "learners": {}, "init_differs": {}}
    for name in LEARNERS:
        learner = build(name, seed=100 + r)
        before = torch.cat([p.detach().reshape(-1) for p in learner.parameters()]).clone()
        D.broadcast_module(learner)
        after = torch.cat([p.detach().reshape(-1) for p in learner.parameters()])
        result["init_differs"][name] = bool((before != after).any())
        for step in range(STEPS):
            learner.train_step(rank_share(name, step, r, w))
        params = {k: v.detach().clone() for k, v in learner.named_parameters()}
        buffers = {k: v.detach().clone() for k, v in learner.named_buffers()}
        D.sync_buffers(learner)
        result["learners"][name] = {"params": params, "state": state(learner),
                                    "buffers_before_sync": buffers}
    # standard training fed by the SupervisedAdapter's per-rank shares of global minibatches
    batches = adapter_batches(r, w)
    result["adapter"] = None
    if batches is not None:
        learner = build("standard", seed=100 + r)
        D.broadcast_module(learner)
        for b in batches:
            learner.train_step(b)
        result["adapter"] = {k: v.detach().clone() for k, v in learner.named_parameters()}
    # evaluation: shard the fixed episodes, gather per-episode values in order
    learner = build("protonet", seed=7 + r)
    D.broadcast_module(learner)
    eps = eval_episodes()
    local = episode_scores(learner, D.shard(eps, r, w))
    result["eval_local_n"] = len(local)
    result["eval"] = D.gather_per_episode(local, len(eps))
    try:  # the runner's evaluation path (fewshot.evaluation) on the same shards
        from fewshot.evaluation import evaluate_episodes, gather_accuracies, shard_indices
    except ImportError:
        result["eval_runner"] = None
    else:
        acc, _ = evaluate_episodes(learner, eps, shard_indices(len(eps), r, w))
        result["eval_runner"] = gather_accuracies(acc, len(eps), r, w)
    # the mean of known gradients; a parameter without a gradient on one rank only
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, dtype=torch.float64))
    c = nn.Parameter(torch.zeros(2))
    a.grad = torch.full((3,), float(r + 1))
    b.grad = torch.full((2,), 4.0, dtype=torch.float64) if r == 0 else None
    D.all_reduce_mean_grads([a, c, b])
    result["mean_grads"] = [a.grad.clone(), b.grad.clone()]
    result["grad_none_everywhere_stays_none"] = c.grad is None
    # object collectives
    result["broadcast"] = D.broadcast_object({"from": r, "seed": D.rank_seed(5, r)})
    result["gathered"] = D.all_gather_object(r * 10)
    result["metrics"] = {k: float(v) for k, v in
                         D.reduce_metrics({"loss": torch.tensor(float(r)),
                                           "acc": torch.tensor(2.0 * r + 1)}).items()}
    D.barrier()
    torch.save(result, out / f"rank{r}.pt.tmp")
    os.replace(out / f"rank{r}.pt.tmp", out / f"rank{r}.pt")
    D.shutdown()


def scenario_failure(out: Path, mode: str) -> None:
    from fewshot import distributed as D
    from fewshot.errors import DistributedError

    ctx = D.init_from_env(timeout_s=float(os.environ.get("FEWSHOT_TEST_TIMEOUT", "2")),
                          init_timeout_s=60, device="cpu")
    if ctx.rank == 1:
        if mode == "die":
            os._exit(3)
        time.sleep(float(os.environ.get("FEWSHOT_TEST_HANG", "30")))
        os._exit(0)
    p = nn.Parameter(torch.ones(4))
    p.grad = torch.ones(4)
    t0 = time.monotonic()
    record = {"error": None, "type": None}
    try:
        D.all_reduce_mean_grads([p])
    except DistributedError as e:
        record = {"error": str(e), "type": type(e).__name__}
    except Exception as e:  # noqa: BLE001 - the test asserts the type
        record = {"error": str(e), "type": type(e).__name__}
    record["seconds"] = time.monotonic() - t0
    (out / "rank0.json").write_text(json.dumps(record))
    D.shutdown()


if __name__ == "__main__":
    torch.set_num_threads(1)
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    if scenario == "all":
        scenario_all(out_dir)
    else:
        scenario_failure(out_dir, scenario)
