"""MAML++ (Antoniou, Edwards & Storkey, "How to train your MAML", ICLR 2019).

MAML (:mod:`fewshot.learners.maml`, Finn et al. 2017) with the paper's six changes (sec. 4),
each an option of this learner or of the shared inner loop:

* LSLR, per-layer per-step learnable inner learning rates: step t of the inner loop is
  θ_{t+1} = θ_t − α_{t} ⊙ ∇_θ L_{S_b}(f_{θ_t}), with one learnable α_{t,l} per parameter
  tensor l and step t = 0..T−1 (``InnerLoop(lr_per_step=True, learn_lr=True)``), initialised
  to ``inner_lr``. A test-time adaptation with ``eval_steps`` > T reuses α_{T−1} for the
  extra steps.
* MSL, multi-step loss: the outer loss of a task is Σ_{t=1..T} v_t L_{T_b}(f_{θ_t}) (eq. 3
  with the importance vector v) while ``epoch < msl_epochs``, then L_{T_b}(f_{θ_T}) alone. v
  is the authors' annealing (``get_per_step_loss_importance_vector`` in
  few_shot_learning_system.py of AntreasAntoniou/HowToTrainYourMAMLPytorch): with
  d = 1 / (T · msl_epochs) and m = 0.03 / T, at epoch e
  v_t = max(1/T − e·d, m) for t < T and v_T = min(1/T + e·(T−1)·d, 1 − (T−1)·m)
  (:func:`msl_weights`).
* DA, derivative-order annealing: first-order meta-gradients (∇L treated as a constant in
  the inner steps) for the first ``first_order_epochs`` epochs, second order after.
* BNRS, per-step BatchNorm running statistics (``bn="per_step"``: one set per step index,
  used in eval mode; with MSL, set s collects the support batch of inner step s and the query
  batch after s steps, which the task-batched path applies forward by forward instead of task
  by task: the statistics differ from the sequential path's in order only, the gradients
  not), and BNWB, per-step BatchNorm weights and biases
  (``InnerLoop(bn_affine_per_step=True)``: γ_s, β_s for s = 0..T, meta-learned, not adapted
  in the inner loop, as in the authors' code where BatchNorm parameters are not inner-loop
  parameters).
* CA, cosine annealing of the outer (Adam) learning rate β over ``total_epochs`` epochs:
  β_e = β_min + (β − β_min)(1 + cos(π e / E)) / 2 at epoch e (the authors' code: PyTorch's
  CosineAnnealingLR with T_max = total_epochs, stepped with the epoch index), constant β_min
  after E.

Epochs: the paper counts epochs of 500 outer iterations ("total_iter_per_epoch": 500 in the
authors' configs); here epoch e = ⌊steps_done / steps_per_epoch⌋ over this learner's outer
steps (its ``train_step`` calls, checkpointed), ``steps_per_epoch`` = 500 by default, so a
shorter run can scale every schedule by choosing a smaller ``steps_per_epoch``.

Defaults: the authors' Omniglot 20-way 1-shot configuration (experiment_config/
omniglot_maml++_20_way_1_shot_5_batch_norm_log_64_seed_0.json): 5 inner steps in training
and at test, α initialised to 0.1, β = 1e-3 annealed to β_min = 1e-5 over 250 epochs,
multi-step loss for 20 epochs, meta-batch 16; ``first_order_epochs`` = 50 from the paper's
text (sec. 4, DA; that config trains second order throughout, its mini-ImageNet configs
switch at epoch 80). ``ways`` stays MAML's 5. Evaluation: the query forward of a test
episode normalises with the per-step running statistics (eval mode); the authors' code
normalises with batch statistics at test even with per-step statistics collected.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List

import torch.nn.functional as F
from torch import Tensor

from fewshot.learners.base import require
from fewshot.learners.common import (MultiStepLoss, batched_episode_update, batches_tasks,
                                     boolean, check_batch, mean_episode_update, positive_float,
                                     positive_int)
from fewshot.learners.maml import MAML
from fewshot.learners.registry import register_learner

__all__ = ["MAMLPlusPlus", "msl_weights", "cosine_lr"]


def msl_weights(steps: int, epoch: int, msl_epochs: int) -> List[float]:
    """MAML++'s per-step loss importance vector v_1..v_T at ``epoch`` (module docstring);
    after ``msl_epochs`` the final step's loss alone, (0, .., 0, 1)."""
    if epoch >= msl_epochs:
        return [0.0] * (steps - 1) + [1.0]
    decay = 1.0 / steps / msl_epochs
    floor = 0.03 / steps
    head = [max(1.0 / steps - epoch * decay, floor)] * (steps - 1)
    last = min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return head + [last]


