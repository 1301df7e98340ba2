"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017).

For an episode with support set S = {(x_i, y_i)} over N classes and an embedding
f_φ (the backbone), each class k gets a prototype, the mean of its support embeddings
(Snell et al. eq. 1; the L2G paper's eq. 6):

    c_k = 1/|S_k| Σ_{(x_i, y_i) ∈ S_k} f_φ(x_i)

and a query x is classified by a softmax over negative squared Euclidean distances
(Snell et al. eq. 2; the L2G paper's eq. 7):

    p_φ(y = k | x) = exp(−d(f_φ(x), c_k)) / Σ_k' exp(−d(f_φ(x), c_k')),   d(z, z') = ‖z − z'‖².

Training minimises J(φ) = −log p_φ(y = k | x) averaged over the episode's queries (and
over the episodes of a meta-batch) with Adam (lr 1e-3, halved every 2000 episodes in
Snell et al. sec. 3.2). There is no fine-tuning at test time: :meth:`ProtoNet.predict`
returns the logits −d(f_φ(x), c_k) of the episode's queries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.learners.base import Learner, LearnerConfig
from fewshot.learners.common import (check_batch, check_episode, check_lr_halve_every,
                                     encode_episode, eval_mode, halve_lr_every,
                                     mean_episode_update, meta_adam, prototypes,
                                     squared_euclidean_logits)
from fewshot.learners.registry import register_learner

__all__ = ["ProtoNet", "prototypes", "squared_euclidean_logits"]


@register_learner("protonet")
class ProtoNet(Learner):
    """Prototypical Networks: nearest class mean in a learned embedding (Snell et al. 2017)."""

    description = "Prototypical Networks: softmax over negative squared distances to class-mean prototypes"
    paper = ("Snell, Swersky & Zemel, 'Prototypical Networks for Few-shot Learning', "
             "NeurIPS 2017")
    input_kind = "episodes"
    supports_autocast = True
    fine_tunes_at_test = False

    @dataclass
    class Config(LearnerConfig):
        """ProtoNet hyper-parameters (defaults: Snell et al. sec. 3.2).

        lr: Adam learning rate (1e-3).
        lr_halve_every: halve the learning rate every this many training steps (episodes
            in Snell et al.: 2000); 0 keeps it constant.
        """

        lr: float = 1e-3
        lr_halve_every: int = 2000

        def validate(self) -> None:
            super().validate()
            check_lr_halve_every(self.lr_halve_every)

    def __init__(self, config=None, *, in_channels, image_size, num_classes=None, backbone=None):
        super().__init__(config, in_channels=in_channels, image_size=image_size,
                         num_classes=num_classes, backbone=backbone)
        #: the embedding f_φ, (B, C, H, W) -> (B, D)
        self.encoder = self.make_backbone()
        self.optimizers["meta"] = meta_adam(self.encoder.parameters(), self.config.lr)
        halve_lr_every(self, self.config.lr_halve_every)

    def episode_features(self, episode) -> Tuple[Tensor, Tensor]:
        """(support, query) embeddings f_φ(x), flat, in float32 even under autocast; support
        and query images go through the encoder in one batch (in the learner's current mode)."""
        return encode_episode(self.encoder, episode)

    def prototype_logits(self, query_z: Tensor, protos: Tensor) -> Tensor:
        """−‖f_φ(x̃) − c_k‖² (Snell et al. eq. 2)."""
        return squared_euclidean_logits(query_z, protos)

    def episode_logits(self, episode) -> Tensor:
        """(Q, N) logits −‖f_φ(x̃) − c_k‖² of the episode's queries."""
        fs, fq = self.episode_features(episode)
        return self.prototype_logits(fq, prototypes(fs, episode.support_y, episode.ways))

    def episode_loss(self, episode) -> Tuple[Tensor, Tensor]:
        """(J(φ) = cross-entropy of the query logits (Snell et al. eq. 2-3), logits)."""
        logits = self.episode_logits(episode)
        return F.cross_entropy(logits, episode.query_y), logits

    def train_step(self, batch) -> Dict[str, Tensor]:
        """One Adam step on J(φ) averaged over the episodes of ``batch``."""
        episodes = check_batch(self, batch)
        self.train()
        return mean_episode_update(self, episodes, self.episode_loss)

    def predict(self, episode) -> Tensor:
        """Query logits from the support prototypes; no fine-tuning (Snell et al.).

        Always in eval mode (BatchNorm reads its running statistics and never updates them),
        whatever mode the caller left the learner in.
        """
        check_episode(self, episode)
        with eval_mode(self), torch.no_grad():
            return self.episode_logits(episode)
