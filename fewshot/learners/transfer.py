"""The transfer-learning baseline (pre-train on the base classes, fine-tune on a new task).

As the meta-transfer paper uses it (Tu et al., "a joint training approach that combines both
transfer-learning and meta-learning": its transfer baseline trains "a single monolithic task"
over the base data and adapts to a new task with "regular stochastic gradient descent") and as
Chen et al. ("A Closer Look at Few-shot Classification", ICLR 2019) define their Baseline:

1. Training: a network f_θ = head ∘ body with a linear head over all ``num_classes`` base
   classes minimises the cross-entropy L(θ) = −log softmax(f_θ(x))_y over base-class labels
   with Adam (lr 1e-3, Chen et al.).
2. A new N-way task: a fresh N-way linear head W (zero-initialised, so the result does not
   depend on a random draw) is fitted on the support set by ``finetune_steps`` SGD steps
   of size ``finetune_lr`` on the cross-entropy (W ← W − η ∇_W L_S); with
   ``finetune_body=True`` the body is fine-tuned too. The queries are classified by the
   fine-tuned network. The steps run through the shared inner loop (detached).

Input choice: the learner consumes episodes (``input_kind = "episodes"``), so it trains on
the same sampled images as the meta-learners it is compared with; every image of an episode
(support and query) is one supervised example labelled by its store class id
(``base_support_y`` / ``base_query_y``). A meta-batch of episodes is one minibatch.

BatchNorm: the body was trained with batch statistics; fine-tuning and prediction run in eval
mode with the body's running statistics (``bn="running"`` of the inner loop), never updating
them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.errors import ConfigError
from fewshot.inner_loop import TASK_BATCHING, InnerLoop
from fewshot.learners.base import Learner, LearnerConfig, accuracy, host_label_span
from fewshot.learners.common import (HeadNet, boolean, check_batch, check_episode, choice,
                                     eval_mode, meta_adam, positive_float, positive_int, stack,
                                     support_loss)
from fewshot.learners.registry import register_learner

__all__ = ["Transfer"]


@register_learner("transfer")
class Transfer(Learner):
    """Pre-train a base-class classifier; fine-tune a new head on each task's support set."""

    #: first-order only (no gradients through gradients): bf16/fp16 autocast is safe;
    #: tested in tests/learners/test_autocast.py
    supports_autocast = True

    description = "transfer baseline: classifier over all base classes, new head fine-tuned by SGD per task"
    paper = ("Chen, Liu, Kira, Wang & Huang, 'A Closer Look at Few-shot Classification', ICLR "
             "2019 (Baseline); the transfer baseline of the meta-transfer learning paper")
    input_kind = "episodes"
    fine_tunes_at_test = True

    @dataclass
    class Config(LearnerConfig):
        """Transfer-baseline hyper-parameters (defaults: Chen et al.'s Baseline).

        lr: Adam learning rate of base-class training (1e-3).
        finetune_steps: SGD steps on the support set for a new task (100).
        finetune_lr: their step size η (0.01).
        finetune_body: also fine-tune the body, not only the new head (False).
        task_batching: "auto" | "on" | "off": fine-tune equal-shaped test episodes at once.
        """

        lr: float = 1e-3
        finetune_steps: int = 100
        finetune_lr: float = 0.01
        finetune_body: bool = False
        task_batching: str = "auto"

        def validate(self) -> None:
            super().validate()
            choice(self.task_batching, "task_batching", TASK_BATCHING)
            positive_int(self.finetune_steps, "finetune_steps", 0)
            positive_float(self.finetune_lr, "finetune_lr")
            boolean(self.finetune_body, "finetune_body")

    def __init__(self, config=None, *, in_channels, image_size, num_classes=None, backbone=None):
        super().__init__(config, in_channels=in_channels, image_size=image_size,
                         num_classes=num_classes, backbone=backbone)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"learner '{self.name}' needs num_classes, the number of training "
                              f"(base) classes (>= 2), got {num_classes!r}")
        #: body + head over all base classes
        self.net = HeadNet(self.make_backbone(), num_classes)
        self.optimizers["meta"] = meta_adam(self.net.parameters(), self.config.lr)

    def _examples(self, episodes):
        xs, ys = [], []
        for i, ep in enumerate(episodes):
            if ep.base_support_y is None or ep.base_query_y is None:
                raise ConfigError(f"learner '{self.name}' trains on base-class labels: episode "
                                  f"{i} has no base_support_y/base_query_y (use a sampler "
                                  "that keeps store class ids)")
            xs += [ep.support_x, ep.query_x]
            ys += [ep.base_support_y, ep.base_query_y]
        y = torch.cat(ys)
        span = host_label_span(y)  # None on a device: no per-step sync
        lo, hi = span if span is not None else (0, 0)
        if lo < 0 or hi >= self.num_classes:
            raise ConfigError(f"episode base-class labels span {lo}..{hi} but learner '{self.name}' "
                              f"was built for num_classes={self.num_classes}; build it with the "
                              f"training store's number of classes")
        return torch.cat(xs), y

    def train_step(self, batch) -> Dict[str, Tensor]:
        """One Adam step of base-class cross-entropy on all images of the episodes."""
        episodes = check_batch(self, batch)
        x, y = self._examples(episodes)
        self.train()
        opt = self.optimizers["meta"]
        opt.zero_grad(set_to_none=True)
        loss, logits = self.base_class_loss(x, y)
        loss.backward()
        loss = loss.detach()
        self.check_finite(loss, self.steps_done)
        self.outer_step("meta")
        self.steps_done += 1
        return {"loss": loss, "acc": accuracy(logits.detach(), y)}

    def base_class_loss(self, x: Tensor, y: Tensor):
        """(L(θ) = mean cross-entropy of f_θ(x) over base-class labels y, the logits f_θ(x))."""
        logits = self.net(x)
        return F.cross_entropy(logits, y), logits

    def predict(self, episode) -> Tensor:
        """Fit a new zero-initialised N-way head (and the body if ``finetune_body``) on the
        support set with ``finetune_steps`` SGD steps; return the query logits."""
        check_episode(self, episode)
        c = self.config
        body = self.net.backbone
        ways = episode.ways
        sx, sy, qx = episode.support_x, episode.support_y, episode.query_x
        with eval_mode(self):
            if c.finetune_body:
                model = HeadNet(body, ways)
                ref = next(body.parameters())
                model.head.to(device=ref.device, dtype=ref.dtype)  # the body stays as it is
                _zero(model.head)
                loop = InnerLoop(model, steps=c.finetune_steps, lr=c.finetune_lr, bn="running")
                adapted = loop.adapt(lambda net: F.cross_entropy(net(sx), sy), differentiable=False)
                with torch.no_grad():
                    return adapted(qx)
            # head only: the body's features are fixed, compute them once
            with torch.no_grad():
                fs = body(sx).flatten(1)
                fq = body(qx).flatten(1)
            head = nn.Linear(fs.shape[1], ways).to(fs.device, fs.dtype)
            _zero(head)
            loop = InnerLoop(head, steps=c.finetune_steps, lr=c.finetune_lr)
            adapted = loop.adapt(lambda net: F.cross_entropy(net(fs), sy), differentiable=False)
            with torch.no_grad():
                return adapted(fq)

    def predict_batch(self, episodes) -> Tensor:
        """:meth:`predict` for T equal-shaped episodes at once: (T, Q, ways) query logits."""
        for ep in episodes:
            check_episode(self, ep)
        c = self.config
        body = self.net.backbone
        sx, sy, qx = (stack(episodes, a) for a in ("support_x", "support_y", "query_x"))
        with eval_mode(self):
            if c.finetune_body:
                model = HeadNet(body, episodes[0].ways)
                ref = next(body.parameters())
                model.head.to(device=ref.device, dtype=ref.dtype)
                _zero(model.head)
                loop = InnerLoop(model, steps=c.finetune_steps, lr=c.finetune_lr, bn="running")
                adapted = loop.adapt_batched(support_loss, sx, sy, differentiable=False)
                with torch.no_grad():
                    return adapted(qx)
            with torch.no_grad():  # eval-mode features are per image: one pass for all tasks
                fs = body(sx.flatten(0, 1)).flatten(1).unflatten(0, sx.shape[:2])
                fq = body(qx.flatten(0, 1)).flatten(1).unflatten(0, qx.shape[:2])
            head = nn.Linear(fs.shape[-1], episodes[0].ways).to(fs.device, fs.dtype)
            _zero(head)
            loop = InnerLoop(head, steps=c.finetune_steps, lr=c.finetune_lr)
            adapted = loop.adapt_batched(support_loss, fs, sy, differentiable=False)
            with torch.no_grad():
                return adapted(fq)


def _zero(linear: nn.Linear) -> None:
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
