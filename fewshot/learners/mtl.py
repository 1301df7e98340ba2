"""MTL: meta-transfer learning, joint transfer learning and meta-learning (MAML or Reptile).

"Meta-Transfer Learning", AAAI student abstract (``meta_transfer_aaai``), Algorithm 1. One
model f_θ: a shared feature extractor with an N-way head for the sampled tasks and a C-way
head over all C base classes (Figure 1). Each iteration, for a batch of tasks τ_i ~ p(τ):

    θ_i = θ − α_inner ∇L_τi(f_θ)   for k steps, one per sub-batch of τ_i's examples  (lines 5-6)
    θ_metalearner = θ − α_outer Σ_i ∇L_τi(f_θi)                           (line 7, MAML)
    θ_metalearner = θ + α_outer Σ_i (θ_i − θ)                             (line 8, Reptile)
    θ_discriminator = θ − α_d ∇L_(x,y)(f_θ)                               (line 9, transfer)
    θ ← β θ_metalearner + (1 − β) θ_discriminator                         (line 10)

L_(x,y) is the C-way cross-entropy over all instances of the sampled tasks with their
base-class labels (``base_support_y`` / ``base_query_y``). Lines 7 and 9 start from the same
θ; ``beta`` (default 0.9) weighs the meta-learner's copy: β = 1 is the plain meta-learner,
β = 0 plain transfer. Line 9 leaves the N-way head and line 7/8 the C-way head where they are.

Choices where the paper is silent (reasons and the authors' code: ``docs/learners.md``):

* Σ_i is a mean over the meta-batch: α_outer(paper) = ``lr`` / meta-batch. Each step is plain
  SGD or Adam (β1 = 0); the transfer Adam keeps its moments across iterations.
* Sub-batches: ``inner_batch`` = B (20) cuts shuffled passes into k batches of B (OpenAI's
  Reptile); ``None`` splits a random permutation into k parts. MTL+MAML adapts on the support
  set and takes line 7's loss on the query set; MTL+Reptile adapts on all of a task's examples.
* Defaults from the authors' code: Conv-4 (32 filters), zero-initialised heads, k = 10,
  α_inner = α_d = 1e-3 with Adam; MTL+Reptile interpolates with α_outer = 1 (``anneal_steps``
  decays it to 0). MTL+MAML is second order (the authors' "MAML" is first order,
  ``first_order=true``) with SGD inner steps (α_inner = 0.01) and Adam meta steps (1e-3).
* ``mode = "paper"`` (default): Algorithm 1 as printed; one transfer step on all the tasks'
  images, line 10's full step, the inner Adam's state new for every task.
* ``mode = "authors"`` (MTL+Reptile only) reproduces the authors' code
  (github.com/erfaneshrati/meta-transfer-learning, ``Reptile.train_metatransfer_step``):
  per task, one transfer step on the C-way loss of its k inner mini-batches gives φ_i and
  θ_disc = mean_i φ_i; the moved copies are averaged, θ ← ½ θ + ½ (β θ_meta + (1 − β) θ_disc)
  (half of line 10's step, weights 0.45 / 0.05 at β = 0.9: their hard-coded "0.1"); the inner
  and transfer Adams keep their state across tasks, so tasks run in sequence on one
  process (no rank averaging); needs ``bn = "transductive"``. Not reproduced in either mode:
  TF Adam's ε on the un-corrected √v, tasks' classes drawn with replacement, their
  evaluation (one query per class, 100 tasks) and curves on the test split.

Evaluation (``predict``; the paper: "regular stochastic gradient descent"): a new
zero-initialised N-way head for the episode's N, ``eval_steps`` SGD steps of ``eval_lr`` on
mini-batches of at most ``eval_batch`` support examples (all parameters adapt), then the
query logits. BatchNorm follows ``bn`` ("transductive" by default); under "per_step" (MTL+MAML
only) fine-tuning step s reads the training statistics of step min(s, k). MTL+Reptile refuses
"per_step", and "running" at β = 1 (nothing on Reptile's side would learn those statistics).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.errors import ConfigError, DataError
from fewshot.inner_loop import BN_POLICIES, TASK_BATCHING, InnerLoop, batched_oom_guard
from fewshot.learners.base import Learner, LearnerConfig, accuracy, host_label_span, require
from fewshot.learners.common import (all_examples, batched_query_loss, batches_tasks,
                                     check_batch, check_episode, choice, eval_mode,
                                     minibatch_indices, minibatch_loss, positive_float,
                                     positive_int, stack, stacked_examples)
from fewshot.learners.registry import register_learner

__all__ = ["MTLNet", "MTLConfig", "MTLMAML", "MTLReptile", "sub_batches"]

_PAPER = ("'Meta-Transfer Learning' (joint transfer learning and meta-learning), AAAI student "
          "abstract; Algorithm 1")


def sub_batches(n: int, k: int, batch: Optional[int], generator: torch.Generator) -> List[Tensor]:
    """Indices of the k sub-batches of n examples (see the module docstring).

    ``batch=None``: a random permutation split into k nearly equal parts (needs k <= n).
    ``batch=B``: k batches of B from shuffled passes over the examples, reshuffled when
    used up (Reptile's mini-batches, :func:`fewshot.learners.common.minibatch_indices`);
    needs B <= n.
    """
    if batch is None:
        if k > n:
            raise ConfigError(f"MTL cannot split a task of {n} examples into k={k} sub-batches "
                              f"(learner option 'inner_steps'); use k <= {n} or set 'inner_batch'")
        return list(torch.tensor_split(torch.randperm(n, generator=generator), k))
    if batch > n:
        raise ConfigError(f"MTL sub-batch size inner_batch={batch} exceeds the task's {n} "
                          f"examples; lower 'inner_batch' or use more shots")
    return minibatch_indices(n, batch, k, generator)


class MTLNet(nn.Module):
    """A feature extractor with an N-way ``head`` and a C-way ``base_head`` (paper Fig. 1).

    ``forward(x)`` gives N-way task logits, ``forward(x, base=True)`` C-way base-class
    logits. Both heads start at zero (the authors' code).
    """

    def __init__(self, backbone: nn.Module, ways: int, num_classes: Optional[int]):
        super().__init__()
        features = getattr(backbone, "out_features", None)
        if not isinstance(features, int) or features < 1:
            raise ConfigError("MTL's backbone must expose out_features (its flat feature size)")
        self.backbone = backbone
        like = next(backbone.parameters(), None)
        self.head = _zero_linear(features, ways, like)
        self.base_head = _zero_linear(features, num_classes, like) if num_classes else None

    def features(self, x: Tensor) -> Tensor:
        z = self.backbone(x)
        return z.reshape(z.shape[0], -1)

    def forward(self, x: Tensor, base: bool = False) -> Tensor:
        return (self.base_head if base else self.head)(self.features(x))


class _FineTuneNet(nn.Module):
    """The shared feature extractor with a new N-way head, for test-time fine-tuning."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        z = self.backbone(x)
        return self.head(z.reshape(z.shape[0], -1))


def _zero_linear(d_in: int, d_out: int, like: Optional[Tensor] = None) -> nn.Linear:
    """A zero-initialised ``nn.Linear`` on the device and dtype of ``like``."""
    kw = {} if like is None else {"device": like.device, "dtype": like.dtype}
    layer = nn.Linear(d_in, d_out, **kw)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _copy_per_step_stats(source: InnerLoop, target: InnerLoop) -> None:
    """Give ``target``'s step s the per-step BatchNorm statistics of ``source``'s step
    min(s, T_source) (MAML++'s policy: steps beyond the trained ones read the last set), so
    that test-time fine-tuning with a new loop normalises with the learned statistics."""
    last = source.steps
    for k in range(len(source._bn_names)):
        for kind in ("mean", "var"):
            src, dst = getattr(source, f"bn_{kind}_{k}"), getattr(target, f"bn_{kind}_{k}")
            idx = torch.clamp(torch.arange(dst.shape[0], device=src.device), max=last)
            dst.copy_(src[idx])


@torch.no_grad()
def _load(params: List[Tensor], values: List[Tensor]) -> None:
    for p, v in zip(params, values):
        p.copy_(v)


def _not_base_head(name: str, param, module) -> bool:
    return not name.startswith("base_head.")


@dataclass
class MTLConfig(LearnerConfig):
    """MTL hyper-parameters (see the module docstring for the equations and defaults).

    lr: α_outer, the meta-learner step (Reptile: interpolation 1.0; MAML: Adam 1e-3).
    meta_optimizer: "sgd" (the paper's plain step) or "adam" for line 7/8.
    beta: β of line 10, weight of the meta-learner's copy, in [0, 1] (0.9: the authors' code's
        "0.1" on the transfer copy; their update is half of line 10's, see ``mode``).
    ways: N of the training tasks' head (every training episode must be N-way).
    inner_steps: k, inner steps per task (10).
    inner_batch: examples per sub-batch (20); None splits the task into k parts.
    inner_lr: α_inner; inner_optimizer: "sgd" or "adam" (Adam with β1 = adam_beta1).
    first_order: MTL+MAML only: drop second derivatives through the inner steps.
    transfer_lr: α_d; transfer_optimizer: "sgd" or "adam" (β1 = adam_beta1).
    adam_beta1: β1 of the inner and transfer Adams (0, the authors' code).
    anneal_steps: decay lr linearly to 0 over this many iterations (0 = constant).
    eval_steps, eval_lr, eval_batch: test-time SGD fine-tuning of a new N-way head.
    bn: BatchNorm policy of the inner loop ("transductive", "running", "per_step").
    seed: seed of the sub-batch shuffles.
    mode: "paper" (Algorithm 1 as printed) or "authors" (MTL+Reptile only: the authors'
        update, sequential tasks, see the module docstring).
    task_batching: "auto" | "on" | "off": the meta side's inner loops (and test-time
        fine-tuning) as one batched computation over equal-shaped tasks.
    """

    lr: float = 1.0
    meta_optimizer: str = "sgd"
    beta: float = 0.9
    ways: int = 5
    inner_steps: int = 10
    inner_batch: Optional[int] = 20
    inner_lr: float = 1e-3
    inner_optimizer: str = "adam"
    first_order: bool = False
    transfer_lr: float = 1e-3
    transfer_optimizer: str = "adam"
    adam_beta1: float = 0.0
    anneal_steps: int = 0
    eval_steps: int = 50
    eval_lr: float = 0.01
    eval_batch: Optional[int] = 128
    bn: str = "transductive"
    seed: int = 0
    mode: str = "paper"
    task_batching: str = "auto"

    def validate(self) -> None:
        super().validate()
        choice(self.task_batching, "task_batching", TASK_BATCHING)
        require(self.mode in ("paper", "authors"), f"learner option 'mode' must be 'paper' "
                f"(Algorithm 1 as printed) or 'authors' (the authors' code), got {self.mode!r}")
        if self.mode == "authors":
            require(self.bn == "transductive" and self.meta_optimizer == "sgd",
                    "learner option mode='authors' reproduces the authors' code: it needs "
                    "bn='transductive' and meta_optimizer='sgd' (Reptile's interpolation)")
        require(isinstance(self.beta, (int, float)) and not isinstance(self.beta, bool)
                and 0.0 <= self.beta <= 1.0,
                f"learner option 'beta' (β of MTL Algorithm 1, line 10: the meta-learner's "
                f"weight) must lie in [0, 1], got {self.beta!r}")
        positive_int(self.ways, "ways", 1)
        positive_int(self.inner_steps, "inner_steps", 1)
        positive_int(self.eval_steps, "eval_steps", 0)
        positive_int(self.anneal_steps, "anneal_steps", 0)
        for opt in ("inner_batch", "eval_batch"):
            v = getattr(self, opt)
            if v is not None:
                positive_int(v, opt, 1)
        for opt in ("inner_lr", "transfer_lr", "eval_lr"):
            v = getattr(self, opt)
            positive_float(v, opt)
        for opt in ("meta_optimizer", "inner_optimizer", "transfer_optimizer"):
            require(getattr(self, opt) in ("sgd", "adam"),
                    f"learner option '{opt}' must be 'sgd' or 'adam', got {getattr(self, opt)!r}")
        require(0.0 <= self.adam_beta1 < 1.0,
                f"learner option 'adam_beta1' must lie in [0, 1), got {self.adam_beta1}")
        require(self.bn in BN_POLICIES, f"learner option 'bn' must be one of "
                                        f"{', '.join(BN_POLICIES)}, got {self.bn!r}")


class _MTL(Learner):
    """Meta-transfer learning (Algorithm 1); ``variant`` picks line 7 (MAML) or 8 (Reptile)."""

    paper = _PAPER
    input_kind = "episodes"
    fine_tunes_at_test = True
    variant: ClassVar[str] = "reptile"

    def __init__(self, config=None, *, in_channels, image_size, num_classes=None, backbone=None):
        super().__init__(config, in_channels=in_channels, image_size=image_size,
                         num_classes=num_classes, backbone=backbone)
        cfg = self.config
        if cfg.beta < 1 and not num_classes:
            raise ConfigError(f"learner '{self.name}' needs num_classes (the C base classes of "
                              f"the training split) for its transfer head when beta < 1 "
                              f"(beta={cfg.beta})")
        if self.variant == "reptile" and (cfg.bn == "per_step" or (cfg.bn == "running"
                                                                and cfg.beta == 1)):
            raise ConfigError(f"learner '{self.name}': bn={cfg.bn!r} with beta={cfg.beta} leaves "
                              "the test-time statistics unlearned (Reptile's side has no forward "
                              "after the inner steps; only the transfer step updates running "
                              "statistics); use 'transductive'")
        if cfg.mode == "authors" and self.variant != "reptile":
            raise ConfigError(f"learner '{self.name}': mode='authors' reproduces the authors' "
                              "Reptile update only (their 'MAML' is first-order FOML); use "
                              "mtl+reptile or mode='paper'")
        #: f_θ: shared features, N-way ``head``, C-way ``base_head``
        self.net = MTLNet(self.make_backbone(), cfg.ways, num_classes if cfg.beta < 1 else None)
        #: the k inner steps of lines 5-6 (adapts the features and the N-way head)
        self.inner = InnerLoop(self.net, steps=cfg.inner_steps, lr=cfg.inner_lr,
                               adapt=_not_base_head,
                               first_order=cfg.first_order or self.variant == "reptile",
                               bn=cfg.bn, optimizer=cfg.inner_optimizer,
                               adam_betas=(cfg.adam_beta1, 0.999))
        meta_params = list(self.net.backbone.parameters()) + list(self.net.head.parameters())
        self.optimizers["meta"] = self._optimizer(meta_params, cfg.meta_optimizer, cfg.lr,
                                                  beta1=0.9)
        if cfg.anneal_steps:
            total = cfg.anneal_steps
            self.schedulers["meta"] = torch.optim.lr_scheduler.LambdaLR(
                self.optimizers["meta"], lambda t: max(0.0, 1.0 - t / total))
        if self.net.base_head is not None:
            transfer_params = list(self.net.backbone.parameters()) + list(self.net.base_head.parameters())
            self.optimizers["transfer"] = self._optimizer(transfer_params, cfg.transfer_optimizer,
                                                          cfg.transfer_lr, beta1=cfg.adam_beta1)
        if cfg.mode == "authors":  # one inner optimiser for the whole run (its state persists)
            self.optimizers["inner"] = self._optimizer(meta_params, cfg.inner_optimizer,
                                                       cfg.inner_lr, beta1=cfg.adam_beta1)
        self._rng = torch.Generator().manual_seed(int(cfg.seed))

    @staticmethod
    def _optimizer(params, kind: str, lr: float, beta1: float) -> torch.optim.Optimizer:
        if kind == "adam":
            return torch.optim.Adam(params, lr=lr, betas=(beta1, 0.999), foreach=True)
        return torch.optim.SGD(params, lr=lr, foreach=True)

    # ----------------------------------------------------------------------- checks
    def inner_examples(self, ways: int, shots: int, queries: int) -> int:
        """How many examples the k inner steps of a task draw from (MAML: support only)."""
        return ways * shots if self.variant == "maml" else ways * (shots + queries)

    def validate_task(self, ways: int, shots: int, queries: int) -> None:
        """Raise :class:`ConfigError` before training if a ways/shots/queries task cannot be used.

        (ways must equal the N-way head's N; the k sub-batches must fit the task.)
        """
        cfg = self.config
        if ways != cfg.ways:
            raise ConfigError(f"learner '{self.name}' has an N-way head with N={cfg.ways} "
                              f"(option 'ways') but training tasks are {ways}-way")
        if self.variant == "maml" and queries < 1:
            raise ConfigError(f"learner '{self.name}' takes MAML's meta-loss on query examples; "
                              "train.queries must be >= 1")
        n = self.inner_examples(ways, shots, queries)
        sub_batches(n, cfg.inner_steps, cfg.inner_batch, torch.Generator())

    def _check_task(self, ep) -> None:
        n = ep.support_x.shape[0] + (0 if self.variant == "maml" else ep.query_x.shape[0])
        sub_batches(n, self.config.inner_steps, self.config.inner_batch, torch.Generator())
        if self.variant == "maml" and ep.query_x.shape[0] == 0:
            raise ConfigError(f"learner '{self.name}' needs query examples for MAML's meta-loss")
        if self.net.base_head is not None:
            if ep.base_support_y is None or ep.base_query_y is None:
                raise DataError(f"learner '{self.name}' needs base-class labels "
                                "(Episode.base_support_y / base_query_y) for its transfer update")

    def _base_targets(self, episodes) -> Tensor:
        y = torch.cat([torch.cat([ep.base_support_y, ep.base_query_y]) for ep in episodes])
        self._check_base(y)
        return y

    # ------------------------------------------------------------------- the update
    def _adapt(self, x: Tensor, y: Tensor, differentiable: bool):
        """θ_i after k inner steps, one per sub-batch of (x, y) (lines 5-6).

        Returns the adapted network and the (loss, accuracy) of the last inner step's
        sub-batch (Reptile's training metrics; no extra forward pass).
        """
        batches = [b.to(x.device) for b in sub_batches(x.shape[0], self.config.inner_steps,
                                                       self.config.inner_batch, self._rng)]
        last = {}
        adapted = self.inner.adapt(minibatch_loss(x, y, batches, last),
                                   differentiable=differentiable)
        return adapted, last

    def _meta_side(self, episodes) -> Dict[str, Tensor]:
        """Leave the gradient of line 7 (MAML) or line 8 (Reptile) in ``.grad`` and step."""
        n = len(episodes)
        losses, accs = [], []
        meta_params = [p for g in self.optimizers["meta"].param_groups for p in g["params"]]
        if batches_tasks(self, episodes):
            return self._meta_side_batched(episodes, meta_params)
        if self.variant == "maml":
            for ep in episodes:
                adapted, _ = self._adapt(ep.support_x, ep.support_y, differentiable=True)
                logits = adapted(ep.query_x)
                loss = F.cross_entropy(logits, ep.query_y)
                (loss / n).backward()
                losses.append(loss.detach())
                accs.append(accuracy(logits.detach(), ep.query_y))
        else:
            theta = list(self.net.parameters())
            total = [torch.zeros_like(p) for p in theta]
            for ep in episodes:
                x, y = all_examples(ep)
                adapted, last = self._adapt(x, y, differentiable=False)
                for acc_, new, old in zip(total, adapted.params, theta):
                    acc_.add_(new.detach() - old.detach())
                losses.append(last["loss"])
                accs.append(last["acc"])
            # SGD on −mean(θ_i − θ) is θ + α_outer · mean(θ_i − θ) (line 8)
            index = {id(p): k for k, p in enumerate(theta)}
            for p in meta_params:
                p.grad = -(total[index[id(p)]] / n)
        self.outer_step("meta")
        return {"meta_loss": torch.stack(losses).mean(), "meta_acc": torch.stack(accs).mean()}

    def _meta_side_batched(self, episodes, meta_params) -> Dict[str, Tensor]:
        """:meth:`_meta_side` with the T tasks' k inner steps as one batched computation.

        Sub-batches are drawn task by task from the learner's generator, as sequentially;
        MAML (line 7): one backward of (1/T) Σ_i L_i(θ_i; query_i); Reptile (line 8): the
        gradient −(1/T) Σ_i (θ_i − θ).
        """
        n, maml = len(episodes), self.variant == "maml"
        if maml:
            x, y = stack(episodes, "support_x"), stack(episodes, "support_y")
        else:
            x, y = stacked_examples(episodes)
        draws = [sub_batches(x.shape[1], self.config.inner_steps, self.config.inner_batch, self._rng)
                 for _ in episodes]
        rows = [torch.stack([d[t] for d in draws]).to(x.device) for t in range(len(draws[0]))]

        def loss_fn(net, x_i, y_i, *rows_i):
            r = rows_i[net.step]
            logits = net(x_i[r])
            loss = F.cross_entropy(logits, y_i[r])
            return loss, (accuracy(logits.detach(), y_i[r]),)

        with batched_oom_guard(n, f"learner '{self.name}'"):
            adapted = self.inner.adapt_batched(loss_fn, x, y, *rows, differentiable=maml)
            if maml:
                losses, accs = batched_query_loss(adapted(stack(episodes, "query_x")),
                                                  stack(episodes, "query_y"))
                losses.mean().backward()
                loss, acc = losses.detach().mean(), accs.mean()
        if not maml:
            theta = list(self.net.parameters())
            index = {id(p): k for k, p in enumerate(theta)}
            stacked = adapted.stacked_params()
            for p in meta_params:
                q = stacked[index[id(p)]]
                p.grad = -((q.detach() - p.detach()).sum(0) / n)
            loss, acc = adapted.inner_losses[-1].mean(), adapted.aux[-1][0].mean()
        self.outer_step("meta")
        return {"meta_loss": loss, "meta_acc": acc}

    def _transfer_side(self, episodes) -> Dict[str, Tensor]:
        """Line 9: one step of the C-way loss over all instances of the sampled tasks."""
        x = torch.cat([torch.cat([ep.support_x, ep.query_x]) for ep in episodes])
        y = self._base_targets(episodes)
        logits = self.net(x, base=True)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        self.outer_step("transfer")
        return {"transfer_loss": loss.detach(), "transfer_acc": accuracy(logits.detach(), y)}

    def train_step(self, batch) -> Dict[str, Tensor]:
        """One iteration of Algorithm 1: lines 3-10 on the meta-batch ``batch``."""
        episodes = check_batch(self, batch, self.config.ways)
        for ep in episodes:
            self._check_task(ep)
        self.train()
        if self.config.mode == "authors":
            return self._authors_step(episodes)
        beta = float(self.config.beta)
        params = list(self.net.parameters())
        theta = [p.detach().clone() for p in params]
        metrics: Dict[str, Tensor] = {}

        def moved(side) -> List[Tensor]:
            for p in params:
                p.grad = None
            metrics.update(side(episodes))
            out = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, t in zip(params, theta):
                    p.copy_(t)
            return out

        theta_meta = moved(self._meta_side) if beta > 0 else theta
        theta_disc = moved(self._transfer_side) if beta < 1 else theta
        with torch.no_grad():  # line 10: θ ← β θ_metalearner + (1 − β) θ_discriminator
            for p, a, b in zip(params, theta_meta, theta_disc):
                p.copy_(a * beta + b * (1.0 - beta))
            for p in params:
                p.grad = None
        parts = []
        if beta > 0:
            parts.append(beta * metrics["meta_loss"])
        if beta < 1:
            parts.append((1.0 - beta) * metrics["transfer_loss"])
        loss = sum(parts[1:], parts[0])
        self.check_finite(loss, self.steps_done)
        self.steps_done += 1
        metrics["loss"] = loss
        metrics["acc"] = metrics["meta_acc"] if beta > 0 else metrics["transfer_acc"]
        return metrics

    # --------------------------------------------------------------- authors mode
    def _authors_task(self, ep, theta: List[Tensor]):
        """One task of the authors' update from θ: (θ_i, φ_i, metrics); θ is restored."""
        cfg = self.config
        params = list(self.net.parameters())
        x, y = all_examples(ep)
        batches = [b.to(x.device) for b in sub_batches(x.shape[0], cfg.inner_steps,
                                                       cfg.inner_batch, self._rng)]
        net, out = self.inner.functional(), {}
        for rows in batches:  # k steps of the run-long inner optimiser (state kept)
            logits = net(x[rows])
            loss = F.cross_entropy(logits, y[rows])
            self.optimizers["inner"].zero_grad(set_to_none=True)
            loss.backward()
            self.optimizers["inner"].step()
            out["meta_loss"], out["meta_acc"] = loss.detach(), accuracy(logits.detach(), y[rows])
        theta_i = [p.detach().clone() for p in params]
        _load(params, theta)
        phi_i = theta
        if self.net.base_head is not None:  # one transfer step on the k mini-batches' images
            rows = torch.cat(batches)
            yb = torch.cat([ep.base_support_y, ep.base_query_y])[rows]
            self._check_base(yb)
            logits = self.net(x[rows], base=True)
            loss = F.cross_entropy(logits, yb)
            self.optimizers["transfer"].zero_grad(set_to_none=True)
            loss.backward()
            self.optimizers["transfer"].step()
            out["transfer_loss"], out["transfer_acc"] = loss.detach(), accuracy(logits.detach(), yb)
            phi_i = [p.detach().clone() for p in params]
            _load(params, theta)
        return theta_i, phi_i, out

    def _authors_step(self, episodes) -> Dict[str, Tensor]:
        """The authors' update (module docstring): θ ← ½θ + ½(β θ_meta + (1 − β) θ_disc),
        tasks in sequence, run-long inner and transfer Adam states."""
        beta = float(self.config.beta)
        cfg = self.config  # ε: α_outer, annealed linearly as the meta scheduler does
        eps = cfg.lr * (max(0.0, 1.0 - self.steps_done / cfg.anneal_steps) if cfg.anneal_steps else 1.0)
        params = list(self.net.parameters())
        theta = [p.detach().clone() for p in params]
        d_meta = [torch.zeros_like(t) for t in theta]
        d_disc = [torch.zeros_like(t) for t in theta]
        per_task = []
        for ep in episodes:
            theta_i, phi_i, out = self._authors_task(ep, theta)
            for dm, dd, t, a, b in zip(d_meta, d_disc, theta, theta_i, phi_i):
                dm.add_(a - t)
                dd.add_(b - t)
            per_task.append(out)
        n = len(episodes)
        with torch.no_grad():
            for p, t, dm, dd in zip(params, theta, d_meta, d_disc):
                p.copy_(t + 0.5 * beta * eps * dm / n + 0.5 * (1.0 - beta) * dd / n)
                p.grad = None
        metrics = {k: torch.stack([o[k] for o in per_task]).mean() for k in per_task[0]}
        metrics["loss"] = beta * metrics["meta_loss"] + (1.0 - beta) * metrics.get(
            "transfer_loss", torch.zeros(()))
        metrics["acc"] = metrics["meta_acc"]
        self.check_finite(metrics["loss"], self.steps_done)
        self.steps_done += 1
        return metrics

    def _check_base(self, y: Tensor) -> None:
        span = host_label_span(y)  # None on a device: no per-step sync
        if span is not None and (span[0] < 0 or span[1] >= self.net.base_head.out_features):
            raise DataError(f"base-class labels {span[0]}..{span[1]} do not fit the "
                            f"C-way head (C = num_classes = {self.net.base_head.out_features}); "
                            "build the learner with the training split's number of classes")

    # ------------------------------------------------------------------------ test
    def supports_ways(self, ways: int) -> bool:
        """Any N: :meth:`predict` puts a new N-way head on the features (``ways`` is only
        the training head's N)."""
        return ways >= 1

    def predict(self, episode) -> Tensor:
        """New zero N-way head, ``eval_steps`` SGD steps on the support set, query logits."""
        check_episode(self, episode)
        cfg = self.config
        head = _zero_linear(self.net.head.in_features, episode.ways, self.net.head.weight)
        net = _FineTuneNet(self.net.backbone, head)
        loop = InnerLoop(net, steps=cfg.eval_steps, lr=cfg.eval_lr, bn=cfg.bn, optimizer="sgd")
        if cfg.bn == "per_step":  # fine-tuning step s reads the training set min(s, k)
            _copy_per_step_stats(self.inner, loop)
        x, y = episode.support_x, episode.support_y
        n = x.shape[0]
        batch = None if cfg.eval_batch is None else min(cfg.eval_batch, n)
        g = torch.Generator().manual_seed(int(cfg.seed))
        batches = [b.to(x.device) for b in sub_batches(n, cfg.eval_steps, batch, g)] \
            if batch is not None else None

        def loss_fn(net_):
            if batches is None:
                return F.cross_entropy(net_(x), y)
            b = batches[net_.step]
            return F.cross_entropy(net_(x[b]), y[b])

        with eval_mode(self):
            adapted = loop.adapt(loss_fn, differentiable=False)
            with torch.no_grad():
                return adapted(episode.query_x)

    def predict_batch(self, episodes) -> Tensor:
        """:meth:`predict` for T equal-shaped episodes at once: (T, Q, ways) logits (each task
        its own new zero head and the same sub-batch rows as :meth:`predict` draws)."""
        for ep in episodes:
            check_episode(self, ep)
        cfg = self.config
        head = _zero_linear(self.net.head.in_features, episodes[0].ways, self.net.head.weight)
        loop = InnerLoop(_FineTuneNet(self.net.backbone, head), steps=cfg.eval_steps,
                         lr=cfg.eval_lr, bn=cfg.bn, optimizer="sgd")
        x, y = stack(episodes, "support_x"), stack(episodes, "support_y")
        n = x.shape[1]
        batch = None if cfg.eval_batch is None else min(cfg.eval_batch, n)
        g = torch.Generator().manual_seed(int(cfg.seed))
        batches = [b.to(x.device) for b in sub_batches(n, cfg.eval_steps, batch, g)] \
            if batch is not None else None

        def loss_fn(net_, x_i, y_i):
            if batches is None:
                return F.cross_entropy(net_(x_i), y_i)
            b = batches[net_.step]
            return F.cross_entropy(net_(x_i[b]), y_i[b])

        with eval_mode(self):
            adapted = loop.adapt_batched(loss_fn, x, y, differentiable=False)
            with torch.no_grad():
                return adapted(stack(episodes, "query_x"))

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        state = super().state_dict(*args, **kwargs)
        state["rng"] = self._rng.get_state()
        return state

    def load_state_dict(self, state, strict: bool = True):  # type: ignore[override]
        super().load_state_dict(state, strict=strict)
        if "rng" in state:
            self._rng.set_state(state["rng"])


@register_learner("mtl+reptile")
class MTLReptile(_MTL):
    """MTL with Reptile as the meta-learner (Algorithm 1, line 8)."""

    description = ("MTL + Reptile: joint Reptile and C-way transfer updates, "
                   "θ ← β θ_meta + (1−β) θ_transfer; SGD fine-tuning of a new head at test")
    variant = "reptile"
    Config = MTLConfig


@dataclass
class MTLMAMLConfig(MTLConfig):
    """As :class:`MTLConfig`, with MAML's defaults for the meta side (second order, SGD
    inner steps α_inner = 0.01, Adam meta step 1e-3)."""

    lr: float = 1e-3
    meta_optimizer: str = "adam"
    inner_lr: float = 0.01
    inner_optimizer: str = "sgd"


@register_learner("mtl+maml")
class MTLMAML(_MTL):
    """MTL with MAML as the meta-learner (Algorithm 1, line 7)."""

    description = ("MTL + MAML: joint MAML and C-way transfer updates, "
                   "θ ← β θ_meta + (1−β) θ_transfer; SGD fine-tuning of a new head at test")
    variant = "maml"
    Config = MTLMAMLConfig
