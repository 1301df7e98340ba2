"""The supervised adapter: ordinary labelled minibatches as pairs of tasks (MLTP).

MLTP (Deng & Zhang, "Is the Meta-Learning Idea Able to Improve the Generalization of Deep
Neural Networks on the Standard Supervised Learning?", ICPR 2020, Algorithm 1) splits every
minibatch of B images into two tasks of B/2 (sec. IV-A: 128 into 2 x 64), ``task_i`` (the
inner step ``w' = w - α ∂L(f(w, x_i), y_i)/∂w``) and ``task_j`` (the outer loss
``η L(f(w', x_j), y_j)``), so it keeps the batch size of standard training.
:class:`SupervisedAdapter` yields such :class:`TaskPairBatch` es over shuffled epochs:

* epoch ``e`` visits the store in the order ``randperm(N)`` drawn from a generator seeded
  from (seed, e); minibatch ``b`` is rows ``perm[bB:(b+1)B]``, its first B/2 rows are
  task_i, the last B/2 task_j. ``drop_last=True`` (default) drops the incomplete last
  minibatch. With ``drop_last=False`` the last minibatch of B' < B rows is kept, trimmed
  to the largest multiple of 2W rows (W = ``world_size``; on one process: to an even
  count), so task_i and task_j are equally large on every rank. This drops at most 2W - 1
  rows, the last of the epoch's shuffled order (a different row each epoch); a remainder
  of fewer than 2W rows gives no minibatch. The paper is silent on an epoch's remainder, so
  this is our choice: sec. IV-A keeps MLTP's minibatches those of standard training and
  its two tasks equally large, and so does this (the learner refuses unequal halves).
* B must be even: an odd batch size is refused (``ConfigError``), since halves of unequal
  size would weight the two terms of J differently from the paper.
* sharding (``rank``, ``world_size``), like ``torch.utils.data.DistributedSampler``: every
  rank draws the same permutation (same seed and epoch) and takes the strided rows
  ``rank, rank + W, ...`` of each half, so rank r gets B/(2W) rows of task_i and B/(2W)
  rows of task_j of *the same global minibatch*; the union over ranks is the global
  minibatch and each rank's halves are still task_i / task_j. B/2 must be divisible by W.
* augmentation presets of :mod:`fewshot.data.transforms` (``"cifar"``: per-image
  standardisation, pad 4 + random crop + flip; ``"tiny"``: store mean/std, pad 8 + crop +
  flip), drawn per image from a generator seeded from (seed, epoch, batch, rank), so a
  batch's augmentation does not depend on the number of DataLoader workers.
* ``num_workers > 0`` builds batches in DataLoader worker processes (worker w builds
  minibatches w, w + W, ...; the loader returns them in order, so the stream equals the
  single-process one), pinned when CUDA is available.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from fewshot.errors import ConfigError
from fewshot.data import transforms as T
from fewshot.data.episodes import episode_seed


@dataclass
class TaskPairBatch:
    """Two half-batch tasks of one minibatch: ``(x_i, y_i)`` and ``(x_j, y_j)``, images
    (B/2, C, H, W) float, labels (B/2,) int64 store class ids."""

    x_i: Tensor
    y_i: Tensor
    x_j: Tensor
    y_j: Tensor

    def __len__(self) -> int:
        return int(self.y_i.shape[0] + self.y_j.shape[0])

    @property
    def x(self) -> Tensor:
        """The whole minibatch (task_i then task_j)."""
        return torch.cat([self.x_i, self.x_j])

    @property
    def y(self) -> Tensor:
        return torch.cat([self.y_i, self.y_j])

    def to(self, device, non_blocking: bool = False) -> "TaskPairBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                                for f in fields(self)})

    def pin_memory(self) -> "TaskPairBatch":
        return replace(self, **{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})


class _Converter:
    """Gather rows of a store and turn them into normalised float batches."""

    def __init__(self, store, augment, channels_last: bool = False, stats=None):
        self.store = store
        h, _, c = store.image_shape
        self.normalize, self.train_augment = T.resolve(augment, image_size=h)
        mean, std = stats if stats is not None else (store.mean, store.std)
        self.scale, self.shift = T.affine_coefficients(mean, std, self.normalize, c)
        self.channels_last = channels_last
        self._images = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_images"] = None
        return state

    def gather(self, rows: Tensor) -> Tensor:
        if self.store.in_memory:
            if self._images is None:
                self._images = self.store.images_tensor()
            return torch.index_select(self._images, 0, rows)
        return torch.from_numpy(np.ascontiguousarray(self.store.read(rows.numpy())))

    def __call__(self, rows: Tensor, train: bool, generator=None) -> Tensor:
        x = self.gather(rows).permute(0, 3, 1, 2)
        return T.convert(x, self.scale, self.shift, normalize=self.normalize,
                         augment=self.train_augment if train else None, generator=generator,
                         channels_last=self.channels_last)


class _Hybrid:
    """A method callable on the class (first argument the store) or on an instance (then the
    instance's augmentation preset is the default)."""

    def __init__(self, fn):
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __get__(self, obj, cls):
        return functools.partial(self.fn, obj)


class SupervisedAdapter:
    """Shuffled epochs of :class:`TaskPairBatch` es (see the module docstring).

    Args:
        store: an ImageStore (in memory or lazy).
        batch_size: B, the global minibatch (two tasks of B/2); must be even and B/2 divisible
            by ``world_size``.
        augment: a preset name ("cifar", "tiny", "episodic", "none"), None or a callable.
        seed: fixes the shuffles and augmentations.
        num_workers: DataLoader worker processes building batches (0: in this process).
        device: where batches are delivered.
        drop_last: drop the incomplete last minibatch of an epoch (else keep it, trimmed to
            equal halves: see the module docstring).
        rank, world_size: this process's share of every global minibatch.
        shuffle: False visits rows in store order (for debugging and tests).
    ``len(adapter)`` is the number of minibatches per epoch; iterating yields one epoch (the
    epoch set by :meth:`set_epoch`, else 0, 1, ... on successive passes).
    """

    def __init__(self, store, batch_size: int = 128, augment=None, seed: int = 0,
                 num_workers: int = 0, device="cpu", drop_last: bool = True,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 channels_last: bool = False, pin_memory: Optional[bool] = None):
        b, w = int(batch_size), int(world_size)
        if b < 2 or b % 2:
            raise ConfigError(f"batch_size = {batch_size}: the supervised adapter splits each "
                              "minibatch into two equal tasks (task_i, task_j), so batch_size must "
                              "be even and >= 2; use an even batch size")
        if w < 1 or not 0 <= int(rank) < w:
            raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, "
                              f"world_size={world_size}")
        if (b // 2) % w:
            raise ConfigError(f"batch_size = {b}: each half (task_i, task_j) of {b // 2} images "
                              f"must split evenly over world_size = {w} ranks; use a batch size "
                              f"divisible by {2 * w}")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        if len(store) < (b if drop_last else 2 * w):
            raise ConfigError(f"batch_size = {b} is larger than the {len(store)} images of "
                              f"store {store.dataset}/{store.split} with drop_last="
                              f"{bool(drop_last)}; lower batch_size")
        self.store = store
        self.batch_size, self.rank, self.world_size = b, int(rank), w
        self.seed, self.num_workers = int(seed), int(num_workers)
        self.device = torch.device(device)
        self.drop_last, self.shuffle = bool(drop_last), bool(shuffle)
        self.augment = augment
        self.convert = _Converter(store, augment, channels_last)
        self.pin_memory = (torch.cuda.is_available() and self.device.type == "cuda") \
            if pin_memory is None else bool(pin_memory)
        self.epoch = 0
        self._epoch_set = False

    def __len__(self) -> int:
        n = len(self.store)
        full, rest = divmod(n, self.batch_size)
        return full + int(not self.drop_last and rest >= 2 * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Use the shuffle and augmentation of ``epoch`` for the next pass."""
        self.epoch = int(epoch)
        self._epoch_set = True

    def permutation(self, epoch: int) -> Tensor:
        """The visiting order of ``epoch``."""
        n = len(self.store)
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator()
        g.manual_seed(episode_seed(self.seed, epoch, 0x5EED))
        return torch.randperm(n, generator=g)

    def rows(self, epoch: int, b: int, perm: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """This rank's (task_i rows, task_j rows) of minibatch ``b`` of ``epoch``."""
        perm = self.permutation(epoch) if perm is None else perm
        rows = perm[b * self.batch_size:(b + 1) * self.batch_size]
        rows = rows[:rows.numel() - rows.numel() % (2 * self.world_size)]  # equal halves
        half = rows.numel() // 2
        ri, rj = rows[:half], rows[half:]
        if self.world_size > 1:
            ri, rj = ri[self.rank::self.world_size], rj[self.rank::self.world_size]
        return ri, rj

    def batch(self, epoch: int, b: int, perm: Optional[Tensor] = None) -> TaskPairBatch:
        """Minibatch ``b`` of ``epoch`` (this rank's share), on the CPU."""
        ri, rj = self.rows(epoch, b, perm)
        g = torch.Generator()
        g.manual_seed(episode_seed(self.seed, epoch, b, self.rank, 0xA06))
        x = self.convert(torch.cat([ri, rj]), train=True, generator=g)
        labels = torch.as_tensor(self.store.labels, dtype=torch.int64)
        y = labels[torch.cat([ri, rj])]
        n = ri.numel()
        return TaskPairBatch(x[:n], y[:n], x[n:], y[n:])

    def __iter__(self) -> Iterator[TaskPairBatch]:
        epoch = self.epoch
        if self.num_workers > 0:
            from torch.utils.data import DataLoader

            loader = DataLoader(_EpochDataset(self, epoch), batch_size=None,
                                num_workers=self.num_workers, pin_memory=self.pin_memory)
            source = iter(loader)
        else:
            perm = self.permutation(epoch)
            source = (self.batch(epoch, b, perm) for b in range(len(self)))
        for batch in source:
            yield batch.to(self.device, non_blocking=self.pin_memory) \
                if self.device.type != "cpu" else batch
        if not self._epoch_set:
            self.epoch = epoch + 1
        self._epoch_set = False

    def batches_from(self, start_step: int, on_epoch=None) -> Iterator[TaskPairBatch]:
        """Minibatches from global step ``start_step`` on, epoch after epoch, without end.

        ``on_epoch(epoch)`` is called at each epoch start (the trainer applies its learning-rate
        milestones there). A resume inside an epoch continues with that epoch's batch
        ``start_step % len(self)`` of the same permutation, so the run sees exactly the batches
        of an uninterrupted one.
        """
        per_epoch = len(self)
        epoch, skip = divmod(int(start_step), per_epoch)
        while True:
            if on_epoch is not None:
                on_epoch(epoch)
            self.set_epoch(epoch)
            if skip:
                perm = self.permutation(epoch)  # resumed inside the epoch: its batches skip, skip+1, ...
                for b in range(skip, per_epoch):
                    yield self.batch(epoch, b, perm).to(self.device)
            else:
                yield from self
            skip = 0
            epoch += 1

    def state_dict(self) -> Dict[str, Any]:
        return {"sampler": "SupervisedAdapter", "seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or "epoch" not in state:
            raise ConfigError(f"SupervisedAdapter.load_state_dict: not an adapter state: {state!r}")
        self.seed, self.epoch = int(state.get("seed", self.seed)), int(state["epoch"])

    @_Hybrid
    def eval_batches(self, store=None, batch_size: int = 256, device="cpu", augment="default",
                     channels_last: bool = False, stats="default") -> Iterator[Tuple[Tensor, Tensor]]:
        """Every image of ``store`` once, in store order, as ``(x, y)`` batches (the last may be
        smaller), normalised as the preset ``augment`` does at test time, never augmented.

        Called on the class, ``SupervisedAdapter.eval_batches(store, 256)`` uses the store's
        mean/std unless ``augment`` names a preset (pass the training preset, e.g. "cifar",
        whose test images are per-image standardised); called on an adapter,
        ``adapter.eval_batches(test_store)`` uses the adapter's preset.

        ``stats`` = (mean, std) for presets that normalise by dataset statistics (``"tiny"``):
        the *training* set's, as MLTP normalises Tiny ImageNet's test images; it defaults to the
        adapter's training store on an instance and to ``store``'s own on the class."""
        if store is None:
            if self is None:
                raise ConfigError("eval_batches(store, batch_size): give a store")
            store = self.store
        if augment == "default":
            augment = self.augment if self is not None else None
        if isinstance(stats, str) and stats == "default":
            stats = (self.store.mean, self.store.std) if self is not None else None
        if int(batch_size) < 1:
            raise ConfigError(f"eval batch_size must be >= 1, got {batch_size}")
        conv = _Converter(store, augment, channels_last, stats=stats)
        labels = torch.as_tensor(store.labels, dtype=torch.int64)
        device = torch.device(device)
        n, bs = len(store), int(batch_size)
        for start in range(0, n, bs):
            rows = torch.arange(start, min(n, start + bs))
            x = conv(rows, train=False)
            y = labels[rows]
            if device.type != "cpu":
                x, y = x.to(device), y.to(device)
            yield x, y


class _EpochDataset(IterableDataset):
    """Minibatches ``w, w + W, ...`` of one epoch in DataLoader worker ``w`` of ``W``."""

    def __init__(self, adapter: SupervisedAdapter, epoch: int):
        self.adapter, self.epoch = adapter, epoch

    def __iter__(self):
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        perm = self.adapter.permutation(self.epoch)
        for b in range(w, len(self.adapter), nw):
            yield self.adapter.batch(self.epoch, b, perm)
