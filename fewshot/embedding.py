"""``fewshot embed``: a run's embeddings of one fixed test episode, drawn in 2-D.

Imports: run, evaluation (the grid check), data, plots, errors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from fewshot.data.episodes import fixed_episodes
from fewshot.data.store import open_split
from fewshot.errors import ConfigError
from fewshot.evaluation import check_grid
from fewshot.run import Run, open_run

__all__ = ["embedding_fn", "embed"]


def embedding_fn(learner):
    """The learner's embedding f(x) -> (B, D): ``learner.embed``, else its ``encoder`` /
    ``backbone`` / ``features`` module; a learner with none of them cannot be drawn."""
    fn = getattr(learner, "embed", None)
    if callable(fn):
        return fn
    for attr in ("encoder", "backbone", "features", "feature_extractor"):
        mod = getattr(learner, attr, None)
        if mod is not None and callable(mod):
            return mod
    raise ConfigError(f"learner '{getattr(learner, 'name', '?')}' exposes no embedding (no .embed() "
                      f"method and no encoder/backbone module); `fewshot embed` cannot draw it")


def embed(run, *, ways: int = 5, shots: int = 5, queries: int = 15, episode: int = 0,
          split: Optional[str] = None, method: str = "tsne", checkpoint: str = "best", out=None,
          device="cpu"):
    """``fewshot embed``: draw support (stars) and query (dots) embeddings of one fixed test
    episode in 2-D: ``method`` "tsne" (the L2G paper's Figure 3, seeded by the run's eval seed)
    or "pca" (see :func:`fewshot.plots.project_2d`). Returns (path, method)."""
    from fewshot.plots import plot_embedding  # matplotlib is optional

    run = run if isinstance(run, Run) else open_run(run)
    cfg = run.config
    split = split or cfg.eval_split()
    if episode < 0:
        raise ConfigError(f"--episode must be >= 0, got {episode}")
    store = open_split(cfg.data.sources[0], split, cfg.data.root, cfg.data.in_memory)
    try:
        check_grid(store, [ways], [shots], queries, what=f"embed episode on split '{split}'")
        learner, step, which = run.load_learner(checkpoint, device=device)
        ep = fixed_episodes(store, ways, shots, queries, episode + 1, cfg.eval.seed)[episode].to(device)
    finally:
        store.close()
    f = embedding_fn(learner)
    learner.eval()
    with torch.no_grad():
        zs = f(ep.support_x).reshape(ep.support_x.shape[0], -1).float().cpu()
        zq = f(ep.query_x).reshape(ep.query_x.shape[0], -1).float().cpu()
    path = Path(out) if out else Path(run.run_dir) / "plots" / "embedding.png"
    title = (f"{cfg.learner.name} ({which}, step {step}): {ways}-way {shots}-shot episode {episode} "
             f"of {cfg.data.sources[0]}/{split}")
    return plot_embedding(zs.numpy(), ep.support_y.cpu().numpy(), zq.numpy(), ep.query_y.cpu().numpy(),
                          path, title=title, method=method, seed=cfg.eval.seed)
