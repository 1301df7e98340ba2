"""Relation Networks (Sung, Yang, Zhang, Xiang, Torr & Hospedales, CVPR 2018).

An embedding f_θ maps images to feature maps. As the L2G paper writes it (Lee et al.,
eqs. 9-11), each class c of an episode is represented by the SUM of its support feature maps

    ρ_c = Σ_{x ∈ S_c} f_θ(x)                                   (L2G eq. 9)

(Sung et al. sum the K-shot features too), each (class, query) pair is scored by the relation
module d_φ on the channel-wise concatenation, prototype first,

    s_{c,m} = d_φ(concat(ρ_c, f_θ(x̃_m))) ∈ (0, 1)              (L2G eq. 10)

and the model is trained to regress the scores to the one-hot match indicator,

    L = mean_{m,c} (s_{c,m} − 1[y_m = c])²                      (L2G eq. 11, Sung et al. eq. 3)

(the mean, as Sung et al.'s code, rather than the sum of eq. 11: a constant factor of the
step size). Adam with lr 1e-3, halved every 100000 episodes, and the gradient norm of each
network clipped to 0.5, as Sung et al.'s code. No fine-tuning at test: :meth:`predict`
returns the relation scores (Q, N), whose arg-max is the prediction.

The embedding is Conv-4 with the max-pools of its last two blocks removed (L2G,
"Implementation Details"; ``pool_blocks=2``) unless ``backbone_options`` sets ``pool_blocks``;
the relation module is :class:`fewshot.nn.relation.RelationModule` (two conv blocks and two
fully-connected layers) sized for the embedding's feature maps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.errors import ConfigError
from fewshot.learners.base import Learner, LearnerConfig
from fewshot.learners.common import (check_batch, check_episode, class_sums, halve_lr_every, mean_episode_update,
                                     eval_mode, positive_float, positive_int, meta_adam)
from fewshot.learners.registry import register_learner

__all__ = ["RelationNet"]


@register_learner("relationnet")
class RelationNet(Learner):
    """Relation Network; see the module docstring for the equations."""

    #: first-order only (no gradients through gradients): bf16/fp16 autocast is safe;
    #: tested in tests/learners/test_autocast.py
    supports_autocast = True

    description = "Relation Network: a learned relation module scores (class sum, query) feature pairs"
    paper = ("Sung, Yang, Zhang, Xiang, Torr & Hospedales, 'Learning to Compare: Relation Network "
             "for Few-Shot Learning', CVPR 2018")
    input_kind = "episodes"
    fine_tunes_at_test = False

    @dataclass
    class Config(LearnerConfig):
        """RelationNet hyper-parameters (defaults: Sung et al.'s code).

        lr: Adam learning rate for embedding and relation module (1e-3).
        lr_halve_every: halve the learning rate every this many steps (100000); 0 = never.
        relation_hidden: width of the relation module's first fc layer (8).
        grad_clip: clip each network's gradient norm to this (0.5); 0 = no clipping.
        """

        lr: float = 1e-3
        lr_halve_every: int = 100000
        relation_hidden: int = 8
        grad_clip: float = 0.5

        def validate(self) -> None:
            super().validate()
            positive_int(self.lr_halve_every, "lr_halve_every", 0)
            positive_int(self.relation_hidden, "relation_hidden", 1)
            positive_float(self.grad_clip, "grad_clip", allow_zero=True, note="(0 = off)")

    def __init__(self, config=None, *, in_channels, image_size, num_classes=None, backbone=None):
        super().__init__(config, in_channels=in_channels, image_size=image_size,
                         num_classes=num_classes, backbone=backbone)
        from fewshot.nn.relation import RelationModule

        c = self.config
        overrides = {"flatten": False}
        if c.backbone == "conv4" and "pool_blocks" not in c.backbone_options:
            overrides["pool_blocks"] = 2
        #: f_θ: images -> feature maps (B, C, h, w)
        self.encoder = self.make_backbone(**overrides)
        if not hasattr(self.encoder, "out_shape") or getattr(self.encoder, "flatten", False):
            raise ConfigError("learner 'relationnet' needs a backbone that returns feature maps "
                              "(flatten=False) and exposes out_shape = (C, h, w)")
        #: d_φ: concatenated pairs (P, 2C, h, w) -> scores (P,)
        self.relation = RelationModule.for_backbone(self.encoder, hidden=c.relation_hidden)
        self.optimizers["meta"] = meta_adam(self.parameters(), c.lr)
        halve_lr_every(self, c.lr_halve_every)

    def episode_scores(self, episode) -> Tensor:
        """(Q, N) relation scores s_{c,m} (L2G eq. 10) of the episode's queries."""
        s = episode.support_x.shape[0]
        maps = self.encoder(torch.cat([episode.support_x, episode.query_x], 0))
        protos = class_sums(maps[:s], episode.support_y, episode.ways)
        return self.relation.pairwise(protos, maps[s:])

    def episode_loss(self, episode):
        """(MSE of the scores against one-hot query labels (eq. 11, mean), scores)."""
        scores = self.episode_scores(episode)
        target = F.one_hot(episode.query_y, episode.ways).to(scores.dtype)
        return F.mse_loss(scores, target), scores

    def train_step(self, batch) -> Dict[str, Tensor]:
        """One Adam step on the mean MSE over the episodes of ``batch``."""
        episodes = check_batch(self, batch)
        self.train()
        return mean_episode_update(
            self, episodes, self.episode_loss, clip_norm=self.config.grad_clip,
            clip_groups=[self.encoder.parameters(), self.relation.parameters()])

    def predict(self, episode) -> Tensor:
        """Relation scores (Q, N) of the queries; no fine-tuning (Sung et al.).

        Always in eval mode (BatchNorm reads its running statistics and never updates them),
        whatever mode the caller left the learner in.
        """
        check_episode(self, episode)
        with eval_mode(self), torch.no_grad():
            return self.episode_scores(episode)
