"""The training loop: stores -> sampler -> learner steps -> logs, validation, checkpoints.

:class:`Trainer` builds everything from a :class:`~fewshot.config.RunConfig`:

* the stores of the train / val / test splits (the evaluation grid and the training task
  shape are checked against them before any step runs);
* the learner, ``get_learner(name)(Config(**options), in_channels, image_size,
  num_classes=train classes)``;
* the sampler the learner's ``input_kind`` asks for: ``episodes`` -> meta-batches from an
  :class:`EpisodeSampler` (or :class:`AnyWayAnyShotSampler` when ways/shots are lists);
  ``pairs`` -> :class:`DisjointPairSampler` (T_i, T_j) pairs; ``supervised`` ->
  :class:`SupervisedAdapter` epochs with learning-rate milestones.

Each step calls ``learner.train_step(batch)``. Metrics stay on the device and are summed;
every ``log_every`` steps they are synchronised to floats and appended to
``metrics.jsonl`` (and TensorBoard when installed). A non-finite loss is checked every
step on CPU (cheap) and at each log interval on GPU (no per-step host sync) and stops
training with :class:`TrainingError` naming the step and the last finite metrics.

Validation runs on fixed, seeded episodes of the val split; the weights with the best
validation accuracy are kept as ``checkpoints/best.pt`` (the test split is never used for
selection). ``checkpoints/last.pt`` is written every ``checkpoint_every`` steps, at the
end, and on SIGINT / SIGTERM, after which :class:`Interrupted` is raised (the CLI exits
with status 130 for SIGINT and 143 for SIGTERM). ``fewshot train --resume RUN_DIR``
restores learner, optimiser, sampler and RNG states and continues; on CPU the resumed
run ends with exactly the weights of an uninterrupted run.

Distributed (torchrun): every rank builds the same learner from the global seed; rank r
then draws its share (meta_batch / world) of each meta-batch from the seed
:func:`rank_seed` (seed, r); only rank 0 writes files.

The run directory holds ``config.toml`` (resolved), ``env.json``, ``run.json`` (state),
``metrics.jsonl``, ``checkpoints/``, ``results.{json,csv,md}`` and ``plots/``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from fewshot import checkpoint as ckpt
from fewshot.config import (RunConfig, atomic_write_text, config_hash, learner_options,
                            load_config, save_config)
from fewshot.errors import CheckpointError, ConfigError, FewShotError, TrainingError
from fewshot.report import GridResult, load_results, write_results

__all__ = ["Trainer", "Run", "Interrupted", "resolve_device", "rank_seed", "seed_everything",
           "build_learner", "open_run", "EXIT_SIGINT", "EXIT_SIGTERM"]

EXIT_SIGINT = 130   # 128 + SIGINT, as shells report an interrupted command
EXIT_SIGTERM = 143  # 128 + SIGTERM


class Interrupted(FewShotError):
    """Training stopped by SIGINT/SIGTERM after writing ``checkpoints/last.pt``."""

    def __init__(self, signum: int, step: int, run_dir: Path):
        self.signum, self.step, self.run_dir = signum, step, Path(run_dir)
        self.exit_code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM
        name = signal.Signals(signum).name
        super().__init__(f"{name}: stopped after step {step}; checkpoint written to "
                         f"{self.run_dir / 'checkpoints' / 'last.pt'}; continue with "
                         f"`fewshot train --resume {self.run_dir}`")


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {device!r} but no CUDA device is available; use "
                          f"--device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"train.device = {device!r} is not a device; use auto, cpu, cuda "
                          f"or cuda:N") from None


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s episodes (:func:`fewshot.distributed.rank_seed`: ``seed`` itself
    for rank 0, an independent SeedSequence child stream for the others)."""
    from fewshot.distributed import rank_seed as _rank_seed

    return _rank_seed(seed, rank)


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _dist_info():
    from fewshot import distributed as d

    return d.rank(), d.world_size()


