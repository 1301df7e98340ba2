"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is one ``torch.save`` file holding a dict::

    {"format": "fewshot-checkpoint", "version": 1,
     "step": int, "config_hash": str, "learner_name": str,
     "learner": learner.state_dict(),     # modules, step sizes, optimisers, schedulers
     "sampler": sampler.state_dict(),
     "rng": {"torch": ByteTensor, "cuda": [ByteTensor...], "numpy": {...}, "python": [...]},
     "trainer": {...}}                    # best validation accuracy, lr bases, ...

Writing goes to a temporary file in the same folder, is flushed to disk and then renamed
over the final name (``os.replace``), so a crash never leaves a half-written file under a
final name. Reading refuses anything that is not such a dict (a corrupt file, a foreign
pickle, a checkpoint of another learner or another config) with :class:`CheckpointError`.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from fewshot.atomic import atomic_output
from fewshot.errors import CheckpointError

FORMAT = "fewshot-checkpoint"
VERSION = 1

__all__ = ["FORMAT", "VERSION", "save_checkpoint", "load_checkpoint", "rng_state",
           "set_rng_state", "atomic_torch_save"]


def atomic_torch_save(obj: Any, path: Union[str, os.PathLike]) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (:func:`fewshot.atomic.atomic_output`)."""
    with atomic_output(path, "wb") as fh:
        torch.save(obj, fh)
    return Path(path)


def rng_state() -> Dict[str, Any]:
    """torch (CPU and CUDA), numpy and python global RNG states as weights_only-loadable data."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(path: Union[str, os.PathLike], *, step: int, config_hash: str,
                    learner, sampler=None, trainer: Optional[Dict[str, Any]] = None,
                    include_rng: bool = True) -> Path:
    """Write a checkpoint of ``learner`` (and the sampler, RNGs, trainer state) atomically."""
    obj = {
        "format": FORMAT, "version": VERSION, "step": int(step), "config_hash": config_hash,
        "learner_name": getattr(learner, "name", ""),
        "learner": learner.state_dict(),
        "sampler": sampler.state_dict() if sampler is not None and hasattr(sampler, "state_dict") else None,
        "rng": rng_state() if include_rng else None,
        "trainer": trainer or {},
    }
    return atomic_torch_save(obj, path)


def load_checkpoint(path: Union[str, os.PathLike], *, expect_hash: Optional[str] = None,
                    expect_learner: Optional[str] = None, map_location="cpu") -> Dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` and check what it is.

    Raises :class:`CheckpointError` when the file is missing, corrupt or not a fewshot
    checkpoint, or when its learner / config hash differ from the expected ones.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; train first (`fewshot train`) or "
                              f"pick an existing run directory")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt, truncated, or holds objects outside the allow-list
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read safely ({first[:200]}); it is "
                              f"corrupt or was not written by fewshot: delete it or retrain") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fewshot checkpoint (no '{FORMAT}' marker); "
                              f"give a checkpoint written by `fewshot train`")
    if obj.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {obj.get('version')}, this "
                              f"fewshot reads version {VERSION}")
    if expect_learner is not None and obj.get("learner_name") != expect_learner:
        raise CheckpointError(f"checkpoint {path} holds learner '{obj.get('learner_name')}', the "
                              f"config asks for '{expect_learner}'")
    if expect_hash is not None and obj.get("config_hash") != expect_hash:
        raise CheckpointError(f"checkpoint {path} was written with config hash "
                              f"{obj.get('config_hash')}, the run's config.toml now hashes to "
                              f"{expect_hash}: the config was edited; restore it or start a new run")
    return obj
