"""Episodes as tensors, and the samplers that draw them.

An :class:`Episode` is one N-way few-shot task: a support set and a query set whose labels
are remapped to ``0..N-1`` (the original class ids are kept in ``classes``).

Samplers (all seeded, all checking up front that the store can satisfy them):

* :class:`EpisodeSampler` -- N-way K-shot Q-query episodes;
* :class:`AnyWayAnyShotSampler` -- N and K drawn per episode from given sets (L2G, Table 3);
* :class:`VariableEpisodeSampler` -- Meta-Dataset variable-way variable-shot episodes;
* :class:`DisjointPairSampler` -- task pairs (T_i, T_j) with disjoint classes (L2G, Alg. 1);
* :func:`fixed_episodes` -- a fixed list of evaluation episodes (index lists, materialised
  on access); :class:`EpisodeDataset` / :func:`episode_loader` -- DataLoader workers.

Episode ``i`` of a sampler with seed ``s`` is a function of ``(s, i)`` only: one gather of
its ``support + query`` rows from the store's uint8 ``(N, H, W, C)`` images
(``torch.index_select`` in memory, one sorted ``store.read`` when lazy), converted to float
``(x/255 - mean_c)/std_c`` in ``(B, C, H, W)``.
"""
from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from fewshot.data import transforms as T
from fewshot.errors import ConfigError, DataError, unknown_name