def build_learner(cfg: RunConfig, *, in_channels: int, image_size: int, num_classes: int,
                  device: Union[str, torch.device] = "cpu"):
    """The learner of ``cfg`` built for the data's shape and moved to ``device``."""
    from fewshot.learners import get_learner

    cls = get_learner(cfg.learner.name)
    lcfg = learner_options(cfg.learner.name, cfg.learner.options, cfg.source or "")
    learner = cls(lcfg, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
    return learner.to(device)


def _version(mod: str) -> Optional[str]:
    try:
        import importlib.metadata as md

        return md.version(mod)
    except Exception:
        return None


def _git_commit() -> Optional[str]:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device, seed: int, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """What env.json records: versions, git commit, python, torch, device, seed, command."""
    import fewshot

    env = {
        "fewshot": fewshot.__version__, "git_commit": _git_commit(),
        "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "cpu_threads": torch.get_num_threads(), "seed": seed,
        "command": list(argv) if argv is not None else list(sys.argv),
        "packages": {m: _version(m) for m in ("numpy", "h5py", "higher", "torchvision", "tqdm",
                                             "matplotlib", "learn2learn")},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        env["world_size"] = _dist_info()[1]
    except Exception:
        env["world_size"] = 1
    return env


# ----------------------------------------------------------------------- the run
@dataclass
class Run:
    """A run directory and what it holds (returned by :meth:`Trainer.run` and the API)."""

    run_dir: Path
    config: RunConfig
    state: Dict[str, Any] = field(default_factory=dict)  # run.json
    results: Optional[GridResult] = None

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))

    @property
    def best_val(self) -> Optional[float]:
        return self.state.get("best_val")

    def metrics(self, split: Optional[str] = None) -> List[Dict[str, Any]]:
        """The records of metrics.jsonl (optionally only ``split`` "train" or "val")."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in rows if split is None or r.get("split") == split]

    def checkpoint_path(self, which: str = "best") -> Path:
        p = self.run_dir / "checkpoints" / f"{which}.pt"
        if which == "best" and not p.is_file():
            p = self.run_dir / "checkpoints" / "last.pt"
        return p

    def load_learner(self, which: str = "best", device="cpu"):
        """The learner with the ``best`` (validation) or ``last`` weights of this run."""
        shape = self.state.get("data_shape")
        if not shape:
            raise CheckpointError(f"{self.run_dir / 'run.json'} lacks the data shape; the run "
                                  f"never started training")
        learner = build_learner(self.config, device=device, **shape)
        path = self.checkpoint_path(which)
        obj = ckpt.load_checkpoint(path, expect_learner=self.config.learner.name,
                                   expect_hash=config_hash(self.config))
        learner.load_state_dict(obj["learner"])
        learner.to(device)
        return learner, int(obj["step"]), path.stem

    def __repr__(self) -> str:
        return f"Run({str(self.run_dir)!r}, learner={self.config.learner.name!r}, step={self.step})"


def open_run(run_dir: Union[str, os.PathLike]) -> Run:
    """A :class:`Run` for an existing run directory (config.toml and run.json)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise CheckpointError(f"{run_dir} is not a fewshot run directory (no config.toml); give "
                              f"the --out directory of `fewshot train`")
    cfg = load_config(run_dir / "config.toml")
    state = {}
    if (run_dir / "run.json").is_file():
        try:
            state = json.loads((run_dir / "run.json").read_text())
        except ValueError:
            raise CheckpointError(f"{run_dir / 'run.json'} is corrupt; the run directory was "
                                  f"damaged") from None
    results = None
    if (run_dir / "results.json").is_file():
        results = load_results(run_dir)
    return Run(run_dir, cfg, state, results)


RUN_MARKERS = ("config.toml", "env.json", "run.json", "metrics.jsonl", "checkpoints")


