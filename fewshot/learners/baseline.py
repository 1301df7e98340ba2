"""Baseline and Baseline++ (Chen, Liu, Kira, Wang & Huang, "A Closer Look at Few-shot
Classification", ICLR 2019, sec. 3.1-3.2).

Training stage (both): a feature extractor f_θ and a classifier C(·|W_b) over all base classes
minimise the cross-entropy over base-class labels (Adam, lr 1e-3, as in the paper's sec. 4.1),
on every image of the sampled episodes, as :class:`~fewshot.learners.transfer.Transfer` trains.

* Baseline: C is linear, W_bᵀ f_θ(x) (+ bias).
* Baseline++: C scores cosine similarities, s · cos(f_θ(x), w_k), with weight-normalised
  class vectors w_k (:class:`~fewshot.learners.common.CosineHead`, their ``distLinear``;
  scale s = 2 for up to 200 classes, 10 above, as their code) "to reduce intra-class
  variation" (sec. 3.2).

Fine-tuning stage (a new N-way task): f_θ is fixed (features in eval mode, running BatchNorm
statistics); a new classifier C(·|W_n) of the same kind (N classes; PyTorch's default random
initialisation, drawn from a generator seeded by ``finetune_seed`` so predictions repeat) is
trained on the support features with the optimiser of their code
(``BaselineFinetune.set_forward_adaptation``): SGD, lr 0.01, momentum 0.9, dampening 0.9, weight
decay 1e-3, ``finetune_epochs`` = 100 epochs over the support set in shuffled mini-batches of
``finetune_batch`` = 4. The queries get C(f_θ(x)|W_n).

The fine-tuning steps use ``torch.optim.SGD`` rather than :class:`~fewshot.inner_loop.InnerLoop`:
they are not differentiated through, and the inner loop has no momentum, dampening or weight
decay (SGD with those is Chen et al.'s procedure).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.learners.base import LearnerConfig
from fewshot.learners.common import (CosineHead, check_episode, chen_cosine_scale, cosine_logits,
                                     encode_episode, eval_mode, fraction, meta_adam, positive_float,
                                     positive_int)
from fewshot.learners.registry import register_learner
from fewshot.learners.transfer import Transfer

__all__ = ["Baseline", "BaselinePlusPlus", "fine_tune_head"]


@dataclass
class BaselineConfig(LearnerConfig):
    """Baseline / Baseline++ hyper-parameters (defaults: Chen et al. 2019 and their code).

    lr: Adam learning rate of the training stage (1e-3).
    finetune_epochs: epochs over the support set for a new task (100).
    finetune_batch: mini-batch size of fine-tuning (4).
    finetune_lr: SGD step size (0.01).
    finetune_momentum / finetune_dampening: SGD momentum and dampening (0.9 / 0.9).
    finetune_weight_decay: SGD weight decay (1e-3).
    finetune_seed: seed of the new head's initialisation and of the mini-batch order (0).
    """

    lr: float = 1e-3
    finetune_epochs: int = 100
    finetune_batch: int = 4
    finetune_lr: float = 0.01
    finetune_momentum: float = 0.9
    finetune_dampening: float = 0.9
    finetune_weight_decay: float = 1e-3
    finetune_seed: int = 0

    def validate(self) -> None:
        super().validate()
        positive_int(self.finetune_epochs, "finetune_epochs", 0)
        positive_int(self.finetune_batch, "finetune_batch")
        positive_float(self.finetune_lr, "finetune_lr")
        fraction(self.finetune_momentum, "finetune_momentum")
        fraction(self.finetune_dampening, "finetune_dampening")
        positive_float(self.finetune_weight_decay, "finetune_weight_decay", allow_zero=True)
        positive_int(self.finetune_seed, "finetune_seed", 0)


def fine_tune_head(head: nn.Module, fs: Tensor, sy: Tensor, c: BaselineConfig,
                   generator: torch.Generator) -> nn.Module:
    """Chen et al.'s fine-tuning of a new classifier on fixed support features ``fs``.

    ``c.finetune_epochs`` epochs; each draws a permutation of the S support examples and takes
    one SGD step (momentum, dampening, weight decay of ``c``) per consecutive mini-batch of
    ``c.finetune_batch`` (the last one may be smaller) on the mean cross-entropy.
    """
    opt = torch.optim.SGD(head.parameters(), lr=c.finetune_lr, momentum=c.finetune_momentum,
                          dampening=c.finetune_dampening, weight_decay=c.finetune_weight_decay)
    n = fs.shape[0]
    with torch.enable_grad():
        for _ in range(c.finetune_epochs):
            order = torch.randperm(n, generator=generator).to(fs.device)
            for start in range(0, n, c.finetune_batch):
                rows = order[start:start + c.finetune_batch]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(head(fs[rows]), sy[rows]).backward()
                opt.step()
    return head


@register_learner("baseline")
class Baseline(Transfer):
    """Chen et al.'s Baseline: base-class classifier; a new linear head fitted per task."""

    description = ("Baseline: classifier over all base classes, new linear head fine-tuned per task "
                   "(SGD, 100 epochs of batch 4)")
    paper = ("Chen, Liu, Kira, Wang & Huang, 'A Closer Look at Few-shot Classification', ICLR 2019 "
             "(Baseline)")
    Config = BaselineConfig
    fine_tunes_at_test = True
    #: no batched fine-tuning: episodes are fine-tuned one by one (evaluation sees no predict_batch)
    predict_batch = None

    def __init__(self, config=None, *, in_channels, image_size, num_classes=None, backbone=None):
        super().__init__(config, in_channels=in_channels, image_size=image_size,
                         num_classes=num_classes, backbone=backbone)
        features = self.net.head.in_features
        ref = next(self.net.backbone.parameters())
        self.net.head = self.new_head(features, num_classes).to(ref.device, ref.dtype)
        self.optimizers["meta"] = meta_adam(self.net.parameters(), self.config.lr)

    def new_head(self, features: int, classes: int) -> nn.Module:
        """The classifier C(·|W) over ``classes`` classes: linear (PyTorch's default init)."""
        return nn.Linear(features, classes)

    def episode_features(self, episode) -> Tuple[Tensor, Tensor]:
        """(support, query) features f_θ(x), flat, in eval mode (running BatchNorm statistics),
        without a graph."""
        with eval_mode(self), torch.no_grad():
            return encode_episode(self.net.backbone, episode)

    def predict(self, episode) -> Tensor:
        """Fine-tune a new N-way classifier on the fixed support features (:func:`fine_tune_head`);
        return its query logits."""
        check_episode(self, episode)
        fs, fq = self.episode_features(episode)
        gen = torch.Generator().manual_seed(self.config.finetune_seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2 ** 62, (1,), generator=gen)))
            head = self.new_head(fs.shape[1], episode.ways).to(fs.device, fs.dtype)
        head = fine_tune_head(head, fs, episode.support_y, self.config, gen)
        with torch.no_grad():
            return head(fq)


@register_learner("baseline++")
class BaselinePlusPlus(Baseline):
    """Chen et al.'s Baseline++: as Baseline with a cosine-similarity classifier (both stages)."""

    description = ("Baseline++: Baseline with a weight-normalised cosine classifier (scale 2, 10 "
                   "above 200 classes) in training and fine-tuning")
    paper = ("Chen, Liu, Kira, Wang & Huang, 'A Closer Look at Few-shot Classification', ICLR 2019 "
             "(Baseline++)")

    def new_head(self, features: int, classes: int) -> nn.Module:
        """s · cos(f_θ(x), w_k) with weight-normalised w_k (:class:`CosineHead`)."""
        return CosineHead(features, classes)

    def prototype_logits(self, query_z: Tensor, protos: Tensor) -> Tensor:
        """The metric for transductive inference on prototypes: the cosine classifier with class
        vectors w_k = the prototypes, s · cos(z, c_k), s as the N-way head's scale."""
        return cosine_logits(query_z, protos, chen_cosine_scale(protos.shape[0]))
