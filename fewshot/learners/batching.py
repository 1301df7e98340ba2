"""Task batching for learners: choosing it, stacking episodes, the batched MAML-type step.

A learner with a ``task_batching`` option ("auto" | "on" | "off", see
:func:`fewshot.inner_loop.resolve_task_batching`) adapts a meta-batch of equal-shaped tasks
with :meth:`fewshot.inner_loop.InnerLoop.adapt_batched` instead of one task after another,
and fine-tunes equal-shaped test episodes at once in ``predict_batch``. The sequential path
stays the reference; tests hold the two equal.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.errors import ConfigError
from fewshot.inner_loop import TASK_BATCHING, batched_oom_guard, resolve_task_batching

__all__ = ["check_task_batching", "batches_tasks", "stack", "episode_tensors",
           "batched_query_loss", "batched_episode_update"]

_EPISODE = ("support_x", "support_y", "query_x", "query_y", "classes")


def check_task_batching(value) -> None:
    """ConfigError unless ``value`` is one of "auto", "on", "off"."""
    if value not in TASK_BATCHING:
        raise ConfigError(f"learner option 'task_batching' must be one of "
                          f"{', '.join(TASK_BATCHING)}, got {value!r}")


def episode_tensors(item) -> List[Tensor]:
    """The tensors whose shapes must agree for an episode (or an (T_i, T_j) pair) to batch."""
    if isinstance(item, (tuple, list)):
        return [t for ep in item for t in episode_tensors(ep)]
    return [getattr(item, a) for a in _EPISODE]


def batches_tasks(learner, items: Sequence) -> bool:
    """Whether ``learner`` adapts ``items`` (episodes or pairs) as one batched computation."""
    return resolve_task_batching(learner.config.task_batching,
                                 [episode_tensors(it) for it in items], learner.device,
                                 f"learner '{learner.name}'")


def stack(episodes: Sequence, name: str) -> Tensor:
    """``torch.stack`` of attribute ``name`` over episodes: (T, ...)."""
    return torch.stack([getattr(ep, name) for ep in episodes])


def batched_query_loss(logits: Tensor, y: Tensor):
    """Per-task mean cross-entropy (T,) and accuracy (T,) of (T, Q, N) logits, (T, Q) labels."""
    loss = F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)
    acc = (logits.detach().argmax(-1) == y).float().mean(1)
    return loss, acc


def support_loss(net, x: Tensor, y: Tensor) -> Tensor:
    """One task's support cross-entropy L(f; D) (the inner loss of MAML eq. 1)."""
    return F.cross_entropy(net(x), y)


def batched_episode_update(learner, loop, episodes: Sequence, inner_loss: Callable = support_loss,
                           optimizer_name: str = "meta", **outer_options) -> Dict[str, Tensor]:
    """The batched twin of ``mean_episode_update`` for MAML-type learners.

    θ'_i from ``loop.adapt_batched`` on the support sets, then one backward of
    (1/T) Σ_i L_i(f_{θ'_i}; D'_i) (MAML eq. 3 with the mean), the finiteness check, the
    outer step, the step count; metrics: mean query loss and accuracy over tasks.
    """
    learner.optimizers[optimizer_name].zero_grad(set_to_none=True)
    sx, sy, qx, qy = (stack(episodes, a) for a in _EPISODE[:4])
    with batched_oom_guard(len(episodes), f"learner '{learner.name}'"):
        adapted = loop.adapt_batched(inner_loss, sx, sy)
        losses, accs = batched_query_loss(adapted(qx), qy)
        losses.mean().backward()
    loss = losses.detach().mean()
    learner.check_finite(loss, learner.steps_done)
    learner.outer_step(optimizer_name, **outer_options)
    learner.steps_done += 1
    return {"loss": loss, "acc": accs.mean()}
