"""Figures (matplotlib, Agg backend, written atomically as PNG).

* :func:`plot_training` — loss and accuracy against the step, train and validation;
* :func:`plot_grid` — the N-way K-shot grid as grouped bars with 95% CI whiskers;
* :func:`plot_bench` — several learners side by side per grid cell (``fewshot bench``);
* :func:`plot_embedding` — a 2-D projection of support and query embeddings of test
  episodes, supports as stars, queries as dots, one colour per class (as Figure 3 of the
  L2G paper). The projection is t-SNE (scikit-learn) when installed, else PCA: the top two
  right singular vectors of the centred embedding matrix Z − mean(Z) (exact SVD,
  ``torch.linalg.svd``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["plot_training", "plot_grid", "plot_bench", "plot_embedding", "project_2d"]


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


def project_2d(z, method: str = "auto", seed: int = 0) -> Tuple[np.ndarray, str]:
    """(n, 2) projection of embeddings ``z`` (n, D) and the method used ("tsne" or "pca")."""
    import torch

    z = torch.as_tensor(z, dtype=torch.float32)
    if method in ("auto", "tsne"):
        try:
            from sklearn.manifold import TSNE  # optional

            perplexity = float(max(2, min(30, (z.shape[0] - 1) // 3)))
            y = TSNE(n_components=2, perplexity=perplexity, random_state=seed,
                     init="pca").fit_transform(z.numpy())
            return np.asarray(y), "tsne"
        except ImportError:
            if method == "tsne":
                from fewshot.errors import ConfigError

                raise ConfigError("--method tsne needs scikit-learn (pip install scikit-learn); "
                                  "use --method pca") from None
    zc = (z - z.mean(0, keepdim=True)).double()
    _, _, vh = torch.linalg.svd(zc, full_matrices=False)  # exact, deterministic
    y = zc @ vh[:2].T
    if y.shape[1] < 2:  # one-dimensional embeddings: pad a zero axis
        y = torch.cat([y, torch.zeros(y.shape[0], 2 - y.shape[1], dtype=y.dtype)], 1)
    return y.float().numpy(), "pca"


def plot_embedding(z_support, y_support, z_query, y_query, path, title: str = "",
                   method: str = "auto", seed: int = 0) -> Tuple[Path, str]:
    """Supports as stars, queries as dots, one colour per class, in a joint 2-D projection."""
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
    ax.set_title(title or f"support (stars) and query (dots) embeddings, {used.upper()}")
    ax.legend(fontsize=7, loc="best", markerscale=0.5)
    return _save(fig, path), used
