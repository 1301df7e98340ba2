"""L2G: Learning to Generalize to unseen tasks with bilevel optimisation, and MAML + X.

Lee, Na, Lee & Hwang, "Learning to Generalize to Unseen Tasks with Bilevel Optimization"
(arXiv 2019), Algorithm 1 and eqs. 3-5, on a metric-based base learner X (Prototypical
Networks, eqs. 6-8, or Relation Networks, eqs. 9-11). A step receives T task pairs (T_i, T_j)
with disjoint classes (T = ``train.meta_batch``; the paper uses 5). For each pair, with the
embedding (and relation module) parameters θ and X's loss L on a task's queries x̃ against
prototypes ρ_c from its support set:

    θ' = θ − α ∇_θ L_Ti({ρ_c}, f_θ(x̃))                                          (eq. 3)
    min_θ  L_Tj({ρ_c}, f_θ'(x̃))      (prototypes and queries of T_j embedded by θ')   (eq. 4)

θ takes an Adam step (β, halved every ``lr_halve_every`` steps) on the mean of eq. 4 over the
T pairs (eq. 5). The inner step goes through :class:`fewshot.inner_loop.InnerLoop` and is
second order as eq. 4 states; ``first_order=True`` is what the authors' code effectively
computes. α = 1e-2 is fixed; ``learn_inner_lr=True`` learns it per layer (Meta-SGD).
**MAML + X** (the paper's baseline) is the same scheme with T_j = T_i on plain episodes.
Test time: no fine-tuning; :meth:`L2G.predict` returns X's query scores at θ.

Choices where the paper is silent (reasons: ``docs/learners.md``):

* X's losses are averaged over queries (Snell's and Sung's code), not summed as eqs. 8, 11.
* BatchNorm (``bn``, default ``"running"``): the running statistics are updated by the outer
  forward on T_j only and used at test; ``"transductive"`` normalises every forward, test
  queries included, with the batch's statistics; ``"per_step"`` tests with step 0's set.
* Support and query images of a task go through the embedding in one batch.
* Prototypes: mean of the support embeddings for ProtoNet (eq. 6), sum for RelationNet (eq. 9).
* Adam without weight decay (the authors' code passes 0.9).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.errors import ConfigError, DataError
from fewshot.inner_loop import BN_POLICIES, TASK_BATCHING, InnerLoop, batched_oom_guard
from fewshot.learners.base import Learner, LearnerConfig, accuracy, require
from fewshot.learners.common import (batches_tasks, check_episode, check_inner_checkpoint,
                                     check_lr_halve_every, choice,
                                     class_sums, eval_mode, halve_lr_every, meta_adam, one_hot,
                                     positive_float, positive_int, prototypes,
                                     squared_euclidean_logits, stack)
from fewshot.learners.registry import register_learner

__all__ = ["L2GConfig", "L2GRelationConfig", "L2GProtoNet", "L2GRelationNet", "MAMLProtoNet",
           "MAMLRelationNet", "ProtoNetScorer", "RelationNetScorer", "build_relation_scorer",
           "check_disjoint_pairs"]


# ------------------------------------------------------------------------------- base models
class ProtoNetScorer(nn.Module):
    """ProtoNet as one module: ``forward(support_x, support_y, query_x, ways)`` -> (Q, N) logits.

    Logits are −‖f_θ(x̃) − ρ_c‖² with ρ_c the mean support embedding of class c (L2G eqs. 6-7,
    Snell et al. eqs. 1-2); the loss is cross-entropy on them (eq. 8, averaged over queries).
    One module so that :class:`InnerLoop` can run it at θ and at θ'.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, ways: int) -> Tensor:
        s = support_x.shape[0]
        z = self.encoder(torch.cat([support_x, query_x], 0))
        z = z.reshape(z.shape[0], -1)
        return squared_euclidean_logits(z[s:], prototypes(z[:s], support_y, ways))

    @staticmethod
    def loss(scores: Tensor, query_y: Tensor, ways: int) -> Tensor:
        return F.cross_entropy(scores, query_y)


