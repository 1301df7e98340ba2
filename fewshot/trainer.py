"""The training loop: stores -> sampler -> learner steps -> logs, validation, checkpoints.

:class:`Trainer` builds everything from a :class:`~fewshot.config.RunConfig`: the stores of
the train / val splits of every source, checked against the evaluation grid and the training
tasks before any step runs, and the sampler the learner's ``input_kind`` asks for
(:mod:`fewshot.training_data`), and the learner (:func:`fewshot.run.build_learner`);
supervised learners get learning-rate milestones at epoch starts.

:meth:`Trainer.run` is set-up, start or restore, then per step :meth:`~Trainer._train_step`
(:meth:`~Trainer._next_batch` is the one place a batch is drawn and reaches the device),
:meth:`~Trainer._log_window` every ``log_every`` steps (the one place the metrics summed on
the device reach the host), validation and checkpoints, then the finish (plot, evaluation).
A non-finite loss is checked every step on CPU (cheap); on a GPU the first non-finite step is
tracked on the device (:class:`FirstNonFinite`, no per-step host sync) and read at each log
window and before every checkpoint. Either way training stops with :class:`TrainingError`
naming the step at which the loss first stopped being finite and the last finite metrics.

On CUDA, episodic batches come through a :class:`~fewshot.data.prefetch.BatchFeed`: batch k+1
is gathered into pinned memory and copied with ``non_blocking=True`` on a side stream while
step k runs; checkpoints record the sampler state of the first batch not yet trained on, so
resume stays exact.

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

What the run shows and watches as it goes (progress bar or plain lines, TensorBoard, the
non-finite tracker, signals) is :mod:`fewshot.training_progress`.

Imports: run, evaluation, config, checkpoint, data, learners, distributed, training_data,
training_progress, errors, atomic.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from fewshot import checkpoint as ckpt
from fewshot import distributed
from fewshot.atomic import atomic_write_text
from fewshot.config import config_hash, load_config, save_config
from fewshot.data.prefetch import BatchFeed
from fewshot.errors import CheckpointError, ConfigError, FewShotError, TrainingError
from fewshot.evaluation import evaluate_run, validation_accuracy, validation_accuracy_supervised
from fewshot.learners import get_learner
from fewshot.learners.common import scale_lrs_at_milestones
from fewshot.run import (Run, build_learner, dist_info, environment, prepare_run_dir, rank_seed,
                         resolve_device, resolve_memory_format, seed_everything)
from fewshot.training_data import (build_sampler, check_feasible, check_learner_tasks,
                                   open_training_data, validation_episodes)
from fewshot.training_progress import (FirstNonFinite, MetricWindow, Progress, Signals,
                                       Tensorboard, format_metrics, loss_checked_at_once,
                                       truncate_metrics)

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
        self.data = open_training_data(cfg)
        self.kind = get_learner(cfg.learner.name).input_kind
        check_feasible(cfg, self.data, self.kind)
        if t.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("train.amp = 'fp16' needs a CUDA device; use 'bf16' on CPU")
        seed_everything(t.seed)  # the same initial weights on every rank
        self.learner = build_learner(cfg, device=self.device, **self.data.data_shape)
        self.channels_last = self._set_memory_format(t.memory_format)
        check_learner_tasks(cfg, self.learner, self.kind)
        self.learner.train()
        self._broadcast_weights()
        seed_everything(rank_seed(t.seed, self.rank))
        self.per_rank = self._per_rank_batch() if self.kind != "supervised" else 1
        self.sampler = build_sampler(cfg, self.data, self.kind, seed=rank_seed(t.seed, self.rank),
                                     device=self.device, channels_last=self.channels_last,
                                     rank=self.rank, world=self.world)
        self.base_lrs: Dict[str, List[float]] = {}
        self.val_eps = None
        if self.kind != "supervised":
            self.val_eps = validation_episodes(cfg, self.data, self.device)

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
                      "data_shape": self.data.data_shape, "image_shape": self.data.image_shape,
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
            truncate_metrics(self.run_dir / "metrics.jsonl", prog.step)

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
        self._bar = Progress(self.is_writer and not t.quiet and prog.step < prog.total,
                              prog.total * self._items, prog.step * self._items, unit, f"train {name}")
        self._tb = Tensorboard(self.run_dir / "tensorboard", self.is_writer)
        val_every = self._val_interval()
        window = MetricWindow()
        metrics_path = self.run_dir / "metrics.jsonl"
        self._nonfinite = FirstNonFinite()
        self._feed = self._make_feed()
        try:
            with Signals() as sig, (open(metrics_path, "a") if self.is_writer
                                     else contextlib.nullcontext()) as self._mfile:
                while prog.step < prog.total:
                    window.add(self._train_step(prog))
                    self._bar.update(self._items)
                    if prog.step % t.log_every == 0 or prog.step == prog.total:
                        self._log_window(prog, window)
                        window = MetricWindow()
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
                                f"{format_metrics(prog.last_metrics)}; lower the learning rate "
                                f"or check the data") from None
        prog.step += 1
        if "loss" not in metrics:
            raise TrainingError(f"learner '{self.config.learner.name}' returned no 'loss' metric")
        if loss_checked_at_once(self.device):
            if not bool(torch.isfinite(metrics["loss"].detach()).all()):
                self._raise_nonfinite(prog, prog.step, float(metrics["loss"]))
        else:
            self._nonfinite.observe(metrics["loss"], prog.step)
        return metrics

    def _raise_nonfinite(self, prog: _Progression, step: int, value: Optional[float] = None):
        shown = f" ({value})" if value is not None else ""
        raise TrainingError(f"non-finite loss{shown} at step {step}; last finite metrics: "
                            f"{format_metrics(prog.last_metrics)}; lower the learning rate or "
                            f"check the data")

    def _check_nonfinite(self, prog: _Progression) -> None:
        """The device-side record of a non-finite loss (one host sync), before it is logged
        or checkpointed."""
        first = self._nonfinite.step()
        if first is not None:
            self._raise_nonfinite(prog, first)

    def _log_window(self, prog: _Progression, window: MetricWindow) -> None:
        """Means of the window's steps to metrics.jsonl, TensorBoard and the progress output."""
        self._check_nonfinite(prog)
        row = window.means(self.world)
        if not all(math.isfinite(v) for v in row.values()):
            raise TrainingError(f"non-finite metrics {format_metrics(row)} in steps "
                                f"{prog.step - window.count + 1}..{prog.step}; last finite metrics: "
                                f"{format_metrics(prog.last_metrics)}; lower the learning rate")
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
            return validation_accuracy_supervised(self.learner, self.data.val_store, self.data.train_store,
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
