"""MLTP: the meta-learning based training procedure and its variants.

Deng & Zhang, "Is the Meta-Learning Idea Able to Improve the Generalization of Deep Neural
Networks on the Standard Supervised Learning?", ICPR 2020 (Algorithm 1, eqs. 2-6). Each
minibatch of B images is split into two tasks of B/2, task_i and task_j (sec. IV-A: 128 =
64 + 64). One iteration minimises

    J = L(f(w, x^i), y^i) + η L(f(w − α ∂L(f(w, x^i), y^i)/∂w, x^j), y^j)      (eq. 4)

plus β R(w) = β ½‖w‖² (eq. 6) through the optimiser's ``weight_decay`` (α is not decayed).
α = [α_1, .., α_n] holds one inner step size per layer (a conv or linear module's weight and
bias share α_l), drawn from N(``alpha_mean``, ``alpha_std``) and updated by the same optimiser
as w (line 7), or fixed with ``learn_alpha=False``. To first order in α (eq. 5),
J ≈ L_i(w) + η L_j(w) − η α ⟨∂L_i/∂w, ∂L_j/∂w⟩: MLTP rewards agreeing task gradients.

The inner step runs through :class:`fewshot.inner_loop.InnerLoop` (one step,
``lr_per="layer"``). Variants (sec. III-E): ``mltp`` (all conv and fc layers, second order),
``mltp_conv`` / ``mltp_fc`` (only ``nn.Conv*`` / ``nn.Linear`` layers take the inner step;
the others stay w in both terms and still get the full gradient of J), ``mltp_fo`` (first
order: ∂J/∂w = ∂L_i/∂w|_w + η ∂L_j/∂w|_{w'}; α is still learned, ∂J/∂α_l needs first
derivatives only). ``adapt = "first_conv"`` / ``"last_fc"`` of learner ``mltp`` adapt only
the first ``nn.Conv*`` / last ``nn.Linear`` module, the cost/accuracy trade-offs the end of
sec. III-E suggests without numbers.

Choices where the paper is silent (reasons: ``docs/learners.md``):

* ``alpha_negative``: ``"clamp"`` (default) projects α onto α ≥ 0 after every optimiser step
  and after the initial draw; ``"error"`` raises :class:`~fewshot.errors.TrainingError`
  naming the layer when an update drives α below 0 (on an accelerator at the next
  checkpoint: ``MLTP._refuse_negative_alpha``); ``"allow"`` keeps signed α (Meta-SGD).
* BatchNorm: batch statistics in both forwards; the running statistics are updated once per
  iteration, by the task_j forward at w' (``bn="running"``), and evaluation uses them with w.
* Dropout draws independent masks in the two forwards.
* Odd minibatches are refused (``SupervisedLearner.check_batch``); a non-finite J raises
  :class:`~fewshot.errors.TrainingError` before any weight moves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.errors import ConfigError, TrainingError
from fewshot.learners.base import accuracy, read_on_cpu, require
from fewshot.learners.registry import register_learner
from fewshot.learners.standard import SupervisedConfig, SupervisedLearner

_ADAPT = ("all", "conv", "fc", "first_conv", "last_fc")
_NEGATIVE = ("clamp", "error", "allow")
_NEVER = 2 ** 62  # no step recorded (alpha_negative="error" on an accelerator)
_LAYER_WORDS = {"conv": "convolutional (nn.Conv*)", "fc": "fully-connected (nn.Linear)",
                "all": "convolutional or fully-connected"}
_LAYER_WORDS.update(first_conv=_LAYER_WORDS["conv"], last_fc=_LAYER_WORDS["fc"])
_KIND = {"first_conv": "conv", "last_fc": "fc"}  # the layer kind a one-layer choice needs


@dataclass
class MLTPConfig(SupervisedConfig):
    """Hyper-parameters of MLTP (paper's CIFAR defaults; Tiny ImageNet: η = 0.5,
    α ~ N(1e-2, 1e-2), SGD momentum 0.9, lr 0.05)."""

    eta: float = 1.0  # η of eq. 4: weight of the task_j loss after the inner step
    alpha_mean: float = 1e-3  # mean of the normal the per-layer α are drawn from
    alpha_std: float = 1e-3  # its standard deviation (0 = every α equals alpha_mean)
    learn_alpha: bool = True  # α updated by the optimiser of w (False: fixed hyper-parameter)
    # which layers take the inner step: "all" | "conv" | "fc" | "first_conv" | "last_fc"
    adapt: str = "all"
    first_order: bool = False  # drop the second derivatives (MLTP_FO)
    alpha_negative: str = "clamp"  # "clamp" | "error" | "allow" (see the module docstring)

    def validate(self) -> None:
        super().validate()
        require(self.eta >= 0.0, f"learner option 'eta' must be >= 0, got {self.eta}")
        require(self.alpha_std >= 0.0,
                f"learner option 'alpha_std' must be >= 0, got {self.alpha_std}")
        require(self.adapt in _ADAPT, f"learner option 'adapt' must be one of "
                f"{', '.join(_ADAPT)}, got '{self.adapt}'")
        require(self.alpha_negative in _NEGATIVE, f"learner option 'alpha_negative' must be "
                f"one of {', '.join(_NEGATIVE)}, got '{self.alpha_negative}'")
        if self.alpha_negative != "allow":
            require(self.alpha_mean >= 0.0, f"learner option 'alpha_mean' is "
                    f"{self.alpha_mean} but alpha_negative='{self.alpha_negative}' keeps step "
                    f"sizes >= 0; give alpha_mean >= 0 or alpha_negative='allow'")


def _require_preset(cfg: MLTPConfig, adapt: str, first_order: bool, name: str) -> None:
    require(cfg.adapt == adapt and bool(cfg.first_order) == first_order,
            f"learner '{name}' fixes adapt='{adapt}', first_order={first_order}; got "
            f"adapt='{cfg.adapt}', first_order={cfg.first_order} (use learner 'mltp' to "
            f"combine them freely)")


@dataclass
class MLTPConvConfig(MLTPConfig):
    """MLTPConfig with adapt='conv' (second order) fixed."""

    adapt: str = "conv"

    def validate(self) -> None:
        super().validate()
        _require_preset(self, "conv", False, "mltp_conv")


@dataclass
class MLTPFcConfig(MLTPConfig):
    """MLTPConfig with adapt='fc' (second order) fixed."""

    adapt: str = "fc"

    def validate(self) -> None:
        super().validate()
        _require_preset(self, "fc", False, "mltp_fc")


@dataclass
class MLTPFOConfig(MLTPConfig):
    """MLTPConfig with adapt='all', first_order=True fixed."""

    first_order: bool = True

    def validate(self) -> None:
        super().validate()
        _require_preset(self, "all", True, "mltp_fo")


@register_learner("mltp")
class MLTP(SupervisedLearner):
    """MLTP (Algorithm 1): minimise eq. 4 (+ eq. 6's weight decay) over w and α.

    ``adapt`` and ``first_order`` select the paper's variants; the registered names
    ``mltp_conv``, ``mltp_fc`` and ``mltp_fo`` fix them.
    """

    Config = MLTPConfig
    #: alpha_negative="error" on an accelerator: first step with a negative α, on the device
    _negative_alpha_at: Optional[Tensor] = None
    description = ("MLTP: meta-learning based training (two half-batch tasks, one inner step, "
                   "learned per-layer α), second order, all layers")
    paper = ("Deng & Zhang, Is the Meta-Learning Idea Able to Improve the Generalization of Deep "
             "Neural Networks on the Standard Supervised Learning?, ICPR 2020 (Alg. 1, eq. 4)")

    def __init__(self, config: Optional[MLTPConfig] = None, **kwargs):
        super().__init__(config, **kwargs)
        from fewshot.inner_loop import InnerLoop

        c = self.config
        self._check_has_layers()
        # α_l ~ N(alpha_mean, alpha_std), one per layer; a submodule of the learner, so its
        # step sizes are saved with it and move with .to(device)
        self.inner = InnerLoop(self.model, steps=1, lr=c.alpha_mean, learn_lr=c.learn_alpha,
                               lr_per="layer", adapt=c.adapt, first_order=c.first_order,
                               bn="running", optimizer="sgd", lr_init_std=c.alpha_std)
        if not self.inner.adapted_names:
            raise ConfigError(self._no_layers_message())
        if c.alpha_negative != "allow":
            self._clamp_alpha()
        self._make_optimizer(extra_params=list(self.inner.parameters()) if c.learn_alpha else ())

    # ------------------------------------------------------------------ set-up
    def _layer_kinds(self) -> Dict[str, int]:
        kinds = {"conv": 0, "fc": 0}
        for m in self.model.modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                kinds["conv"] += 1
            elif isinstance(m, nn.Linear):
                kinds["fc"] += 1
        return kinds

    def _no_layers_message(self) -> str:
        c = self.config
        net = "the given backbone" if self._given_backbone is not None else f"'{c.backbone}'"
        other = [k for k, n in self._layer_kinds().items() if n and k != _KIND.get(c.adapt, c.adapt)]
        hint = (f"; it has {', '.join(other)} layers: use adapt='{other[0]}' (learner "
                f"'mltp_{other[0]}') or 'mltp'" if other else "")
        return (f"learner '{self.name}': adapt='{c.adapt}' selects no layer of network {net}, "
                f"which has no {_LAYER_WORDS[c.adapt]} layers{hint}")

    def _check_has_layers(self) -> None:
        kinds = self._layer_kinds()
        adapt = _KIND.get(self.config.adapt, self.config.adapt)
        n = sum(kinds.values()) if adapt == "all" else kinds[adapt]
        if n == 0:
            raise ConfigError(self._no_layers_message())

    @torch.no_grad()
    def _clamp_alpha(self) -> None:
        self.inner.alpha.clamp_(min=0.0)

    def step_sizes(self) -> Dict[str, Tensor]:
        """α per adapted layer (name -> tensor)."""
        return self.inner.step_sizes()

    # ------------------------------------------------------------------ the objective
    def objective(self, x_i: Tensor, y_i: Tensor, x_j: Tensor, y_j: Tensor,
                  _fo_grads: bool = False) -> Dict[str, Tensor]:
        """J of eq. 4 and its parts, differentiable in w and α (no optimiser step).

        Returns ``J``, ``loss_i`` = L(f(w, x^i), y^i), ``loss_j`` = L(f(w', x^j), y^j),
        ``logits_i``, ``logits_j`` and ``adapted`` (the network at w').

        Second order: the inner gradient keeps its graph, so ``J.backward()`` gives
        ∂J/∂w = ∂L_i/∂w + η (I − diag(α) ∂²L_i/∂w²) ∂L_j/∂w|_{w'} and ∂J/∂α.

        First order (MLTP_FO): the inner loop frees L_i's graph once it has ∂L_i/∂w, and
        ∂J/∂w = g_i + η ∂L_j/∂w|_{w'} with g_i = ∂L_i/∂w|_w. Rather than back-propagating
        L_i a second time, g_i is taken from that one inner backward pass (tensor hooks on
        w record it; parameters the inner step does not adapt get theirs from the same
        graph, kept alive for them) and J is returned as
        L_i + ⟨w, g_i⟩ − ⟨w, g_i⟩|_const + η L_j: its value is eq. 4 and its gradient is
        exactly the first-order one. So MLTP_FO costs two forward and two backward passes
        over B/2 images, the same as standard training's over B. (``train_step`` goes one
        step further: it back-propagates η L_j only and adds g_i to ``.grad``, which saves
        two passes over the weights; ``_fo_grads`` returns g_i for that.)

        Longer than 60 lines on purpose: the first-order hooks are registered inside
        ``loss_i``, removed in the ``finally`` around the inner step and read after it, so
        the closure, the hooks and ``captured`` share one scope.
        """
        parts: Dict[str, object] = {}
        first_order = self.config.first_order
        names = self.inner.param_names
        adapted_set = set(self.inner.adapted_names)
        captured: Dict[int, Tensor] = {}

        def loss_i(net) -> Tensor:  # Algorithm 1, line 3 (its gradient makes line 4's step)
            logits = net(x_i)
            loss = F.cross_entropy(logits, y_i)
            parts["loss_i"], parts["logits_i"], parts["w"] = loss, logits, list(net.params)
            if first_order:
                hooks = []
                for k, (n, p) in enumerate(zip(names, net.params)):
                    if n in adapted_set and p.requires_grad:
                        hooks.append(p.register_hook(lambda g, k=k: captured.__setitem__(k, g)))
                parts["hooks"] = hooks
                rest = [(k, p) for k, (n, p) in enumerate(zip(names, net.params))
                        if n not in adapted_set and p.requires_grad]
                if rest:  # ∂L_i/∂w of the parameters the inner step leaves alone
                    gs = torch.autograd.grad(loss, [p for _, p in rest], retain_graph=True,
                                             allow_unused=True)
                    for (k, p), g in zip(rest, gs):
                        captured[k] = torch.zeros_like(p) if g is None else g
            return loss

        try:
            adapted = self.inner.adapt(loss_i, differentiable=True)  # line 4: w' = w − α ∂L_i/∂w
        finally:
            for h in parts.get("hooks", ()):
                h.remove()
        logits_j = adapted(x_j)  # line 5: f(w', x^j)
        loss_j = F.cross_entropy(logits_j, y_j)
        L_i = parts["loss_i"]
        if first_order:
            w = parts["w"]
            missing = [names[k] for k, p in enumerate(w) if p.requires_grad and k not in captured]
            if missing:
                raise TrainingError(f"learner '{self.name}': the inner loop did not report "
                                    f"∂L_i/∂w for {missing[:3]}; first-order MLTP needs it")
            if _fo_grads:
                return {"J": L_i.detach() + self.config.eta * loss_j, "loss_i": L_i.detach(),
                        "loss_j": loss_j, "logits_i": parts["logits_i"], "logits_j": logits_j,
                        "adapted": adapted, "g_i": [(w[k], g.detach()) for k, g in captured.items()]}
            lin = sum((w[k] * g.detach()).sum() for k, g in captured.items())
            L_i = L_i.detach() + (lin - lin.detach())
        J = L_i + self.config.eta * loss_j  # line 6 (eq. 4)
        return {"J": J, "loss_i": parts["loss_i"], "loss_j": loss_j,
                "logits_i": parts["logits_i"], "logits_j": logits_j, "adapted": adapted}

    def train_step(self, batch) -> Dict[str, Tensor]:
        """One iteration of Algorithm 1 on a TaskPairBatch (lines 2-7)."""
        x_i, y_i, x_j, y_j = self.check_batch(batch)
        self.model.train()
        self.inner.train()
        c = self.config
        out = self.objective(x_i, y_i, x_j, y_j, _fo_grads=c.first_order)
        J = out["J"]
        self._guard_finite(J, "MLTP objective J")
        opt = self.optimizers["meta"]
        opt.zero_grad(set_to_none=True)
        if c.first_order:  # ∂J/∂w = g_i + η ∂L_j/∂w|_{w'};  ∂J/∂α = −η ⟨g_i, ∂L_j/∂w|_{w'}⟩
            (c.eta * out["loss_j"]).backward()
            _add_to_grads(out["g_i"])
        else:
            J.backward()  # ∂J/∂w (second order) and ∂J/∂α
        self.outer_step("meta")  # line 7: w ← w − r ∂J/∂w, α ← α − r ∂J/∂α (+ β w)
        self.steps_done += 1
        if c.learn_alpha and c.alpha_negative == "clamp":
            self._clamp_alpha()
        elif c.learn_alpha and c.alpha_negative == "error":
            self._refuse_negative_alpha()
        alphas = self.inner.alpha.detach()  # every α_l (step_sizes() are views of it)
        acc = 0.5 * (accuracy(out["logits_i"].detach(), y_i)
                     + accuracy(out["logits_j"].detach(), y_j))
        return {"loss": J.detach(), "loss_i": out["loss_i"].detach(),
                "loss_j": out["loss_j"].detach(), "acc": acc,
                "alpha_mean": alphas.mean(), "alpha_min": alphas.min()}

    def _refuse_negative_alpha(self) -> None:
        """alpha_negative='error': stop when the update drove some α below 0 (the failed step
        is undone, :class:`~fewshot.learners.base.Learner`). On the CPU at once; on an
        accelerator reading α would make the host wait every step, so the first such step is
        recorded on the device (no wait) and read when the learner is checkpointed
        (:meth:`state_dict`: the trainer checkpoints periodically and at the end)."""
        negative = (self.inner.alpha.detach() < 0).any()
        now = read_on_cpu(negative)
        if now:
            self._raise_negative_alpha(self.steps_done)
        if now is None:
            mark = torch.where(negative, self.steps_done, _NEVER)
            first = self._negative_alpha_at
            self._negative_alpha_at = mark if first is None else torch.minimum(first, mark)

    def _raise_negative_alpha(self, step: int) -> None:
        """TrainingError for a negative α first seen after step ``step`` (names the layers
        whose α is negative now and the lowest α)."""
        names = [n for n, a in self.step_sizes().items() if bool((a.detach() < 0).any())]
        layers = ", ".join(f"'{n}'" for n in names) or "a layer"
        raise TrainingError(
            f"learner '{self.name}': step size α of layer {layers} turned negative "
            f"({float(self.inner.alpha.detach().min()):.3g}) at step {step}; set "
            f"alpha_negative='clamp' (project onto α >= 0) or lower 'lr'")

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        first = self._negative_alpha_at
        if first is not None and int(first) != _NEVER:  # one host read per checkpoint
            self._raise_negative_alpha(int(first))
        return super().state_dict(*args, **kwargs)


def _add_to_grads(pairs) -> None:
    """``p.grad += g`` for each ``(p, g)``, as one multi-tensor operation (no per-tensor
    Python loop of kernels); ``g`` becomes ``p.grad`` where there was none (``g`` is a fresh
    gradient owned by no one else, so no copy is needed)."""
    with torch.no_grad():
        have = [(p.grad, g) for p, g in pairs if p.grad is not None]
        for p, g in pairs:
            if p.grad is None:
                p.grad = g
        if have:
            torch._foreach_add_([a for a, _ in have], [g for _, g in have])


@register_learner("mltp_conv")
class MLTPConv(MLTP):
    """MLTP_conv (sec. III-E): only convolutional layers take the inner step of eq. 4."""

    Config = MLTPConvConfig
    description = "MLTP with the inner step on convolutional layers only (second order)"


@register_learner("mltp_fc")
class MLTPFc(MLTP):
    """MLTP_fc (sec. III-E): only fully-connected layers take the inner step of eq. 4."""

    Config = MLTPFcConfig
    description = "MLTP with the inner step on fully-connected layers only (second order)"


@register_learner("mltp_fo")
class MLTPFO(MLTP):
    """MLTP_FO (sec. III-E): first-order ∂J/∂w (no second derivatives); α still learned."""

    Config = MLTPFOConfig
    description = "first-order MLTP: no second derivatives, per-layer α still learned"