class RelationNetScorer(nn.Module):
    """RelationNet as one module: ``forward(support_x, support_y, query_x, ways)`` -> (Q, N).

    Feature maps f_θ(x) of shape (C, h, w); the prototype of class c is the *sum* of its
    support maps (L2G eq. 9); the relation module scores every (prototype, query) pair,
    s_{c,m} = d(concat(ρ_c, f_θ(x̃_m))) ∈ (0, 1) (eq. 10); the loss is the MSE between the
    scores and the one-hot match indicator (eq. 11, averaged over pairs as Sung et al.'s code).
    """

    def __init__(self, encoder: nn.Module, relation: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.relation = relation

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, ways: int) -> Tensor:
        s = support_x.shape[0]
        z = self.encoder(torch.cat([support_x, query_x], 0))  # (S + Q, C, h, w)
        return self.relation.pairwise(class_sums(z[:s], support_y, ways), z[s:])

    @staticmethod
    def loss(scores: Tensor, query_y: Tensor, ways: int) -> Tensor:
        target = one_hot(query_y, ways, scores.dtype)
        return F.mse_loss(scores, target)  # (one-hot by comparison: vmap-safe, no host sync)


def build_relation_scorer(learner: Learner) -> RelationNetScorer:
    """Conv-4 without its last two max-pools (L2G "Implementation Details") + relation module.

    ``backbone_options`` may override the embedding (e.g. Sung et al.'s padding [0, 0, 1, 1]);
    a user-supplied backbone must return feature maps (``flatten=False``, ``out_shape``).
    """
    from fewshot.nn import RelationModule

    if learner._given_backbone is not None:
        encoder = learner._given_backbone
    else:
        options = {"pool_blocks": 2} if learner.config.backbone == "conv4" else {}
        options.update(learner.config.backbone_options)
        options["flatten"] = False
        from fewshot.nn import build_backbone

        encoder = build_backbone(learner.config.backbone, in_channels=learner.in_channels,
                                 image_size=learner.image_size, **options)
    relation = RelationModule.for_backbone(encoder, hidden=learner.config.relation_hidden)
    return RelationNetScorer(encoder, relation)


def check_disjoint_pairs(pairs: Sequence[Tuple[object, object]]) -> None:
    """Raise :class:`DataError` if some pair (T_i, T_j) shares a class (``classes`` stay on the
    host, :meth:`Episode.to`, so this never waits for the device).

    L2G's eq. 4 needs T_j "from a *disjoint* set of classes to the classes in the task T_i";
    the pair sampler guarantees it, this catches a mis-configured batch source.
    """
    overlaps = [torch.isin(ti.classes, tj.classes).any() for ti, tj in pairs]
    if bool(torch.stack(overlaps).any()):
        bad = [k for k, o in enumerate(overlaps) if bool(o)]
        ti, tj = pairs[bad[0]]
        shared = sorted(set(ti.classes.tolist()) & set(tj.classes.tolist()))
        raise DataError(f"L2G task pair {bad[0]} shares classes {shared[:5]} between T_i and T_j; "
                        "L2G needs disjoint classes: draw pairs with DisjointPairSampler "
                        "(train.pair) or use maml+protonet / maml+relationnet for T_j = T_i")


