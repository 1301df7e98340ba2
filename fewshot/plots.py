"""Figures (matplotlib, Agg backend, written atomically as PNG).

* :func:`plot_training` — loss and accuracy against the step, train and validation;
* :func:`plot_grid` — the N-way K-shot grid as grouped bars with 95% CI whiskers;
* :func:`plot_bench` — several learners side by side per grid cell (``fewshot bench``);
* :func:`plot_embedding` — a 2-D projection of support and query embeddings of test
  episodes, supports as stars, queries as dots, one colour per class (as Figure 3 of the
  L2G paper, a t-SNE). The projection (:func:`project_2d`) is t-SNE by default
  (openTSNE, a dependency), or PCA when asked for (``method="pca"``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["plot_training", "plot_grid", "plot_bench", "plot_embedding", "project_2d",
           "PROJECTIONS"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    from fewshot.atomic import atomic_output

    path = Path(path)
    try:
        with atomic_output(path, "wb") as fh:
            fig.savefig(fh, format=path.suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")
    finally:
        _plt().close(fig)
    return path


def plot_training(rows: Sequence[dict], path, title: str = "") -> Optional[Path]:
    """Training curves from metrics.jsonl rows: loss (left) and accuracy (right)."""
    train = [r for r in rows if r.get("split") == "train"]
    val = [r for r in rows if r.get("split") == "val"]
    if not train and not val:
        return None
    plt = _plt()
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 3.6))
    if train and "loss" in train[0]:
        ax_l.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("loss")
    ax_l.grid(alpha=0.3)
    if train and "acc" in train[0]:
        ax_a.plot([r["step"] for r in train], [r["acc"] for r in train], label="train (query) acc")
    if val:
        s = [r["step"] for r in val]
        a = np.array([r["acc"] for r in val])
        ci = np.array([r.get("ci95", 0.0) or 0.0 for r in val])
        ax_a.errorbar(s, a, yerr=ci, fmt="o-", capsize=3, label="validation acc ± 95% CI")
    ax_a.set_xlabel("step")
    ax_a.set_ylabel("accuracy")
    ax_a.grid(alpha=0.3)
    ax_a.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _bars(ax, labels: List[str], series: Dict[str, Tuple[List[float], List[float]]]):
    n = len(series)
    width = 0.8 / max(n, 1)
    x = np.arange(len(labels))
    for i, (name, (means, cis)) in enumerate(series.items()):
        ci = np.nan_to_num(np.array(cis, dtype=float) * 100)
        ax.bar(x + (i - (n - 1) / 2) * width, np.array(means) * 100, width, yerr=ci, capsize=3,
               label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_ylabel("accuracy % (± 95% CI)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)


def plot_grid(grid, path) -> Path:
    """The grid of one run: bars per (ways, shots) cell with 95% CI whiskers."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(grid.cells), 3.6))
    _bars(ax, [f"{c.ways}w {c.shots}s" for c in grid.cells],
          {grid.learner: ([c.mean for c in grid.cells], [c.ci95 for c in grid.cells])})
    ax.set_title(f"{grid.learner} on {grid.dataset}/{grid.split}")
    return _save(fig, path)


def plot_bench(table: Dict[str, Dict[Tuple[int, int], Tuple[float, float]]], path, title: str = "") -> Path:
    """Grouped bars: ``table[learner][(ways, shots)] = (mean, ci95)``."""
    plt = _plt()
    cells = sorted({k for v in table.values() for k in v})
    fig, ax = plt.subplots(figsize=(2 + 1.8 * len(cells), 4))
    nan = float("nan")
    series = {name: ([v.get(c, (nan, nan))[0] for c in cells], [v.get(c, (nan, nan))[1] for c in cells])
              for name, v in table.items()}
    _bars(ax, [f"top-1 ({w} cl.)" if s == 0 else f"{w}-way {s}-shot" for w, s in cells], series)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        ax.set_title(title)
    return _save(fig, path)


#: The projections :func:`project_2d` offers (``fewshot embed --method``); the first is the default.
PROJECTIONS = ("tsne", "pca")


