"""Episodes as tensors, and the samplers that draw them.

An :class:`Episode` is one N-way few-shot task: a support set and a query set whose labels
are remapped to ``0..N-1`` (the original class ids are kept in ``classes``).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
from torch import Tensor


@dataclass
class Episode:
    """One N-way task.

    Attributes:
        support_x: (S, C, H, W) float images of the support set.
        support_y: (S,) int64 labels in ``0..ways-1``.
        query_x: (Q, C, H, W) float images of the query set.
        query_y: (Q,) int64 labels in ``0..ways-1``.
        classes: (ways,) int64 ids of the store's classes, ``classes[k]`` is label ``k``.
        base_support_y / base_query_y: optional (S,) / (Q,) labels in the store's own class
            ids (used by MTL's transfer head and the transfer baseline).
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    classes: Tensor
    base_support_y: Optional[Tensor] = None
    base_query_y: Optional[Tensor] = None

    @property
    def ways(self) -> int:
        return int(self.classes.numel())

    @property
    def shots(self) -> Tensor:
        """(ways,) number of support examples per class (may differ per class)."""
        return torch.bincount(self.support_y, minlength=self.ways)

    def to(self, device, non_blocking: bool = False) -> "Episode":
        """The same episode with every tensor on ``device``."""
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v
        return replace(self, **moved)