# ------------------------------------------------------------------------------- the learner
@dataclass
class L2GConfig(LearnerConfig):
    """L2G / MAML + X hyper-parameters (defaults: the L2G paper's "Implementation Details").

    lr: Adam learning rate of the meta-update (eq. 5's β), 1e-3.
    lr_halve_every: halve ``lr`` every this many outer steps (10,000 for ProtoNet, 100,000
        for RelationNet in the paper); 0 keeps it constant.
    inner_lr: α of eq. 3, 1e-2.
    inner_steps: gradient steps on T_i (the paper: 1).
    learn_inner_lr: learn one α per layer (Meta-SGD), initialised at ``inner_lr``.
    first_order: drop second derivatives in eq. 4 (the authors' code's effective behaviour).
    bn: BatchNorm policy of the inner loop: "running" (default), "transductive" or "per_step".
    weight_decay: Adam's L2 penalty (0; the authors' code's 0.9 is not copied).
    task_batching: "auto" | "on" | "off": adapt the T pairs as one batched computation.
    inner_checkpoint: recompute each second-order inner step of eq. 3 in the backward pass
        of eq. 4 instead of keeping its graph (same meta-gradient; memory nearly flat in
        ``inner_steps``); off by default, needs ``first_order = false``.
    """

    lr: float = 1e-3
    lr_halve_every: int = 10000
    inner_lr: float = 1e-2
    inner_steps: int = 1
    learn_inner_lr: bool = False
    first_order: bool = False
    bn: str = "running"
    weight_decay: float = 0.0
    task_batching: str = "auto"
    inner_checkpoint: bool = False

    def validate(self) -> None:
        super().validate()
        choice(self.task_batching, "task_batching", TASK_BATCHING)
        check_inner_checkpoint(self)
        check_lr_halve_every(self.lr_halve_every)
        require(self.inner_lr > 0, f"learner option 'inner_lr' (α of L2G eq. 3) must be > 0, "
                                   f"got {self.inner_lr}")
        positive_int(self.inner_steps, "inner_steps", 1)
        require(self.bn in BN_POLICIES, f"learner option 'bn' must be one of "
                                        f"{', '.join(BN_POLICIES)}, got {self.bn!r}")
        require(self.weight_decay >= 0, f"learner option 'weight_decay' must be >= 0, "
                                        f"got {self.weight_decay}")


