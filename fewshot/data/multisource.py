"""Multi-source episodic training in the style of Meta-Dataset (Triantafillou et al., ICLR 2020).

Several datasets ("sources") train one learner. Every episode comes from ONE source: episode
``i`` first draws its source ``s_i`` from the source probabilities ``p``, then is episode ``i``
of that source's own sampler (N-way K-shot, any-way any-shot or Meta-Dataset variable episodes,
as configured), so its classes never mix datasets:

* ``"uniform"`` (Meta-Dataset's default): ``p_s = 1/S``;
* ``"size"``: ``p_s = K_s / Σ_t K_t`` with ``K_s`` the number of classes of source ``s``'s
  training split (classes, not images: a source's number of distinct tasks grows with its
  classes, and image counts would let one large class-poor dataset dominate).

The source is drawn by inverse transform sampling, ``s_i = min{s : u_i < Σ_{t<=s} p_t}`` with
``u_i ~ U[0, 1)`` (float64) from a generator seeded from ``(seed, i)`` on a stream of its own,
and the episode from the source sampler's generator seeded from ``(seed, i)``: episode ``i`` is
a function of ``(seed, i)`` only, so resuming needs only the episode counter
(:meth:`MultiSourceSampler.state_dict`), exactly as for one source.

Images: every source's stores are brought to the first source's image shape (size and channel
count) by :func:`fewshot.data.conform.conform_store` before the samplers are built, and each
source is normalised by its own (converted) per-channel statistics. Class ids: source ``s``'s
class ``c`` is ``c + Σ_{t<s} K_t`` in ``Episode.classes`` and ``base_*_y``, one label space over
all sources (what transfer heads index).

Validation (:func:`chained_episodes`): ``n`` fixed episodes split evenly over the sources'
val splits (counts differ by at most one, the first sources get the extra ones), each source's
episodes fixed by the seed; their mean accuracy is, for ``n`` a multiple of ``S``, the mean of
the per-source validation accuracies.
"""
from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from dataclasses import replace
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from fewshot.data.episodes import (CountedSampling, Episode, _generator, fixed_episodes,
                                   make_sampler)
from fewshot.data.store import available_splits, data_root
from fewshot.errors import ConfigError, DataError

__all__ = ["SOURCE_SAMPLING", "source_probabilities", "MultiSourceSampler", "check_source_classes",
           "chained_episodes", "split_evenly", "prepared_datasets", "check_sources_prepared"]

SOURCE_SAMPLING = ("uniform", "size")
_SOURCE_STREAM = 0x5011CE  # generator key of the source choice, apart from the episode's own


def source_probabilities(stores: Sequence, how: str) -> List[float]:
    """``p_s`` for ``how`` = "uniform" (1/S) or "size" (K_s / Σ K_t, K = classes)."""
    if how not in SOURCE_SAMPLING:
        raise ConfigError(f"data.source_sampling must be 'uniform' or 'size', got {how!r}")
    if how == "uniform":
        return [1.0 / len(stores)] * len(stores)
    k = np.array([s.num_classes for s in stores], dtype=np.float64)
    return (k / k.sum()).tolist()


def check_source_classes(stores: Sequence, ways: int, what: str) -> None:
    """One-line :class:`DataError` naming the first source whose split has fewer classes than
    ``ways`` (the source, the split and both counts)."""
    for s in stores:
        if s.num_classes < ways:
            raise DataError(f"data.dataset source '{s.dataset}': split '{s.split}' has "
                            f"{s.num_classes} classes, fewer than the {ways} ways of {what}; "
                            f"lower the ways or drop the source")


def prepared_datasets(root=None) -> List[str]:
    """Names of the datasets with at least one store under the data root."""
    base = data_root(root)
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if p.is_dir() and available_splits(p.name, root))


def check_sources_prepared(names: Sequence[str], root=None) -> None:
    """One-line :class:`DataError` for a source name with no store, listing the prepared ones."""
    known = prepared_datasets(root)
    for name in names:
        if name not in known:
            raise DataError(f"data.dataset source '{name}' is not prepared under {data_root(root)} "
                            f"(prepared: {', '.join(known) or 'none'}); run `fewshot data "
                            f"prepare {name} ...` or fix the name")


