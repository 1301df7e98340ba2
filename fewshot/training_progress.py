"""What a training run shows and watches while it runs: the progress bar or plain log lines,
TensorBoard scalars, the per-window metric sums kept on the device, the first non-finite loss
(tracked on the device, no per-step host sync), and the SIGINT / SIGTERM flag the loop checks
after each step. Used by :mod:`fewshot.trainer`.

Progress: on a terminal a live bar (tqdm); when stderr is not a terminal (a pipe, a log
file, CI) no bar, as tqdm's own convention, but one plain line per log window.

Imports: distributed, atomic.
"""
from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from fewshot import distributed
from fewshot.atomic import atomic_write_text

__all__ = ["Signals", "Tensorboard", "Progress", "isatty", "MetricWindow", "FirstNonFinite",
           "loss_checked_at_once", "format_metrics", "truncate_metrics"]


class Signals:
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


class Tensorboard:
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


class Progress:
    """Training progress on stderr: a live tqdm bar on a terminal; otherwise (a pipe, a log
    file, CI: what tqdm's ``disable=None`` turns off) no bar but one plain line per log
    window, so a log stays readable and greppable."""

    def __init__(self, enabled: bool, total: int, initial: int, unit: str, desc: str):
        self.stream, self.desc, self.unit, self.bar = sys.stderr, desc, unit, None
        self.enabled = enabled
        if enabled and isatty(self.stream):
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


def isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class MetricWindow:
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


class FirstNonFinite:
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


def loss_checked_at_once(device: torch.device) -> bool:
    """Whether every step's loss is checked as soon as it is computed: free on the CPU; on an
    accelerator it would make the host wait for the device each step (:class:`FirstNonFinite`)."""
    return device.type == "cpu"


def format_metrics(m: Dict[str, Any]) -> str:
    """``k=v, ...`` of a metrics row for an error message ("none yet" when empty)."""
    if not m:
        return "none yet"
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the rows of metrics.jsonl logged after ``step`` (a resumed run recomputes them)."""
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