class _BilevelMetric(Learner):
    """Shared machinery of L2G + X and MAML + X (see the module docstring)."""

    fine_tunes_at_test = False
    #: True for MAML + X: T_j = T_i
    same_task: ClassVar[bool] = False
    #: X: "protonet" or "relationnet"
    base_learner: ClassVar[str] = "protonet"

    def __init__(self, config=None, *, in_channels, image_size, num_classes=None, backbone=None):
        super().__init__(config, in_channels=in_channels, image_size=image_size,
                         num_classes=num_classes, backbone=backbone)
        cfg = self.config
        #: X as one module: forward(support_x, support_y, query_x, ways) -> (Q, N) scores
        self.scorer = self.build_scorer()
        #: eq. 3's step θ' = θ − α ∇_θ L_Ti (α fixed, or per-layer learnable as Meta-SGD)
        self.inner = InnerLoop(self.scorer, steps=cfg.inner_steps, lr=cfg.inner_lr,
                               learn_lr=cfg.learn_inner_lr, lr_per="layer",
                               first_order=cfg.first_order, bn=cfg.bn,
                               recompute=cfg.inner_checkpoint)
        params = list(self.scorer.parameters()) + list(self.inner.parameters())
        self.optimizers["meta"] = meta_adam(params, cfg.lr, weight_decay=cfg.weight_decay)
        halve_lr_every(self, cfg.lr_halve_every)

    # the base learner X -------------------------------------------------------------------
    def build_scorer(self) -> nn.Module:
        """X as one module; subclasses pick ProtoNet or RelationNet by ``base_learner``."""
        if self.base_learner == "protonet":
            return ProtoNetScorer(self.make_backbone())
        return build_relation_scorer(self)

    def task_loss(self, net, task) -> Tuple[Tensor, Tensor]:
        """X's loss L_T({ρ_c}, f(x̃)) of ``task`` under ``net`` (θ or θ'), and its scores."""
        scores = net(task.support_x, task.support_y, task.query_x, task.ways)
        return self.scorer.loss(scores, task.query_y, task.ways), scores

    # batches ------------------------------------------------------------------------------
    def _pairs(self, batch) -> List[Tuple[object, object]]:
        if not isinstance(batch, (list, tuple)) or len(batch) == 0:
            raise ConfigError(f"learner '{self.name}' trains on a non-empty list of "
                              f"{'episodes' if self.same_task else '(T_i, T_j) episode pairs'}, "
                              f"got {type(batch).__name__}")
        if self.same_task:
            for ep in batch:
                if isinstance(ep, (tuple, list)):
                    raise ConfigError(f"learner '{self.name}' (MAML + X, T_j = T_i) trains on "
                                      "episodes, not pairs; its input_kind is 'episodes'")
                check_episode(self, ep)
            return [(ep, ep) for ep in batch]
        pairs = []
        for item in batch:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise ConfigError(f"learner '{self.name}' trains on (T_i, T_j) episode pairs "
                                  f"(input_kind 'pairs'), got {type(item).__name__}")
            check_episode(self, item[0])
            check_episode(self, item[1])
            pairs.append((item[0], item[1]))
        check_disjoint_pairs(pairs)
        return pairs

    # protocol -----------------------------------------------------------------------------
    def train_step(self, batch) -> Dict[str, Tensor]:
        """One meta-update (eq. 5) on the mean over pairs of eq. 4's L_Tj(θ').

        Each pair's outer loss is back-propagated as soon as it is computed (its graph is
        freed before the next pair's), the gradients accumulate, then one Adam step.
        """
        pairs = self._pairs(batch)
        self.train()
        if batches_tasks(self, pairs):
            return self._train_batched(pairs)
        opt = self.optimizers["meta"]
        opt.zero_grad(set_to_none=True)
        n = len(pairs)
        outer, inner, accs = [], [], []
        for t_i, t_j in pairs:
            first = []

            def inner_loss(net, t_i=t_i, first=first):
                loss, _ = self.task_loss(net, t_i)
                if not first:
                    first.append(loss.detach())
                return loss

            adapted = self.inner.adapt(inner_loss)           # θ' (eq. 3)
            loss_j, scores = self.task_loss(adapted, t_j)    # L_Tj(θ') (eq. 4)
            (loss_j / n).backward()
            outer.append(loss_j.detach())
            inner.append(first[0])
            accs.append(accuracy(scores.detach(), t_j.query_y))
        return self._finish_step(torch.stack(outer).mean(), torch.stack(accs).mean(),
                                 torch.stack(inner).mean())

    def _train_batched(self, pairs) -> Dict[str, Tensor]:
        """:meth:`train_step` with the T pairs as one batched computation: θ'_i for all T_i
        by ``adapt_batched`` (eq. 3), then one backward of (1/T) Σ L_Tj(θ'_i) (eqs. 4-5)."""
        self.optimizers["meta"].zero_grad(set_to_none=True)
        t_i = [p[0] for p in pairs]
        t_j = [p[1] for p in pairs]
        ways_i, ways_j = t_i[0].ways, t_j[0].ways
        fields = ("support_x", "support_y", "query_x", "query_y")
        si, sj = [stack(t_i, f) for f in fields], [stack(t_j, f) for f in fields]

        def inner_loss(net, sx, sy, qx, qy):
            return self.scorer.loss(net(sx, sy, qx, ways_i), qy, ways_i)

        with batched_oom_guard(len(pairs), f"learner '{self.name}'"):
            adapted = self.inner.adapt_batched(inner_loss, *si)          # θ'_i (eq. 3)
            scores = adapted(sj[0], sj[1], sj[2], ways_j)                # (T, Q, N)
            losses = torch.func.vmap(lambda s, y: self.scorer.loss(s, y, ways_j))(scores, sj[3])
            losses.mean().backward()                                     # eqs. 4-5
        accs = (scores.detach().argmax(-1) == sj[3]).float().mean(1)
        return self._finish_step(losses.detach().mean(), accs.mean(), adapted.inner_losses[0].mean())

    def _finish_step(self, loss: Tensor, acc: Tensor, inner: Tensor) -> Dict[str, Tensor]:
        """Finiteness check, per-network clipping, the Adam step (eq. 5) and the metrics."""
        self.check_finite(loss, self.steps_done)
        clip = getattr(self.config, "grad_clip", 0)
        if clip:
            for part in self.scorer.children():
                torch.nn.utils.clip_grad_norm_(part.parameters(), clip)
        self.outer_step("meta")
        self.steps_done += 1
        return {"loss": loss, "acc": acc, "inner_loss": inner}

    def predict(self, episode) -> Tensor:
        """X's query scores at the meta-learned θ, no fine-tuning (L2G sec. 3.3).

        The forward goes through the inner loop's functional model at θ, in eval mode, so
        BatchNorm follows the ``bn`` policy: "transductive" normalises with the statistics of
        the episode's own batch (support and query images, embedded together as in
        training), "running" with the running statistics, "per_step" with the per-step set
        of step index 0 (θ is the network after 0 inner steps; set 0 is the one the inner
        step's forward at θ updates in training).
        """
        check_episode(self, episode)
        with eval_mode(self), torch.no_grad():
            net = self.inner.functional(step=0)
            return net(episode.support_x, episode.support_y, episode.query_x, episode.ways)


