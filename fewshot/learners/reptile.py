"""Reptile (Nichol, Achiam & Schulman, 'On First-Order Meta-Learning Algorithms', 2018).

For each task τ_i of a meta-batch of n tasks, starting from θ, the inner loop
(:class:`fewshot.inner_loop.InnerLoop`, detached: no graph) takes k steps of SGD or Adam on
the task's training loss L_{τ_i}, giving θ̃_i = U^k_{τ_i}(θ) (Algorithm 1). The batched
outer update (Algorithm 2) is

    θ ← θ + ε · (1/n) Σ_i (θ̃_i − θ)

with the outer step size ε annealed linearly from ``meta_step_size`` to
``meta_step_size_final`` over ``meta_iters`` steps, as Reptile's code does
(ε_t = (t/T)·ε_final + (1 − t/T)·ε_0, held at ε_final after T).

Implementation: the update is handed to an SGD optimiser with learning rate ε_t as the
pseudo-gradient g = θ − (1/n) Σ_i θ̃_i (so θ ← θ − ε_t g is exactly the update above), which
lets :meth:`Learner.outer_step` average g over ranks in distributed training: the mean over
ranks of each rank's mean over its tasks is the mean over the global meta-batch.

Following Reptile's code (``supervised-reptile``): a task's training examples are all of the
episode's examples (support and query; its ``--train-shots``), visited in mini-batches of
``inner_batch`` drawn by cycling through shuffles of the examples; the inner optimiser is Adam
with β1 = 0 (``lr`` is its step size, the code's ``--learning-rate``). Unlike that code, the
Adam moments restart for every task (the code keeps them across tasks because it restores
only the trainable variables; the paper does not discuss it). At test time
:meth:`Reptile.predict` fine-tunes on the support set for ``eval_steps`` (50) steps with
the same optimiser and classifies the queries; BatchNorm is transductive by default, as
the paper's reported results (``--transductive``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.inner_loop import BN_POLICIES, TASK_BATCHING, InnerLoop, batched_oom_guard
from fewshot.learners.base import Learner, LearnerConfig, accuracy, require
from fewshot.learners.common import (HeadNet, all_examples, batches_tasks, check_batch,
                                     check_episode, choice, eval_mode, fraction,
                                     minibatch_indices, minibatch_loss, positive_float,
                                     positive_int, stack, stacked_examples)
from fewshot.learners.registry import register_learner

__all__ = ["Reptile"]


@register_learner("reptile")
class Reptile(Learner):
    """Reptile; see the module docstring for the update and the choices made."""

    description = "Reptile: move the initialisation towards weights fine-tuned on each task (1st order)"
    paper = ("Nichol, Achiam & Schulman, 'On First-Order Meta-Learning Algorithms', "
             "arXiv:1803.02999, 2018")
    input_kind = "episodes"
    fine_tunes_at_test = True

    @dataclass
    class Config(LearnerConfig):
        """Reptile hyper-parameters (defaults: the paper's mini-ImageNet settings, Table 3 /
        the code's README).

        lr: step size of the inner optimiser (Adam: 1e-3).
        ways: N, outputs of the head; every episode must be N-way (5).
        inner_steps: k, inner steps per task in training (8).
        inner_batch: examples per inner step (10); None = all of the task's examples.
        inner_optimizer: "adam" (the code's) or "sgd".
        adam_beta1: Adam's β1 for the inner steps (0, as the code).
        meta_step_size: ε_0, the outer step size at the start (1.0).
        meta_step_size_final: ε at the end of the annealing (0.0).
        meta_iters: T, outer steps over which ε is annealed (100000).
        eval_steps: fine-tuning steps at test (50).
        eval_batch: examples per fine-tuning step (None = the whole support set; the code
            used 5 for 1-shot and 15 for 5-shot 5-way).
        bn: BatchNorm policy of the inner loop: only "transductive" (the paper's results and
            code: batch statistics everywhere). "running" and "per_step" are refused: their
            statistics are learned by a forward after the inner steps, which Reptile has not.
        meta_batch: tasks per outer step the trainer should draw (5).
        seed: seeds the mini-batch order (together with the step number).
        task_batching: "auto" | "on" | "off": adapt equal-shaped tasks as one batched
            computation (same mini-batches, same result as sequential).
        """

        lr: float = 1e-3
        ways: int = 5
        inner_steps: int = 8
        inner_batch: Optional[int] = 10
        inner_optimizer: str = "adam"
        adam_beta1: float = 0.0
        meta_step_size: float = 1.0
        meta_step_size_final: float = 0.0
        meta_iters: int = 100000
        eval_steps: int = 50
        eval_batch: Optional[int] = None
        bn: str = "transductive"
        meta_batch: int = 5
        seed: int = 0
        task_batching: str = "auto"

        def validate(self) -> None:
            super().validate()
            choice(self.task_batching, "task_batching", TASK_BATCHING)
            positive_int(self.ways, "ways", 1)
            positive_int(self.inner_steps, "inner_steps", 1)
            positive_int(self.eval_steps, "eval_steps", 0)
            positive_int(self.meta_iters, "meta_iters", 1)
            positive_int(self.meta_batch, "meta_batch", 1)
            positive_int(self.seed, "seed", 0)
            for opt in ("inner_batch", "eval_batch"):
                if getattr(self, opt) is not None:
                    positive_int(getattr(self, opt), opt, 1)
            choice(self.inner_optimizer, "inner_optimizer", ("adam", "sgd"))
            fraction(self.adam_beta1, "adam_beta1")
            positive_float(self.meta_step_size, "meta_step_size")
            positive_float(self.meta_step_size_final, "meta_step_size_final", allow_zero=True)
            choice(self.bn, "bn", BN_POLICIES)
            require(self.bn == "transductive", f"learner option bn={self.bn!r} does not fit "
                    "Reptile: its update has no forward after the inner steps, so running or "
                    "per-step statistics for testing are never learned; use 'transductive'")

    def __init__(self, config=None, *, in_channels, image_size, num_classes=None, backbone=None):
        super().__init__(config, in_channels=in_channels, image_size=image_size,
                         num_classes=num_classes, backbone=backbone)
        c = self.config
        #: the network θ: backbone + N-way head
        self.net = HeadNet(self.make_backbone(), c.ways)
        #: the inner optimiser U (detached steps)
        self.loop = InnerLoop(self.net, steps=c.inner_steps, lr=c.lr, optimizer=c.inner_optimizer,
                              adam_betas=(c.adam_beta1, 0.999), bn=c.bn)
        self.optimizers["meta"] = torch.optim.SGD(self.net.parameters(), lr=c.meta_step_size, foreach=True)

    def meta_step_size(self, step: Optional[int] = None) -> float:
        """ε_t: linear from ``meta_step_size`` (t = 0) to ``meta_step_size_final`` (t >= T)."""
        c = self.config
        t = self.steps_done if step is None else step
        frac = min(t / c.meta_iters, 1.0)
        return frac * c.meta_step_size_final + (1 - frac) * c.meta_step_size

    def _generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + salt)

    def adapt(self, x: Tensor, y: Tensor, steps: int, batch: Optional[int],
              generator: torch.Generator):
        """θ̃ = U^steps(θ) on examples (x, y) in mini-batches; returns (adapted net, last loss,
        last accuracy), the loss and accuracy of the last step's mini-batch before its update."""
        batches = minibatch_indices(len(y), batch, steps, generator)
        last = {}
        adapted = self.loop.adapt(minibatch_loss(x, y, batches, last), steps=steps,
                                  differentiable=False)
        return adapted, last.get("loss"), last.get("acc")

    def train_step(self, batch) -> Dict[str, Tensor]:
        """One batched Reptile update (Algorithm 2) over the episodes of ``batch``.

        Metrics: ``loss`` / ``acc`` are the inner-loop loss and accuracy at the last inner
        step (on its mini-batch, before its update), averaged over tasks; ``epsilon`` is ε_t.
        """
        episodes = check_batch(self, batch, self.config.ways)
        self.train()
        c = self.config
        params = list(self.net.parameters())
        if batches_tasks(self, episodes):
            return self._finish_step(params, *self._train_batched(episodes))
        sums = [torch.zeros_like(p) for p in params]
        losses, accs = [], []
        for i, ep in enumerate(episodes):
            x, y = all_examples(ep)
            gen = self._generator(self.steps_done * 4096 + i)
            adapted, loss, acc = self.adapt(x, y, c.inner_steps, c.inner_batch, gen)
            for s, q in zip(sums, adapted.params):
                s.add_(q)
            losses.append(loss)
            accs.append(acc)
        return self._finish_step(params, sums, len(episodes), torch.stack(losses).mean(),
                                 torch.stack(accs).mean())

    def _finish_step(self, params, sums, n: int, loss: Tensor, acc: Tensor) -> Dict[str, Tensor]:
        """Pseudo-gradient θ − (1/n) Σ_i θ̃_i from ``sums`` = Σ_i θ̃_i, then the ε_t step."""
        self.check_finite(loss, self.steps_done)
        with torch.no_grad():
            for p, s in zip(params, sums):
                p.grad = p - s / n  # pseudo-gradient θ − mean_i θ̃_i
        eps = self.meta_step_size()
        opt = self.optimizers["meta"]
        for group in opt.param_groups:
            group["lr"] = eps
        self.outer_step("meta")
        self.steps_done += 1
        return {"loss": loss, "acc": acc, "epsilon": torch.tensor(eps)}

    def _adapt_batched(self, x: Tensor, y: Tensor, steps: int, batch: Optional[int],
                       generators: List[torch.Generator]):
        """θ̃_i = U^steps(θ) for T tasks at once ((T, n, ...) examples, task i's mini-batches
        drawn from ``generators[i]`` exactly as :meth:`adapt`); a :class:`BatchedAdapted`."""
        rows = torch.stack([torch.stack(minibatch_indices(y.shape[1], batch, steps, g))
                            for g in generators]).to(x.device)

        def loss_fn(net, x_i, y_i, rows_i):
            r = rows_i[net.step]
            logits = net(x_i[r])
            loss = F.cross_entropy(logits, y_i[r])
            return loss, (accuracy(logits.detach(), y_i[r]),)

        with batched_oom_guard(x.shape[0], f"learner '{self.name}'"):
            return self.loop.adapt_batched(loss_fn, x, y, rows, steps=steps, differentiable=False)

    def _train_batched(self, episodes):
        """The meta-batch's inner loops as one batched computation: (Σ_i θ̃_i, n, loss, acc)."""
        c = self.config
        x, y = stacked_examples(episodes)
        gens = [self._generator(self.steps_done * 4096 + i) for i in range(len(episodes))]
        adapted = self._adapt_batched(x, y, c.inner_steps, c.inner_batch, gens)
        sums = [q.sum(0) for q in adapted.stacked_params()]
        return (sums, len(episodes), adapted.inner_losses[-1].mean(),
                adapted.aux[-1][0].mean())

    def predict(self, episode) -> Tensor:
        """Fine-tune on the support set for ``eval_steps`` steps, return query logits."""
        check_episode(self, episode, self.config.ways)
        c = self.config
        with eval_mode(self):
            adapted, _, _ = self.adapt(episode.support_x, episode.support_y, c.eval_steps,
                                       c.eval_batch, self._generator(2**31 - 1))
            with torch.no_grad():
                return adapted(episode.query_x)

    def predict_batch(self, episodes) -> Tensor:
        """:meth:`predict` for T equal-shaped episodes at once: (T, Q, ways) query logits."""
        for ep in episodes:
            check_episode(self, ep, self.config.ways)
        c = self.config
        with eval_mode(self):
            gens = [self._generator(2**31 - 1) for _ in episodes]
            adapted = self._adapt_batched(stack(episodes, "support_x"), stack(episodes, "support_y"),
                                          c.eval_steps, c.eval_batch, gens)
            with torch.no_grad():
                return adapted(stack(episodes, "query_x"))
