"""Standard supervised training: the baseline of the MLTP paper.

Deng & Zhang, "Is the Meta-Learning Idea Able to Improve the Generalization of Deep Neural
Networks on the Standard Supervised Learning?", ICPR 2020, section III-A: in every
iteration a minibatch (x_bat, y_bat) gives the loss

    C(w, x_bat, y_bat) = L(f(w, x_bat), y_bat)                       (eq. 1)

(L = cross-entropy here) and w takes one step of the optimiser on ∂C/∂w. Weight decay is
the optimiser's ``weight_decay``, i.e. the objective gains β R(w) with R(w) = ½‖w‖² (the
paper's eq. 6 applied to eq. 1; torch adds β w to the gradient, which is L2
regularisation, not AdamW's decoupled decay).

The learner consumes the same :class:`~fewshot.data.supervised.TaskPairBatch` as MLTP
(two halves of one minibatch of B images) and trains on their union, so that standard
training and MLTP see exactly the same images per iteration, the same network, schedule
and augmentation.

This module also holds :class:`SupervisedLearner`, the machinery the two supervised
learners share: the classifier, the optimiser (Adam or SGD with momentum), batch checks
and ``predict_batch``. The paper's step schedules (lr divided by 10 after epochs 50 and 100
on CIFAR, 30 and 60 on Tiny ImageNet) are the trainer's ``train.lr_milestones`` /
``train.lr_gamma``: at each epoch start it sets every parameter group's lr to
r_0 · gamma^(milestones passed), which is MultiStepLR stepped per epoch. Used without
the trainer, a scheduler placed in ``learner.schedulers["meta"]`` is stepped after every
optimiser step by :meth:`Learner.outer_step`.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.errors import ConfigError, TrainingError
from fewshot.learners.base import Learner, LearnerConfig, accuracy, require
from fewshot.learners.registry import register_learner

_OPTIMIZERS = ("adam", "sgd")


@dataclass
class SupervisedConfig(LearnerConfig):
    """Hyper-parameters shared by ``standard`` and the MLTP learners.

    Defaults are the paper's CIFAR settings (section IV-A): Adam, lr 1e-3, divided by 10
    after epochs 50 and 100 (the schedule is the trainer's train.lr_milestones).
    """

    lr: float = 1e-3  # r in Algorithm 1 (initial learning rate of w and α)
    backbone: str = "cnet1"  # a name known to fewshot.nn.build_classifier
    backbone_options: Dict = field(default_factory=dict)
    optimizer: str = "adam"  # "adam" | "sgd" (SGD with momentum, the Tiny ImageNet setting)
    momentum: float = 0.9  # SGD momentum (ignored by Adam)
    nesterov: bool = False  # Nesterov momentum (SGD only; the paper uses plain momentum)
    weight_decay: float = 0.0  # β of eq. 6 with R(w) = ½‖w‖² (never applied to step sizes α)

    def validate(self) -> None:
        super().validate()
        require(self.optimizer in _OPTIMIZERS,
                f"learner option 'optimizer' must be one of {', '.join(_OPTIMIZERS)}, "
                f"got '{self.optimizer}'")
        require(0.0 <= self.momentum < 1.0,
                f"learner option 'momentum' must lie in [0, 1), got {self.momentum}")
        require(self.weight_decay >= 0.0,
                f"learner option 'weight_decay' must be >= 0, got {self.weight_decay}")


def topk_correct(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> Dict[int, Tensor]:
    """Number of rows whose label is among the k largest logits, for each k (0-dim tensors).

    k larger than the number of classes counts every row as correct (top-5 of a 3-class
    problem is trivially 100%).
    """
    out = {}
    kmax = min(max(ks), logits.shape[-1])
    top = logits.topk(kmax, dim=-1).indices
    hit = top == labels.unsqueeze(-1)
    for k in ks:
        out[k] = hit[:, :min(k, kmax)].any(dim=-1).sum()
    return out


class SupervisedLearner(Learner):
    """Shared machinery of the supervised learners (``input_kind = "supervised"``).

    Owns ``self.model`` (a classifier ``(B, C, H, W) -> (B, num_classes)`` logits), one
    optimiser ``self.optimizers["meta"]`` over w (with ``weight_decay``) and any extra
    parameter group a subclass adds (MLTP's step sizes α, without weight decay).
    """

    input_kind = "supervised"
    Config = SupervisedConfig
    fine_tunes_at_test = False

    def __init__(self, config: Optional[SupervisedConfig] = None, *, in_channels: int,
                 image_size: int, num_classes: Optional[int] = None,
                 backbone: Optional[nn.Module] = None):
        super().__init__(config, in_channels=in_channels, image_size=image_size,
                         num_classes=num_classes, backbone=backbone)
        if num_classes is None or int(num_classes) < 2:
            raise ConfigError(f"learner '{self.name}' trains a classifier over the training "
                              f"classes and needs num_classes >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.model = self._build_model()

    # ------------------------------------------------------------------ set-up
    def _build_model(self) -> nn.Module:
        """``config.backbone`` from :func:`fewshot.nn.build_classifier`, or the user's backbone
        followed by a linear ``head`` over ``num_classes``."""
        if self._given_backbone is not None:
            feats = self._given_backbone
            d = getattr(feats, "out_features", None)
            if not isinstance(d, int) or d < 1:
                raise ConfigError(f"learner '{self.name}': the given backbone must expose "
                                  f"'out_features' (its feature size), got {d!r}")
            return nn.Sequential(OrderedDict(features=feats,
                                             head=nn.Linear(d, self.num_classes)))
        from fewshot.nn import build_classifier

        return build_classifier(self.config.backbone, in_channels=self.in_channels,
                                image_size=self.image_size, num_classes=self.num_classes,
                                **self.config.backbone_options)

    def _make_optimizer(self, extra_params: Sequence[Tensor] = ()) -> None:
        """One optimiser over w (weight decay β) and ``extra_params`` (no weight decay).

        Algorithm 1, line 7: w and α are both updated with learning rate r by the same
        optimiser; eq. 6's β R(w) regularises w only.
        """
        c = self.config
        groups = [{"params": list(self.model.parameters()), "weight_decay": c.weight_decay}]
        extra = [p for p in extra_params if p.requires_grad]
        if extra:
            groups.append({"params": extra, "weight_decay": 0.0})
        if c.optimizer == "adam":
            opt = torch.optim.Adam(groups, lr=c.lr, foreach=True)
        else:
            opt = torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov, foreach=True)
        self.optimizers["meta"] = opt

    def current_lr(self) -> float:
        """The learning rate r of w at this step."""
        return float(self.optimizers["meta"].param_groups[0]["lr"])

    # ------------------------------------------------------------------ checks
    def check_batch(self, batch) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return ``(x_i, y_i, x_j, y_j)`` after checking shapes and labels.

        The two halves must be equally large: the paper splits a minibatch of 128 into two
        tasks of 64 (section IV-A). An odd minibatch is refused rather than split unevenly.
        Shapes are checked always (host metadata); label ranges only for labels still on the
        CPU: on an accelerator the check would be a host sync per step, so labels are checked
        where they are made, on the host before the copy (the store's labels are in range by
        construction), and cross-entropy itself refuses an out-of-range label on the device.
        """
        try:
            x_i, y_i, x_j, y_j = batch.x_i, batch.y_i, batch.x_j, batch.y_j
        except AttributeError:
            raise ConfigError(f"learner '{self.name}' consumes TaskPairBatch(x_i, y_i, x_j, y_j) "
                              f"minibatches, got {type(batch).__name__}") from None
        for nm, x, y in (("task_i", x_i, y_i), ("task_j", x_j, y_j)):
            if x.dim() != 4 or x.shape[1] != self.in_channels:
                raise ConfigError(f"{nm} images must be (B, {self.in_channels}, H, W), "
                                  f"got {tuple(x.shape)}")
            if y.dim() != 1 or y.shape[0] != x.shape[0]:
                raise ConfigError(f"{nm} has {x.shape[0]} images but labels of shape "
                                  f"{tuple(y.shape)}")
            if x.shape[0] == 0:
                raise ConfigError(f"{nm} is empty; use a batch_size of at least 2")
            if y.device.type == "cpu":  # on an accelerator int(y.min()) would stall every step
                lo, hi = int(y.min()), int(y.max())
                if lo < 0 or hi >= self.num_classes:
                    raise ConfigError(f"{nm} labels must lie in 0..{self.num_classes - 1}, "
                                      f"found {lo}..{hi}")
        if x_i.shape[0] != x_j.shape[0]:
            raise ConfigError(f"task_i has {x_i.shape[0]} images and task_j {x_j.shape[0]}: a "
                              f"minibatch is split into two equal halves (MLTP paper sec. IV); "
                              f"use an even batch_size")
        dev = self.device
        self._fuse_optimizer(dev)
        return x_i.to(dev), y_i.to(dev), x_j.to(dev), y_j.to(dev)

    def _fuse_optimizer(self, dev: torch.device) -> None:
        """On CUDA, switch the optimiser to its fused kernel (one launch for all tensors instead
        of a multi-tensor loop; same update rule up to float rounding). Done once, on the first
        step on the device, since the learner is built on the CPU and moved afterwards; a
        resumed optimiser's step counters move to the device, as fused Adam needs."""
        opt = self.optimizers.get("meta")
        if dev.type != "cuda" or opt is None or getattr(self, "_fused_on", None) == dev:
            return
        if all(p.device == dev for g in opt.param_groups for p in g["params"]):
            for g in opt.param_groups:
                g["fused"], g["foreach"] = True, False
            for st in opt.state.values():
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].to(dev, torch.float32)
            object.__setattr__(self, "_fused_on", dev)

    def _guard_finite(self, loss: Tensor, what: str = "loss") -> None:
        """Refuse a non-finite objective before any weight moves (nothing half-updated).

        Checked on CPU, where it costs nothing. On an accelerator the check would stall the
        device every step, so it is left to the trainer, which checks the logged metrics
        every ``log_every`` steps and stops with the same error.
        """
        if loss.device.type != "cpu":
            return
        if not bool(torch.isfinite(loss.detach()).all()):
            raise TrainingError(f"learner '{self.name}': non-finite {what} ({float(loss.detach())}) at "
                                f"training step {self.steps_done}; lower 'lr' (now "
                                f"{self.current_lr():g}) or check the inputs for NaN")

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict_batch(self, x: Tensor) -> Tensor:
        """Logits ``f(w, x)`` of shape (B, num_classes), in evaluation mode.

        No extra test-time computation for MLTP (sec. III-B): the network at w is used
        as it is (BatchNorm with running statistics, dropout off).
        """
        was = self.model.training
        self.model.eval()
        try:
            return self.model(x.to(self.device))
        finally:
            self.model.train(was)

    def predict(self, episode) -> Tensor:
        raise ConfigError(f"learner '{self.name}' is a supervised classifier over "
                          f"{self.num_classes} training classes and does not take few-shot "
                          f"episodes; evaluate it with predict_batch(x) on a test split")


@register_learner("standard")
class Standard(SupervisedLearner):
    """Ordinary supervised training (MLTP paper eq. 1): cross-entropy on the whole minibatch.

    ``train_step(TaskPairBatch)`` takes one optimiser step on
    C(w, x_bat, y_bat) = L(f(w, x_bat), y_bat) with x_bat = x_i ∪ x_j (both halves), plus the
    optimiser's weight decay β·½‖w‖² (eq. 6 without the meta term).
    """

    #: first-order only (no gradients through gradients): bf16/fp16 autocast is safe;
    #: tested in tests/learners/test_autocast.py
    supports_autocast = True

    description = "standard supervised training (cross-entropy on each minibatch), MLTP's baseline"
    paper = ("Deng & Zhang, Is the Meta-Learning Idea Able to Improve the Generalization of Deep "
             "Neural Networks on the Standard Supervised Learning?, ICPR 2020 (baseline, eq. 1)")

    def __init__(self, config: Optional[SupervisedConfig] = None, **kwargs):
        super().__init__(config, **kwargs)
        self._make_optimizer()

    def loss(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        """C(w, x, y) of eq. 1 and the logits."""
        logits = self.model(x)
        return F.cross_entropy(logits, y), logits

    def train_step(self, batch) -> Dict[str, Tensor]:
        x_i, y_i, x_j, y_j = self.check_batch(batch)
        self.model.train()
        x = torch.cat([x_i, x_j])
        y = torch.cat([y_i, y_j])
        loss, logits = self.loss(x, y)
        self._guard_finite(loss)
        opt = self.optimizers["meta"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        self.outer_step("meta")
        self.steps_done += 1
        return {"loss": loss.detach(), "acc": accuracy(logits.detach(), y)}