@dataclass
class L2GRelationConfig(L2GConfig):
    """As :class:`L2GConfig` with RelationNet's schedule (halve every 100,000 steps),
    ``relation_hidden``, the width of the relation module's first fc layer (8, Sung et al.),
    and ``grad_clip``: each network's (embedding, relation module) meta-gradient norm is
    clipped to it (0.5, Sung et al.'s code and our RelationNet baseline; 0 = off)."""

    lr_halve_every: int = 100000
    relation_hidden: int = 8
    grad_clip: float = 0.5

    def validate(self) -> None:
        super().validate()
        positive_int(self.relation_hidden, "relation_hidden", 1)
        positive_float(self.grad_clip, "grad_clip", allow_zero=True, note="(0 = off)")


_L2G_PAPER = ("Lee, Na, Lee & Hwang, 'Learning to Generalize to Unseen Tasks with Bilevel "
              "Optimization', arXiv:1908.01457, 2019")


@register_learner("l2g+protonet")
class L2GProtoNet(_BilevelMetric):
    """L2G + Prototypical Networks: θ' from T_i (eq. 3), meta-loss on disjoint T_j (eq. 4)."""

    description = ("L2G + ProtoNet: inner step on task T_i, meta-loss on a class-disjoint task "
                   "T_j at the adapted weights; no fine-tuning at test")
    paper = _L2G_PAPER
    input_kind = "pairs"
    Config = L2GConfig


@register_learner("maml+protonet")
class MAMLProtoNet(_BilevelMetric):
    """MAML + Prototypical Networks: L2G's bilevel scheme with T_j = T_i (baseline 6)."""

    description = ("MAML + ProtoNet: inner step on a task, meta-loss on the same task at the "
                   "adapted weights (L2G paper's baseline); no fine-tuning at test")
    paper = _L2G_PAPER
    input_kind = "episodes"
    same_task = True
    Config = L2GConfig


@register_learner("l2g+relationnet")
class L2GRelationNet(_BilevelMetric):
    """L2G + Relation Networks: θ (embedding and relation module) adapted on T_i, meta-loss on T_j."""

    description = ("L2G + RelationNet: inner step on task T_i, relation-score MSE on a "
                   "class-disjoint task T_j at the adapted weights; no fine-tuning at test")
    paper = _L2G_PAPER
    input_kind = "pairs"
    base_learner = "relationnet"
    Config = L2GRelationConfig


@register_learner("maml+relationnet")
class MAMLRelationNet(_BilevelMetric):
    """MAML + Relation Networks: L2G's bilevel scheme with T_j = T_i (baseline 6)."""

    description = ("MAML + RelationNet: inner step on a task, relation-score MSE on the same "
                   "task at the adapted weights (L2G paper's baseline); no fine-tuning at test")
    paper = _L2G_PAPER
    input_kind = "episodes"
    same_task = True
    base_learner = "relationnet"
    Config = L2GRelationConfig