def prepare_run_dir(run_dir: Path, force: bool) -> None:
    """Create ``run_dir``; an existing non-empty one needs ``force`` (and must be a run dir)."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if not force:
            raise CheckpointError(f"run directory {run_dir} already exists; pass --force to "
                                  f"overwrite it, --resume {run_dir} to continue it, or --out "
                                  f"another directory")
        if not any((run_dir / m).exists() for m in RUN_MARKERS):
            raise CheckpointError(f"{run_dir} is not empty and does not look like a run directory; "
                                  f"refusing to delete it even with --force; choose another --out")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


class _Signals:
    """SIGINT/SIGTERM set a flag the loop checks after each step; a second one aborts."""

    def __init__(self):
        self.received: Optional[int] = None
        self._old = {}

    def _handler(self, signum, frame):
        if self.received is not None:  # second signal: stop now
            for s, h in self._old.items():
                signal.signal(s, h)
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


class _Tensorboard:
    def __init__(self, log_dir: Path, enabled: bool):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        except Exception:
            return
        self.writer = SummaryWriter(str(log_dir))

    def add(self, metrics: Dict[str, float], step: int, prefix: str) -> None:
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------------- samplers
def _as_list(v) -> List[int]:
    return list(v) if isinstance(v, (list, tuple)) else [int(v)]


def _task_spec(ways, shots, queries, variable: bool = False) -> Dict[str, Any]:
    """A sampler spec for :func:`fewshot.data.episodes.make_sampler`: N-way K-shot (ints),
    any-way any-shot (lists) or Meta-Dataset variable episodes."""
    if variable:
        return {"variable": True}
    return {"ways": ways, "shots": shots, "queries": queries}


def _episode_sampler(store, spec, seed, device, augment):
    from fewshot.data.episodes import make_sampler

    return make_sampler(store, spec, seed=seed, device=device, augment=augment)


class Trainer:
    """Train the learner of a config into a run directory (see the module docstring).

    Args:
        config: a :class:`RunConfig`, a TOML path or a dict.
        run_dir: where the run goes (created; an existing one needs ``force``).
        overrides: ``--set`` strings applied to ``config``.
        force: replace an existing run directory.
        resume: continue the run in ``run_dir`` from ``checkpoints/last.pt`` (its
            config.toml is used; ``overrides`` may change only keys that do not shape the
            weights, e.g. ``train.episodes``).
        argv: the command line recorded in env.json.
    """

    def __init__(self, config=None, run_dir: Union[str, os.PathLike, None] = None, *,
                 overrides: Sequence[str] = (), force: bool = False, resume: bool = False,
                 argv: Optional[Sequence[str]] = None):
        if run_dir is None:
            if resume:
                raise ConfigError("resume needs the run directory")
            stem = Path(config).stem if isinstance(config, (str, os.PathLike)) else "run"
            run_dir = Path("runs") / stem
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.argv = argv
        self.rank, self.world = _dist_info()
        if resume:
            if not (self.run_dir / "config.toml").is_file():
                raise CheckpointError(f"cannot resume: {self.run_dir} has no config.toml; give the "
                                      f"directory of a run started with `fewshot train`")
            old = load_config(self.run_dir / "config.toml")
            self.config = load_config(old, overrides)
            if config_hash(self.config) != config_hash(old):
                raise ConfigError("--resume: the overrides change keys that shape the weights; only "
                                  "train.episodes/epochs, logging, checkpoint, device and data location "
                                  "keys may change on resume")
        else:
            if config is None:
                raise ConfigError("no config given")
            self.config = load_config(config, overrides)
            if self.is_writer:
                prepare_run_dir(self.run_dir, force)
        self.hash = config_hash(self.config)

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ set-up
    def _open_stores(self):
        from fewshot.data.store import open_split

        d = self.config.data
        self.train_store = open_split(d.dataset, d.train_split, d.root, d.in_memory)
        self.val_store = open_split(d.dataset, d.val_split, d.root, d.in_memory)
        shape = self.train_store.image_shape
        self.data_shape = {"in_channels": int(shape[2]), "image_size": int(shape[0]),
                           "num_classes": int(self.train_store.num_classes)}

    def _check_feasible(self, learner_kind: str):
        from fewshot.data.store import open_split
        from fewshot.evaluate import check_grid

        t, e, d = self.config.train, self.config.eval, self.config.data
        test = open_split(d.dataset, self.config.eval_split(), d.root, in_memory=False)
        try:
            if learner_kind != "supervised":
                check_grid(test, e.ways, e.shots, e.queries,
                           what=f"eval grid on split '{self.config.eval_split()}' (eval.ways/shots/queries)")
        finally:
            test.close()
        if learner_kind == "supervised":
            return
        if not t.variable:
            check_grid(self.train_store, _as_list(t.ways), _as_list(t.shots), t.queries,
                       what="training tasks (train.ways/shots/queries)")
        if learner_kind == "pairs" and t.pair and not t.pair.get("variable", t.variable):
            check_grid(self.train_store, _as_list(t.pair.get("ways", t.ways)),
                       _as_list(t.pair.get("shots", t.shots)), t.pair.get("queries", t.queries),
                       what="second training task (train.pair)")
        check_grid(self.val_store, [self.val_ways], [self.val_shots], t.queries,
                   what=f"validation episodes on split '{d.val_split}' (train.val_ways/val_shots)")

    def _check_learner_tasks(self, kind: str) -> None:
        """A learner's own limits on its training tasks (e.g. MTL's k sub-batches), checked
        before the run directory is written and before any training step."""
        t = self.config.train
        if kind == "supervised" or t.variable or not hasattr(self.learner, "validate_task"):
            return
        for ways in _as_list(t.ways):
            for shots in _as_list(t.shots):
                self.learner.validate_task(ways, shots, t.queries)

    @property
    def val_ways(self) -> int:
        t = self.config.train
        return t.val_ways or _as_list(t.ways)[0]

    @property
    def val_shots(self) -> int:
        t = self.config.train
        return t.val_shots or _as_list(t.shots)[0]

    def _build_sampler(self, kind: str, seed: int):
        t, dev, aug = self.config.train, self.device, self.config.data.augment
        first = _task_spec(t.ways, t.shots, t.queries, t.variable)
        if kind == "episodes":
            return _episode_sampler(self.train_store, first, seed, dev, aug)
        if kind == "pairs":
            from fewshot.data.episodes import DisjointPairSampler

            second = _task_spec(t.pair.get("ways", t.ways), t.pair.get("shots", t.shots),
                                t.pair.get("queries", t.queries), t.pair.get("variable", t.variable))
            return DisjointPairSampler(self.train_store, first, second, seed=seed, device=dev,
                                       augment=aug)
        if kind == "supervised":
            from fewshot.data.supervised import SupervisedAdapter

            # the adapter takes the global batch and this rank's share of each of its halves;
            # every rank shuffles with the global seed (the same permutation on all ranks)
            return SupervisedAdapter(self.train_store, batch_size=t.batch_size, augment=aug,
                                     seed=self.config.train.seed, device=dev, rank=self.rank,
                                     world_size=self.world)
        raise ConfigError(f"learner '{self.config.learner.name}' has input_kind {kind!r}; the "
                          f"trainer knows episodes, pairs and supervised")

    def _per_rank_batch(self) -> int:
        from fewshot.distributed import split_meta_batch

        return split_meta_batch(self.config.train.meta_batch, self.world)

    def _broadcast_weights(self) -> None:
        """Every rank starts from rank 0's weights (not only from equal seeds)."""
        if self.world > 1:
            from fewshot.distributed import broadcast_module

            broadcast_module(self.learner)

    def _sync_statistics(self) -> None:
        """Average BatchNorm running statistics over ranks, so validation and checkpoints see
        one network (a collective: all ranks call it at the same steps)."""
        if self.world > 1:
            from fewshot.distributed import sync_buffers

            sync_buffers(self.learner)

    def _save_last(self, step: int, trainer_state: Dict[str, Any]) -> None:
        """checkpoints/last.pt; with several ranks, every rank's sampler and RNG states are
        gathered into it (a collective: all ranks call this at the same steps)."""
        extra = dict(trainer_state)
        self._sync_statistics()
        if self.world > 1:
            from fewshot.distributed import all_gather_object

            mine = {"sampler": self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else None,
                    "rng": ckpt.rng_state()}
            extra["ranks"] = all_gather_object(mine)
        if self.is_writer:
            ckpt.save_checkpoint(self.run_dir / "checkpoints" / "last.pt", step=step,
                                 config_hash=self.hash, learner=self.learner,
                                 sampler=self.sampler, trainer=extra)
            self._write_state()

    def _next_batch(self, kind: str):
        if kind == "episodes":
            return [self.sampler.sample() for _ in range(self.per_rank)]
        if kind == "pairs":
            return [self.sampler.sample() for _ in range(self.per_rank)]
        return next(self._sup_iter)

    # --------------------------------------------------------------- supervised
    def _supervised_total(self) -> int:
        per_epoch = len(self.sampler)
        if self.config.train.epochs <= 0:
            raise ConfigError("train.epochs must be > 0 for supervised learners "
                              f"('{self.config.learner.name}')")
        return per_epoch * self.config.train.epochs

    def _supervised_iter(self, start_step: int):
        """Batches from ``start_step`` on, with lr milestones applied at epoch starts."""
        per_epoch = len(self.sampler)
        epoch = start_step // per_epoch
        skip = start_step % per_epoch
        while True:
            self._apply_milestones(epoch)
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(epoch)
            if skip and hasattr(self.sampler, "batch") and hasattr(self.sampler, "permutation"):
                perm = self.sampler.permutation(epoch)  # resume inside an epoch: batches skip..
                for b in range(skip, per_epoch):
                    yield self.sampler.batch(epoch, b, perm).to(self.device)
            else:
                for i, batch in enumerate(self.sampler):
                    if i >= skip:
                        yield batch
            skip = 0
            epoch += 1

    def _apply_milestones(self, epoch: int) -> None:
        t = self.config.train
        if not t.lr_milestones:
            return
        k = sum(1 for m in t.lr_milestones if epoch >= m)
        for name, opt in self.learner.optimizers.items():
            bases = self.base_lrs.setdefault(name, [g["lr"] for g in opt.param_groups])
            for g, base in zip(opt.param_groups, bases):
                g["lr"] = base * (t.lr_gamma ** k)

    # --------------------------------------------------------------- main loop
    def run(self, evaluate: bool = True) -> Run:
        """Train (or continue) and, with ``evaluate``, evaluate the grid of [eval]."""
        cfg, t = self.config, self.config.train
        self.device = resolve_device(t.device)
        if t.threads:
            torch.set_num_threads(t.threads)
        self._open_stores()
        from fewshot.learners import get_learner

        kind = get_learner(cfg.learner.name).input_kind
        self._check_feasible(kind)
        if t.amp != "off":
            cls = get_learner(cfg.learner.name)
            if not getattr(cls, "supports_autocast", False):
                raise ConfigError(f"train.amp = {t.amp!r}: learner '{cfg.learner.name}' does not "
                                  f"declare autocast safe (second-order or fine-tuned gradients); "
                                  f"set train.amp = \"off\"")
            if t.amp == "fp16" and self.device.type != "cuda":
                raise ConfigError("train.amp = 'fp16' needs a CUDA device; use 'bf16' on CPU")

        seed_everything(t.seed)  # the same initial weights on every rank
        self.learner = build_learner(cfg, device=self.device, **self.data_shape)
        self._check_learner_tasks(kind)
        self.learner.train()
        self._broadcast_weights()
        seed_everything(rank_seed(t.seed, self.rank))
        self.per_rank = self._per_rank_batch() if kind != "supervised" else 1
        self.sampler = self._build_sampler(kind, rank_seed(t.seed, self.rank))
        self.base_lrs: Dict[str, List[float]] = {}
        from fewshot.data.episodes import fixed_episodes

        self.val_eps = None
        if kind != "supervised":
            self.val_eps = fixed_episodes(self.val_store, self.val_ways, self.val_shots, t.queries,
                                          t.val_episodes, t.seed + 7919, device=self.device)
        total = self._supervised_total() if kind == "supervised" else t.episodes
        step, best_val, best_step = 0, None, None
        prior_seconds, t_start = 0.0, time.perf_counter()
        history_last: Dict[str, float] = {}
        metrics_path = self.run_dir / "metrics.jsonl"
        if self.resume:
            obj = ckpt.load_checkpoint(self.run_dir / "checkpoints" / "last.pt",
                                       expect_hash=self.hash, expect_learner=cfg.learner.name)
            self.learner.load_state_dict(obj["learner"])
            self.learner.to(self.device)
            tr = obj.get("trainer", {})
            from fewshot.distributed import check_resume_world_size

            check_resume_world_size(tr.get("world"), self.world, str(self.run_dir / "checkpoints" / "last.pt"))
            mine = tr["ranks"][self.rank] if self.world > 1 else {"sampler": obj.get("sampler"),
                                                                   "rng": obj.get("rng")}
            if mine.get("sampler") is not None and hasattr(self.sampler, "load_state_dict"):
                self.sampler.load_state_dict(mine["sampler"])
            step = int(obj["step"])
            best_val, best_step = tr.get("best_val"), tr.get("best_step")
            self.base_lrs = tr.get("base_lrs", {})
            history_last = tr.get("last_metrics", {})
            prior_seconds = float(tr.get("train_seconds", 0.0))
            if mine.get("rng") is not None:
                ckpt.set_rng_state(mine["rng"])
            self._broadcast_weights()
            if self.is_writer:
                self._truncate_metrics(metrics_path, step)
        elif self.is_writer:
            save_config(cfg, self.run_dir / "config.toml")
            env = environment(self.device, t.seed, self.argv)
            atomic_write_text(self.run_dir / "env.json", json.dumps(env, indent=1) + "\n")
        if kind == "supervised":
            self._sup_iter = self._supervised_iter(step)
        self.state = {"learner": cfg.learner.name, "input_kind": kind, "config_hash": self.hash,
                      "data_shape": self.data_shape, "step": step, "total_steps": total,
                      "best_val": best_val, "best_step": best_step, "complete": False,
                      "world": self.world}
        self._write_state()

        tb = _Tensorboard(self.run_dir / "tensorboard", self.is_writer)
        on_cpu = self.device.type == "cpu"
        per_step_items = self.per_rank * self.world if kind != "supervised" else t.batch_size
        bar = None
        if self.is_writer and not t.quiet and step < total:
            from tqdm.auto import tqdm

            bar = tqdm(total=total * per_step_items, initial=step * per_step_items,
                       unit="ep" if kind != "supervised" else "img", unit_scale=False,
                       desc=f"train {cfg.learner.name}", dynamic_ncols=True, smoothing=0.1)
        amp_ctx = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16 if t.amp == "bf16"
                                          else torch.float16)) if t.amp != "off" else contextlib.nullcontext
        sums: Dict[str, torch.Tensor] = {}
        count, window_t0 = 0, time.perf_counter()
        val_every_steps = self._val_interval(kind)
        interrupted = None
        try:
            with _Signals() as sig, (open(metrics_path, "a") if self.is_writer else contextlib.nullcontext()) as mfile:
                while step < total:
                    batch = self._next_batch(kind)
                    try:
                        with amp_ctx():
                            metrics = self.learner.train_step(batch)
                    except TrainingError as e:
                        raise TrainingError(f"{e} (run step {step + 1}); last finite metrics: "
                                            f"{_fmt_metrics(history_last)}; lower the learning rate "
                                            f"or check the data") from None
                    step += 1
                    if "loss" not in metrics:
                        raise TrainingError(f"learner '{cfg.learner.name}' returned no 'loss' metric")
                    if on_cpu and not bool(torch.isfinite(metrics["loss"].detach()).all()):
                        raise TrainingError(f"non-finite loss ({float(metrics['loss'])}) at step {step}; "
                                            f"last finite metrics: {_fmt_metrics(history_last)}; "
                                            f"lower the learning rate or check the data")
                    for k, v in metrics.items():
                        v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
                        sums[k] = sums[k] + v if k in sums else v.clone()
                    count += 1
                    if bar is not None:
                        bar.update(per_step_items)
                    if step % t.log_every == 0 or step == total:
                        if self.world > 1:  # mean over ranks (a collective at fixed steps)
                            from fewshot.distributed import reduce_metrics

                            sums = reduce_metrics(sums)
                        row = {k: float(v) / count for k, v in sums.items()}
                        if not all(math.isfinite(v) for v in row.values()):
                            raise TrainingError(f"non-finite metrics {_fmt_metrics(row)} in steps "
                                                f"{step - count + 1}..{step}; last finite metrics: "
                                                f"{_fmt_metrics(history_last)}; lower the learning rate")
                        elapsed = time.perf_counter() - window_t0
                        rate = count / max(elapsed, 1e-9)
                        row = {"split": "train", "step": step, **row, "lr": self._lr(),
                               "steps_per_s": rate, "items_per_s": rate * per_step_items}
                        history_last = {k: v for k, v in row.items() if k not in ("split",)}
                        if self.is_writer:
                            mfile.write(json.dumps(row) + "\n")
                            mfile.flush()
                            tb.add(row, step, "train")
                        if bar is not None:
                            bar.set_postfix({k: f"{row[k]:.3f}" for k in ("loss", "acc") if k in row})
                        sums, count, window_t0 = {}, 0, time.perf_counter()
                    if val_every_steps and step % val_every_steps == 0 or step == total:
                        va = self._validate(kind)
                        if va is not None:
                            vrow = {"split": "val", "step": step, "acc": va[0], "ci95": va[1]}
                            if self.is_writer:
                                mfile.write(json.dumps(vrow) + "\n")
                                mfile.flush()
                                tb.add({"acc": va[0]}, step, "val")
                            if best_val is None or va[0] > best_val:
                                best_val, best_step = va[0], step
                                if self.is_writer:
                                    ckpt.save_checkpoint(self.run_dir / "checkpoints" / "best.pt",
                                                         step=step, config_hash=self.hash,
                                                         learner=self.learner, include_rng=False)
                    self.state.update(step=step, best_val=best_val, best_step=best_step)
                    secs = prior_seconds + time.perf_counter() - t_start
                    self.state["train_seconds"] = round(secs, 3)
                    trainer_state = {"best_val": best_val, "best_step": best_step,
                                     "base_lrs": self.base_lrs, "last_metrics": history_last,
                                     "world": self.world, "train_seconds": secs}
                    due = (t.checkpoint_every and step % t.checkpoint_every == 0) or step == total
                    if sig.received is not None or due:
                        self._save_last(step, trainer_state)
                    if sig.received is not None:
                        interrupted = sig.received
                        break
        finally:
            if bar is not None:
                bar.close()
            tb.close()
        if interrupted is not None:
            raise Interrupted(interrupted, step, self.run_dir)
        self.state.update(complete=True)
        self._write_state()
        run = Run(self.run_dir, cfg, dict(self.state))
        if self.is_writer:
            try:
                from fewshot.plots import plot_training

                plot_training(run.metrics(), self.run_dir / "plots" / "training.png",
                              title=f"{cfg.learner.name} on {cfg.data.dataset}")
            except FewShotError:
                raise
            except Exception as e:  # plotting must not lose a finished run
                print(f"warning: training plot not written: {e}", file=sys.stderr)
        if evaluate:
            from fewshot.api import evaluate_run

            run.results = evaluate_run(run, learner=self.learner, quiet=t.quiet, device=self.device,
                                       rank=self.rank, world=self.world, write=self.is_writer)
        return run

    # ------------------------------------------------------------------ helpers
    def _val_interval(self, kind: str) -> int:
        t = self.config.train
        if not t.val_every:
            return 0
        if kind == "supervised":
            return t.val_every * len(self.sampler)
        return t.val_every

    def _validate(self, kind: str):
        """(mean accuracy, 95% CI) on the fixed validation episodes (or val images)."""
        from fewshot.evaluate import evaluate_episodes, gather_accuracies, shard_indices
        from fewshot.report import mean_ci

        n = self.config.train.val_episodes
        self._sync_statistics()
        if kind == "supervised":
            return self._validate_supervised()
        local, _ = evaluate_episodes(self.learner, self.val_eps, shard_indices(n, self.rank, self.world),
                                     device=self.device)
        acc = gather_accuracies(local, n, self.rank, self.world)
        m, _, ci = mean_ci(acc)
        return m, ci

    def _validate_supervised(self):
        from fewshot.report import mean_ci

        if self.val_store.class_names != self.train_store.class_names:
            return None  # a supervised classifier can only be validated on its own classes
        correct = supervised_correct(self.learner, self.val_store, self.config.train.batch_size,
                                     self.device, self.config.data.augment,
                                     stats=(self.train_store.mean, self.train_store.std))
        m, _, ci = mean_ci(correct)
        return m, ci

    def _lr(self) -> Optional[float]:
        opts = getattr(self.learner, "optimizers", {})
        for opt in opts.values():
            return float(opt.param_groups[0]["lr"])
        return None

    def _write_state(self) -> None:
        if self.is_writer:
            atomic_write_text(self.run_dir / "run.json", json.dumps(self.state, indent=1) + "\n")

    @staticmethod
    def _truncate_metrics(path: Path, step: int) -> None:
        """Drop metric rows logged after ``step`` (they are recomputed on resume)."""
        if not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except ValueError:
                continue  # a line torn by a kill
        atomic_write_text(path, "".join(x + "\n" for x in keep))


