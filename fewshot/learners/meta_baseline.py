"""Meta-Baseline (Chen, Liu, Xu, Darrell & Wang, "Meta-Baseline: Exploring Simple Meta-Learning
for Few-Shot Learning", ICCV 2021), two stages in one run.

1. Classifier stage (Classifier-Baseline, sec. 3.2): an encoder f_θ with a linear classifier
   over all base classes minimises the cross-entropy over base-class labels, on every image of
   the sampled episodes (as :class:`~fewshot.learners.transfer.Transfer`; Adam, ``lr`` 1e-3 —
   the paper uses SGD lr 0.1 over epochs of the base set, a loop this episodic trainer does not
   have).
2. Meta stage (sec. 3.3): the classifier is dropped; on each N-way K-shot episode the class
   centroids w_c = (1/|S_c|) Σ_{x ∈ S_c} f_θ(x) (eq. 1) score a query x by
   p(y = c | x) = exp(⟨f_θ(x), w_c⟩ · τ) / Σ_c' exp(⟨f_θ(x), w_c'⟩ · τ) (eq. 2), ⟨·,·⟩ the cosine
   similarity and τ a learnable temperature (initial value 10); f_θ and τ minimise the
   query cross-entropy with SGD (``meta_lr`` 0.001, momentum 0.9, weight decay 5e-4, the
   paper's meta-stage optimiser; no weight decay on τ).

The stage of a training step is chosen by the learner's own step count (``steps_done``, saved
in checkpoints): steps 0 .. ``pretrain_steps`` − 1 are classifier steps, the others meta steps.
Both optimisers are in the state dict, so a run resumed from any checkpoint continues in the
right stage with the right optimiser state. Prediction at any stage is eq. 2 with the current
τ (the paper evaluates Classifier-Baseline by the same cosine nearest-centroid rule).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.learners.base import LearnerConfig
from fewshot.learners.common import (check_batch, check_episode, cosine_logits, encode_episode,
                                     eval_mode, fraction, mean_episode_update, positive_float,
                                     positive_int, prototypes)
from fewshot.learners.registry import register_learner
from fewshot.learners.transfer import Transfer

__all__ = ["MetaBaseline"]


@register_learner("meta_baseline")
class MetaBaseline(Transfer):
    """Classifier pre-training, then episodic cosine nearest-centroid with a learned τ."""

    description = ("Meta-Baseline: base-class classifier for pretrain_steps, then episodic cosine "
                   "ProtoNet with a learnable temperature (one run, two stages)")
    paper = ("Chen, Liu, Xu, Darrell & Wang, 'Meta-Baseline: Exploring Simple Meta-Learning for "
             "Few-Shot Learning', ICCV 2021")
    fine_tunes_at_test = False
    predict_batch = None  # one forward pass per episode

    @dataclass
    class Config(LearnerConfig):
        """Meta-Baseline hyper-parameters.

        lr: Adam learning rate of the classifier stage (1e-3).
        pretrain_steps: training steps of the classifier stage; the meta stage follows (chosen:
            1000; the paper trains the classifier to convergence, 100 epochs of miniImageNet).
        meta_lr / meta_momentum / meta_weight_decay: SGD of the meta stage (0.001 / 0.9 / 5e-4).
        tau_init: initial temperature τ (10).
        """

        lr: float = 1e-3
        pretrain_steps: int = 1000
        meta_lr: float = 0.001
        meta_momentum: float = 0.9
        meta_weight_decay: float = 5e-4
        tau_init: float = 10.0

        def validate(self) -> None:
            super().validate()
            positive_int(self.pretrain_steps, "pretrain_steps", 0)
            positive_float(self.meta_lr, "meta_lr")
            fraction(self.meta_momentum, "meta_momentum")
            positive_float(self.meta_weight_decay, "meta_weight_decay", allow_zero=True)
            positive_float(self.tau_init, "tau_init")

    def __init__(self, config=None, *, in_channels, image_size, num_classes=None, backbone=None):
        super().__init__(config, in_channels=in_channels, image_size=image_size,
                         num_classes=num_classes, backbone=backbone)
        c = self.config
        ref = next(self.net.parameters())
        #: the temperature τ of eq. 2
        self.tau = nn.Parameter(torch.tensor(float(c.tau_init), device=ref.device, dtype=ref.dtype))
        self.optimizers["episodic"] = torch.optim.SGD(
            [{"params": list(self.net.backbone.parameters()), "weight_decay": c.meta_weight_decay},
             {"params": [self.tau], "weight_decay": 0.0}],
            lr=c.meta_lr, momentum=c.meta_momentum)

    def in_meta_stage(self) -> bool:
        """Whether the next training step is a meta-stage step (``steps_done >= pretrain_steps``)."""
        return self.steps_done >= self.config.pretrain_steps

    def episode_features(self, episode) -> Tuple[Tensor, Tensor]:
        """(support, query) encoder features f_θ(x), flat, float32 at least, in the learner's
        current mode (callers choose eval mode for prediction)."""
        return encode_episode(self.net.backbone, episode)

    def prototype_logits(self, query_z: Tensor, protos: Tensor) -> Tensor:
        """⟨f_θ(x), w_c⟩_cos · τ (eq. 2)."""
        return cosine_logits(query_z, protos, self.tau.to(query_z.dtype))

    def episode_logits(self, episode) -> Tensor:
        fs, fq = self.episode_features(episode)
        return self.prototype_logits(fq, prototypes(fs, episode.support_y, episode.ways))

    def episode_loss(self, episode):
        """(query cross-entropy of eq. 2's probabilities, logits)."""
        logits = self.episode_logits(episode)
        return F.cross_entropy(logits, episode.query_y), logits

    def train_step(self, batch) -> Dict[str, Tensor]:
        """A classifier-stage step (Transfer's) while ``steps_done < pretrain_steps``, else one
        SGD step of the meta stage on the mean episode loss."""
        if not self.in_meta_stage():
            return super().train_step(batch)
        episodes = check_batch(self, batch)
        self.train()
        return mean_episode_update(self, episodes, self.episode_loss, optimizer_name="episodic")

    def predict(self, episode) -> Tensor:
        """Eq. 2's logits ⟨f_θ(x), w_c⟩_cos · τ of the queries, eval mode, no fine-tuning."""
        check_episode(self, episode)
        with eval_mode(self), torch.no_grad():
            return self.episode_logits(episode)
