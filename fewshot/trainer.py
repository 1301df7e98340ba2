"""The training loop: stores -> sampler -> learner steps -> logs, validation, checkpoints.

:class:`Trainer` builds everything from a :class:`~fewshot.config.RunConfig`: the stores of
the train / val splits (the evaluation grid and the training task shape are checked against
them before any step runs), the learner (:func:`fewshot.run.build_learner`) and the sampler
its ``input_kind`` asks for: ``episodes`` -> meta-batches from an :class:`EpisodeSampler`
(or :class:`AnyWayAnyShotSampler` when ways/shots are lists); ``pairs`` ->
:class:`DisjointPairSampler` (T_i, T_j) pairs; ``supervised`` -> :class:`SupervisedAdapter`
epochs, with learning-rate milestones at epoch starts.

:meth:`Trainer.run` is set-up, start or restore, then per step :meth:`~Trainer._train_step`
(:meth:`~Trainer._next_batch` is the one place a batch is drawn and reaches the device),
:meth:`~Trainer._log_window` every ``log_every`` steps (the one place the metrics summed on
the device reach the host), validation and checkpoints, then the finish (plot, evaluation).
A non-finite loss is checked every step on CPU (cheap); on a GPU the first non-finite step is
tracked on the device (:class:`_FirstNonFinite`, no per-step host sync) and read at each log
window and before every checkpoint. Either way training stops with :class:`TrainingError`
naming the step at which the loss first stopped being finite and the last finite metrics.

On CUDA, episodic batches come through a :class:`~fewshot.data.prefetch.BatchFeed`: batch k+1
is gathered into pinned memory and copied with ``non_blocking=True`` on a side stream while
step k runs; checkpoints record the sampler state of the first batch not yet trained on, so
resume stays exact.

Multi-source training (``data.dataset`` a list): every source's train and val stores are
brought to the first source's image shape and episodes come from a
:class:`~fewshot.data.multisource.MultiSourceSampler` (each episode from one source), validated
on fixed episodes split evenly over the sources' val splits; see
:mod:`fewshot.data.multisource`.

Validation runs on fixed, seeded episodes of the val split; the weights with the best
validation accuracy are kept as ``checkpoints/best.pt`` (the test split is never used for
selection). ``checkpoints/last.pt`` is written every ``checkpoint_every`` steps, at the
end, and on SIGINT / SIGTERM, after which :class:`Interrupted` is raised (the CLI exits
with status 130 for SIGINT and 143 for SIGTERM). ``fewshot train --resume RUN_DIR``
restores learner, optimiser, sampler and RNG states and continues; on CPU the resumed
run ends with exactly the weights of an uninterrupted run.

Distributed (torchrun): every rank builds the same learner from the global seed; rank r
then draws its share (meta_batch / world) of each meta-batch from the seed
:func:`~fewshot.run.rank_seed` (seed, r); only rank 0 writes files.

Progress: on a terminal a live bar (tqdm); when stderr is not a terminal (a pipe, a log
file, CI) no bar, as tqdm's own convention, but one plain line per log window.

Imports: run, evaluation, config, checkpoint, data, learners, distributed, errors, atomic.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from fewshot import checkpoint as ckpt
from fewshot import distributed
from fewshot.atomic import atomic_write_text
from fewshot.config import config_hash, load_config, save_config
from fewshot.data.conform import conform_store
from fewshot.data.episodes import DisjointPairSampler, make_sampler
from fewshot.data.multisource import (MultiSourceSampler, chained_episodes, check_source_classes,
                                      check_sources_prepared, source_probabilities)
from fewshot.data.prefetch import BatchFeed
from fewshot.data.store import open_split
from fewshot.data.supervised import SupervisedAdapter
from fewshot.errors import CheckpointError, ConfigError, FewShotError, TrainingError
from fewshot.evaluation import (check_grid, evaluate_run, validation_accuracy,
                                validation_accuracy_supervised)
from fewshot.learners import get_learner
from fewshot.learners.common import scale_lrs_at_milestones
from fewshot.run import (Run, build_learner, dist_info, environment, prepare_run_dir, rank_seed,
                         resolve_device, resolve_memory_format, seed_everything)

__all__ = ["Trainer", "Interrupted", "EXIT_SIGINT", "EXIT_SIGTERM"]

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


class _Progress:
    """Training progress on stderr: a live tqdm bar on a terminal; otherwise (a pipe, a log
    file, CI: what tqdm's ``disable=None`` turns off) no bar but one plain line per log
    window, so a log stays readable and greppable."""

    def __init__(self, enabled: bool, total: int, initial: int, unit: str, desc: str):
        self.stream, self.desc, self.unit, self.bar = sys.stderr, desc, unit, None
        self.enabled = enabled
        if enabled and _isatty(self.stream):
            from tqdm.auto import tqdm  # only on a terminal

            self.bar = tqdm(total=total, initial=initial, unit=unit, unit_scale=False, desc=desc,
                            dynamic_ncols=True, smoothing=0.1, file=self.stream)

    def update(self, items: int) -> None:
        if self.bar is not None:
            self.bar.update(items)

    def window(self, row: Dict[str, Any], total_steps: int) -> None:
        """The metrics of one log window: the bar's postfix, or one plain line."""
        shown = {k: row[k] for k in ("loss", "acc") if k in row}
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})
        elif self.enabled:
            metrics = " ".join(f"{k}={v:.4f}" for k, v in shown.items())
            print(f"{self.desc}: step {row['step']}/{total_steps} {metrics} "
                  f"{row['steps_per_s']:.2f} steps/s {row['items_per_s']:.1f} {self.unit}/s",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _Window:
    """Metrics of the steps since the last log, summed on the device (no host sync per step)."""

    def __init__(self):
        self.sums: Dict[str, torch.Tensor] = {}
        self.count, self.t0 = 0, time.perf_counter()

    def add(self, metrics: Dict[str, Any]) -> None:
        for k, v in metrics.items():
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1

    def means(self, world: int) -> Dict[str, float]:
        """Per-step means, over ranks too (a collective at fixed steps): the host sync."""
        sums = distributed.reduce_metrics(self.sums) if world > 1 else self.sums
        return {k: float(v) / self.count for k, v in sums.items()}


class _FirstNonFinite:
    """The first step whose ``loss`` metric was NaN or infinite, kept on the device.

    ``observe`` queues three tiny device ops and never waits; ``step()`` is the host sync,
    called once per log window and before each checkpoint.
    """

    NONE = 2 ** 62

    def __init__(self):
        self.first: Optional[torch.Tensor] = None

    def observe(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        mark = torch.where(bad, step, self.NONE)
        self.first = mark if self.first is None else torch.minimum(self.first, mark)

    def step(self) -> Optional[int]:
        if self.first is None:
            return None
        first = int(self.first)
        return None if first == self.NONE else first


def _loss_checked_at_once(device: torch.device) -> bool:
    """Whether every step's loss is checked as soon as it is computed: free on the CPU; on an
    accelerator it would make the host wait for the device each step (:class:`_FirstNonFinite`)."""
    return device.type == "cpu"


@dataclass
class _Progression:
    """What the loop carries from step to step (and last.pt saves of the trainer)."""

    step: int = 0
    total: int = 0
    best_val: Optional[float] = None
    best_step: Optional[int] = None
    prior_seconds: float = 0.0
    last_metrics: Dict[str, Any] = field(default_factory=dict)
    t_start: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return self.prior_seconds + time.perf_counter() - self.t_start


# ---------------------------------------------------------------------- samplers
def _as_list(v) -> List[int]:
    return list(v) if isinstance(v, (list, tuple)) else [int(v)]


def _task_spec(ways, shots, queries, variable: bool = False) -> Dict[str, Any]:
    """A sampler spec for :func:`fewshot.data.episodes.make_sampler`: N-way K-shot (ints),
    any-way any-shot (lists) or Meta-Dataset variable episodes."""
    if variable:
        return {"variable": True}
    return {"ways": ways, "shots": shots, "queries": queries}


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
        self.rank, self.world = dist_info()
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
    def _set_up(self) -> None:
        """Device, stores, feasibility checks, the learner (seeded), sampler, val episodes."""
        cfg, t = self.config, self.config.train
        self.device = resolve_device(t.device)
        if t.threads:
            torch.set_num_threads(t.threads)
        self._open_stores()
        self.kind = get_learner(cfg.learner.name).input_kind
        self._check_feasible(self.kind)
        if t.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("train.amp = 'fp16' needs a CUDA device; use 'bf16' on CPU")
        seed_everything(t.seed)  # the same initial weights on every rank
        self.learner = build_learner(cfg, device=self.device, **self.data_shape)
        self.channels_last = self._set_memory_format(t.memory_format)
        self._check_learner_tasks(self.kind)
        self.learner.train()
        self._broadcast_weights()
        seed_everything(rank_seed(t.seed, self.rank))
        self.per_rank = self._per_rank_batch() if self.kind != "supervised" else 1
        self.sampler = self._build_sampler(self.kind, rank_seed(t.seed, self.rank))
        self.base_lrs: Dict[str, List[float]] = {}
        self.val_eps = None
        if self.kind != "supervised":
            self.val_eps = chained_episodes(self.val_stores, self.val_ways, self.val_shots,
                                            t.queries, t.val_episodes, t.seed + 7919,
                                            device=self.device)

    def _set_memory_format(self, option: str) -> bool:
        """Put the learner's 4-D weights in the layout ``train.memory_format`` resolves to on
        this device (:func:`~fewshot.run.resolve_memory_format`); True for channels_last, which
        the samplers then deliver too (parameters keep their identity, so the optimisers and
        a restored checkpoint see the same tensors).

        A resumed run under ``auto`` keeps the layout it was started with (run.json; runs
        from before this option were contiguous): convolution sums are ordered by layout, so
        only then does it end with exactly the weights of an uninterrupted run.
        """
        if self.resume and option == "auto":
            started = json.loads((self.run_dir / "run.json").read_text()) \
                if (self.run_dir / "run.json").is_file() else {}
            option = started.get("memory_format", "contiguous")
        fmt = resolve_memory_format(option, self.device, self.learner)
        if fmt is torch.channels_last:
            self.learner.to(memory_format=fmt)
        self.memory_format = "channels_last" if fmt is torch.channels_last else "contiguous"
        return fmt is torch.channels_last

    def _open_stores(self):
        """The train and val stores of every source (one, or several for multi-source
        training), each conformed to the first source's training image shape."""
        d = self.config.data
        if len(d.sources) > 1:
            check_sources_prepared(d.sources, d.root)
        self.train_stores = [open_split(n, d.train_split, d.root, d.in_memory) for n in d.sources]
        shape = self.train_stores[0].image_shape
        self.train_stores = [conform_store(s, shape, d.in_memory) for s in self.train_stores]
        self.val_stores = [conform_store(open_split(n, d.val_split, d.root, d.in_memory), shape,
                                         d.in_memory) for n in d.sources]
        self.train_store, self.val_store = self.train_stores[0], self.val_stores[0]
        self.image_shape = [int(v) for v in shape]
        self.data_shape = {"in_channels": int(shape[2]), "image_size": int(shape[0]),
                           "num_classes": int(sum(s.num_classes for s in self.train_stores))}

    def _check_feasible(self, learner_kind: str):
        t, e, d = self.config.train, self.config.eval, self.config.data
        test = open_split(self.config.eval_dataset(), self.config.eval_split(), d.root,
                          in_memory=False)
        try:
            if learner_kind != "supervised":
                check_grid(test, e.ways, e.shots, e.queries,
                           what=f"eval grid on split '{self.config.eval_split()}' (eval.ways/shots/queries)")
        finally:
            test.close()
        if learner_kind == "supervised":
            return
        multi = len(self.train_stores) > 1
        if not t.variable:
            if multi:
                check_source_classes(self.train_stores, max(_as_list(t.ways)), "train.ways")
            for store in self.train_stores:
                check_grid(store, _as_list(t.ways), _as_list(t.shots), t.queries,
                           what="training tasks (train.ways/shots/queries)")
        if learner_kind == "pairs" and t.pair and not t.pair.get("variable", t.variable):
            check_grid(self.train_store, _as_list(t.pair.get("ways", t.ways)),
                       _as_list(t.pair.get("shots", t.shots)), t.pair.get("queries", t.queries),
                       what="second training task (train.pair)")
        if multi:
            check_source_classes(self.val_stores, self.val_ways, "validation (train.val_ways)")
        for store in self.val_stores:
            check_grid(store, [self.val_ways], [self.val_shots], t.queries,
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
        cl = self.channels_last
        first = _task_spec(t.ways, t.shots, t.queries, t.variable)
        if kind == "episodes" and len(self.train_stores) > 1:
            p = source_probabilities(self.train_stores, self.config.data.source_sampling)
            return MultiSourceSampler(self.train_stores, first, p, seed=seed, device=dev,
                                      augment=aug)
        if kind == "episodes":
            return make_sampler(self.train_store, first, seed=seed, device=dev, augment=aug,
                                channels_last=cl)
        if kind == "pairs":
            second = _task_spec(t.pair.get("ways", t.ways), t.pair.get("shots", t.shots),
                                t.pair.get("queries", t.queries), t.pair.get("variable", t.variable))
            return DisjointPairSampler(self.train_store, first, second, seed=seed, device=dev,
                                       augment=aug, channels_last=cl)
        if kind == "supervised":
            # the adapter takes the global batch and this rank's share of each of its halves;
            # every rank shuffles with the global seed (the same permutation on all ranks)
            return SupervisedAdapter(self.train_store, batch_size=t.batch_size, augment=aug,
                                     seed=self.config.train.seed, device=dev, rank=self.rank,
                                     world_size=self.world, channels_last=cl)
        raise ConfigError(f"learner '{self.config.learner.name}' has input_kind {kind!r}; the "
                          f"trainer knows episodes, pairs and supervised")

    def _per_rank_batch(self) -> int:
        return distributed.split_meta_batch(self.config.train.meta_batch, self.world)

    def _total_steps(self) -> int:
        """train.episodes outer steps; for a supervised learner, train.epochs epochs of batches."""
        t = self.config.train
        if self.kind != "supervised":
            return t.episodes
        if t.epochs <= 0:
            raise ConfigError("train.epochs must be > 0 for supervised learners "
                              f"('{self.config.learner.name}')")
        return len(self.sampler) * t.epochs

    # ------------------------------------------------------------- start / restore
    def _start_or_restore(self) -> _Progression:
        """A fresh run writes config.toml and env.json; a resumed one restores last.pt."""
        cfg = self.config
        prog = _Progression(total=self._total_steps())
        if self.resume:
            self._restore(prog)
        elif self.is_writer:
            save_config(cfg, self.run_dir / "config.toml")
            env = environment(self.device, cfg.train.seed, self.argv)
            atomic_write_text(self.run_dir / "env.json", json.dumps(env, indent=1) + "\n")
        if self.kind == "supervised":
            self._batches = self.sampler.batches_from(prog.step, on_epoch=self._start_epoch)
        self.state = {"learner": cfg.learner.name, "input_kind": self.kind, "config_hash": self.hash,
                      "data_shape": self.data_shape, "image_shape": self.image_shape,
                      "step": prog.step, "total_steps": prog.total,
                      "best_val": prog.best_val, "best_step": prog.best_step, "complete": False,
                      "world": self.world, "memory_format": self.memory_format}
        self._write_state()
        return prog

    def _restore(self, prog: _Progression) -> None:
        """Learner, sampler, RNG and trainer states of checkpoints/last.pt (every rank its own)."""
        path = self.run_dir / "checkpoints" / "last.pt"
        obj = ckpt.load_checkpoint(path, expect_hash=self.hash, expect_learner=self.config.learner.name)
        self.learner.load_state_dict(obj["learner"])
        self.learner.to(self.device)
        tr = obj.get("trainer", {})
        distributed.check_resume_world_size(tr.get("world"), self.world, str(path))
        mine = tr["ranks"][self.rank] if self.world > 1 else {"sampler": obj.get("sampler"),
                                                               "rng": obj.get("rng")}
        if mine.get("sampler") is not None and hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(mine["sampler"])
        prog.step = int(obj["step"])
        prog.best_val, prog.best_step = tr.get("best_val"), tr.get("best_step")
        self.base_lrs = tr.get("base_lrs", {})
        prog.last_metrics = tr.get("last_metrics", {})
        prog.prior_seconds = float(tr.get("train_seconds", 0.0))
        if mine.get("rng") is not None:
            ckpt.set_rng_state(mine["rng"])
        self._broadcast_weights()
        if self.is_writer:
            self._truncate_metrics(self.run_dir / "metrics.jsonl", prog.step)

    def _start_epoch(self, epoch: int) -> None:
        """Supervised epoch start: every learning rate scaled by lr_gamma per passed milestone."""
        t = self.config.train
        scale_lrs_at_milestones(self.learner.optimizers, self.base_lrs, epoch, t.lr_milestones,
                                t.lr_gamma)

    # --------------------------------------------------------------- main loop
    def run(self, evaluate: bool = True) -> Run:
        """Train (or continue) and, with ``evaluate``, evaluate the grid of [eval]."""
        self._set_up()
        prog = self._start_or_restore()
        interrupted = self._loop(prog)
        if interrupted is not None:
            raise Interrupted(interrupted, prog.step, self.run_dir)
        return self._finish(evaluate)

    def _loop(self, prog: _Progression) -> Optional[int]:
        """Steps until the total or a signal; returns the signal number that stopped it."""
        t, name = self.config.train, self.config.learner.name
        self._items = self.per_rank * self.world if self.kind != "supervised" else t.batch_size
        unit = "ep" if self.kind != "supervised" else "img"
        self._bar = _Progress(self.is_writer and not t.quiet and prog.step < prog.total,
                              prog.total * self._items, prog.step * self._items, unit, f"train {name}")
        self._tb = _Tensorboard(self.run_dir / "tensorboard", self.is_writer)
        val_every = self._val_interval()
        window = _Window()
        metrics_path = self.run_dir / "metrics.jsonl"
        self._nonfinite = _FirstNonFinite()
        self._feed = self._make_feed()
        try:
            with _Signals() as sig, (open(metrics_path, "a") if self.is_writer
                                     else contextlib.nullcontext()) as self._mfile:
                while prog.step < prog.total:
                    window.add(self._train_step(prog))
                    self._bar.update(self._items)
                    if prog.step % t.log_every == 0 or prog.step == prog.total:
                        self._log_window(prog, window)
                        window = _Window()
                    if val_every and prog.step % val_every == 0 or prog.step == prog.total:
                        self._validate_and_keep_best(prog)
                    if self._checkpoint(prog, sig.received):
                        return sig.received
        finally:
            self._feed.close()
            self._bar.close()
            self._tb.close()
        return None

    def _amp(self):
        t = self.config.train
        if t.amp == "off":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if t.amp == "bf16" else torch.float16)

    def _make_feed(self) -> BatchFeed:
        """Episodic batches one ahead on CUDA (a sampler's batches depend only on its index);
        the supervised adapter's epochs apply learning-rate milestones, so they are not drawn
        ahead."""
        if self.kind == "supervised":
            return BatchFeed(lambda: next(self._batches), prefetch=False,
                             state=getattr(self.sampler, "state_dict", None))
        return BatchFeed(lambda: [self.sampler.sample() for _ in range(self.per_rank)],
                         state=self.sampler.state_dict, device=self.device)

    def _next_batch(self):
        """The one place a training batch is drawn and reaches the device."""
        return next(self._feed)

    def _sampler_state(self):
        """The sampler's state for the first batch not yet trained on (one may be drawn ahead)."""
        return self._feed.state_dict()

    def _train_step(self, prog: _Progression) -> Dict[str, Any]:
        """One outer step of the learner; returns its metrics (still on the device)."""
        batch = self._next_batch()
        try:
            with self._amp():
                metrics = self.learner.train_step(batch)
        except TrainingError as e:
            raise TrainingError(f"{e} (run step {prog.step + 1}); last finite metrics: "
                                f"{_fmt_metrics(prog.last_metrics)}; lower the learning rate "
                                f"or check the data") from None
        prog.step += 1
        if "loss" not in metrics:
            raise TrainingError(f"learner '{self.config.learner.name}' returned no 'loss' metric")
        if _loss_checked_at_once(self.device):
            if not bool(torch.isfinite(metrics["loss"].detach()).all()):
                self._raise_nonfinite(prog, prog.step, float(metrics["loss"]))
        else:
            self._nonfinite.observe(metrics["loss"], prog.step)
        return metrics

    def _raise_nonfinite(self, prog: _Progression, step: int, value: Optional[float] = None):
        shown = f" ({value})" if value is not None else ""
        raise TrainingError(f"non-finite loss{shown} at step {step}; last finite metrics: "
                            f"{_fmt_metrics(prog.last_metrics)}; lower the learning rate or "
                            f"check the data")

    def _check_nonfinite(self, prog: _Progression) -> None:
        """The device-side record of a non-finite loss (one host sync), before it is logged
        or checkpointed."""
        first = self._nonfinite.step()
        if first is not None:
            self._raise_nonfinite(prog, first)

    def _log_window(self, prog: _Progression, window: _Window) -> None:
        """Means of the window's steps to metrics.jsonl, TensorBoard and the progress output."""
        self._check_nonfinite(prog)
        row = window.means(self.world)
        if not all(math.isfinite(v) for v in row.values()):
            raise TrainingError(f"non-finite metrics {_fmt_metrics(row)} in steps "
                                f"{prog.step - window.count + 1}..{prog.step}; last finite metrics: "
                                f"{_fmt_metrics(prog.last_metrics)}; lower the learning rate")
        rate = window.count / max(time.perf_counter() - window.t0, 1e-9)
        row = {"split": "train", "step": prog.step, **row, "lr": self._lr(),
               "steps_per_s": rate, "items_per_s": rate * self._items}
        prog.last_metrics = {k: v for k, v in row.items() if k not in ("split",)}
        self._write_row(row, {k: v for k, v in row.items()}, "train")
        self._bar.window(row, prog.total)

    def _write_row(self, row: Dict[str, Any], scalars: Dict[str, Any], split: str) -> None:
        if self.is_writer:
            self._mfile.write(json.dumps(row) + "\n")
            self._mfile.flush()
            self._tb.add(scalars, row["step"], split)

    def _validate_and_keep_best(self, prog: _Progression) -> None:
        """Validation accuracy to the log; better than the best so far -> checkpoints/best.pt."""
        va = self._validate()
        if va is None:
            return
        self._write_row({"split": "val", "step": prog.step, "acc": va[0], "ci95": va[1]},
                        {"acc": va[0]}, "val")
        if prog.best_val is None or va[0] > prog.best_val:
            prog.best_val, prog.best_step = va[0], prog.step
            if self.is_writer:
                ckpt.save_checkpoint(self.run_dir / "checkpoints" / "best.pt", step=prog.step,
                                     config_hash=self.hash, learner=self.learner, include_rng=False)

    def _checkpoint(self, prog: _Progression, signum: Optional[int]) -> bool:
        """run.json state; checkpoints/last.pt when due or on a signal. True: stop now."""
        t = self.config.train
        self.state.update(step=prog.step, best_val=prog.best_val, best_step=prog.best_step)
        secs = prog.seconds()
        self.state["train_seconds"] = round(secs, 3)
        due = (t.checkpoint_every and prog.step % t.checkpoint_every == 0) or prog.step == prog.total
        if signum is not None or due:
            self._check_nonfinite(prog)  # never checkpoint weights a non-finite step has reached
            self._save_last(prog.step, {"best_val": prog.best_val, "best_step": prog.best_step,
                                        "base_lrs": self.base_lrs, "last_metrics": prog.last_metrics,
                                        "world": self.world, "train_seconds": secs})
        return signum is not None

    # ------------------------------------------------------------------ finish
    def _finish(self, evaluate: bool) -> Run:
        """run.json complete, the training plot, and the evaluation of the [eval] grid."""
        cfg = self.config
        self.state.update(complete=True)
        self._write_state()
        run = Run(self.run_dir, cfg, dict(self.state))
        if self.is_writer:
            self._plot(run)
        if evaluate:
            run.results = evaluate_run(run, learner=self.learner, quiet=cfg.train.quiet,
                                       device=self.device, rank=self.rank, world=self.world,
                                       write=self.is_writer)
        return run

    def _plot(self, run: Run) -> None:
        cfg = self.config
        try:
            from fewshot.plots import plot_training  # matplotlib is optional and slow to import

            plot_training(run.metrics(), self.run_dir / "plots" / "training.png",
                          title=f"{cfg.learner.name} on {'+'.join(cfg.data.sources)}")
        except FewShotError:
            raise
        except Exception as e:  # plotting must not lose a finished run
            print(f"warning: training plot not written: {e}", file=sys.stderr)

    # ------------------------------------------------------------------ helpers
    def _val_interval(self) -> int:
        t = self.config.train
        if not t.val_every:
            return 0
        if self.kind == "supervised":
            return t.val_every * len(self.sampler)
        return t.val_every

    def _validate(self):
        """(mean accuracy, 95% CI) on the fixed validation episodes (or val images)."""
        self._sync_statistics()
        if self.kind == "supervised":
            return validation_accuracy_supervised(self.learner, self.val_store, self.train_store,
                                                  self.config.train.batch_size, self.device,
                                                  self.config.data.augment)
        return validation_accuracy(self.learner, self.val_eps, self.config.train.val_episodes,
                                   device=self.device, rank=self.rank, world=self.world)

    def _broadcast_weights(self) -> None:
        """Every rank starts from rank 0's weights (not only from equal seeds)."""
        if self.world > 1:
            distributed.broadcast_module(self.learner)

    def _sync_statistics(self) -> None:
        """Average BatchNorm running statistics over ranks, so validation and checkpoints see
        one network (a collective: all ranks call it at the same steps)."""
        if self.world > 1:
            distributed.sync_buffers(self.learner)

    def _save_last(self, step: int, trainer_state: Dict[str, Any]) -> None:
        """checkpoints/last.pt; with several ranks, every rank's sampler and RNG states are
        gathered into it (a collective: all ranks call this at the same steps)."""
        extra = dict(trainer_state)
        self._sync_statistics()
        if self.world > 1:
            mine = {"sampler": self._sampler_state(), "rng": ckpt.rng_state()}
            extra["ranks"] = distributed.all_gather_object(mine)
        if self.is_writer:
            ckpt.save_checkpoint(self.run_dir / "checkpoints" / "last.pt", step=step,
                                 config_hash=self.hash, learner=self.learner,
                                 sampler=self._feed, trainer=extra)
            self._write_state()

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


def _fmt_metrics(m: Dict[str, Any]) -> str:
    if not m:
        return "none yet"
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())
