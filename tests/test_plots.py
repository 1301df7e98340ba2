"""2-D projections of embeddings (``fewshot embed``): t-SNE by default, PCA on request."""
from __future__ import annotations

import numpy as np
import pytest

from fewshot.errors import ConfigError
from fewshot.plots import PROJECTIONS, plot_embedding, project_2d


def _clusters(k=5, per=20, d=32, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10.0, (k, d))
    y = np.repeat(np.arange(k), per)
    return (centres[y] + rng.normal(0, spread, (k * per, d))).astype(np.float32), y


def test_tsne_is_the_default_and_is_seeded():
    z, _ = _clusters()
    a, used = project_2d(z)
    assert used == "tsne" == PROJECTIONS[0] and a.shape == (100, 2) and np.isfinite(a).all()
    assert np.array_equal(project_2d(z, "tsne", seed=0)[0], a)  # same embeddings: same plot


def test_tsne_keeps_well_separated_clusters_apart():
    """Five tight Gaussian clusters far apart in 32-D: in the 2-D t-SNE map every point's
    nearest neighbour is of its cluster, and each cluster's largest distance to its own centre
    is below the smallest distance between two cluster centres."""
    z, y = _clusters()
    p, _ = project_2d(z, "tsne", seed=0)
    d = ((p[:, None] - p[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (y[d.argmin(1)] == y).all()
    centres = np.stack([p[y == k].mean(0) for k in range(5)])
    radius = max(np.linalg.norm(p[y == k] - centres[k], axis=1).max() for k in range(5))
    gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    assert radius < gaps[~np.eye(5, dtype=bool)].min() / 2


def test_pca_is_the_closed_form_projection_on_the_top_two_axes():
    """Embeddings with known principal axes: Z = m + C Q^T, columns of C uncorrelated with
    variances 25 > 4 > 0.25 > ..., Q orthonormal. PCA's two coordinates are then exactly the
    centred first two columns of C (up to the sign of each axis)."""
    rng = np.random.default_rng(0)
    n, d = 60, 8
    c = rng.normal(size=(n, d))
    c -= c.mean(0)
    u, _, vt = np.linalg.svd(c, full_matrices=False)
    c = u * np.sqrt(n) * np.array([5.0, 2.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01])  # uncorrelated columns
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    z = 3.0 + c @ q.T
    p, used = project_2d(z, "pca")
    assert used == "pca" and p.shape == (n, 2)
    for k in range(2):
        sign = np.sign(p[:, k] @ c[:, k])
        np.testing.assert_allclose(sign * p[:, k], c[:, k], atol=1e-3 * np.abs(c[:, k]).max())


def test_unknown_method_and_tiny_inputs_are_refused():
    z, _ = _clusters()
    with pytest.raises(ConfigError, match="'auto' is unknown.*tsne, pca"):
        project_2d(z, "auto")
    with pytest.raises(ConfigError, match="at least 4 embeddings.*--method pca"):
        project_2d(z[:3], "tsne")
    assert project_2d(z[:3], "pca")[0].shape == (3, 2)


def test_plot_embedding_writes_the_tsne_plot(tmp_path):
    z, y = _clusters(k=3, per=6)
    path, used = plot_embedding(z[::3], y[::3], z, y, tmp_path / "e.png")
    assert used == "tsne" and path.stat().st_size > 1000


def test_cli_and_api_default_to_tsne():
    import inspect

    from fewshot.api import embed
    from fewshot.cli import build_parser

    assert build_parser().parse_args(["embed", "RUN"]).method == "tsne"
    assert inspect.signature(embed).parameters["method"].default == "tsne"
    with pytest.raises(ConfigError, match="invalid choice: 'auto'"):  # no silent PCA fallback
        build_parser().parse_args(["embed", "RUN", "--method", "auto"])


def _drawn(monkeypatch):
    """Capture the title and legend texts of the figure ``plot_embedding`` saves."""
    import fewshot.plots as plots

    seen, real = {}, plots._save

    def save(fig, path):
        (ax,) = fig.axes
        seen["title"] = ax.get_title()
        seen["legend"] = [t.get_text() for t in ax.get_legend().get_texts()]
        seen["markers"] = [h.get_marker() for h in ax.get_legend().legend_handles[:2]]
        return real(fig, path)

    monkeypatch.setattr(plots, "_save", save)
    return seen


@pytest.mark.parametrize("method,name", [("tsne", "t-SNE"), ("pca", "PCA")])
def test_embedding_plot_names_the_markers_and_the_projection(tmp_path, monkeypatch, method, name):
    seen = _drawn(monkeypatch)
    z, y = _clusters(k=3, per=6)
    plot_embedding(z[::3], y[::3], z, y, tmp_path / "e.png", title="protonet (best, step 9)",
                   method=method)
    assert seen["title"] == f"protonet (best, step 9)\n{name} of the embeddings"
    assert seen["legend"] == ["support", "query", "class 0", "class 1", "class 2"]
    assert seen["markers"] == ["*", "o"]  # the markers the support and query points are drawn with


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=["022", "077", "002"])
def test_plots_and_other_outputs_follow_the_umask(tmp_path, umask):
    """Files written atomically get 0o666 less the umask, as ``open`` gives a new file."""
    import os
    import stat

    from fewshot.atomic import atomic_write_text

    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as fh:  # the reference: a file made by open()
            fh.write("x")
        png, _ = plot_embedding(*_clusters(k=3, per=2), *_clusters(k=3, per=2), tmp_path / "e.png",
                                method="pca")
        text = atomic_write_text(tmp_path / "run.json", "{}\n")
    finally:
        os.umask(old)
    want = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert want == 0o666 & ~umask
    assert stat.S_IMODE(png.stat().st_mode) == want
    assert stat.S_IMODE(text.stat().st_mode) == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.png", "plain.txt", "run.json"]
