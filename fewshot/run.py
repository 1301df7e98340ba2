"""A run directory: what it holds, how it is created and opened, and the learner it builds.

A run directory holds ``config.toml`` (resolved), ``env.json`` (provenance), ``run.json``
(state), ``metrics.jsonl``, ``checkpoints/{last,best}.pt``, ``results.{json,csv,md}`` and
``plots/``. This module also owns what every run needs before its first step: the device
(:func:`resolve_device`), the seeds (:func:`seed_everything`, :func:`rank_seed`) and the
learner built for the data's shape (:func:`build_learner`).

Imports: config, checkpoint, report, learners, distributed, errors, atomic (never the
trainer, the evaluation or the API).
"""
from __future__ import annotations

import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from fewshot import checkpoint as ckpt
from fewshot import distributed
from fewshot.config import RunConfig, config_hash, learner_options, load_config
from fewshot.errors import CheckpointError, ConfigError
from fewshot.learners import get_learner
from fewshot.report import GridResult, load_results

__all__ = ["Run", "open_run", "prepare_run_dir", "RUN_MARKERS", "build_learner", "resolve_device",
           "rank_seed", "seed_everything", "dist_info", "environment"]

#: names whose presence marks a directory as a run directory (``--force`` deletes only those)
RUN_MARKERS = ("config.toml", "env.json", "run.json", "metrics.jsonl", "checkpoints")


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


def resolve_memory_format(option: str, device: torch.device,
                          model: torch.nn.Module) -> torch.memory_format:
    """The layout ``train.memory_format`` asks for on ``device`` for ``model``.

    ``auto``: ``torch.channels_last`` on a CPU when ``model`` has a 2-D convolution, else
    ``torch.contiguous_format``. On a CPU, oneDNN's convolutions, BatchNorm and pooling run on
    NHWC activations without reordering them around every layer: a plain Conv-4 ProtoNet loop
    ran 1.2-1.4x faster in NHWC on this project's 2-core machine (28x28 and 84x84). On CUDA
    ``auto`` keeps the contiguous layout, as before (NHWC was not measured there; AMP users on
    tensor cores may set ``channels_last``). Both layouts compute the same function, rounded
    differently: CPU BatchNorm sums NHWC batch statistics less exactly (about 1e-5 relative),
    so numbers agree to float rounding, not bit for bit.
    """
    if option == "auto":
        convs = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        option = "channels_last" if device.type == "cpu" and convs else "contiguous"
    return torch.channels_last if option == "channels_last" else torch.contiguous_format


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s episodes (:func:`fewshot.distributed.rank_seed`: ``seed`` itself
    for rank 0, an independent SeedSequence child stream for the others)."""
    return distributed.rank_seed(seed, rank)


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def dist_info() -> Tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without torch.distributed."""
    return distributed.rank(), distributed.world_size()


def build_learner(cfg: RunConfig, *, in_channels: int, image_size: int, num_classes: int,
                  device: Union[str, torch.device] = "cpu"):
    """The learner of ``cfg`` built for the data's shape and moved to ``device``."""
    cls = get_learner(cfg.learner.name)
    lcfg = learner_options(cfg.learner.name, cfg.learner.options, cfg.source or "")
    learner = cls(lcfg, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
    return learner.to(device)


# ------------------------------------------------------------------- provenance
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
    import fewshot  # the package itself (its version); run.py is never imported by fewshot/__init__

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
        env["world_size"] = dist_info()[1]
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