@dataclass
class Episode:
    """One N-way task.

    Attributes:
        support_x: (S, C, H, W) float images of the support set.
        support_y: (S,) int64 labels in ``0..ways-1``.
        query_x: (Q, C, H, W) float images of the query set.
        query_y: (Q,) int64 labels in ``0..ways-1``.
        classes: (ways,) int64 ids of the store's classes, ``classes[k]`` is label ``k``
            (kept on the host by :meth:`to`).
        base_support_y / base_query_y: optional (S,) / (Q,) labels in the store's own class
            ids (used by MTL's transfer head and the transfer baseline).
        checked: the labels were checked on the host when the episode was made (labels in
            ``0..ways-1``, at least one support example per class; the samplers do this before
            the copy to the device), so learners need not read them again.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    classes: Tensor
    base_support_y: Optional[Tensor] = None
    base_query_y: Optional[Tensor] = None
    checked: bool = False

    @property
    def ways(self) -> int:
        return int(self.classes.numel())

    @property
    def shots(self) -> Tensor:
        """(ways,) number of support examples per class (may differ per class)."""
        return torch.bincount(self.support_y, minlength=self.ways)

    def to(self, device, non_blocking: bool = False) -> "Episode":
        """The same episode with every tensor on ``device``, except ``classes``: the store ids
        are bookkeeping that checks read on the host (e.g. L2G's disjoint-pair check), so they
        stay there and reading them never waits for the device."""
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "classes" or not isinstance(v, Tensor):
                continue
            moved[f.name] = v.to(device, non_blocking=non_blocking)
        return replace(self, **moved)

    def pin_memory(self) -> "Episode":
        """The same episode in pinned host memory (used by ``DataLoader(pin_memory=True)``)."""
        pinned = {}
        for f in fields(self):
            v = getattr(self, f.name)
            pinned[f.name] = v.pin_memory() if isinstance(v, Tensor) else v
        return replace(self, **pinned)


def _check_plan_labels(plan: "EpisodePlan") -> None:
    """The label checks every learner needs, on the host before the copy (numpy, no tensor
    ops): labels in 0..ways-1 and at least one support example per class."""
    ways = int(plan.classes.numel())
    ys, yq = plan.support_y.numpy(), plan.query_y.numpy()
    for part, y in (("support", ys), ("query", yq)):
        if y.size and (y.min() < 0 or y.max() >= ways):
            raise DataError(f"sampler made {part} labels {y.min()}..{y.max()} for a {ways}-way "
                            f"episode (a bug in the sampler: please report it)")
    if ways and not np.bincount(ys, minlength=ways).all():
        raise DataError(f"sampler made a {ways}-way episode with a class without support "
                        f"examples (a bug in the sampler: please report it)")


# ---------------------------------------------------------------------------- samplers
#
# Every sampler draws episode ``i`` from its own torch.Generator seeded from (seed, i) (a
# splitmix64 hash), so: the same seed gives the same episodes on any machine and in any
# number of DataLoader workers; resuming needs only the episode counter (``state_dict``);
# ``fixed_episodes`` can re-create any episode from its index lists.

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def episode_seed(*keys: int) -> int:
    """A 63-bit seed hashed from integer keys (e.g. (seed, episode index))."""
    h = 0x243F6A8885A308D3
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return h >> 1


def _generator(*keys: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(episode_seed(*keys))
    return g


@dataclass
class EpisodePlan:
    """The index lists of one episode (what :func:`fixed_episodes` keeps in memory): store
    rows of the support and query images (class-major: class 0's rows first) and their
    episode labels; ``classes[k]`` is the store class of label ``k``."""

    classes: Tensor
    support_rows: Tensor
    support_y: Tensor
    query_rows: Tensor
    query_y: Tensor
    rows: Optional[Tensor] = None  # support_rows then query_rows in one tensor (gather order)


def _store_name(store) -> str:
    path = getattr(store, "path", None)
    where = f" ({path})" if path is not None else ""
    return f"store {getattr(store, 'dataset', '?')}/{getattr(store, 'split', '?')}{where}"


class EpisodeSpecError(ConfigError, DataError):
    """An episode request the store cannot satisfy (both a ConfigError and a DataError)."""


def _as_ints(name: str, v) -> Tuple[int, ...]:
    vals = tuple(int(x) for x in (v if isinstance(v, (list, tuple, range)) else [v]))
    if not vals:
        raise ConfigError(f"{name} must name at least one value")
    for x in vals:
        if x < 1:
            raise ConfigError(f"{name} must be >= 1, got {x}")
    return vals


class CountedSampling(abc.ABC):
    """The counter over ``self.episode(index)`` that every episode sampler shares (the
    single-store samplers here and :class:`~fewshot.data.multisource.MultiSourceSampler`):
    ``sample`` returns episode ``self.index`` and moves the counter, so the counter alone is
    the resume point."""

    index: int

    @abc.abstractmethod
    def episode(self, index: int) -> Episode:
        """Episode number ``index``, a function of (seed, index) only."""

    def sample(self) -> Episode:
        """The next episode."""
        ep = self.episode(self.index)
        self.index += 1
        return ep

    def sample_batch(self, n: int) -> List[Episode]:
        """The next ``n`` episodes (one meta-batch)."""
        return [self.sample() for _ in range(int(n))]

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()


class _Sampler(CountedSampling):
    """Shared machinery: store access, seeding, gather-and-convert, state, iteration.

    Args (common to every sampler):
        store: an :class:`~fewshot.data.store.ImageStore` (in memory, lazy, or a union).
        seed: episodes are a function of (seed, episode index) only.
        device: where the episode tensors are delivered.
        normalize: normalise by the store's per-channel mean/std (else only ``/255``).
        augment: None, a preset name of :mod:`fewshot.data.transforms` ("episodic", ...)
            or a callable on float (B, C, H, W) batches in [0, 1]; applied to support and
            query images alike, per image, seeded by the episode.
        channels_last: deliver images in ``torch.channels_last`` memory format (the store's
            NHWC layout, so the conversion needs no transpose).
        deliver: "float" converts on the host and moves float tensors; "uint8" moves the
            gathered uint8 bytes (4x fewer) and converts on ``device`` (for GPUs); "auto"
            (default) picks "uint8" for non-CPU devices.
    """

    def __init__(self, store, *, seed: int = 0, device="cpu", normalize: bool = True,
                 augment=None, channels_last: bool = False, deliver: str = "auto"):
        self.store = store
        self.seed = int(seed)
        self.index = 0
        self.device = torch.device(device)
        if deliver not in ("auto", "float", "uint8"):
            raise ConfigError(f"deliver must be 'auto', 'float' or 'uint8', got {deliver!r}")
        self.deliver = ("uint8" if self.device.type != "cpu" else "float") if deliver == "auto" \
            else deliver
        self.channels_last = bool(channels_last)
        h, w, c = store.image_shape
        mode, aug = T.resolve(augment, image_size=h)
        self.normalize_mode = mode if normalize else "none"
        self.augment = aug
        self._scale, self._shift = T.affine_coefficients(store.mean, store.std,
                                                         self.normalize_mode, c)
        self._dev_coeffs = None
        self.offsets = torch.as_tensor(np.asarray(store.class_offsets), dtype=torch.int64)
        self.counts = self.offsets[1:] - self.offsets[:-1]
        self._max_count = int(self.counts.max()) if self.counts.numel() else 0
        self._uniform = bool(self.counts.numel()) and bool(torch.all(self.counts == self._max_count))
        self._counts_np = self.counts.numpy()
        self._offsets_np = self.offsets.numpy()
        self._slots_np = np.arange(self._max_count)
        self._images = None

    # -- store access
    def _image_tensor(self) -> Optional[Tensor]:
        if not self.store.in_memory:
            return None
        if self._images is None:
            self._images = self.store.images_tensor()
        return self._images

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_images"] = None  # re-derived (shared memory) from the store in the worker
        state["_dev_coeffs"] = None
        return state

    def _check_count(self, name: str, need: int, exclude_classes: int = 0) -> None:
        k = self.store.num_classes - exclude_classes
        if need > k:
            raise EpisodeSpecError(
                f"{name}: {need} classes requested but {_store_name(self.store)} has "
                f"{self.store.num_classes} classes" +
                (f" ({exclude_classes} taken by the other task of a disjoint pair)"
                 if exclude_classes else "") + "; lower the ways or use a larger split")

    def _check_images(self, name: str, need: int, what: str) -> None:
        short = torch.nonzero(self.counts < need).flatten()
        if short.numel():
            c = int(short[0])
            raise EpisodeSpecError(
                f"{name}: {what} = {need} images per class, but class '{self.store.class_names[c]}' "
                f"(id {c}) of {_store_name(self.store)} has only {int(self.counts[c])} "
                f"({short.numel()} classes have fewer than {need}); lower shots/queries")

    # -- drawing
    def _choose_classes(self, g: torch.Generator, ways: int,
                        exclude: Optional[Tensor] = None) -> Tensor:
        k = self.store.num_classes
        if exclude is None or exclude.numel() == 0:
            return torch.randperm(k, generator=g)[:ways]
        keep = torch.ones(k, dtype=torch.bool)
        keep[exclude] = False
        avail = torch.nonzero(keep).flatten()
        if avail.numel() < ways:
            raise EpisodeSpecError(
                f"{ways}-way episode: only {avail.numel()} of the {k} classes of "
                f"{_store_name(self.store)} are not taken by the other task of a disjoint pair; "
                "lower the ways")
        return avail[torch.randperm(avail.numel(), generator=g)[:ways]]

    def _draw_rows(self, g: torch.Generator, classes: Tensor, shots, queries) -> EpisodePlan:
        """Distinct rows per class: ``shots[k]`` support then ``queries[k]`` query rows of
        class ``classes[k]``, by one vectorised random ranking (no per-image loop): keys
        ``u ~ U[0,1)`` (float32, torch generator) for every image slot of each class, slots
        past the class size masked out, and the ``shots + queries`` smallest keys taken in
        ascending order (a stable sort: ties go to the lower slot, the same on every machine).
        ``shots``/``queries`` are ints (the same for every class) or (N,) tensors. The index
        arithmetic runs in numpy (small arrays: far less overhead per operation than torch)."""
        n = classes.numel()
        cls = classes.numpy()
        counts = self._counts_np[cls]
        width = self._max_count if self._uniform else int(counts.max())
        kmax = shots + queries if isinstance(shots, int) and isinstance(queries, int) else \
            int(np.max(np.asarray(shots) + np.asarray(queries)))
        order = self._smallest(torch.rand(n, width, generator=g).numpy(), counts, kmax)
        if isinstance(shots, int) and isinstance(queries, int):
            rows = order + self._offsets_np[cls][:, None]
            flat = np.concatenate([rows[:, :shots].reshape(-1), rows[:, shots:].reshape(-1)])
            s_y = np.repeat(np.arange(n), shots)
            q_y = np.repeat(np.arange(n), queries)
        else:
            shots = np.broadcast_to(np.asarray(shots, dtype=np.int64), (n,))
            queries = np.broadcast_to(np.asarray(queries, dtype=np.int64), (n,))
            need = shots + queries
            rows = order + self._offsets_np[cls][:, None]
            col = np.arange(rows.shape[1])[None, :]
            s_mask = col < shots[:, None]
            q_mask = (col >= shots[:, None]) & (col < need[:, None])
            labels = np.broadcast_to(np.arange(n)[:, None], rows.shape)
            flat = np.concatenate([rows[s_mask], rows[q_mask]])
            s_y, q_y = labels[s_mask], labels[q_mask]
        all_rows = torch.from_numpy(flat.astype(np.int64, copy=False))
        k = s_y.size
        return EpisodePlan(classes=classes, support_rows=all_rows[:k],
                           support_y=torch.from_numpy(np.ascontiguousarray(s_y, dtype=np.int64)),
                           query_rows=all_rows[k:],
                           query_y=torch.from_numpy(np.ascontiguousarray(q_y, dtype=np.int64)),
                           rows=all_rows)

    def _smallest(self, keys: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
        """Slots of the ``k`` smallest keys of each row, ascending, among the first
        ``counts[row]`` slots. float32 ``U[0,1)`` keys are multiples of 2^-24, so
        ``key * 2^24 * width + slot`` is an exact integer key that breaks ties by slot: the
        selection is unique, whatever partition algorithm numpy uses on this machine."""
        n, width = keys.shape
        ik = (keys * np.float32(1 << 24)).astype(np.int64)  # exact: 24-bit integers
        ik *= width
        ik += self._slots_np[:width][None, :]
        if not self._uniform:
            ik[self._slots_np[:width][None, :] >= counts[:, None]] = np.iinfo(np.int64).max
        if k < width:
            part = np.argpartition(ik, k - 1, axis=1)[:, :k]
        else:
            part = np.broadcast_to(self._slots_np[:width][None, :], (n, width))
        vals = np.take_along_axis(ik, part, axis=1)
        return np.take_along_axis(part, np.argsort(vals, axis=1), axis=1)

    @abc.abstractmethod
    def plan(self, g: torch.Generator, exclude: Optional[Tensor] = None) -> EpisodePlan:
        """The index lists of one episode drawn from ``g`` (classes in ``exclude`` barred)."""

    @abc.abstractmethod
    def min_ways(self) -> int:
        """The fewest classes one episode of this sampler can have."""

    # -- materialising
    def _coeffs(self, device):
        if device.type == "cpu":
            return self._scale, self._shift
        if self._dev_coeffs is None or self._dev_coeffs[0].device != device:
            self._dev_coeffs = (self._scale.to(device), self._shift.to(device))
        return self._dev_coeffs

    def gather(self, rows: Tensor) -> Tensor:
        """uint8 (n, H, W, C) images of store rows (in-memory: one ``index_select``; lazy: one
        sorted read through ``store.read``)."""
        images = self._image_tensor()
        if images is not None:
            return torch.index_select(images, 0, rows)
        return torch.from_numpy(np.ascontiguousarray(self.store.read(rows.numpy())))

    def materialize(self, plan: EpisodePlan, g: Optional[torch.Generator] = None) -> Episode:
        """Gather, convert and split one episode: support and query in one gather."""
        rows = plan.rows if plan.rows is not None else \
            torch.cat([plan.support_rows, plan.query_rows])
        x = self.gather(rows).permute(0, 3, 1, 2)  # (n, C, H, W) view of NHWC bytes
        target = self.device
        if self.deliver == "uint8" and target.type != "cpu":
            x = x.pin_memory().to(target, non_blocking=True) if torch.cuda.is_available() and \
                target.type == "cuda" else x.to(target)
        scale, shift = self._coeffs(x.device)
        x = T.convert(x, scale, shift, normalize=self.normalize_mode, augment=self.augment,
                      generator=g, channels_last=self.channels_last)
        s = plan.support_rows.numel()
        sx, qx = x[:s], x[s:]
        base = plan.classes.numpy()  # store ids of the episode labels (numpy: cheap)
        _check_plan_labels(plan)
        ep = Episode(support_x=sx, support_y=plan.support_y, query_x=qx, query_y=plan.query_y, checked=True,
                     classes=plan.classes,
                     base_support_y=torch.from_numpy(base[plan.support_y.numpy()]),
                     base_query_y=torch.from_numpy(base[plan.query_y.numpy()]))
        if ep.support_x.device != target or ep.support_y.device != target:
            ep = ep.to(target, non_blocking=True)
        return ep

    # -- public sampling API
    def plan_at(self, index: int) -> EpisodePlan:
        """The index lists of episode ``index`` of this sampler's sequence."""
        return self.plan(_generator(self.seed, index))

    def episode(self, index: int) -> Episode:
        """Episode ``index`` of this sampler's sequence (does not move the counter)."""
        g = _generator(self.seed, index)
        return self.materialize(self.plan(g), g)

    def state_dict(self) -> Dict[str, Any]:
        """Resume point: ``{"seed", "index"}`` (plain ints, safe for ``weights_only`` loads)."""
        return {"sampler": type(self).__name__, "seed": self.seed, "index": self.index}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or "index" not in state:
            raise ConfigError(f"{type(self).__name__}.load_state_dict: not a sampler state: "
                              f"{state!r}")
        self.seed = int(state.get("seed", self.seed))
        self.index = int(state["index"])


class EpisodeSampler(_Sampler):
    """N-way K-shot episodes with Q queries per class (Vinyals et al., 2016; Snell et al.,
    2017): ``ways`` classes drawn uniformly without replacement from the store's classes,
    then ``shots + queries`` distinct images of each class, uniformly without replacement;
    the first ``shots`` form the support set, the rest the query set, so no query image is
    in the support. Labels are remapped to ``0..ways-1`` in the order the classes were
    drawn; ``base_*_y`` keep the store's class ids. Support and query are class-major
    (class 0's images first). See :class:`_Sampler` for the common options.
    """

    def __init__(self, store, ways: int, shots: int, queries: int, seed: int = 0, device="cpu",
                 normalize: bool = True, augment=None, channels_last: bool = False,
                 deliver: str = "auto"):
        super().__init__(store, seed=seed, device=device, normalize=normalize, augment=augment,
                         channels_last=channels_last, deliver=deliver)
        (self.ways,), (self.shots,) = _as_ints("ways", ways), _as_ints("shots", shots)
        self.queries = int(queries)
        if self.queries < 0:
            raise ConfigError(f"queries must be >= 0, got {queries}")
        self._check_count(f"{self.ways}-way episodes", self.ways)
        self._check_images(f"{self.ways}-way {self.shots}-shot {self.queries}-query episodes",
                           self.shots + self.queries, "shots + queries")

    def min_ways(self) -> int:
        return self.ways

    def plan(self, g, exclude=None):
        classes = self._choose_classes(g, self.ways, exclude)
        return self._draw_rows(g, classes, self.shots, self.queries)

    def __repr__(self) -> str:
        return (f"EpisodeSampler({_store_name(self.store)}, ways={self.ways}, shots={self.shots}, "
                f"queries={self.queries}, seed={self.seed})")


class AnyWayAnyShotSampler(_Sampler):
    """Any-way any-shot episodes (Lee et al., *Learning to Generalize to Unseen Tasks with
    Bilevel Optimization*, Table 3): per episode the number of classes N is drawn uniformly
    from ``ways`` and the number of shots K uniformly from ``shots`` (the same K for all N
    classes of the episode), then an N-way K-shot episode with ``queries`` queries per class
    is drawn as by :class:`EpisodeSampler`. The paper's sets are ways {5, 7, 10} and shots
    {1, 5, 10}; give one value to vary only the other ("any-shot" or "any-way")."""

    def __init__(self, store, ways=(5, 7, 10), shots=(1, 5, 10), queries: int = 15,
                 seed: int = 0, device="cpu", normalize: bool = True, augment=None,
                 channels_last: bool = False, deliver: str = "auto"):
        super().__init__(store, seed=seed, device=device, normalize=normalize, augment=augment,
                         channels_last=channels_last, deliver=deliver)
        self.ways_set, self.shots_set = _as_ints("ways", ways), _as_ints("shots", shots)
        self.queries = int(queries)
        if self.queries < 0:
            raise ConfigError(f"queries must be >= 0, got {queries}")
        self._check_count(f"any-way episodes of up to {max(self.ways_set)} ways",
                          max(self.ways_set))
        self._check_images(f"any-shot episodes of up to {max(self.shots_set)} shots and "
                           f"{self.queries} queries", max(self.shots_set) + self.queries,
                           "shots + queries")

    def min_ways(self) -> int:
        return min(self.ways_set)

    def plan(self, g, exclude=None):
        n = self.ways_set[int(torch.randint(len(self.ways_set), (1,), generator=g))]
        k = self.shots_set[int(torch.randint(len(self.shots_set), (1,), generator=g))]
        classes = self._choose_classes(g, n, exclude)
        return self._draw_rows(g, classes, k, self.queries)

    def __repr__(self) -> str:
        return (f"AnyWayAnyShotSampler({_store_name(self.store)}, ways={self.ways_set}, "
                f"shots={self.shots_set}, queries={self.queries}, seed={self.seed})")


class VariableEpisodeSampler(_Sampler):
    """Meta-Dataset variable-way variable-shot episodes (Triantafillou et al., ICLR 2020,
    sec. 3.2 "Episode sampling"), for a set of classes C of the split:

    * ways: ``N ~ U{min_ways, ..., min(max_ways, |C|)}`` and N classes uniformly;
    * queries per class (the same for all): ``q = min(max_query_per_class,
      min_c floor(0.5 |Im(c)|))``;
    * support budget: ``|S| = min(max_support_size, Σ_c ceil(β min(max_support_per_class,
      |Im(c)| - q)))`` with ``β ~ U(0, 1]``;
    * shots: ``R_c = exp(α_c) |Im(c)| / Σ_c' exp(α_c') |Im(c')|`` with
      ``α_c ~ U[log 0.5, log 2)``, and ``k_c = min(floor(R_c (|S| - N)) + 1, |Im(c)| - q)``;
      here also ``k_c <= max_support_per_class`` (Meta-Dataset caps only each class's
      contribution to the budget; this cap makes "at most 100 shots per class" a guarantee).

    So ``Σ_c k_c <= |S| <= max_support_size``, every class has >= 1 shot, and no query image is
    in the support. Every class of the split needs >= 2 images. Defaults are Meta-Dataset's:
    ways in [5, 50], <= 500 support images, <= 100 per class, <= 10 queries per class.
    """

    def __init__(self, store, min_ways: int = 5, max_ways: int = 50, max_support_size: int = 500,
                 max_support_per_class: int = 100, max_query_per_class: int = 10,
                 seed: int = 0, device="cpu", normalize: bool = True, augment=None,
                 channels_last: bool = False, deliver: str = "auto"):
        super().__init__(store, seed=seed, device=device, normalize=normalize, augment=augment,
                         channels_last=channels_last, deliver=deliver)
        self.min_ways_, self.max_ways = int(min_ways), int(max_ways)
        self.max_support_size = int(max_support_size)
        self.max_support_per_class = int(max_support_per_class)
        self.max_query_per_class = int(max_query_per_class)
        if not 1 <= self.min_ways_ <= self.max_ways:
            raise ConfigError(f"need 1 <= min_ways <= max_ways, got min_ways={min_ways}, "
                              f"max_ways={max_ways}")
        if self.max_support_size < self.max_ways:
            raise ConfigError(f"max_support_size={max_support_size} is below max_ways={max_ways}: "
                              "every class needs at least one support image")
        if self.max_support_per_class < 1 or self.max_query_per_class < 1:
            raise ConfigError("max_support_per_class and max_query_per_class must be >= 1")
        self._check_count(f"variable episodes of at least {self.min_ways_} ways", self.min_ways_)
        self._check_images("variable (Meta-Dataset) episodes", 2,
                           "one support and one query needs")

    def min_ways(self) -> int:
        return self.min_ways_

    def plan(self, g, exclude=None):
        avail = self.store.num_classes - (0 if exclude is None else int(exclude.numel()))
        hi = min(self.max_ways, avail)
        if hi < self.min_ways_:
            raise EpisodeSpecError(f"variable episodes need >= {self.min_ways_} classes but only "
                                   f"{avail} of {_store_name(self.store)} are free")
        n = int(torch.randint(self.min_ways_, hi + 1, (1,), generator=g))
        classes = self._choose_classes(g, n, exclude)
        counts = self.counts[classes]
        q = min(self.max_query_per_class, int((counts // 2).min()))
        beta = 1.0 - float(torch.rand(1, generator=g))  # U(0, 1]
        contrib = torch.clamp(counts - q, max=self.max_support_per_class).double()
        budget = min(self.max_support_size, int(torch.ceil(beta * contrib).sum()))
        lo, hi_w = math.log(0.5), math.log(2.0)
        alpha = lo + (hi_w - lo) * torch.rand(n, generator=g, dtype=torch.float64)
        r = torch.exp(alpha) * counts.double()
        r = r / r.sum()
        shots = torch.floor(r * (budget - n)).long() + 1
        shots = torch.minimum(shots, counts - q).clamp(max=self.max_support_per_class)
        return self._draw_rows(g, classes, shots, q)

    def __repr__(self) -> str:
        return (f"VariableEpisodeSampler({_store_name(self.store)}, ways=[{self.min_ways_}, "
                f"{self.max_ways}], support<={self.max_support_size} (<={self.max_support_per_class}"
                f"/class), queries<={self.max_query_per_class}/class, seed={self.seed})")


def make_sampler(store, spec, **options) -> _Sampler:
    """A sampler from a spec: a sampler (returned as is), or a dict ``{"ways", "shots",
    "queries"}`` (lists/tuples of ways or shots -> :class:`AnyWayAnyShotSampler`, else
    :class:`EpisodeSampler`), or ``{"variable": True, ...}`` (the other keys are
    :class:`VariableEpisodeSampler`'s options), or a tuple ``(ways, shots, queries)``."""
    if isinstance(spec, _Sampler):
        return spec
    if isinstance(spec, (tuple, list)) and len(spec) == 3:
        spec = dict(zip(("ways", "shots", "queries"), spec))
    if not isinstance(spec, dict):
        raise ConfigError(f"a sampler spec is a sampler, a dict or (ways, shots, queries); got "
                          f"{spec!r}")
    spec = dict(spec)
    if spec.pop("variable", False):
        return VariableEpisodeSampler(store, **spec, **options)
    known = {"ways", "shots", "queries"}
    extra = set(spec) - known
    if extra:
        raise ConfigError(f"sampler spec: {unknown_name('key', sorted(extra)[0], known)}")
    missing = known - set(spec)
    if missing:
        raise ConfigError(f"sampler spec {spec!r} lacks {', '.join(sorted(missing))}")
    ways, shots = spec["ways"], spec["shots"]
    if isinstance(ways, (list, tuple)) or isinstance(shots, (list, tuple)):
        return AnyWayAnyShotSampler(store, ways=ways, shots=shots, queries=spec["queries"],
                                    **options)
    return EpisodeSampler(store, ways, shots, spec["queries"], **options)


class DisjointPairSampler:
    """Pairs of tasks (T_i, T_j) whose classes never overlap (Lee et al., L2G, Algorithm 1:
    "we sample the second task T_j from a disjoint set of classes to the classes in T_i").

    ``DisjointPairSampler(store, first, second, seed=0, **options)`` with ``first`` and
    ``second`` specs for :func:`make_sampler` (e.g. T_i 5-way 5-shot
    ``{"ways": 5, "shots": 5, "queries": 15}``, T_j any-way any-shot
    ``{"ways": [5, 7, 10], "shots": [1, 5, 10], "queries": 15}``, as the paper's Table 3),
    or ``DisjointPairSampler(first_sampler, second_sampler, seed=0)`` with two samplers on
    one store. Pair ``i`` draws T_i, then T_j from the classes not in T_i, both from one
    generator seeded from (seed, i). Checked up front: the store must have at least
    ``max ways of T_i + max ways of T_j`` classes, except that a variable (Meta-Dataset) T_j
    needs only its ``min_ways`` more, since its N is capped by the classes left, as in
    Meta-Dataset.
    """

    def __init__(self, store, first=None, second=None, seed: int = 0, **options):
        if isinstance(store, _Sampler):
            if not isinstance(first, _Sampler) or second is not None:
                raise ConfigError("DisjointPairSampler(first_sampler, second_sampler, seed=...) "
                                  "needs two samplers")
            store, first, second = store.store, store, first
        if first is None or second is None:
            raise ConfigError("DisjointPairSampler needs two task specs (first, second)")
        self.store = store
        self.seed = int(seed)
        self.index = 0
        self.first = make_sampler(store, first, seed=seed, **options)
        self.second = make_sampler(store, second, seed=seed, **options)
        if self.first.store is not self.second.store:
            raise ConfigError("DisjointPairSampler: both samplers must draw from the same store")
        need = self.first.min_ways() + self.second.min_ways()
        if need > store.num_classes:
            raise EpisodeSpecError(
                f"disjoint task pairs need {self.first.min_ways()} + {self.second.min_ways()} = "
                f"{need} distinct classes but {_store_name(store)} has {store.num_classes}; "
                "lower the ways of T_i or T_j or use a larger split")
        most = self._max_ways(self.first) + (self.second.min_ways() if isinstance(
            self.second, VariableEpisodeSampler) else self._max_ways(self.second))
        if most > store.num_classes:
            raise EpisodeSpecError(
                f"disjoint task pairs: T_i of up to {self._max_ways(self.first)} ways plus T_j of "
                f"up to {self._max_ways(self.second)} ways can exceed the {store.num_classes} "
                f"classes of {_store_name(store)}; lower the ways (a variable T_j is capped to the "
                "classes left, a variable T_i is not)")

    @staticmethod
    def _max_ways(s: _Sampler) -> int:
        if isinstance(s, EpisodeSampler):
            return s.ways
        if isinstance(s, AnyWayAnyShotSampler):
            return max(s.ways_set)
        return min(s.max_ways, s.store.num_classes)

    def pair(self, index: int) -> Tuple[Episode, Episode]:
        """Pair ``index`` of this sampler's sequence (does not move the counter)."""
        g = _generator(self.seed, index, 0x5A17)
        pi = self.first.plan(g)
        pj = self.second.plan(g, exclude=pi.classes)
        return self.first.materialize(pi, g), self.second.materialize(pj, g)

    def sample(self) -> Tuple[Episode, Episode]:
        """The next (T_i, T_j)."""
        out = self.pair(self.index)
        self.index += 1
        return out

    def sample_batch(self, n: int) -> List[Tuple[Episode, Episode]]:
        """The next ``n`` pairs (one meta-batch)."""
        return [self.sample() for _ in range(int(n))]

    def __iter__(self):
        while True:
            yield self.sample()

    def state_dict(self) -> Dict[str, Any]:
        return {"sampler": "DisjointPairSampler", "seed": self.seed, "index": self.index}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or "index" not in state:
            raise ConfigError(f"DisjointPairSampler.load_state_dict: not a sampler state: {state!r}")
        self.seed = int(state.get("seed", self.seed))
        self.index = int(state["index"])


class FixedEpisodes(Sequence):
    """A fixed, reproducible list of episodes: the index lists of every episode are kept
    (a few integers per image), the images are gathered and converted on access, so 600
    20-way 5-shot episodes cost kilobytes, not gigabytes. ``eps[i]`` is always the same
    episode; two learners given the same (store, ways, shots, queries, n, seed) see exactly
    the same episodes."""

    def __init__(self, sampler: _Sampler, n: int, seed: int):
        self.sampler = sampler
        self.seed = int(seed)
        self.plans = [sampler.plan(_generator(self.seed, i, 0xE7A1)) for i in range(int(n))]

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"episode {i} of {len(self)}")
        return self.sampler.materialize(self.plans[i], _generator(self.seed, i, 0xE7A2))

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


def fixed_episodes(store, ways=None, shots=None, queries=None, n: int = 600, seed: int = 0,
                   **options) -> FixedEpisodes:
    """``n`` evaluation episodes fixed by ``seed`` (see :class:`FixedEpisodes`).

    ``store`` may be a store (then ``ways``/``shots``/``queries`` as for :func:`make_sampler`:
    ints for N-way K-shot, lists for any-way any-shot) or a sampler (its kind and options,
    with episodes fixed by ``seed`` rather than the sampler's own). Options (device,
    normalize, channels_last, ...) go to the sampler; augmentation is off by default."""
    if isinstance(store, _Sampler):
        sampler = store
    else:
        if ways is None or shots is None or queries is None:
            raise ConfigError("fixed_episodes(store, ways, shots, queries, n, seed) needs ways, "
                              "shots and queries")
        sampler = make_sampler(store, {"ways": ways, "shots": shots, "queries": queries},
                               seed=seed, **options)
    if int(n) < 0:
        raise ConfigError(f"fixed_episodes: n must be >= 0, got {n}")
    return FixedEpisodes(sampler, n, seed)


class EpisodeDataset(IterableDataset):
    """Episodes of a sampler for ``torch.utils.data.DataLoader`` workers.

    Worker ``w`` of ``W`` produces episodes ``start + w, start + w + W, ...``; the DataLoader
    returns workers' items round-robin, so the stream is episode ``start, start+1, ...``
    exactly as without workers (same seed, same episodes, whatever ``num_workers``). The
    sampler (with its store) is inherited by forked workers: an in-memory store's image
    array is shared copy-on-write and never written, so it is not duplicated per worker
    (with the "spawn" start method the store's tensor is moved to shared memory by torch's
    reductions); lazy stores reopen their HDF5 file in each worker. Use with
    ``DataLoader(dataset, batch_size=None, num_workers=W)`` (see :func:`episode_loader`);
    keep the sampler's device "cpu" inside workers and move episodes in the main process.
    """

    def __init__(self, sampler, length: Optional[int] = None, start: int = 0):
        self.sampler, self.length, self.start = sampler, length, int(start)

    def __iter__(self):
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        i = self.start + w
        stop = None if self.length is None else self.start + self.length
        fetch = self.sampler.pair if isinstance(self.sampler, DisjointPairSampler) else \
            self.sampler.episode
        while stop is None or i < stop:
            yield fetch(i)
            i += nw


def episode_loader(sampler, num_workers: int = 2, length: Optional[int] = None,
                   pin_memory: Optional[bool] = None, prefetch_factor: int = 2):
    """A DataLoader over :class:`EpisodeDataset` starting at the sampler's counter (the counter
    is not moved; call ``sampler.load_state_dict`` to resume elsewhere)."""
    from torch.utils.data import DataLoader

    if getattr(sampler, "device", torch.device("cpu")) != torch.device("cpu"):
        raise ConfigError("episode_loader: build the sampler with device='cpu' and move episodes "
                          "with episode.to(device) in the main process")
    pin = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
    kw = {"prefetch_factor": prefetch_factor} if num_workers > 0 else {}
    return DataLoader(EpisodeDataset(sampler, length, sampler.index), batch_size=None,
                      num_workers=int(num_workers), pin_memory=pin, **kw)
