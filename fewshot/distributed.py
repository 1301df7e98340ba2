"""torch.distributed for training and evaluation (torchrun launches, gloo on CPU, nccl on GPU).

Launch::

    torchrun --nproc_per_node=N -m fewshot train CONFIG.toml
    torchrun --nnodes=2 --nproc_per_node=N --rdzv_backend=c10d \\
             --rdzv_endpoint=HOST:PORT -m fewshot train CONFIG.toml     # on every node

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
(multi-node through its rendezvous); :func:`init_from_env` reads them, joins the process
group with a finite timeout and picks the device. Without those variables everything here
is the single-process identity: rank 0 of a world of 1, collectives are no-ops.

Episodic meta-training: rank r takes M = T/W of a meta-batch of T tasks (from
``rank_seed(seed, r)``); :func:`all_reduce_mean_grads` (in ``Learner.outer_step``) turns each
rank's gradient g_r into 1/W Σ_r g_r = ∇θ 1/T Σ_t L_t(θ), the global meta-batch's gradient.
Supervised training: every rank draws the same permutation and takes its share of both halves
(task_i, task_j) of each global minibatch. Evaluation: rank r takes episodes r, r+W, ...;
accuracies are gathered back in episode order. Why each of these equals the single-process
computation: ``docs/distributed.md``.

Only rank 0 (:func:`is_main`) writes logs, checkpoints and reports. A checkpoint records
the world size; :func:`check_resume_world_size` refuses a resume with another one.

Failures: every collective here runs under the process group's timeout
(``init_from_env(timeout_s=...)``); a rank that dies or stalls makes the others raise
:class:`~fewshot.errors.DistributedError` instead of hanging (gloo raises in Python; with
nccl the watchdog aborts the process after the timeout, ``TORCH_NCCL_ASYNC_ERROR_HANDLING``).
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from fewshot.errors import ConfigError, DataError, DistributedError

__all__ = [
    "DEFAULT_TIMEOUT_S", "DistContext", "init_from_env", "shutdown", "context",
    "is_distributed", "rank", "world_size", "local_rank", "is_main", "barrier",
    "rank_seed", "split_meta_batch", "supervised_rows", "split_supervised_batch",
    "shard", "shard_indices", "gather_per_episode", "all_gather_object", "broadcast_object",
    "broadcast_module", "sync_buffers", "all_reduce_mean_grads", "reduce_metrics",
    "check_resume_world_size", "find_free_port",
]

#: default collective timeout: long enough for a slow checkpoint write or evaluation on
#: rank 0 while the others wait in a barrier, short enough that a dead rank is noticed.
DEFAULT_TIMEOUT_S = 600.0

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, its device and backend.

    ``initialized`` is False for a single process (no process group is created).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CTX = DistContext()
_FAILED = False  # a collective of this process failed (shutdown then does not wait)


def _env_int(name: str) -> Optional[int]:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise DistributedError(f"environment variable {name}={v!r} is not an integer; "
                               f"launch with torchrun, which sets it") from None


def _pick_device(device: Any, local_rank: int) -> torch.device:
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a device; use auto, cpu, cuda or "
                          f"cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError("device 'cuda' requested but CUDA is not available; "
                                   "use --device cpu (backend gloo)")
        n = torch.cuda.device_count()
        if dev.index is None:
            if local_rank >= n:
                raise DistributedError(
                    f"LOCAL_RANK={local_rank} but only {n} CUDA device(s) on this node; "
                    f"use --nproc_per_node={n} or fewer")
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return dev


def init_from_env(backend: Optional[str] = None, timeout_s: Optional[float] = None,
                  device: Any = "auto", init_timeout_s: Optional[float] = None) -> DistContext:
    """Join the process group torchrun describes in the environment; return the context.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` (set by
    torchrun, also across nodes through its rendezvous). ``device="auto"`` picks
    ``cuda:LOCAL_RANK`` when CUDA is present (and makes it the current device), else the CPU.
    ``backend=None`` is ``"nccl"`` on CUDA and ``"gloo"`` on the CPU. ``timeout_s``
    (default: ``$FEWSHOT_DIST_TIMEOUT`` seconds, else :data:`DEFAULT_TIMEOUT_S`) bounds every
    collective: a rank that died or hangs makes the others raise :class:`DistributedError`
    after at most that long. ``init_timeout_s`` bounds the
    rendezvous (all ranks joining; default ``max(timeout_s, 300)``, since ranks of a job
    start at different times), after which a rank that never came up is reported the same way.

    Without ``WORLD_SIZE`` (a plain ``python -m fewshot ...``) or with ``WORLD_SIZE=1`` no
    process group is created and the context is rank 0 of 1. Calling it again after a
    successful initialisation returns the current context.
    """
    global _CTX
    timeout_s = _timeout_seconds(timeout_s)
    if dist.is_available() and dist.is_initialized():
        return _CTX
    world, rk, lrk = _env_int("WORLD_SIZE"), _env_int("RANK"), _env_int("LOCAL_RANK")
    if world is None or world == 1:
        if rk not in (None, 0):
            raise DistributedError(f"RANK={rk} but WORLD_SIZE is {world}; launch with torchrun "
                                   f"--nproc_per_node=N, which sets both")
        _CTX = DistContext(device=_pick_device(device, lrk or 0), timeout_s=timeout_s)
        return _CTX
    _check_launch_env(world, rk)
    lrk = rk if lrk is None else lrk
    dev = _pick_device(device, lrk)
    backend = _choose_backend(backend, dev)
    _join(backend, dev, rk, world, timeout_s, init_timeout_s)
    _CTX = DistContext(rank=rk, world_size=world, local_rank=lrk, device=dev, backend=backend,
                       timeout_s=timeout_s, initialized=True)
    return _CTX


def _timeout_seconds(timeout_s) -> float:
    """The collectives' timeout: the argument, else $FEWSHOT_DIST_TIMEOUT, else the default;
    a positive finite number of seconds or a ConfigError naming where it came from."""
    where = "init_from_env(timeout_s=...)"
    if timeout_s is None:
        env = os.environ.get("FEWSHOT_DIST_TIMEOUT")
        timeout_s, where = (env, "FEWSHOT_DIST_TIMEOUT") if env else (DEFAULT_TIMEOUT_S, where)
    raw = timeout_s
    try:
        timeout_s = float(timeout_s)
    except (TypeError, ValueError):
        timeout_s = float("nan")
    if not timeout_s > 0 or timeout_s == float("inf"):
        raise ConfigError(f"{where}: the distributed timeout must be a positive, finite number "
                          f"of seconds, got {raw!r}")
    return timeout_s


def _check_launch_env(world: int, rk: Optional[int]) -> None:
    """What torchrun sets for a world of several ranks is present and consistent."""
    if world < 1:
        raise DistributedError(f"WORLD_SIZE={world} must be >= 1")
    if rk is None:
        raise DistributedError(f"WORLD_SIZE={world} is set but RANK is not; launch with "
                               f"torchrun, which sets both")
    if not 0 <= rk < world:
        raise DistributedError(f"RANK={rk} is outside 0..{world - 1} (WORLD_SIZE={world})")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set; launch "
                               f"with torchrun (or set them to rank 0's address and a free port)")
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed; install a build "
                               "with distributed support or run one process")


def _choose_backend(backend: Optional[str], dev: torch.device) -> str:
    """nccl on CUDA, gloo on the CPU, unless given; refuse a backend the device cannot use."""
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise DistributedError("backend 'nccl' needs CUDA devices; use backend 'gloo' on the CPU")
    if backend == "gloo" and not dist.is_gloo_available():
        raise DistributedError("backend 'gloo' is not available in this PyTorch build")
    return backend


def _join(backend: str, dev: torch.device, rk: int, world: int, timeout_s: float,
          init_timeout_s: Optional[float]) -> None:
    """init_process_group with the rendezvous timeout, then the collectives' timeout."""
    kwargs: Dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = dev
    init_timeout = max(timeout_s, 300.0) if init_timeout_s is None else float(init_timeout_s)
    set_timeout = getattr(dist, "set_timeout", None) or getattr(
        dist.distributed_c10d, "_set_pg_timeout", None)
    if set_timeout is None:  # old torch: one timeout for the rendezvous and the collectives
        init_timeout = timeout_s
    t0 = time.monotonic()
    try:
        dist.init_process_group(backend=backend, init_method="env://", rank=rk,
                                world_size=world,
                                timeout=datetime.timedelta(seconds=init_timeout), **kwargs)
        if set_timeout is not None and init_timeout != timeout_s:
            set_timeout(datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as e:  # DistStoreError/DistNetworkError are RuntimeErrors
        raise DistributedError(
            f"rank {rk} of {world} could not join the process group at "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within "
            f"{time.monotonic() - t0:.1f} s (timeout {init_timeout:g} s): {_first_line(e)}; "
            f"check that every rank was started and the address is reachable") from e


def shutdown(wait_s: Optional[float] = None) -> None:
    """Leave the process group (no-op when none). Safe to call twice.

    Ranks first meet on the rendezvous store (not a collective, so it cannot pair with a
    collective another rank is stuck in) for at most ``wait_s`` seconds, then destroy the
    process group; rank 0, which hosts the store, then waits (at most ``wait_s``) until every
    rank has destroyed its own, so that no rank's exit races the store going away (a rare
    ``terminate called without an active exception`` abort at exit otherwise).
    ``wait_s=None`` is 30 s, or 0 once a collective of this process has failed (the other
    ranks may be gone).
    """
    global _CTX, _FAILED
    if wait_s is None:
        wait_s = 0.0 if _FAILED else 30.0
    if dist.is_available() and dist.is_initialized():
        store = None
        with contextlib.suppress(Exception):
            store = dist.distributed_c10d._get_default_store()
        world = dist.get_world_size()
        me = dist.get_rank()
        if store is not None and wait_s > 0 and world > 1:
            _store_meet(store, "fewshot/shutdown/arrived", world, wait_s)
        with contextlib.suppress(RuntimeError, ValueError):
            dist.destroy_process_group()
        if store is not None and wait_s > 0 and world > 1:
            if me == 0:
                _store_meet(store, "fewshot/shutdown/destroyed", world, wait_s)
            else:
                with contextlib.suppress(Exception):
                    store.add("fewshot/shutdown/destroyed", 1)
        del store
        gc.collect()
    _CTX = DistContext(device=_CTX.device, timeout_s=_CTX.timeout_s)
    _FAILED = False


def _store_meet(store, key: str, world: int, wait_s: float) -> bool:
    """Count this rank in ``key`` and wait until ``world`` ranks have (False on timeout)."""
    try:
        n = store.add(key, 1)
        deadline = time.monotonic() + wait_s
        while n < world:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
            n = store.add(key, 0)
        return True
    except Exception:  # noqa: BLE001 - the store is gone: the others have left already
        return False


def context() -> DistContext:
    """The context :func:`init_from_env` set (rank 0 of 1 before or without it)."""
    return _CTX


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    return _CTX.local_rank if is_distributed() else 0


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one rank that writes files."""
    return rank() == 0


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0].rstrip(". ") if s else type(e).__name__


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn a failed or timed-out collective into one readable :class:`DistributedError`."""
    global _FAILED
    t0 = time.monotonic()
    try:
        yield
    except (RuntimeError, ValueError) as e:
        _FAILED = True
        waited = time.monotonic() - t0
        timeout = _CTX.timeout_s
        cause = ("timed out" if waited >= 0.9 * timeout else "failed")
        raise DistributedError(
            f"{what} on rank {rank()} of {world_size()} {cause} after {waited:.1f} s "
            f"(timeout {timeout:g} s): another rank probably died or is stuck ({_first_line(e)}); "
            f"see the other ranks' output; raise the timeout if a rank is just slow") from e


def barrier() -> None:
    """Wait for every rank (no-op in one process); raises :class:`DistributedError` on timeout."""
    if not is_distributed():
        return
    with _collective("barrier"):
        if _CTX.backend == "nccl":
            dist.barrier(device_ids=[_CTX.device.index])
        else:
            dist.barrier()


# ------------------------------------------------------------------ seeds and splits
def rank_seed(global_seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s episode sampler, derived from the run's ``global_seed``.

    ``rank_seed(s, 0) == s``: rank 0 (and a single process) draws the episodes a
    one-process run with seed s draws. For r > 0 the seed is the first 63 bits of
    ``numpy.random.SeedSequence(entropy=s, spawn_key=(r,))``, i.e. the r-th child stream
    of s (SeedSequence hashes entropy and spawn key, so seeds of different (s, r) are
    statistically independent, unlike ``s + r`` where rank 1 of seed 0 is rank 0 of seed 1).
    Deterministic across machines and Python versions.
    """
    s = int(global_seed)
    r = int(rank)
    if r < 0:
        raise ConfigError(f"rank must be >= 0, got {r}")
    if s < 0:
        raise ConfigError(f"seed must be >= 0, got {s}")
    if r == 0:
        return s
    state = np.random.SeedSequence(entropy=s, spawn_key=(r,)).generate_state(2, dtype=np.uint32)
    return int(((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1))


def split_meta_batch(meta_batch: int, world: int, what: str = "meta-batch") -> int:
    """Tasks per rank M = T / W of a global meta-batch T; raises unless W divides T.

    The mean over ranks of per-rank means over M tasks is the mean over the T tasks only
    when every rank has the same M (module docstring), so an uneven split is refused.
    ``what`` names the setting in the message (e.g. ``"train.meta_batch"``).
    """
    meta_batch, world = int(meta_batch), int(world)
    if world < 1:
        raise DistributedError(f"world size must be >= 1, got {world}")
    if meta_batch < 1:
        raise ConfigError(f"{what} must be >= 1, got {meta_batch}")
    if meta_batch % world:
        lo = max(world, meta_batch - meta_batch % world)
        divisors = [d for d in range(1, meta_batch + 1) if meta_batch % d == 0][:8]
        raise DistributedError(
            f"{what} = {meta_batch} cannot be split over world size {world}: each rank must "
            f"take the same number of tasks; set {what} to a multiple of {world} (e.g. {lo} or "
            f"{lo + world}) or launch a number of processes that divides {meta_batch} "
            f"({', '.join(map(str, divisors))})")
    return meta_batch // world


def supervised_rows(batch_size: int, rank: int, world: int) -> Tuple[slice, slice]:
    """Rank ``rank``'s rows of a global supervised minibatch: (rows of task_i, rows of task_j).

    MLTP (Deng & Zhang, Algorithm 1) splits a minibatch of B rows into task_i = rows
    [0, B/2) and task_j = rows [B/2, B). With b = B/(2W), rank r takes rows
    ``[r·b, (r+1)·b)`` of task_i and ``[B/2 + r·b, B/2 + (r+1)·b)`` of task_j: its halves are
    sub-batches of the paper's task_i and task_j, and over all ranks each row is used once.
    Raises :class:`DistributedError` unless 2W divides B.

    Equivalent strided layout: torch's ``DistributedSampler`` (every rank the same
    permutation, rank r its positions r, r+W, ...) with a per-rank batch of B/W whose first
    and second halves are taken as task_i and task_j also keeps each rank's halves inside
    the global task_i and task_j (tests/distributed check both).
    """
    b_all, rank, world = int(batch_size), int(rank), int(world)
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"rank {rank} outside 0..{world - 1}")
    if b_all < 2 or b_all % (2 * world):
        raise DistributedError(
            f"batch size {b_all} cannot be split over world size {world}: each rank takes "
            f"an equal part of both halves (task_i, task_j), so the batch must be a multiple "
            f"of 2 x {world} = {2 * world}")
    b = b_all // (2 * world)
    half = b_all // 2
    return slice(rank * b, (rank + 1) * b), slice(half + rank * b, half + (rank + 1) * b)


def split_supervised_batch(x: torch.Tensor, y: torch.Tensor, rank: int, world: int
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_i, y_i, x_j, y_j) of rank ``rank`` from a global minibatch (x, y) of B rows.

    Rows as in :func:`supervised_rows`: ``x_i`` is this rank's part of task_i (the first
    half of the batch), ``x_j`` its part of task_j (the second half).
    """
    if x.shape[0] != y.shape[0]:
        raise DataError(f"supervised batch has {x.shape[0]} images but {y.shape[0]} labels; "
                        f"they must match")
    si, sj = supervised_rows(x.shape[0], rank, world)
    return x[si], y[si], x[sj], y[sj]


# ------------------------------------------------------------------ evaluation
def shard_indices(n: int, rank: int, world: int) -> List[int]:
    """Indices of the items rank ``rank`` of ``world`` handles: rank, rank+world, ..."""
    n, rank, world = int(n), int(rank), int(world)
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"rank {rank} outside 0..{world - 1}")
    return list(range(rank, n, world))


def shard(items: Sequence[Any], rank: int, world: int) -> List[Any]:
    """Rank ``rank``'s share of ``items``: item i goes to rank ``i % world`` (in order)."""
    return [items[i] for i in shard_indices(len(items), rank, world)]


def all_gather_object(obj: Any) -> List[Any]:
    """``[obj of rank 0, ..., obj of rank W-1]`` on every rank (``[obj]`` in one process).

    Objects travel pickled between the ranks of one job (trusted peers); keep them small
    (lists of floats, sampler states).
    """
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * world_size()
    with _collective("all_gather_object"):
        dist.all_gather_object(out, obj)
    return out


def gather_per_episode(values: Sequence[Any], n_total: int) -> List[Any]:
    """Per-episode values of all ranks, back in the original episode order, on every rank.

    ``values`` are this rank's values for the items ``shard(range(n_total), rank, world)``
    (episodes rank, rank+W, ...), in that order. The result is the list a single process
    evaluating all ``n_total`` episodes in order would build, so means and intervals
    computed from it are identical to a single-process evaluation.
    """
    n_total = int(n_total)
    values = list(values)
    r, w = rank(), world_size()
    expect = len(shard_indices(n_total, r, w))
    if len(values) != expect:
        raise DistributedError(f"rank {r} of {w} has {len(values)} per-episode values but its "
                               f"shard of {n_total} episodes has {expect}")
    if w == 1:
        return values
    parts = all_gather_object(values)
    out: List[Any] = [None] * n_total
    for src, part in enumerate(parts):
        idx = shard_indices(n_total, src, w)
        if len(part) != len(idx):
            raise DistributedError(f"rank {src} sent {len(part)} per-episode values for its "
                                   f"{len(idx)} episodes")
        for i, v in zip(idx, part):
            out[i] = v
    return out


def broadcast_object(obj: Any = None, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in one process)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    with _collective("broadcast_object"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``module`` (in place).

    Call once after building (or loading) the learner so every rank starts from the same
    θ, as DDP does at construction; later steps keep them equal (same averaged gradient,
    same optimiser). Learnable step sizes are parameters of the learner, so they are
    included when ``module`` is the learner.
    """
    if not is_distributed():
        return
    tensors = [t for t in list(module.parameters()) + list(module.buffers())]
    if not tensors:
        return
    with _collective("broadcast_module"), torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=src)


def sync_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank's buffers (BatchNorm running statistics) equal: floating buffers
    become their mean over ranks, the others (``num_batches_tracked``) rank ``src``'s.

    Parameters stay equal across ranks by construction (same averaged gradient), but
    buffers are updated by each rank's own forward passes on its own episodes or rows, so
    they drift apart. Call this before every checkpoint and every evaluation: the
    checkpoint then holds the ranks' mean running statistics (the average of W estimates of
    the same population statistics) and a sharded evaluation uses the same network on
    every rank, the network the checkpoint holds. One collective per dtype.
    """
    if not is_distributed():
        return
    bufs = list(module.buffers())
    floats = [b for b in bufs if b.is_floating_point()]
    others = [b for b in bufs if not b.is_floating_point()]
    w = dist.get_world_size()
    with _collective("buffer sync"), torch.no_grad():
        groups: Dict[Tuple[torch.dtype, torch.device], List[torch.Tensor]] = {}
        for b in floats:
            groups.setdefault((b.dtype, b.device), []).append(b)
        for key in sorted(groups, key=lambda k: (str(k[0]), str(k[1]))):
            bs = groups[key]
            flat = torch.cat([b.reshape(-1) for b in bs])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= w
            offset = 0
            for b in bs:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
        for b in others:
            dist.broadcast(b, src=src)


# ------------------------------------------------------------------ gradients, metrics
def all_reduce_mean_grads(params: Iterable[torch.Tensor]) -> None:
    """Replace each parameter's ``.grad`` by its mean over ranks (no-op in one process).

    ``g ← 1/W Σ_r g_r``: with equal per-rank meta-batches this is the gradient of the
    global meta-batch mean (module docstring). Gradients are flattened into one buffer per
    dtype so a step costs one collective. A parameter without a gradient on this rank
    contributes zeros, so every rank issues the same call; a parameter without a gradient
    on *every* rank keeps ``grad = None``, so the optimiser skips it exactly as it would in
    one process (Adam or momentum would otherwise move it on a zero gradient). Raises
    :class:`DistributedError` when a rank died or the collective timed out.
    """
    if not is_distributed():
        return
    params = [p for p in params]
    if not params:
        return
    groups: Dict[Tuple[torch.dtype, torch.device], List[torch.Tensor]] = {}
    for p in params:
        g = p.grad if p.grad is not None else p
        groups.setdefault((g.dtype, g.device), []).append(p)
    w = dist.get_world_size()
    for key in sorted(groups, key=lambda k: (str(k[0]), str(k[1]))):
        ps = groups[key]
        dtype, device = key
        # one flag per parameter (1 = this rank has a gradient) rides in the same buffer
        flags = torch.tensor([0.0 if p.grad is None else 1.0 for p in ps], dtype=dtype,
                             device=device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in ps] + [flags])
        with _collective("gradient all-reduce"):
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        n_flags = len(ps)
        # read the flags (a host sync) only when this rank lacks a gradient: otherwise every
        # parameter has one here, so none can be missing everywhere
        local_missing = any(p.grad is None for p in ps)
        had = flat[flat.numel() - n_flags:].tolist() if local_missing else [1.0] * n_flags
        flat = flat[:flat.numel() - n_flags] / w
        offset = 0
        for p, h in zip(ps, had):
            n = p.numel()
            if h == 0:  # no rank produced a gradient
                p.grad = None
            elif p.grad is None:
                p.grad = flat[offset:offset + n].view_as(p).clone()
            else:
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


def reduce_metrics(metrics: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Mean of each 0-dim metric over ranks (one collective; identity in one process).

    Call it only where the trainer logs (every rank at the same steps): it synchronises.
    """
    if not is_distributed() or not metrics:
        return dict(metrics)
    keys = sorted(metrics)
    dev = _CTX.device if _CTX.backend == "nccl" else torch.device("cpu")
    flat = torch.stack([torch.as_tensor(metrics[k]).detach().float().reshape(()).to(dev)
                        for k in keys])
    with _collective("metric all-reduce"):
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    return {k: flat[i] for i, k in enumerate(keys)}


# ------------------------------------------------------------------ resume
def check_resume_world_size(saved: Optional[int], current: int, path: str = "checkpoint") -> None:
    """Refuse to resume a run written with ``saved`` ranks on ``current`` ranks.

    The effective meta-batch (W·M), the per-rank episode streams (:func:`rank_seed`) and
    the sampler states saved per rank all depend on W, so a resume must use the same
    world size. ``saved=None`` (a checkpoint that does not record it) counts as 1: every
    run writes it, and runs before distributed support were single-process.
    """
    s = 1 if saved is None else int(saved)
    c = int(current)
    if s != c:
        raise DistributedError(
            f"{path} was written by a run with world size {s} but this run has world size {c}; "
            f"resume with the same number of processes (torchrun --nproc_per_node x --nnodes = "
            f"{s}) or start a new run")


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for a local MASTER_PORT in tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
