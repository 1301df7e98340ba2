"""The Python API, as short as the CLI: a thin facade over the trainer, the evaluation and the
report (nothing inside the package imports it).

    import fewshot
    run = fewshot.train("configs/protonet_glyphs.toml", out="runs/proto", **{"train.episodes": 500})
    grid = fewshot.evaluate(run, ways=[5, 20], shots=[1, 5])
    print(grid.table())

``train`` is ``fewshot train``; ``evaluate`` is ``fewshot eval`` (fixed, seeded episodes,
mean ± 95% CI per cell, results written into the run directory); ``compare`` is
``fewshot compare``; ``embed`` is ``fewshot embed``.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Union

from fewshot.config import RunConfig
from fewshot.errors import ConfigError
from fewshot.embedding import embed, embedding_fn
from fewshot.evaluation import evaluate_run
from fewshot.report import Comparison, GridResult, compare_runs
from fewshot.run import Run, open_run
from fewshot.trainer import Trainer

__all__ = ["train", "evaluate", "evaluate_run", "compare", "embed", "embedding_fn", "open_run",
           "Run", "GridResult"]


def _overrides(kw: Dict[str, Any]) -> List[tuple]:
    """``{"train.episodes": 5}`` or ``{"train__episodes": 5}`` -> [("train.episodes", 5)]."""
    out = []
    for k, v in kw.items():
        key = k.replace("__", ".")
        if "." not in key:
            raise ConfigError(f"override {k!r} must name table and key, e.g. train__episodes=500 or "
                              f"**{{'train.episodes': 500}}")
        out.append((key, v))
    return out


def train(config: Union[str, os.PathLike, Dict[str, Any], RunConfig], *, out=None,
          force: bool = False, resume: bool = False, evaluate: bool = True,
          overrides: Sequence[str] = (), **kw) -> Run:
    """Train a config (path, dict or RunConfig) into ``out`` and evaluate its [eval] grid.

    Keyword overrides use ``table__key=value`` or ``**{"table.key": value}``;
    ``overrides`` takes ``--set`` strings. Returns the :class:`Run` (``run.results`` holds
    the evaluation when ``evaluate``).
    """
    ovs = list(overrides) + _overrides(kw)
    if resume:
        return Trainer(None, out, overrides=ovs, resume=True).run(evaluate=evaluate)
    return Trainer(config, out, overrides=ovs, force=force).run(evaluate=evaluate)


def evaluate(run: Union[Run, str, os.PathLike], ways: Sequence[int] = (5,), shots: Sequence[int] = (1, 5),
             queries: Optional[int] = None, episodes: Optional[int] = None, *, split: Optional[str] = None,
             seed: Optional[int] = None, checkpoint: Optional[str] = None, device=None,
             quiet: bool = True, write: bool = True, dataset: Optional[str] = None) -> GridResult:
    """``fewshot eval``: the N-way K-shot grid of a run (a :class:`Run` or its directory);
    ``dataset`` evaluates on another prepared dataset (cross-domain, see
    :func:`fewshot.evaluation.evaluate_run`)."""
    if not isinstance(run, Run):
        run = open_run(run)
    return evaluate_run(run, ways=ways, shots=shots, queries=queries, episodes=episodes,
                        split=split, seed=seed, checkpoint=checkpoint, device=device, quiet=quiet,
                        write=write, dataset=dataset)


def compare(run_a, run_b) -> Comparison:
    """``fewshot compare``: paired per-cell differences of two evaluated runs."""
    a = run_a.run_dir if isinstance(run_a, Run) else run_a
    b = run_b.run_dir if isinstance(run_b, Run) else run_b
    return compare_runs(a, b)