def cosine_lr(base: float, minimum: float, epoch: int, total_epochs: int) -> float:
    """β_e = β_min + (β − β_min)(1 + cos(π e / E)) / 2, β_min after E (E = 0: β)."""
    if total_epochs <= 0:
        return base
    e = min(epoch, total_epochs)
    return minimum + (base - minimum) * (1.0 + math.cos(math.pi * e / total_epochs)) / 2.0


@register_learner("maml++")
class MAMLPlusPlus(MAML):
    """MAML with LSLR, MSL, DA, BNRS, BNWB and CA; see the module docstring."""

    description = ("MAML++: MAML with per-step learned inner lrs, multi-step loss, first-to-second "
                   "order annealing, per-step BatchNorm, cosine outer lr (test: fine-tunes all "
                   "but BatchNorm)")
    paper = "Antoniou, Edwards & Storkey, 'How to train your MAML', ICLR 2019"

    @dataclass
    class Config(MAML.Config):
        """As :class:`MAML.Config` (its meaning of every shared option), plus:

        per_step_lr: LSLR, one α row per inner step (True).
        per_step_bn_affine: BNWB, per-step BatchNorm γ_s, β_s (True).
        msl: use the multi-step loss while ``epoch < msl_epochs`` (True); msl_epochs (20).
        first_order_epochs: DA, first order for epochs 0..N−1 (50; 0 = second order from
            the start; ``first_order=True`` = first order throughout).
        total_epochs: CA over this many epochs (250; 0 = constant β); min_lr: β_min (1e-5).
        steps_per_epoch: outer steps per epoch (500, the paper's iterations per epoch).
        """

        inner_steps: int = 5
        inner_lr: float = 0.1
        eval_steps: int = 5
        bn: str = "per_step"
        learn_inner_lr: bool = True
        meta_batch: int = 16
        per_step_lr: bool = True
        per_step_bn_affine: bool = True
        msl: bool = True
        msl_epochs: int = 20
        first_order_epochs: int = 50
        total_epochs: int = 250
        min_lr: float = 1e-5
        steps_per_epoch: int = 500

        def validate(self) -> None:
            super().validate()
            positive_int(self.inner_steps, "inner_steps", 1)
            for name in ("per_step_lr", "per_step_bn_affine", "msl"):
                boolean(getattr(self, name), name)
            positive_int(self.msl_epochs, "msl_epochs", 0)
            positive_int(self.first_order_epochs, "first_order_epochs", 0)
            positive_int(self.total_epochs, "total_epochs", 0)
            positive_int(self.steps_per_epoch, "steps_per_epoch", 1)
            positive_float(self.min_lr, "min_lr", allow_zero=True)
            require(self.min_lr <= self.lr, f"learner option 'min_lr' ({self.min_lr}) must not "
                    f"exceed 'lr' ({self.lr}): cosine annealing goes from lr down to min_lr")

    def _inner_loop_options(self) -> dict:
        c = self.config
        return {**super()._inner_loop_options(), "lr_per_step": c.per_step_lr,
                "bn_affine_per_step": c.per_step_bn_affine}

    @property
    def epoch(self) -> int:
        """The paper's epoch: ⌊steps_done / steps_per_epoch⌋."""
        return self.steps_done // self.config.steps_per_epoch

    def step_weights(self, epoch: int) -> List[float]:
        """v_1..v_T of the outer loss at ``epoch`` (MSL, or the final step alone)."""
        c = self.config
        return msl_weights(c.inner_steps, epoch, c.msl_epochs if c.msl else 0)

    def _anneal(self) -> List[float]:
        """Set this epoch's derivative order (DA) and outer learning rate (CA); return its
        step weights (MSL)."""
        c, e = self.config, self.epoch
        self.loop.first_order = c.first_order or e < c.first_order_epochs
        for group in self.optimizers["meta"].param_groups:
            group["lr"] = cosine_lr(c.lr, c.min_lr, e, c.total_epochs)
        return self.step_weights(e)

    def multi_step_loss(self, episode, weights: List[float]):
        """(Σ_t v_t L(f_{θ_t}; D'), query logits of the last weighted step) for one episode."""
        msl = MultiStepLoss(weights, episode.query_x, episode.query_y, F.cross_entropy)
        self.loop.adapt(self._support_loss(episode), steps=len(weights), after_step=msl)
        return msl.total, msl.scores

    def train_step(self, batch) -> Dict[str, Tensor]:
        """One Adam step on the mean over tasks of the (multi-step) query loss, with this
        epoch's derivative order, step weights and learning rate."""
        episodes = check_batch(self, batch, self.config.ways)
        self.train()
        weights = self._anneal()
        if batches_tasks(self, episodes):
            return batched_episode_update(self, self.loop, episodes, step_weights=weights)
        return mean_episode_update(self, episodes, lambda ep: self.multi_step_loss(ep, weights))