def supervised_correct(learner, store, batch_size: int, device, augment=None,
                       stats=None) -> List[float]:
    """Per-image 0/1 correctness of ``learner.predict_batch`` on every image of ``store``,
    normalised as the training preset ``augment`` does at test time, with the training set's
    ``stats`` = (mean, std) where the preset uses dataset statistics."""
    from fewshot.data.supervised import SupervisedAdapter

    was = learner.training
    learner.eval()
    out: List[float] = []
    try:
        with torch.no_grad():
            for x, y in SupervisedAdapter.eval_batches(store, batch_size, device=device,
                                                       augment=augment, stats=stats):
                logits = learner.predict_batch(x.to(device))
                out.extend((logits.argmax(-1) == y.to(device)).float().cpu().tolist())
    finally:
        learner.train(was)
    return out


def supervised_topk_correct(learner, store, batch_size: int, device, augment=None, stats=None,
                            ks: Sequence[int] = (1, 5)) -> Dict[int, List[float]]:
    """Per-image top-k correctness, k in ``ks``: 1.0 where the label is among the k largest
    logits of ``learner.predict_batch`` (k capped at the number of classes, so top-5 of a
    3-class problem is 1 everywhere), for every image of ``store``, normalised as in
    :func:`supervised_correct`. Per image, each k's value is :func:`~fewshot.learners.standard.
    topk_correct` of that image's row; top-k correctness is monotone in k."""
    from fewshot.data.supervised import SupervisedAdapter
    from fewshot.learners.standard import topk_correct

    ks = tuple(int(k) for k in ks)
    was = learner.training
    learner.eval()
    out: Dict[int, List[float]] = {k: [] for k in ks}
    try:
        with torch.no_grad():
            for x, y in SupervisedAdapter.eval_batches(store, batch_size, device=device,
                                                       augment=augment, stats=stats):
                logits = learner.predict_batch(x.to(device)).float().cpu()
                y = y.cpu()
                for i in range(logits.shape[0]):
                    hits = topk_correct(logits[i:i + 1], y[i:i + 1], ks)
                    for k in ks:
                        out[k].append(float(hits[k]))
    finally:
        learner.train(was)
    return out


def _fmt_metrics(m: Dict[str, Any]) -> str:
    if not m:
        return "none yet"
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())
