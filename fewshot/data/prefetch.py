"""One batch ahead: the feed of training batches to the device.

:class:`BatchFeed` wraps a producer (``produce() -> batch``, e.g. a meta-batch drawn from an
episode sampler that targets the device). With ``prefetch`` on, batch k+1 is produced by one
worker thread while the caller runs step k; on CUDA the worker issues its host gather, pinned
copy (``non_blocking=True``) and on-device conversion on a side stream, and the consumer's
stream waits on an event recorded after them, so the copy overlaps the step without any host
synchronisation. Tensors made on the side stream are ``record_stream``-ed on the consumer's
stream, so the caching allocator never hands their memory out while the step still reads it.

Resume stays exact: the feed remembers the producer's state (``state()``, e.g. the sampler's
``state_dict``) *before* each batch it produced, and :meth:`BatchFeed.state_dict` returns the
state of the first batch not yet consumed, so a checkpoint written after step k resumes at
batch k+1 even though k+1 was already drawn. This needs a producer whose batches depend only on
its own state (the episode samplers seed every episode from ``(seed, index)``), which is why
the trainer prefetches episodic batches and not the supervised adapter's epoch iterator (its
epoch boundaries apply learning-rate milestones).

Without CUDA the default is no prefetch: on a CPU the worker would compete with the step for
the same cores.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional

import torch

__all__ = ["BatchFeed", "tensors_in"]


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside ``obj`` (tensors, lists, tuples, dicts and dataclasses, nested)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from tensors_in(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from tensors_in(item)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from tensors_in(getattr(obj, f.name))


class BatchFeed:
    """Batches from ``produce``, optionally one ahead (see the module docstring).

    Args:
        produce: returns the next batch.
        state: returns the producer's resume state (called before each ``produce``); None
            if the producer has none.
        device: the device the batches live on (decides whether a side stream is used).
        prefetch: produce the next batch in a worker thread; default: on for CUDA only.
    """

    def __init__(self, produce: Callable[[], Any], *, state: Optional[Callable[[], Any]] = None,
                 device=None, prefetch: Optional[bool] = None):
        self._produce = produce
        self._state = state if state is not None else (lambda: None)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        cuda = self.device.type == "cuda" and torch.cuda.is_available()
        if cuda and self.device.index is None:  # "cuda": the current device, named for the worker
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.prefetch = cuda if prefetch is None else bool(prefetch)
        self._stream = torch.cuda.Stream(self.device) if (cuda and self.prefetch) else None
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: Optional[tuple] = None  # (state before the batch, Future)

    # ----------------------------------------------------------------- public
    def __iter__(self):
        return self

    def __next__(self):
        if not self.prefetch:
            return self._produce()
        if self._pending is None:
            self._submit()
        _, future = self._pending
        self._pending = None
        batch, event = future.result()  # re-raises the producer's exception here
        self._submit()  # batch k+1 is made while the caller runs step k
        return self._adopt(batch, event)

    def state_dict(self) -> Any:
        """The producer's state for the first batch not yet handed out."""
        return self._pending[0] if self._pending is not None else self._state()

    def discard(self) -> None:
        """Drop the batch produced ahead (after the producer's state was changed, e.g. by a
        resume); the next call produces afresh."""
        if self._pending is not None:
            try:
                self._pending[1].result()
            except Exception:  # its error belongs to a batch nobody will use
                pass
            self._pending = None

    def close(self) -> None:
        self.discard()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # --------------------------------------------------------------- internal
    def _submit(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fewshot-feed")
        before = self._state()  # the worker is idle here: the state is the batch's own
        future: Future = self._pool.submit(self._make)
        self._pending = (before, future)

    def _make(self):
        if self._stream is None:
            return self._produce(), None
        torch.cuda.set_device(self.device)
        with torch.cuda.stream(self._stream):
            batch = self._produce()
            event = torch.cuda.Event()
            event.record(self._stream)
        return batch, event

    def _adopt(self, batch, event):
        """Make the consumer's stream wait for the side stream's work on ``batch``."""
        if event is None:
            return batch
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for t in tensors_in(batch):
            if t.device.type == "cuda":
                t.record_stream(current)
        return batch