def project_2d(z, method: str = "tsne", seed: int = 0) -> Tuple[np.ndarray, str]:
    """(n, 2) projection of embeddings ``z`` (n, D) and the method used.

    ``"tsne"`` (van der Maaten & Hinton, JMLR 2008; the L2G paper's Figure 3): openTSNE's
    ``TSNE`` (Poličar et al., JSS 2024; 1.5x faster than scikit-learn's here, see
    ``benchmarks/perf/tsne.py``) minimising KL(P || Q) between Gaussian input affinities P of
    perplexity ``min(30, (n − 1) / 3)`` and Student-t output affinities Q, Barnes-Hut
    gradients, PCA initialisation, ``random_state=seed``: the same ``z`` and seed give the
    same plot. ``"pca"``: the centred embeddings Z − mean(Z) projected on their top
    two right singular vectors (exact SVD, ``torch.linalg.svd``).
    """
    from fewshot.errors import ConfigError

    if method not in PROJECTIONS:
        raise ConfigError(f"embedding projection method {method!r} is unknown; use one of "
                          f"{', '.join(PROJECTIONS)} (--method)")
    z = np.asarray(z, dtype=np.float32)
    if method == "tsne":
        return _tsne(z, seed), "tsne"
    return _pca(z), "pca"


def _tsne(z: np.ndarray, seed: int) -> np.ndarray:
    from fewshot.errors import ConfigError

    n = z.shape[0]
    if n < 4:
        raise ConfigError(f"t-SNE needs at least 4 embeddings, got {n}; draw a larger episode "
                          "or use --method pca")
    try:
        import openTSNE
        from threadpoolctl import threadpool_limits  # a dependency of scikit-learn
    except ImportError:
        raise ConfigError("--method tsne needs openTSNE, a dependency of fewshot: reinstall "
                          "with `pip install -e .` (or `pip install openTSNE`), or use "
                          "--method pca") from None
    perplexity = min(30.0, (n - 1) / 3.0)
    threads = 1 if n <= 2000 else -1  # an episode has ~100 points; one thread is plenty
    tsne = openTSNE.TSNE(n_components=2, perplexity=perplexity, initialization="pca",
                         negative_gradient_method="bh", random_state=int(seed), n_jobs=threads)
    # scikit-learn (PCA initialisation, neighbours) threads by OpenMP, not n_jobs: on a busy
    # machine its spinning threads cost 40x (t-SNE of 100 points: 20 s instead of 0.3 s)
    with threadpool_limits(1 if threads == 1 else None):
        y = tsne.fit(z)
    return np.asarray(y, dtype=np.float32)


def _pca(z: np.ndarray) -> np.ndarray:
    import torch

    zc = torch.as_tensor(z, dtype=torch.float64)
    zc = zc - zc.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(zc, full_matrices=False)  # exact, deterministic
    y = zc @ vh[:2].T
    if y.shape[1] < 2:  # one-dimensional embeddings: pad a zero axis
        y = torch.cat([y, torch.zeros(y.shape[0], 2 - y.shape[1], dtype=y.dtype)], 1)
    return y.float().numpy()


def plot_embedding(z_support, y_support, z_query, y_query, path, title: str = "",
                   method: str = "tsne", seed: int = 0) -> Tuple[Path, str]:
    """Supports as stars, queries as dots, one colour per class, in a joint 2-D projection
    (:func:`project_2d` with ``method`` and ``seed``). The legend names the two markers and
    the classes; the title ends with the projection used."""
    from matplotlib.lines import Line2D

    z = np.concatenate([np.asarray(z_support), np.asarray(z_query)], 0)
    y2, used = project_2d(z, method, seed)
    s = len(z_support)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ys, yq = np.asarray(y_support), np.asarray(y_query)
    cmap = plt.get_cmap("tab10" if max(ys.max(), yq.max()) < 10 else "tab20")
    for k in np.unique(np.concatenate([ys, yq])):
        col = cmap(int(k) % cmap.N)
        q = y2[s:][yq == k]
        ax.scatter(q[:, 0], q[:, 1], s=14, color=col, alpha=0.7, marker="o")
        p = y2[:s][ys == k]
        ax.scatter(p[:, 0], p[:, 1], s=220, color=col, marker="*", edgecolors="black",
                   linewidths=0.8, label=f"class {int(k)}")
    ax.set_xticks([])
    ax.set_yticks([])
    projection = f"{_PROJECTION_NAMES[used]} of the embeddings"
    ax.set_title(f"{title}\n{projection}" if title else projection, fontsize=9)
    markers = [Line2D([], [], linestyle="", marker="*", markersize=11, color="0.6",
                      markeredgecolor="black", label="support"),
               Line2D([], [], linestyle="", marker="o", markersize=5, color="0.6", label="query")]
    classes, _ = ax.get_legend_handles_labels()
    ax.legend(handles=markers + classes, fontsize=7, loc="best", markerscale=0.5)
    return _save(fig, path), used


_PROJECTION_NAMES = {"tsne": "t-SNE", "pca": "PCA"}
