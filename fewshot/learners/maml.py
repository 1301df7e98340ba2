"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017), second and first order.

The model f_θ is a backbone followed by an N-way linear layer named ``head``. For each task
T_i of a meta-batch (Finn et al. Algorithm 2), the inner loop
(:class:`fewshot.inner_loop.InnerLoop`) adapts θ on the support set D_i with T gradient steps
of size α (eq. 1, repeated):

    θ'_i = θ − α ∇_θ L_{T_i}(f_θ; D_i)

and the meta-objective is the query loss of the adapted models, minimised by Adam with step
size β (eq. 2 / eq. 3):

    θ ← θ − β ∇_θ Σ_{T_i} L_{T_i}(f_{θ'_i}; D'_i)

(here the mean over the meta-batch, so β does not depend on its size). Second-order MAML
back-propagates through the inner steps; first-order MAML (``fomaml``, Finn et al. sec. 5.2)
treats ∇_θ L in eq. 1 as a constant. Optionally α is learned per parameter tensor or per layer
(Meta-SGD, Li et al. 2017) and handed to the same Adam optimiser.

At test time :meth:`MAML.predict` fine-tunes on the episode's support set with ``eval_steps``
steps of size α (Finn et al. use 10 at test for mini-ImageNet, 5 in training) and classifies
the queries with the adapted weights. BatchNorm follows the inner loop's ``bn`` policy;
``"transductive"`` (the default, MAML's reference code) uses the batch's statistics in
training and at test.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.inner_loop import ADAPT_PRESETS, BN_POLICIES, TASK_BATCHING, InnerLoop
from fewshot.learners.base import Learner, LearnerConfig, require
from fewshot.learners.common import (HeadNet, batched_episode_update, batches_tasks, boolean,
                                     check_batch, check_episode, check_inner_checkpoint, choice, eval_mode,
                                     mean_episode_update, meta_adam, positive_float, positive_int,
                                     stack, support_loss)
from fewshot.learners.registry import register_learner

__all__ = ["MAML", "FOMAML"]


@register_learner("maml")
class MAML(Learner):
    """MAML with the shared inner loop; see the module docstring for the equations."""

    description = "MAML: learn an initialisation that few SGD steps on the support set adapt (2nd order)"
    paper = ("Finn, Abbeel & Levine, 'Model-Agnostic Meta-Learning for Fast Adaptation of "
             "Deep Networks', ICML 2017")
    input_kind = "episodes"
    fine_tunes_at_test = True

    @dataclass
    class Config(LearnerConfig):
        """MAML hyper-parameters (defaults: Finn et al. sec. 5.2, mini-ImageNet).

        lr: β, the outer Adam step size (1e-3).
        ways: N, outputs of the head; every episode must be N-way (5).
        inner_steps: inner gradient steps in training (5).
        inner_lr: α, the inner step size (0.01; Omniglot used 0.4).
        eval_steps: fine-tuning steps at test (10; must be >= 1).
        first_order: drop second derivatives (False; ``fomaml`` sets True).
        bn: BatchNorm policy of the inner loop: "transductive" (MAML's code), "running",
            "per_step" (MAML++).
        adapt: which parameters the inner loop adapts: "all", "conv", "fc", "head" (ANIL),
            "body" (BOIL), "first_conv", "last_fc".
        learn_inner_lr: learn α (Meta-SGD, Li et al. 2017) with the outer optimiser.
        lr_per: "tensor" (one α per parameter tensor) or "layer" (one per module).
        meta_batch: tasks per outer step the trainer should draw (4 for 1-shot
            mini-ImageNet; Omniglot used 32). ``train_step`` averages over any number.
        task_batching: "auto" (batched on CUDA when the tasks have equal shapes), "on" or
            "off": adapt the meta-batch (and test episodes) as one batched computation
            (:meth:`fewshot.inner_loop.InnerLoop.adapt_batched`).
        inner_checkpoint: recompute each second-order inner step in the backward pass
            instead of keeping its graph (the inner loop's ``recompute``): the same
            meta-gradient ∇_θ L(θ'), peak memory nearly flat in ``inner_steps``, about one
            extra support forward and backward per step, sequential or task-batched. Off
            by default; needs ``first_order = false``.
        """

        lr: float = 1e-3
        ways: int = 5
        inner_steps: int = 5
        inner_lr: float = 0.01
        eval_steps: int = 10
        first_order: bool = False
        bn: str = "transductive"
        adapt: str = "all"
        learn_inner_lr: bool = False
        lr_per: str = "tensor"
        meta_batch: int = 4
        task_batching: str = "auto"
        inner_checkpoint: bool = False

        def validate(self) -> None:
            super().validate()
            choice(self.task_batching, "task_batching", TASK_BATCHING)
            positive_int(self.ways, "ways", 1)
            positive_int(self.inner_steps, "inner_steps", 0)
            positive_int(self.eval_steps, "eval_steps", 0)
            positive_int(self.meta_batch, "meta_batch", 1)
            positive_float(self.inner_lr, "inner_lr")
            choice(self.bn, "bn", BN_POLICIES)
            choice(self.adapt, "adapt", ADAPT_PRESETS)
            choice(self.lr_per, "lr_per", ("tensor", "layer"))
            boolean(self.first_order, "first_order")
            check_inner_checkpoint(self)

    def __init__(self, config=None, *, in_channels, image_size, num_classes=None, backbone=None):
        super().__init__(config, in_channels=in_channels, image_size=image_size,
                         num_classes=num_classes, backbone=backbone)
        c = self.config
        #: f_θ: backbone + N-way head
        self.net = HeadNet(self.make_backbone(), c.ways)
        #: the inner loop (owns α; learnable under learn_inner_lr)
        self.loop = InnerLoop(self.net, **self._inner_loop_options())
        params = list(self.net.parameters()) + list(self.loop.parameters())
        self.optimizers["meta"] = meta_adam(params, c.lr)

    def _inner_loop_options(self) -> dict:
        """The :class:`~fewshot.inner_loop.InnerLoop` options the config sets (a subclass
        adds its own to these)."""
        c = self.config
        return dict(steps=c.inner_steps, lr=c.inner_lr, learn_lr=c.learn_inner_lr,
                    lr_per=c.lr_per, adapt=c.adapt, first_order=c.first_order, bn=c.bn,
                    recompute=c.inner_checkpoint)

    def _support_loss(self, episode):
        def loss_fn(net):
            return F.cross_entropy(net(episode.support_x), episode.support_y)

        return loss_fn

    def task_loss(self, episode, steps: Optional[int] = None):
        """(query loss L_{T_i}(f_{θ'_i}; D'_i), query logits) after adapting on the support set."""
        adapted = self.loop.adapt(self._support_loss(episode), steps=steps)
        logits = adapted(episode.query_x)
        return F.cross_entropy(logits, episode.query_y), logits

    def train_step(self, batch) -> Dict[str, Tensor]:
        """One Adam step on the mean query loss of the adapted models (eq. 3).

        Tasks are processed one after the other and each one's graph is freed by its own
        backward pass, so memory holds one task's unrolled inner loop at a time.
        """
        episodes = check_batch(self, batch, self.config.ways)
        self.train()
        if batches_tasks(self, episodes):
            return batched_episode_update(self, self.loop, episodes)
        return mean_episode_update(self, episodes, self.task_loss)

    def predict(self, episode) -> Tensor:
        """Fine-tune on the support set for ``eval_steps`` steps, return query logits."""
        check_episode(self, episode, self.config.ways)
        with eval_mode(self):
            adapted = self.loop.adapt(self._support_loss(episode), steps=self.config.eval_steps,
                                      differentiable=False)
            with torch.no_grad():
                return adapted(episode.query_x)

    def predict_batch(self, episodes) -> Tensor:
        """:meth:`predict` for T equal-shaped episodes at once: (T, Q, ways) query logits
        (fine-tuning batched by ``adapt_batched``, no graph kept)."""
        for ep in episodes:
            check_episode(self, ep, self.config.ways)
        with eval_mode(self):
            adapted = self.loop.adapt_batched(support_loss, stack(episodes, "support_x"),
                                              stack(episodes, "support_y"),
                                              steps=self.config.eval_steps, differentiable=False)
            with torch.no_grad():
                return adapted(stack(episodes, "query_x"))


@register_learner("fomaml")
class FOMAML(MAML):
    """First-order MAML (Finn et al. sec. 5.2): MAML without second derivatives."""

    description = "first-order MAML: MAML's update with the inner gradients treated as constants"
    paper = MAML.paper + " (first-order approximation, sec. 5.2)"

    @dataclass
    class Config(MAML.Config):
        """As :class:`MAML.Config` with ``first_order=True`` (which it requires)."""

        first_order: bool = True

        def validate(self) -> None:
            super().validate()
            require(self.first_order is True, "learner 'fomaml' is first-order MAML: "
                    "'first_order' must be true (use learner 'maml' for second order)")
