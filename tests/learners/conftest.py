"""Shared helpers for the learner tests: random episodes, a tiny backbone, glyph episodes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fewshot.data.episodes import Episode


class TinyNet(nn.Module):
    """conv3x3(8) - BN - ReLU - maxpool2 - flatten: a small backbone with ``out_features``."""

    def __init__(self, in_channels: int = 1, image_size: int = 8, hidden: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.bn = nn.BatchNorm2d(hidden)
        self.out_features = hidden * (image_size // 2) ** 2

    def forward(self, x):
        return torch.flatten(torch.max_pool2d(torch.relu(self.bn(self.conv(x))), 2), 1)


def random_episode(ways=5, shots=1, queries=3, channels=1, size=8, generator=None,
                   num_base=None, noise=0.3) -> Episode:
    """An N-way K-shot episode of Gaussian images whose class means differ.

    Class k's images are ``mean_k + noise * N(0, 1)`` so an embedding can separate them; labels
    are ordered 0..N-1 repeated per shot.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    means = torch.randn(ways, channels, size, size, generator=g)

    def part(k):
        y = torch.arange(ways).repeat_interleave(k)
        x = means[y] + noise * torch.randn(len(y), channels, size, size, generator=g)
        return x, y

    sx, sy = part(shots)
    qx, qy = part(queries)
    classes = torch.randperm(num_base or ways * 4, generator=g)[:ways]
    return Episode(sx, sy, qx, qy, classes, base_support_y=classes[sy], base_query_y=classes[qy])


@pytest.fixture
def make_episode():
    return random_episode


@pytest.fixture
def tiny_net():
    return TinyNet


class GlyphEpisodes:
    """N-way K-shot episodes drawn from generated glyphs (classes split into train/test).

    Built here from :func:`fewshot.data.sources.glyphs.generate_glyphs` so the learner tests
    depend on the data generator only, not on the samplers: images /255, normalised by the
    mean/std of the train classes, labels 0..N-1 in a random class order, ``base_*_y`` the
    class ids within the split.
    """

    def __init__(self, num_train=100, num_test=50, per_class=20, seed=0):
        from fewshot.data.sources.glyphs import generate_glyphs

        images, labels = generate_glyphs(num_train + num_test, per_class, seed=seed)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        y = torch.from_numpy(labels)
        train = y < num_train
        mean, std = x[train].mean(), x[train].std()
        x = (x - mean) / std
        self.per_class = per_class
        self.splits = {"train": (x[train], y[train]), "test": (x[~train], y[~train] - num_train)}
        self.num_classes = {"train": num_train, "test": num_test}

    def episode(self, split, classes, shots, queries, g) -> Episode:
        """The episode on ``classes`` (ids within ``split``; label = position in it) with
        ``shots`` + ``queries`` random distinct images per class drawn with generator ``g``."""
        x, _ = self.splits[split]
        k = self.per_class
        sx, sy, qx, qy = [], [], [], []
        for label, c in enumerate(classes.tolist()):
            rows = c * k + torch.randperm(k, generator=g)[:shots + queries]
            sx.append(x[rows[:shots]]), qx.append(x[rows[shots:]])
            sy += [label] * shots
            qy += [label] * queries
        sy, qy = torch.tensor(sy), torch.tensor(qy)
        return Episode(torch.cat(sx), sy, torch.cat(qx), qy, classes,
                       base_support_y=classes[sy], base_query_y=classes[qy])

    def sampler(self, split="train", ways=5, shots=1, queries=5, seed=0):
        g = torch.Generator().manual_seed(seed)

        def sample() -> Episode:
            classes = torch.randperm(self.num_classes[split], generator=g)[:ways]
            return self.episode(split, classes, shots, queries, g)

        return sample


@pytest.fixture(scope="session")
def glyphs():
    """Generated glyphs (100 train classes, 50 test classes, 20 drawings each; ~1.5 s)."""
    try:
        return GlyphEpisodes()
    except ImportError as e:
        pytest.skip(f"glyphs generator not available: {e}")


def fit_and_score(learner, glyph_data, *, steps, meta_batch=1, test_episodes=30, ways=5,
                  shots=1, queries=5):
    """Accuracy on fixed test-class episodes before and after ``steps`` training steps.

    Returns ``(before, after)``: mean query accuracy of ``learner.predict`` over
    ``test_episodes`` episodes of the test classes (never seen in training).
    """
    torch.manual_seed(0)
    train = glyph_data.sampler("train", ways, shots, queries, seed=0)
    test = glyph_data.sampler("test", ways, shots, queries, seed=1)
    test_eps = [test() for _ in range(test_episodes)]

    def acc():
        learner.eval()
        a = sum(float((learner.predict(e).argmax(1) == e.query_y).float().mean()) for e in test_eps)
        learner.train()
        return a / len(test_eps)

    before = acc()
    for _ in range(steps):
        learner.train_step([train() for _ in range(meta_batch)])
    after = acc()
    # shown with `pytest -rP`: the measured numbers the thresholds are derived from
    print(f"learning {type(learner).__name__}: before {before:.3f} after {after:.3f}")
    return before, after


@pytest.fixture
def one_thread():
    """Run a test with one intra-op thread (restored after): on the shared 2-core machine,
    OpenMP threads contending with other processes made small convolutions up to 20x
    slower. Used by the classic learners' tests through ``pytestmark``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def learn_glyphs(glyphs):
    """``learn_glyphs(learner, steps=, meta_batch=)`` -> (accuracy before, after); see
    :func:`fit_and_score`.

    Runs with one intra-op thread: on a loaded 2-core machine, OpenMP threads contending
    with other processes made these small convolutions up to 20x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield lambda learner, **kw: fit_and_score(learner, glyphs, **kw)
    finally:
        torch.set_num_threads(threads)


def _steps_agree_under_autocast(learner, batch) -> None:
    """One bf16-autocast step and one float32 step from the same weights agree: float32 loss
    within 5%, gradients with cosine similarity > 0.98 (bf16 keeps ~3 significant digits)."""
    import copy

    twin = copy.deepcopy(learner)
    full = learner.train_step(batch)
    g_full = torch.cat([p.grad.flatten() for p in learner.parameters() if p.grad is not None])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = twin.train_step(batch)
    g_low = torch.cat([p.grad.flatten() for p in twin.parameters() if p.grad is not None])
    assert low["loss"].dtype == torch.float32 and torch.isfinite(low["loss"])
    assert abs(float(low["loss"]) - float(full["loss"])) < 0.05 * max(1.0, abs(float(full["loss"])))
    cos = torch.nn.functional.cosine_similarity(g_full, g_low.float(), dim=0)
    assert cos > 0.98, float(cos)


@pytest.fixture
def steps_agree_under_autocast():
    return _steps_agree_under_autocast
