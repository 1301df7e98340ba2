"""SimpleShot (Wang, Chao, Weinberger & van der Maaten, "SimpleShot: Revisiting Nearest-Neighbor
Classification for Few-Shot Learning", arXiv 1911.04623, 2019).

Training: a feature extractor f_θ with a linear classifier over all base classes minimises the
cross-entropy over base-class labels (sec. 3.1), as :class:`~fewshot.learners.transfer.Transfer`
trains (every image of the sampled episodes, Adam lr 1e-3; the paper trains with SGD over
epochs of the base set, a loop this episodic trainer does not have).

Test: no fine-tuning. Features x = f_θ(I) (eval mode) are transformed (sec. 3.2) by

* UN: x as is;
* L2N: x̂ = x / ‖x‖₂;
* CL2N (the default, their best): x̂ = (x − x̄) / ‖x − x̄‖₂, x̄ the mean feature of the base set;

then each query is assigned to the nearest class centroid (sec. 3, eq. for nearest neighbour
with one centroid per class when K > 1): logits −‖x̂ − c̄_k‖², c̄_k the mean of class k's
transformed support features.

The base mean x̄: the paper computes it once over the base set with the final network. Here it
is a buffer ``base_mean`` (saved in checkpoints) updated at every training step as an
exponential moving average of the step's training features, x̄ ← (1 − m) x̄ + m · mean(f_θ(I)),
``mean_momentum`` m = 0.01 (the buffer then averages the features of roughly the last 1/m
steps, of the network as it was then, with BatchNorm in training mode): it needs no extra pass
over the training set and follows the network to the end of training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.learners.base import LearnerConfig, require
from fewshot.learners.common import (FEATURE_NORMS, check_episode, choice, encode_episode,
                                     eval_mode, normalize_features, prototypes,
                                     squared_euclidean_logits)
from fewshot.learners.registry import register_learner
from fewshot.learners.transfer import Transfer

__all__ = ["SimpleShot"]


@register_learner("simpleshot")
class SimpleShot(Transfer):
    """Base-class classifier; nearest centroid on UN / L2N / CL2N features at test."""

    description = ("SimpleShot: classifier over the base classes, nearest centroid on "
                   "UN / L2N / CL2N-normalised features, no fine-tuning")
    paper = ("Wang, Chao, Weinberger & van der Maaten, 'SimpleShot: Revisiting Nearest-Neighbor "
             "Classification for Few-Shot Learning', arXiv 2019")
    fine_tunes_at_test = False
    #: prediction is one forward pass per episode; no batched fine-tuning
    predict_batch = None

    @dataclass
    class Config(LearnerConfig):
        """SimpleShot hyper-parameters.

        lr: Adam learning rate of base-class training (1e-3).
        feature_norm: "UN" | "L2N" | "CL2N" (CL2N, the paper's best).
        mean_momentum: m in (0, 1] of the moving average of the training features that gives
            x̄ (0.01).
        """

        lr: float = 1e-3
        feature_norm: str = "CL2N"
        mean_momentum: float = 0.01

        def validate(self) -> None:
            super().validate()
            choice(self.feature_norm, "feature_norm", FEATURE_NORMS)
            m = self.mean_momentum
            require(isinstance(m, (int, float)) and not isinstance(m, bool) and 0 < m <= 1,
                    f"learner option 'mean_momentum' must lie in (0, 1], got {m!r}")

    def __init__(self, config=None, *, in_channels, image_size, num_classes=None, backbone=None):
        super().__init__(config, in_channels=in_channels, image_size=image_size,
                         num_classes=num_classes, backbone=backbone)
        ref = next(self.net.parameters())
        #: x̄, the mean base-class feature (CL2N)
        self.register_buffer("base_mean", torch.zeros(self.net.head.in_features,
                                                      device=ref.device, dtype=ref.dtype))
        #: whether x̄ has seen a training step (the first step sets it, not averages it with 0)
        self.register_buffer("base_mean_seen", torch.zeros((), device=ref.device, dtype=torch.bool))

    def base_class_loss(self, x: Tensor, y: Tensor):
        """Base-class cross-entropy; also x̄ ← (1 − m) x̄ + m · mean(f_θ(x)) (the first step
        sets x̄ to the step's mean)."""
        z = self.net.backbone(x)
        z = z.reshape(z.shape[0], -1)
        logits = self.net.head(z)
        with torch.no_grad():
            m = torch.where(self.base_mean_seen, self.config.mean_momentum, 1.0).to(z.dtype)
            self.base_mean.lerp_(z.detach().mean(0).to(self.base_mean.dtype), m)
            self.base_mean_seen.fill_(True)
        return F.cross_entropy(logits, y), logits

    def episode_features(self, episode) -> Tuple[Tensor, Tensor]:
        """(support, query) features x̂ after ``feature_norm``, eval mode, no graph."""
        with eval_mode(self), torch.no_grad():
            fs, fq = encode_episode(self.net.backbone, episode)
        c = self.config
        return (normalize_features(fs, c.feature_norm, self.base_mean),
                normalize_features(fq, c.feature_norm, self.base_mean))

    def prototype_logits(self, query_z: Tensor, protos: Tensor) -> Tensor:
        """−‖x̂ − c̄_k‖² (nearest centroid in Euclidean distance)."""
        return squared_euclidean_logits(query_z, protos)

    def predict(self, episode) -> Tensor:
        """Nearest-centroid logits −‖x̂ − c̄_k‖² of the queries; no fine-tuning."""
        check_episode(self, episode)
        fs, fq = self.episode_features(episode)
        return self.prototype_logits(fq, prototypes(fs, episode.support_y, episode.ways))
