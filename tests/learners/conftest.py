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


@pytest.fixture(scope="session")
def glyph_sampler_factory(tmp_path_factory):
    """``factory(split, ways, shots, queries, seed)`` -> EpisodeSampler over glyphs."""
    try:
        from fewshot.data.episodes import EpisodeSampler
        from fewshot.data.sources.glyphs import generate_glyphs
        from fewshot.data.store import ImageStore
    except ImportError as e:
        pytest.skip(f"glyphs data or EpisodeSampler not available yet: {e}")
    root = tmp_path_factory.mktemp("glyphs")
    stores = {}

    def factory(split="train", ways=5, shots=1, queries=5, seed=0):
        if not stores:
            paths = generate_glyphs(root)
            for p in (paths if isinstance(paths, (list, tuple)) else [paths]):
                s = ImageStore.open(p, in_memory=True)
                stores[s.split] = s
        return EpisodeSampler(stores[split], ways, shots, queries, seed=seed)

    return factory
