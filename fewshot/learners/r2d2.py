"""R2-D2: ridge regression as a differentiable base learner (Bertinetto, Henriques, Torr &
Vedaldi, 'Meta-learning with differentiable closed-form solvers', ICLR 2019).

An embedding φ (the backbone) maps the S support images of an N-way episode to the rows of
X = φ(Z) (S, D); Y (S, N) holds their one-hot labels. The base learner is ridge regression,
solved in closed form with the Woodbury identity so the linear system is S x S (sec. 3.2):

    W = Λ(X, Y) = Xᵀ (X Xᵀ + λ I)⁻¹ Y                    (sec. 3.2, Woodbury form)

and the queries X' = φ(Z') are scored by the linear predictor, rescaled by the "adjust"
layer's scale α and bias β (sec. 3.2; a ridge regressor's outputs are not calibrated logits):

    Ŷ' = α X' W + β.

λ, α and β are meta-parameters learned with φ by Adam on the cross-entropy of Ŷ' against
the query labels (sec. 3.2, 4). (β adds the same number to every score of a query, which the
softmax cross-entropy cannot see: its gradient is zero and it stays at its initial value; it
is kept as the paper writes the predictor.) Details from the authors' code (github.com/bertinetto/r2d2),
where the paper is silent:

* X gets a column of ones, so the ridge regressor has a bias row (regularised like W);
* X and Y are divided by √S, i.e. the ridge objective averages over the support examples,
  (1/S) ‖X W − Y‖² + λ ‖W‖², so λ keeps its meaning across ways and shots; in the form
  above this is W = Xᵀ (X Xᵀ + S λ I)⁻¹ Y;
* initial values λ = 50, α = 1e-4 (the code's defaults; its Omniglot scripts start α at
  10, as ``configs/r2d2_glyphs.toml`` does), β = 0; λ is a plain parameter (the code's
  ``lambda_base = 1``), learned by default as in the paper (``learn_lambda``);
* Adam with lr 5e-3, halved every 20 epochs of 100 episodes (``lr_halve_every = 2000``).

Any way, any shot, any backbone with a flat output; no fine-tuning at test:
:meth:`R2D2.predict` returns Ŷ' (Q, N). The solve runs in float32 (or float64 when the
backbone does) and never under autocast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.learners.base import Learner, LearnerConfig
from fewshot.learners.common import (boolean, check_batch, check_episode, check_lr_halve_every,
                                     eval_mode, halve_lr_every, mean_episode_update, meta_adam,
                                     one_hot, positive_float, ridge_regression)
from fewshot.learners.registry import register_learner

__all__ = ["R2D2"]


@register_learner("r2d2")
class R2D2(Learner):
    """R2-D2: a closed-form ridge-regression head on a learned embedding; see the module
    docstring for the equations."""

    description = ("R2-D2: differentiable closed-form ridge regression (Woodbury, S x S solve) "
                   "on the embedding, with learned λ, scale and bias")
    paper = ("Bertinetto, Henriques, Torr & Vedaldi, 'Meta-learning with differentiable "
             "closed-form solvers', ICLR 2019")
    input_kind = "episodes"
    fine_tunes_at_test = False

    @dataclass
    class Config(LearnerConfig):
        """R2-D2 hyper-parameters (defaults: Bertinetto et al.'s code, see the module docstring).

        lr: Adam learning rate (5e-3).
        lr_halve_every: halve the learning rate every this many steps (2000); 0 = never.
        init_lambda: initial ridge penalty λ (50), on the support-averaged objective.
        learn_lambda: learn λ with the network (true, as the paper); false keeps it fixed.
        init_scale: initial scale α of the adjust layer (1e-4; 10 in the code's Omniglot runs).
        init_bias: initial bias β of the adjust layer (0).
        """

        lr: float = 5e-3
        lr_halve_every: int = 2000
        init_lambda: float = 50.0
        learn_lambda: bool = True
        init_scale: float = 1e-4
        init_bias: float = 0.0

        def validate(self) -> None:
            super().validate()
            check_lr_halve_every(self.lr_halve_every)
            positive_float(self.init_lambda, "init_lambda")
            boolean(self.learn_lambda, "learn_lambda")
            positive_float(self.init_scale, "init_scale")

    def __init__(self, config=None, *, in_channels, image_size, num_classes=None, backbone=None):
        super().__init__(config, in_channels=in_channels, image_size=image_size,
                         num_classes=num_classes, backbone=backbone)
        c = self.config
        #: the embedding φ, (B, C, H, W) -> (B, D)
        self.encoder = self.make_backbone()
        #: the ridge penalty λ (a buffer when it is not learned, so checkpoints hold it either way)
        lam = torch.tensor(float(c.init_lambda))
        if c.learn_lambda:
            self.lam = nn.Parameter(lam)
        else:
            self.register_buffer("lam", lam)
        #: the adjust layer's scale α and bias β
        self.scale = nn.Parameter(torch.tensor(float(c.init_scale)))
        self.bias = nn.Parameter(torch.tensor(float(c.init_bias)))
        self.optimizers["meta"] = meta_adam(self.parameters(), c.lr)
        halve_lr_every(self, c.lr_halve_every)

    def head(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
        """Ŷ' = α X' W + β (Q, N) for support embeddings X (S, D) with labels ``support_y`` and
        query embeddings X' (Q, D): W from :func:`ridge_regression` on [X, 1] / √S and Y / √S."""
        s = support.shape[0]
        ones = torch.ones(s, 1, dtype=support.dtype, device=support.device)
        x = torch.cat([support, ones], 1) / math.sqrt(s)
        y = one_hot(support_y, ways, support.dtype) / math.sqrt(s)
        wb = ridge_regression(x, y, self.lam.to(support.dtype))  # (D + 1, N)
        return self.scale * (query @ wb[:-1] + wb[-1]) + self.bias

    def episode_logits(self, episode) -> Tensor:
        """(Q, N) scores Ŷ' of the episode's queries; support and query images go through φ
        in one batch, the head runs outside autocast (in float32 at least)."""
        s = episode.support_x.shape[0]
        z = self.encoder(torch.cat([episode.support_x, episode.query_x], 0))
        z = z.reshape(z.shape[0], -1)
        z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        with torch.autocast(z.device.type, enabled=False):
            return self.head(z[:s], episode.support_y, z[s:], episode.ways)

    def episode_loss(self, episode) -> Tuple[Tensor, Tensor]:
        """(cross-entropy of Ŷ' against the query labels, Ŷ')."""
        logits = self.episode_logits(episode)
        return F.cross_entropy(logits, episode.query_y), logits

    def train_step(self, batch) -> Dict[str, Tensor]:
        """One Adam step on the mean query cross-entropy over the episodes of ``batch``
        (φ, λ, α and β together)."""
        episodes = check_batch(self, batch)
        self.train()
        return mean_episode_update(self, episodes, self.episode_loss)

    def predict(self, episode) -> Tensor:
        """Query scores Ŷ' (Q, N) from the ridge solution on the support set; no fine-tuning.

        Always in eval mode (BatchNorm reads its running statistics and never updates them).
        """
        check_episode(self, episode)
        with eval_mode(self), torch.no_grad():
            return self.episode_logits(episode)