class MultiSourceSampler(CountedSampling):
    """Episodes from several sources, each episode from one (see the module docstring).

    Args:
        stores: one training store per source, all of one image shape.
        spec: the task spec of :func:`~fewshot.data.episodes.make_sampler` used for every source.
        probabilities: ``p_s``, from :func:`source_probabilities`.
        seed: episodes are a function of (seed, episode index) only.
        **options: the samplers' options (device, augment, ...).
    """

    def __init__(self, stores: Sequence, spec, probabilities: Sequence[float], seed: int = 0,
                 **options):
        if not stores:
            raise ConfigError("MultiSourceSampler needs at least one store")
        shapes = {tuple(s.image_shape) for s in stores}
        if len(shapes) > 1:
            raise DataError(f"multi-source stores have different image shapes {sorted(shapes)}; "
                            f"conform them to one shape first (fewshot.data.conform)")
        p = np.asarray(probabilities, dtype=np.float64)
        if p.shape != (len(stores),) or np.any(p < 0) or not np.isclose(p.sum(), 1.0):
            raise ConfigError(f"source probabilities {list(probabilities)} must be {len(stores)} "
                              f"non-negative numbers summing to 1")
        self.seed, self.index = int(seed), 0
        self.samplers = [make_sampler(s, spec, seed=seed, **options) for s in stores]
        self.names = [s.dataset for s in stores]
        self.probabilities = p.tolist()
        self._cumulative = np.cumsum(p)
        self._offsets = np.concatenate([[0], np.cumsum([s.num_classes for s in stores])])
        self.device = self.samplers[0].device

    def source_at(self, index: int) -> int:
        """The source of episode ``index``."""
        u = float(torch.rand(1, generator=_generator(self.seed, index, _SOURCE_STREAM),
                             dtype=torch.float64))
        s = int(np.searchsorted(self._cumulative, u, side="right"))
        return min(s, len(self.samplers) - 1)  # u < 1 = Σ p up to float rounding

    def min_ways(self) -> int:
        return min(s.min_ways() for s in self.samplers)

    def episode(self, index: int) -> Episode:
        """Episode ``index`` (does not move the counter), class ids global over the sources."""
        s = self.source_at(index)
        ep = self.samplers[s].episode(index)
        off = int(self._offsets[s])
        if off == 0:
            return ep
        return replace(ep, classes=ep.classes + off,
                       base_support_y=None if ep.base_support_y is None else ep.base_support_y + off,
                       base_query_y=None if ep.base_query_y is None else ep.base_query_y + off)

    def state_dict(self) -> Dict[str, Any]:
        """Resume point (plain data): the seed, the counter and the sources it was built on."""
        return {"sampler": "MultiSourceSampler", "seed": self.seed, "index": self.index,
                "sources": list(self.names)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or "index" not in state:
            raise ConfigError(f"MultiSourceSampler.load_state_dict: not a sampler state: {state!r}")
        if state.get("sources", self.names) != self.names:
            raise ConfigError(f"MultiSourceSampler.load_state_dict: state of sources "
                              f"{state['sources']}, this sampler reads {self.names}")
        self.seed = int(state.get("seed", self.seed))
        for sampler in self.samplers:  # a source's episode i is drawn from (seed, i) too
            sampler.seed = self.seed
        self.index = int(state["index"])

    def __repr__(self) -> str:
        parts = ", ".join(f"{n} p={p:.3f}" for n, p in zip(self.names, self.probabilities))
        return f"MultiSourceSampler([{parts}], seed={self.seed})"


class _Chain(SequenceABC):
    """Episode sequences one after another, indexable as one list."""

    def __init__(self, parts: Sequence[Sequence]):
        self.parts = list(parts)
        self._starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i) + (len(self) if int(i) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"episode {i} of {len(self)}")
        p = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.parts[p][i - int(self._starts[p])]


def split_evenly(n: int, parts: int) -> List[int]:
    """``n`` items over ``parts``: counts differing by at most one, the first ones larger."""
    return [n // parts + (1 if k < n % parts else 0) for k in range(parts)]


def chained_episodes(stores: Sequence, ways, shots, queries, n: int, seed: int, **options):
    """``n`` fixed episodes split evenly over ``stores`` (see the module docstring)."""
    counts = split_evenly(int(n), len(stores))
    return _Chain([fixed_episodes(s, ways, shots, queries, k, seed, **options)
                   for s, k in zip(stores, counts)])
