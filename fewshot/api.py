"""The Python API, as short as the CLI.

    from fewshot.api import train, evaluate
    run = train("configs/protonet_glyphs.toml", out="runs/proto", **{"train.episodes": 500})
    grid = evaluate(run, ways=[5, 20], shots=[1, 5])
    print(grid.table())

``train`` is ``fewshot train``; ``evaluate`` is ``fewshot eval`` (fixed, seeded episodes,
mean ± 95% CI per cell, results written into the run directory); ``compare`` is
``fewshot compare``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from fewshot.config import RunConfig
from fewshot.errors import ConfigError
from fewshot.report import Comparison, GridResult, compare_runs, write_results
from fewshot.train import Run, Trainer, open_run, resolve_device

__all__ = ["train", "evaluate", "evaluate_run", "compare", "open_run", "Run", "GridResult"]


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


def evaluate_run(run: Run, *, ways: Optional[Sequence[int]] = None, shots: Optional[Sequence[int]] = None,
                 queries: Optional[int] = None, episodes: Optional[int] = None,
                 split: Optional[str] = None, seed: Optional[int] = None,
                 checkpoint: Optional[str] = None, device=None, quiet: bool = True,
                 learner=None, write: bool = True, rank: int = 0, world: int = 1) -> GridResult:
    """Evaluate a run's weights on the grid (arguments default to the run's [eval] table).

    ``learner`` given (the trainer's, at the end of training) is used as is only when
    ``checkpoint`` is "last"; otherwise the chosen checkpoint is loaded. Results go to
    ``results.{json,csv,md}`` and ``plots/grid.png`` in the run directory when ``write``.
    """
    from fewshot.data.store import open_split
    from fewshot.evaluate import evaluate_grid

    cfg = run.config
    e = cfg.eval
    ways = list(ways) if ways is not None else list(e.ways)
    shots = list(shots) if shots is not None else list(e.shots)
    queries = queries if queries is not None else e.queries
    episodes = episodes if episodes is not None else e.episodes
    split = split or cfg.eval_split()
    seed = e.seed if seed is None else seed
    checkpoint = checkpoint or e.checkpoint
    if checkpoint not in ("best", "last"):
        raise ConfigError(f"--checkpoint must be best or last, got {checkpoint!r}")
    dev = resolve_device(device if isinstance(device, str) else (str(device) if device is not None
                                                                 else cfg.train.device))
    store = open_split(cfg.data.dataset, split, cfg.data.root, cfg.data.in_memory)
    kind = run.state.get("input_kind", "episodes")
    try:
        if kind != "supervised":
            from fewshot.evaluate import check_grid

            check_grid(store, ways, shots, queries, what=f"eval grid on split '{split}'")
        if learner is None or checkpoint != "last":
            learner, step, which = run.load_learner(checkpoint, device=dev)
        else:
            step, which = run.step, "last"
        label = f"{which} (step {step})"
        if kind == "supervised":
            grid = _evaluate_supervised(learner, store, cfg, dev, split, label, step)
        else:
            grid = evaluate_grid(learner, store, ways=ways, shots=shots, queries=queries,
                                 episodes=episodes, seed=seed, device=dev, quiet=quiet,
                                 dataset=cfg.data.dataset, split=split, checkpoint=label, step=step,
                                 rank=rank, world=world)
    finally:
        store.close()
    grid.run_dir = str(run.run_dir)
    grid.learner = cfg.learner.name
    if write and rank == 0:
        write_results(grid, run.run_dir)
        try:
            from fewshot.plots import plot_grid

            plot_grid(grid, Path(run.run_dir) / "plots" / "grid.png")
        except ImportError:
            pass
    run.results = grid
    return grid


def _evaluate_supervised(learner, store, cfg, device, split, label, step) -> GridResult:
    """Top-1 and top-k accuracy (k = min(5, classes)) over every image of ``split`` as one cell
    (ways = classes, shots 0): per-image top-1 0/1 correctness in ``accuracies``, per-image
    top-k in ``metrics["top-k"]``; each summarised as mean ± 1.96·std/√n over images."""
    from fewshot.data.store import open_split
    from fewshot.report import CellResult
    from fewshot.train import supervised_topk_correct

    train = open_split(cfg.data.dataset, cfg.data.train_split, cfg.data.root, in_memory=False)
    try:
        same = train.class_names == store.class_names
        stats = (train.mean, train.std)  # test images normalised by the training set's statistics
    finally:
        train.close()
    if not same:
        raise ConfigError(f"supervised learner '{cfg.learner.name}' classifies the classes of split "
                          f"'{cfg.data.train_split}'; split '{split}' holds other classes: evaluate "
                          f"on a split of the same classes (e.g. --split test of a CIFAR store)")
    k = min(5, int(store.num_classes))
    correct = supervised_topk_correct(learner, store, cfg.train.batch_size, device, cfg.data.augment,
                                      stats=stats, ks=(1, k))
    cell = CellResult(ways=int(store.num_classes), shots=0, queries=0, seed=0, accuracies=correct[1],
                      fingerprint=f"{getattr(store, 'checksum', '') or ''}"[:16],
                      metrics={f"top-{k}": correct[k]} if k > 1 else {})
    return GridResult(learner=cfg.learner.name, dataset=cfg.data.dataset, split=split, cells=[cell],
                      checkpoint=label, step=step, transductive_bn=False,
                      fine_tunes=bool(getattr(learner, "fine_tunes_at_test", False)),
                      extra={"kind": f"supervised top-1 and top-{k} accuracy over all images"})


def evaluate(run: Union[Run, str, os.PathLike], ways: Sequence[int] = (5,), shots: Sequence[int] = (1, 5),
             queries: Optional[int] = None, episodes: Optional[int] = None, *, split: Optional[str] = None,
             seed: Optional[int] = None, checkpoint: Optional[str] = None, device=None,
             quiet: bool = True, write: bool = True) -> GridResult:
    """``fewshot eval``: the N-way K-shot grid of a run (a :class:`Run` or its directory)."""
    if not isinstance(run, Run):
        run = open_run(run)
    return evaluate_run(run, ways=ways, shots=shots, queries=queries, episodes=episodes,
                        split=split, seed=seed, checkpoint=checkpoint, device=device, quiet=quiet,
                        write=write)


def compare(run_a, run_b) -> Comparison:
    """``fewshot compare``: paired per-cell differences of two evaluated runs."""
    a = run_a.run_dir if isinstance(run_a, Run) else run_a
    b = run_b.run_dir if isinstance(run_b, Run) else run_b
    return compare_runs(a, b)


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


def embed(run: Union[Run, str, os.PathLike], *, ways: int = 5, shots: int = 5, queries: int = 15,
          episode: int = 0, split: Optional[str] = None, method: str = "tsne",
          checkpoint: str = "best", out=None, device="cpu"):
    """``fewshot embed``: draw support (stars) and query (dots) embeddings of one fixed test
    episode in 2-D: ``method`` "tsne" (the L2G paper's Figure 3, seeded by the run's eval seed)
    or "pca" (see :func:`fewshot.plots.project_2d`). Returns (path, method)."""
    import torch

    from fewshot.data.episodes import fixed_episodes
    from fewshot.data.store import open_split
    from fewshot.evaluate import check_grid
    from fewshot.plots import plot_embedding

    if not isinstance(run, Run):
        run = open_run(run)
    cfg = run.config
    split = split or cfg.eval_split()
    if episode < 0:
        raise ConfigError(f"--episode must be >= 0, got {episode}")
    store = open_split(cfg.data.dataset, split, cfg.data.root, cfg.data.in_memory)
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
             f"of {cfg.data.dataset}/{split}")
    return plot_embedding(zs.numpy(), ep.support_y.cpu().numpy(), zq.numpy(), ep.query_y.cpu().numpy(),
                          path, title=title, method=method, seed=cfg.eval.seed)
