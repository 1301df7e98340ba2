"""The one differentiable inner loop, on ``higher``.

Every gradient-based adaptation in fewshot (MAML, first-order MAML, Reptile, MAML+X, L2G,
MTL's meta part, MLTP and its conv/fc/FO variants) goes through :class:`InnerLoop`. A learner
says *what* loss to adapt on (``loss_fn``) and computes its outer loss with the returned
:class:`Adapted` network; it never writes SGD over parameters itself.

The update (MAML, Finn et al. 2017, eq. 1; Meta-SGD, Li et al. 2017, for per-layer α;
MLTP, eq. 3, for α_i shared by the i-th layer's parameters) is, for t = 0..T-1,

    θ_{t+1}[a] = θ_t[a] − α_{g(a)} · ∇_{θ[a]} L(θ_t)      for every adapted tensor a,
    θ_{t+1}[b] = θ_t[b]                                   for the others,

with θ_0 the model's own parameters, so the outer loss L'(θ_T) back-propagates to θ_0 (all
tensors, adapted or not) and to α. ``lr_per_step=True`` gives α one row per step,
α_{t,g} (MAML++'s LSLR, Antoniou et al. 2019, sec. 4 "per-layer per-step learning rates"):
step t uses row t; a test-time adaptation with more steps than ``steps`` reuses the last row
α_{T−1} for steps t >= T. ``bn_affine_per_step=True`` (MAML++'s BNWB, "per-step batch
normalisation weights and biases") gives every BatchNorm layer one (γ_s, β_s) per step index
s = 0..T, meta-learned and never adapted; a forward after s steps normalises with
γ_{min(s,T)}, β_{min(s,T)} in :meth:`adapt` and :meth:`adapt_batched` alike.
``first_order=True`` detaches ∇L (no second derivatives: first-order MAML, MLTP_FO); α still
receives ∂L'/∂α = −Σ_t ⟨∇_{θ_{t+1}} L', ∇L(θ_t)⟩.
``optimizer="adam"`` replaces the SGD step by an Adam step (Reptile's inner optimiser).

``recompute=True`` (learner option ``inner_checkpoint``; second-order SGD steps, sequential
and task-batched) is activation checkpointing of the inner loop: each step is one
:class:`_RecomputedStep` that keeps no graph in the forward pass and, in the backward pass,
recomputes ∇L(θ_t) with its graph and returns the step's exact vector-Jacobian product
v ↦ (v − α·∇²L(θ_t) v, −⟨v, ∇L(θ_t)⟩ for α), so the meta-gradient is the ordinary
second-order one while memory holds one step's graph instead of T (cost: one more support
forward and backward per step).

The model is patched once with :func:`higher.patch.monkeypatch` and the functional model is
reused for every task and step (``higher``'s per-task ``innerloop_ctx`` and differentiable
optimisers cost more); steps use :func:`torch.autograd.grad`.

BatchNorm policy (``bn``) — the switch every meta-learning library gets asked about:

* ``"transductive"`` (MAML's and Reptile's reference behaviour): every forward through the
  loop, inner or outer, in training and at test, normalises with the current batch's
  statistics. Running statistics are never read or written.
* ``"running"``: batch statistics while training; the running statistics are updated only by
  the outer forward of the adapted network (``net(x)`` on an :class:`Adapted` returned by
  :meth:`InnerLoop.adapt`), never by inner steps; in eval mode every forward uses them
  (non-transductive testing).
* ``"per_step"`` (MAML++, Antoniou et al. 2019, "per-step batch normalisation running
  statistics"): one set of running statistics per step index t = 0..T (the outer forward after
  t steps uses set t); updated by training forwards, used in eval mode.

In no policy do inner steps corrupt the model's own running statistics.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import higher
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fewshot.errors import ConfigError, TrainingError

BN_POLICIES = ("transductive", "running", "per_step")
ADAPT_PRESETS = ("all", "conv", "fc", "head", "body", "first_conv", "last_fc")
Selector = Union[str, Callable[[str, nn.Parameter, nn.Module], bool]]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _owner_modules(model: nn.Module) -> Dict[str, tuple]:
    """Map each parameter name to ``(module_name, module)`` of the module that holds it."""
    owners = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owners[f"{mname}.{pname}" if mname else pname] = (mname, module)
    return owners


def _head_module_name(model: nn.Module) -> Optional[str]:
    """The module named ``head`` (any depth), else the last ``nn.Linear``."""
    last_linear = None
    for name, module in model.named_modules():
        if name == "head" or name.endswith(".head"):
            return name
        if isinstance(module, nn.Linear):
            last_linear = name
    return last_linear


def select_parameters(model: nn.Module, adapt: Selector) -> List[bool]:
    """Which of ``model.parameters()`` the inner loop adapts, for a preset or a predicate.

    ``"all"``: every parameter; ``"conv"``: parameters of convolution modules; ``"fc"``: of
    ``nn.Linear`` modules; ``"head"``: of the module named ``head`` (else the last Linear;
    ANIL, Raghu et al. 2020); ``"body"``: every parameter but the head's (BOIL, Oh et al. 2021).
    BatchNorm affine parameters are neither conv nor fc. ``"first_conv"``: of the first
    convolution module in ``named_modules`` order; ``"last_fc"``: of the last ``nn.Linear``
    (MLTP sec. III-E's "only the first convolutional layer" / "the last fully connected
    layer"). A callable receives ``(name, parameter, owning_module)``.
    """
    owners = _owner_modules(model)
    names = [n for n, _ in model.named_parameters()]
    if callable(adapt):
        return [bool(adapt(n, p, owners[n][1])) for n, p in model.named_parameters()]
    if adapt == "all":
        return [True] * len(names)
    if adapt == "conv":
        return [isinstance(owners[n][1], _CONV) for n in names]
    if adapt == "fc":
        return [isinstance(owners[n][1], nn.Linear) for n in names]
    if adapt in ("first_conv", "last_fc"):
        kind = _CONV if adapt == "first_conv" else nn.Linear
        layers = [n for n, m in model.named_modules() if isinstance(m, kind)]
        pick = (layers[0] if adapt == "first_conv" else layers[-1]) if layers else None
        return [owners[n][0] == pick for n in names]
    if adapt in ("head", "body"):
        head = _head_module_name(model)
        in_head = [head is not None and (owners[n][0] == head or owners[n][0].startswith(head + "."))
                   for n in names]
        return in_head if adapt == "head" else [not h for h in in_head]
    raise ConfigError(f"inner loop option 'adapt' must be one of {', '.join(ADAPT_PRESETS)} "
                      f"or a callable, got {adapt!r}")


def _check_options(steps, bn: str, optimizer: str, lr_per: str, lr_init_std: float,
                   lr_per_step: bool = False) -> None:
    """ConfigError naming the inner-loop option that is out of range."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ConfigError(f"inner loop option 'steps' must be an integer >= 0, got {steps!r}")
    if lr_per_step and steps < 1:
        raise ConfigError("inner loop option lr_per_step=True needs steps >= 1 (one α row per "
                          "step), got steps=0")
    if bn not in BN_POLICIES:
        raise ConfigError(f"inner loop option 'bn' must be one of {', '.join(BN_POLICIES)}, "
                          f"got {bn!r}")
    if optimizer not in ("sgd", "adam"):
        raise ConfigError(f"inner loop option 'optimizer' must be 'sgd' or 'adam', got {optimizer!r}")
    if lr_per not in ("tensor", "layer"):
        raise ConfigError(f"inner loop option 'lr_per' must be 'tensor' or 'layer', got {lr_per!r}")
    if lr_init_std < 0:
        raise ConfigError(f"inner loop option 'lr_init_std' must be >= 0, got {lr_init_std}")


class Adapted:
    """A network at given weights: ``net(x)`` runs the model functionally with ``params``.

    ``params`` is aligned with ``model.parameters()``; ``step`` is the number of inner steps
    taken to reach them (it picks the BatchNorm statistics under ``bn="per_step"``).
    """

    __slots__ = ("_loop", "params", "step", "_inner")

    def __init__(self, loop: "InnerLoop", params: List[Tensor], step: int, inner: bool = False):
        self._loop = loop
        self.params = params
        self.step = step
        self._inner = inner

    def __call__(self, x: Tensor, *args, **kwargs):
        return self._loop._forward(self.params, self.step, self._inner, x, *args, **kwargs)

    def named_params(self) -> Dict[str, Tensor]:
        return dict(zip(self._loop.param_names, self.params))


@dataclass
class _BNPair:
    name: str
    module: _BatchNorm   # the user's module (owns the running statistics)
    patched: nn.Module   # its higher-patched twin (runs the forward)


class InnerLoop(nn.Module):
    """Differentiable adaptation of ``model`` (see the module docstring for the math).

    Args:
        model: the network to adapt. It is *not* registered as a submodule (the learner owns
            it); the loop's own state is its step sizes α and, for ``bn="per_step"``, the
            per-step statistics.
        steps: number of inner steps T (>= 0).
        lr: initial / fixed step size, a float or a mapping from group name to float.
        learn_lr: make α a parameter (Meta-SGD, MLTP) returned by :meth:`parameters`.
        lr_per: ``"tensor"`` (one α per parameter tensor) or ``"layer"`` (one α per module,
            shared by its weight and bias, as MLTP's α_i).
        adapt: which parameters adapt: ``"all"``, ``"conv"``, ``"fc"``, ``"head"`` or a
            predicate ``(name, param, module) -> bool``.
        first_order: drop second derivatives (∇L is treated as a constant).
        bn: BatchNorm policy, one of :data:`BN_POLICIES`.
        optimizer: ``"sgd"`` or ``"adam"`` for the inner step.
        lr_init_std: α is initialised as ``lr + lr_init_std · N(0, 1)`` (MLTP draws α from
            N(1e-3, 1e-3) on CIFAR); needs ``generator`` for reproducibility.
        adam_betas, adam_eps: Adam's constants for ``optimizer="adam"`` (Reptile's code uses
            β1 = 0).
        lr_per_step: α of shape (steps, groups), one row per step (MAML++ LSLR).
        bn_affine_per_step: per-step BatchNorm γ_s, β_s, s = 0..steps, owned by the loop and
            initialised from the layers' own (MAML++ BNWB); the BatchNorm weights and biases
            are then not adapted (whatever ``adapt`` selects), as in MAML++'s code.
        recompute: second-order SGD steps keep no graph in the forward pass and are
            recomputed one at a time in the backward pass (:class:`_RecomputedStep`): the
            same meta-gradients, peak memory nearly flat in the number of steps. Refused
            with ``first_order`` at construction; a learner that switches ``first_order``
            on later (derivative-order annealing) gets the ordinary first-order steps.
    """

    def __init__(self, model: nn.Module, steps: int = 1, lr: Union[float, Mapping[str, float]] = 0.01,
                 learn_lr: bool = False, lr_per: str = "tensor", adapt: Selector = "all",
                 first_order: bool = False, bn: str = "transductive", optimizer: str = "sgd",
                 lr_init_std: float = 0.0, adam_betas: Sequence[float] = (0.0, 0.999),
                 adam_eps: float = 1e-8, generator: Optional[torch.Generator] = None,
                 lr_per_step: bool = False, bn_affine_per_step: bool = False,
                 recompute: bool = False):
        super().__init__()
        _check_options(steps, bn, optimizer, lr_per, lr_init_std, lr_per_step)
        _check_recompute(recompute, first_order, optimizer)
        self.bn_affine_per_step = bool(bn_affine_per_step)
        object.__setattr__(self, "_model", model)
        self.steps = steps
        self.first_order = bool(first_order)
        self.recompute = bool(recompute)
        self.bn = bn
        self.optimizer = optimizer
        self.adam_betas = tuple(float(b) for b in adam_betas)
        self.adam_eps = float(adam_eps)
        self.lr_per = lr_per
        self.param_names = [n for n, _ in model.named_parameters()]
        self._select(model, adapt, lr_per)
        init = self._initial_alpha(model, lr, lr_init_std, generator)
        if lr_per_step:
            init = init.repeat(steps, 1)
        if learn_lr:
            self.alpha = nn.Parameter(init)
        else:
            self.register_buffer("alpha", init)
        self._init_bn(model, bn, steps)
        object.__setattr__(self, "_fmodel", None)
        object.__setattr__(self, "_pairs", None)
        object.__setattr__(self, "_alpha_cache", None)  # (α's identity, fixed α per tensor)
        object.__setattr__(self, "_replaying", False)  # True while a step is recomputed

    def _select(self, model: nn.Module, adapt: Selector, lr_per: str) -> None:
        """The adapted tensors (indices, names) and their step-size groups."""
        mask = select_parameters(model, adapt)
        if self.bn_affine_per_step:  # γ_s, β_s replace them: never adapted
            owners = _owner_modules(model)
            mask = [m and not isinstance(owners[n][1], _BatchNorm)
                    for m, n in zip(mask, self.param_names)]
        self._adapted_idx = [i for i, m in enumerate(mask) if m]
        self.adapted_names = [self.param_names[i] for i in self._adapted_idx]
        if not self._adapted_idx:
            kinds = {"conv": 0, "fc": 0}
            for m in model.modules():
                kinds["conv"] += isinstance(m, _CONV)
                kinds["fc"] += isinstance(m, nn.Linear)
            raise ConfigError(
                f"inner loop option adapt={adapt!r} selects no parameter of "
                f"{type(model).__name__} (it has {kinds['conv']} conv and {kinds['fc']} fully-"
                f"connected layers); choose another variant or network")
        owners = _owner_modules(model)
        group_of_name: Dict[str, str] = {}
        for n in self.adapted_names:
            group_of_name[n] = (owners[n][0] or "<root>") if lr_per == "layer" else n
        self.group_names: List[str] = list(dict.fromkeys(group_of_name[n] for n in self.adapted_names))
        gindex = {g: k for k, g in enumerate(self.group_names)}
        self._group_idx = [gindex[group_of_name[n]] for n in self.adapted_names]

    def _initial_alpha(self, model: nn.Module, lr, lr_init_std: float,
                       generator: Optional[torch.Generator]) -> Tensor:
        """α's initial values, one per group: ``lr`` (+ ``lr_init_std`` · N(0, 1))."""
        named = list(model.named_parameters())
        dtype = named[0][1].dtype if named and named[0][1].is_floating_point() else torch.float32
        if isinstance(lr, Mapping):
            unknown = set(lr) - set(self.group_names)
            if unknown:
                raise ConfigError(f"inner loop 'lr' names unknown groups {sorted(unknown)}; "
                                  f"groups are {self.group_names}")
            init = torch.tensor([float(lr.get(g, 0.0)) for g in self.group_names], dtype=torch.float64)
        else:
            init = torch.full((len(self.group_names),), float(lr), dtype=torch.float64)
        if lr_init_std > 0:
            init = init + lr_init_std * torch.randn(len(self.group_names), generator=generator,
                                                    dtype=torch.float64)
        return init.to(dtype=dtype, device=named[0][1].device if named else None)

    def _init_bn(self, model: nn.Module, bn: str, steps: int) -> None:
        """BatchNorm bookkeeping; per-step statistics live here so they are checkpointed."""
        self._bn_names = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
        index = {n: i for i, n in enumerate(self.param_names)}
        self._bn_param_idx = [(index.get(f"{n}.weight"), index.get(f"{n}.bias")) for n in self._bn_names]
        if bn == "per_step":
            for k, n in enumerate(self._bn_names):
                m = model.get_submodule(n)
                if not m.track_running_stats or m.momentum is None:
                    raise ConfigError(f"bn='per_step' needs BatchNorm layers with running statistics "
                                      f"and a momentum; '{n}' has neither")
                self.register_buffer(f"bn_mean_{k}", m.running_mean.detach().clone().repeat(steps + 1, 1))
                self.register_buffer(f"bn_var_{k}", m.running_var.detach().clone().repeat(steps + 1, 1))
        if self.bn_affine_per_step:
            self._init_bn_affine(model, steps)

    def _init_bn_affine(self, model: nn.Module, steps: int) -> None:
        """γ_s, β_s (s = 0..steps) of every BatchNorm layer k: parameters ``bn_weight_k`` and
        ``bn_bias_k`` of shape (steps + 1, C), each row a copy of the layer's own γ, β."""
        if not self._bn_names:
            raise ConfigError(f"inner loop option bn_affine_per_step=True needs BatchNorm layers; "
                              f"{type(model).__name__} has none")
        for k, n in enumerate(self._bn_names):
            m = model.get_submodule(n)
            if not m.affine:
                raise ConfigError(f"inner loop option bn_affine_per_step=True needs affine "
                                  f"BatchNorm layers; '{n}' has affine=False")
            for name, value in (("weight", m.weight), ("bias", m.bias)):
                rows = value.detach().clone().repeat(steps + 1, 1)
                self.register_parameter(f"bn_{name}_{k}", nn.Parameter(rows))

    # ------------------------------------------------------------------ public
    @property
    def model(self) -> nn.Module:
        return self._model

    def step_sizes(self) -> Dict[str, Tensor]:
        """α by group name (a parameter tensor's name, or a module's under ``lr_per="layer"``);
        under ``lr_per_step`` each value is the group's (steps,) column."""
        return {g: self.alpha[..., k] for k, g in enumerate(self.group_names)}

    def functional(self, params: Optional[Sequence[Tensor]] = None, step: int = 0) -> Adapted:
        """The model at ``params`` (default: its own parameters) as an outer-forward network."""
        self._sync()
        return Adapted(self, list(self._model.parameters()) if params is None else list(params), step)

    def adapt(self, loss_fn: Callable[[Adapted], Tensor], *, steps: Optional[int] = None,
              params: Optional[Sequence[Tensor]] = None,
              differentiable: Optional[bool] = None,
              after_step: Optional[Callable[[Adapted], None]] = None) -> Adapted:
        """Take ``steps`` inner steps on ``loss_fn`` and return the adapted network.

        ``loss_fn(net)`` is called once per step with the current weights (``net.step`` is
        the step index, for learners that change the batch per step, e.g. MTL's k
        sub-batches). ``differentiable`` (default: ``model.training``) keeps the graph so
        the outer loss reaches θ_0 and α; without it the steps run detached (test-time
        fine-tuning: no graph is kept, memory stays flat). ``after_step(net)``, if given, is
        called after every step t with the network at θ_{t+1} (``net.step = t + 1``), e.g. for
        MAML++'s multi-step loss Σ_t v_t L'(θ_t).
        """
        steps, differentiable, alphas = self._start(steps, differentiable)
        params = list(self._model.parameters()) if params is None else list(params)
        if len(params) != len(self.param_names):
            raise ConfigError(f"adapt() got {len(params)} parameter tensors, the model has "
                              f"{len(self.param_names)}")
        if differentiable and self.recompute and not self.first_order:
            return adapt_recomputed(self, loss_fn, params, steps, alphas, after_step)
        create_graph = differentiable and not self.first_order
        idx = self._adapted_idx
        if not differentiable:
            params = [p.detach() for p in params]
            for i in idx:
                params[i].requires_grad_(True)
        m_state: List[Optional[Tensor]] = [None] * len(idx)
        v_state: List[Optional[Tensor]] = [None] * len(idx)
        with torch.enable_grad():
            for t in range(steps):
                loss = loss_fn(Adapted(self, params, t, inner=True))
                grads = torch.autograd.grad(loss, [params[i] for i in idx], create_graph=create_graph,
                                            allow_unused=True)
                params = self._update(params, grads, alphas, t, m_state, v_state, differentiable)
                if after_step is not None:
                    after_step(Adapted(self, params, t + 1))
        if not differentiable:
            params = [p.detach() for p in params]
        return Adapted(self, params, steps)


    # ------------------------------------------------------------ task batching
    def adapt_batched(self, loss_fn: Callable, *task_tensors: Tensor, steps: Optional[int] = None,
                      differentiable: Optional[bool] = None,
                      after_step: Optional[Callable[["BatchedAdapted"], None]] = None) -> "BatchedAdapted":
        """Adapt T tasks at once; ``task_tensors[j][i]`` is task i's j-th tensor.

        The update of :meth:`adapt` for every task i (module docstring):
        θ^i_{t+1}[a] = θ^i_t[a] − α_{g(a)} · ∇_{θ[a]} L_i(θ^i_t), with θ^i_0 = θ_0 shared
        (expanded over tasks, no copy) and α captured (shared, not vmapped). ``loss_fn(net,
        *task_i_tensors)`` is one task's loss, or ``(loss, aux)``; only the forwards run inside
        ``torch.func.vmap`` over tasks; ∇L and the update (``torch._foreach_*``, shared with
        :meth:`adapt`) use ordinary autograd (:meth:`_batched_grads`), so the outer loss
        back-propagates to θ_0 and α (second order: ``create_graph``; first order and
        ``differentiable=False``: ∇L of detached leaves, a constant); Adam moments are (T, ...).

        Functional model: ``higher``'s patched model (its forward is plain Python over
        tensors and composes with vmap), BatchNorm included (each patched BatchNorm's forward
        is redirected to :meth:`_task_bn`, ``F.batch_norm`` per task under the policy below). ``torch.func.grad`` inside
        vmap is not used: with it, ``F.batch_norm``'s second derivatives under vmap were wrong
        (plain mean/var ops were needed) and its wrapping dispatched ~25% more operators;
        autograd over the vmapped forward's physical ops is exact to second order.
        BN policies, batched: ``"transductive"``: per-task batch statistics, as sequential.
        ``"running"`` / ``"per_step"``: training forwards normalise with per-task batch
        statistics; the statistics that update running statistics leave vmap as outputs and
        the T momentum updates are applied in task order (closed form of the T successive
        updates), which is the sequential result when each task's network makes one updating
        forward per statistics set (inner step t under ``per_step``; the outer forward). A
        second updating forward of the same set applies its T updates after the first's, an
        order the sequential loop does not have; that is logged once. Eval forwards read the
        running statistics. Random ops (dropout) draw independently per task
        (``randomness="different"``), not the sequential path's draws. ``after_step`` as in
        :meth:`adapt`, with the :class:`BatchedAdapted` network after each step.
        """
        steps, differentiable, alphas = self._start(steps, differentiable)
        if differentiable and self.recompute and not self.first_order:
            return adapt_batched_recomputed(self, loss_fn, task_tensors, steps, alphas, after_step)
        n_tasks = _task_count(task_tensors)
        params = list(self._model.parameters())
        if not differentiable:
            params = [p.detach() for p in params]
        batched = [False] * len(params)
        second = differentiable and not self.first_order
        m_state: List[Optional[Tensor]] = [None] * len(self._adapted_idx)
        v_state: List[Optional[Tensor]] = [None] * len(self._adapted_idx)
        losses, auxes, seen = [], [], set()
        for t in range(steps):
            grads, loss, aux = self._batched_grads(loss_fn, params, batched, task_tensors, t,
                                                   second, seen)
            losses.append(loss)
            auxes.append(aux)
            params = self._update(params, grads, alphas, t, m_state, v_state, differentiable)
            for i in self._adapted_idx:
                batched[i] = True
            if after_step is not None:
                after_step(BatchedAdapted(self, params, list(batched), t + 1, n_tasks, losses,
                                          auxes, seen))
        if not differentiable:
            params = [p.detach() for p in params]
        return BatchedAdapted(self, params, batched, steps, n_tasks, losses, auxes, seen)

    def _batched_grads(self, loss_fn, params, batched, task_tensors, t: int, second: bool, seen):
        """(∇_{θ[a]} L_i(θ^i_t) for the adapted a, each (T, ...); L_i(θ^i_t) (T,); aux).

        One vmapped forward of the T task losses at per-task weights Θ[a] = (θ^1_t[a], ...,
        θ^T_t[a]) (θ_0 expanded at t = 0, no copy), then one ordinary backward of Σ_i L_i:
        ∂(Σ_j L_j)/∂Θ[a]_i = ∇_{θ[a]} L_i(θ^i_t), the tasks being independent. Second order:
        ``create_graph`` on the in-graph Θ; first order: Θ are detached leaves, so ∇L is a
        constant for the outer backward.
        """
        idx, n = self._adapted_idx, task_tensors[0].shape[0]
        stacked = [params[i] if batched[i] else params[i].expand(n, *params[i].shape) for i in idx]
        full = list(params)  # first order: only the adapted Θ below are detached leaves
        if not second:
            stacked = [s.detach().requires_grad_(True) for s in stacked]
        for k, i in enumerate(idx):
            full[i] = stacked[k]
        dims = [0 if b else None for b in batched]
        for i in idx:
            dims[i] = 0
        targets: List[tuple] = []

        def per_task(ps, *task):
            net = _TaskNet(self, ps, t, inner=True)
            out = loss_fn(net, *task)
            loss, aux = out if isinstance(out, tuple) else (out, ())
            targets[:] = net.targets
            return loss, aux, net.stats

        fn = torch.func.vmap(per_task, in_dims=(dims, *[0] * len(task_tensors)), randomness="different")
        with torch.enable_grad():
            loss, aux, stats = fn(full, *task_tensors)
            grads = torch.autograd.grad(loss.sum(), stacked, create_graph=second,
                                        materialize_grads=True)
        if not self._replaying:  # a recomputed step (adapt_batched_recomputed) updates nothing
            self._apply_bn_stats(targets, stats, seen)
        aux = torch.utils._pytree.tree_map(lambda v: v.detach() if isinstance(v, Tensor) else v, aux)
        return list(grads), loss.detach(), aux

    def _batched_forward(self, net: "BatchedAdapted", args, kwargs):
        """vmap of the patched model over tasks at ``net.params`` (keyword arguments shared)."""
        self._sync()
        targets: List[tuple] = []

        def per_task(params, *a):
            task_net = _TaskNet(self, params, net.step, inner=False)
            out = task_net(*a, **kwargs)
            targets[:] = task_net.targets
            return out, task_net.stats

        dims = [0 if b else None for b in net.batched]
        in_dims = (dims, *[0 if isinstance(a, Tensor) else None for a in args])
        out, stats = torch.func.vmap(per_task, in_dims=in_dims, randomness="different")(net.params, *args)
        self._apply_bn_stats(targets, stats, net._seen)
        return out

    def _vforward(self, net: "_TaskNet", x: Tensor, *args, **kwargs):
        """One task's forward inside vmap: the patched model, BatchNorm by :meth:`_task_bn`."""
        fmodel = self._fmodel
        _, bn_pairs = self._pairs
        params = self._step_affine(net.params, net.step)
        for k, pair in enumerate(bn_pairs):
            plan = self._bn_plan(k, pair, net.step, net._inner)
            object.__setattr__(pair.patched, "forward",
                               functools.partial(self._task_bn, k, plan, net, params))
        try:
            return fmodel(x, *args, params=params, **kwargs)
        finally:
            for pair in bn_pairs:
                pair.patched.__dict__.pop("forward", None)
            self._release(fmodel)

    def _bn_plan(self, k: int, pair: _BNPair, step: int, inner: bool) -> tuple:
        """(running (mean, var) to read or None for batch statistics, update target or None):
        the one statement of the BatchNorm policy, applied by :meth:`_configure_bn` (sequential)
        and :meth:`_task_bn` (inside vmap)."""
        module = pair.module
        if self.bn == "per_step":
            s = min(step, self.steps)
            if module.training:
                return None, ("step", k, s)
            return (getattr(self, f"bn_mean_{k}")[s], getattr(self, f"bn_var_{k}")[s]), None
        use_running = self.bn == "running" and (not module.training or not inner)
        if use_running and module.track_running_stats:
            if module.training:
                return None, ("module", k)
            return (module.running_mean, module.running_var), None
        return None, None

    def _task_bn(self, k: int, plan: tuple, net: "_TaskNet", params: List[Tensor], x: Tensor) -> Tensor:
        """BatchNorm of layer k inside vmap under the policy's ``plan`` with the weights of
        ``params`` (the forward's, per-step γ_s, β_s substituted); records the batch
        mean and unbiased variance when they update running statistics."""
        running, target = plan
        iw, ib = self._bn_param_idx[k]
        w = params[iw] if iw is not None else None
        b = params[ib] if ib is not None else None
        eps = self._pairs[1][k].module.eps
        if running is not None:
            return F.batch_norm(x, running[0], running[1], w, b, False, 0.0, eps)
        if target is not None:
            with torch.no_grad():
                dims = [0] + list(range(2, x.dim()))
                net.stats += [x.mean(dims), x.var(dims, correction=1)]
            net.targets.append(target)
        return F.batch_norm(x, None, None, w, b, True, 0.0, eps)

    @torch.no_grad()
    def _apply_bn_stats(self, targets: List[tuple], stats: List[Tensor], seen: set) -> None:
        """Apply the T per-task momentum updates of each recorded statistics set in task order.

        T successive updates r ← (1 − f_i) r + f_i s_i give r·Π_i(1 − f_i) + Σ_i f_i s_i
        Π_{u>i}(1 − f_u); f_i = momentum, or 1/n_i (cumulative average, momentum None) with n_i
        the module's count after update i, as ``nn.BatchNorm``.
        """
        for j, target in enumerate(targets):
            if target in seen and "order" not in seen:
                seen.add("order")
                _log.warning("task-batched inner loop: a running-statistics set was updated by "
                             "two forwards of one batched adaptation; their updates are applied "
                             "forward by forward, not task by task as the sequential loop does")
            seen.add(target)
            mean, var = stats[2 * j], stats[2 * j + 1]
            momentum = self._pairs[1][target[1]].module.momentum  # never None for per-step sets
            tasks = mean.shape[0]
            rm, rv, nbt = self._statistics_set(target)
            keep, w = _update_weights(momentum, nbt, tasks, mean.device)
            if nbt is not None:
                nbt.add_(tasks)
            rm.copy_((rm.double() * keep + (w * mean.double()).sum(0)).to(rm.dtype))
            rv.copy_((rv.double() * keep + (w * var.double()).sum(0)).to(rv.dtype))

    # ---------------------------------------------------------------- internal
    def _start(self, steps: Optional[int], differentiable: Optional[bool]) -> tuple:
        """(steps, differentiable, α per adapted tensor) for :meth:`adapt` and
        :meth:`adapt_batched`: defaults filled in, the step count checked, the model synced."""
        self._sync()
        steps = self.steps if steps is None else int(steps)
        if steps < 0:
            raise ConfigError(f"number of inner steps must be >= 0, got {steps}")
        if differentiable is None:
            differentiable = self._model.training
        return steps, differentiable, self._alpha_per_tensor(differentiable)

    def _alpha_per_tensor(self, differentiable: bool) -> List[Union[List[Tensor], List[float]]]:
        """α_{g(a)} for every adapted tensor a, one row per step row of α (one row unless
        ``lr_per_step``), gathered once per adaptation; step t uses row min(t, rows − 1).

        A learnable α (``differentiable`` and α requires grad): 0-d views of one
        ``α.unbind()`` per row (one autograd node, one view per group); otherwise Python floats, read from α once and cached
        until α changes (its version counter or storage), so fixed-α steps neither build a
        graph to α nor index it per tensor (and cost no host sync per step).
        """
        alpha = self.alpha
        if differentiable and alpha.requires_grad:
            parts = [row.unbind() for row in alpha.unbind()] if alpha.dim() == 2 else [alpha.unbind()]
            return [[p[g] for g in self._group_idx] for p in parts]
        key = (alpha.data_ptr(), alpha._version, alpha.device)
        if self._alpha_cache is None or self._alpha_cache[0] != key:
            values = alpha.detach().tolist()
            values = values if alpha.dim() == 2 else [values]
            per_row = [[float(v[g]) for g in self._group_idx] for v in values]
            object.__setattr__(self, "_alpha_cache", (key, per_row))
        return self._alpha_cache[1]

    def _update(self, params: List[Tensor], grads, alphas, t: int, m_state, v_state,
                differentiable: bool) -> List[Tensor]:
        """θ_{t+1}[a] = θ_t[a] − α_{t,g(a)} · d_a for the adapted a (d = ∇L, or Adam's direction;
        α's row t, the last row past it), as ``torch._foreach_*`` over the adapted tensors (one
        autograd node per op). Tensors without a gradient (unused by the loss) stay as they are."""
        alphas = alphas[min(t, len(alphas) - 1)]
        idx = self._adapted_idx
        ks = [k for k, g in enumerate(grads) if g is not None]
        if not ks:
            return params
        ps = [params[idx[k]] for k in ks]
        ds = [grads[k] for k in ks]
        if self.optimizer == "adam":
            ds = [self._adam_direction(k, d, t + 1, m_state, v_state) for k, d in zip(ks, ds)]
        a = [alphas[k] for k in ks]
        with contextlib.nullcontext() if differentiable else torch.no_grad():
            if isinstance(a[0], float) and all(v == a[0] for v in a):
                new = torch._foreach_add(ps, ds, alpha=-a[0])
            elif differentiable and isinstance(a[0], Tensor) and not any(d.requires_grad for d in ds):
                new = _ConstantDirectionStep.apply(ds, *ps, *a)
            else:
                new = torch._foreach_sub(ps, torch._foreach_mul(ds, a))
        out = list(params)
        for k, p in zip(ks, new):
            out[idx[k]] = p if differentiable else p.requires_grad_(True)
        return out

    def _adam_direction(self, k: int, g: Tensor, t: int, m_state, v_state) -> Tensor:
        """Adam's bias-corrected direction m̂ / (√v̂ + ε) for adapted tensor ``k`` at step ``t``."""
        b1, b2 = self.adam_betas
        m = (1 - b1) * g if m_state[k] is None else b1 * m_state[k] + (1 - b1) * g
        v = (1 - b2) * g * g if v_state[k] is None else b2 * v_state[k] + (1 - b2) * g * g
        m_state[k], v_state[k] = m, v
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        # √v̂ with derivative 0 where v̂ = 0 (an exactly zero gradient entry): the plain sqrt's
        # infinite derivative there made second-order meta-gradients NaN (0 · ∞); the direction
        # m̂/(√v̂ + ε) and its true derivative (1/ε at g = 0, through m̂) are unchanged
        positive = v_hat > 0
        root = torch.where(positive, torch.where(positive, v_hat, 1.0).sqrt(), 0.0)
        return m_hat / (root + self.adam_eps)

    def _patched(self):
        if self._fmodel is None:
            fmodel = higher.patch.monkeypatch(self._model, copy_initial_weights=False,
                                              track_higher_grads=True)
            fmods = dict(fmodel.named_modules())
            pairs = [(m, fmods[n]) for n, m in self._model.named_modules()]
            bn_pairs = [_BNPair(n, self._model.get_submodule(n), fmods[n]) for n in self._bn_names]
            slots = [(twin, list(twin._param_names)) for _, twin in pairs if twin._param_names]
            object.__setattr__(self, "_fmodel", fmodel)
            object.__setattr__(self, "_pairs", (pairs, bn_pairs))
            object.__setattr__(self, "_slots", slots)
        return self._fmodel

    def _sync(self) -> None:
        """Mirror the user's modules into the patched twin: train/eval flags and buffers.

        Buffers are shared (not copied), so they follow ``model.to(device)`` and any running
        statistics update lands in the user's model.
        """
        self._patched()
        pairs, _ = self._pairs
        for module, twin in pairs:
            twin.training = module.training
            for key, buf in module._buffers.items():
                twin._buffers[key] = buf

    def _forward(self, params: List[Tensor], step: int, inner: bool, x: Tensor, *args, **kwargs):
        fmodel = self._fmodel
        _, bn_pairs = self._pairs
        for k, pair in enumerate(bn_pairs):
            self._configure_bn(k, pair, step, inner)
        try:
            return fmodel(x, *args, params=self._step_affine(params, step), **kwargs)
        finally:
            self._release(fmodel)

    def _release(self, fmodel) -> None:
        """Drop the patched model's references to the weights of the last forward.

        ``higher`` appends every ``params`` list passed to ``forward`` to a fast-weight history
        and leaves the tensors on the patched modules; reusing one patched model for a whole
        run would keep every step's graph alive. The graph now lives exactly as long as the
        caller holds the outputs.
        """
        fmodel._fast_params = None
        for twin, names in self._slots:
            for name in names:
                twin._parameters[name] = None

    def _step_affine(self, params: List[Tensor], step: int) -> List[Tensor]:
        """``params`` with each BatchNorm layer's weight and bias replaced by γ_s, β_s,
        s = min(step, steps), under ``bn_affine_per_step`` (else ``params`` itself)."""
        if not self.bn_affine_per_step:
            return params
        s = min(step, self.steps)
        out = list(params)
        for k, (iw, ib) in enumerate(self._bn_param_idx):
            if iw is not None:
                out[iw] = getattr(self, f"bn_weight_{k}")[s]
            if ib is not None:
                out[ib] = getattr(self, f"bn_bias_{k}")[s]
        return out

    def _configure_bn(self, k: int, pair: _BNPair, step: int, inner: bool) -> None:
        """Point the patched BatchNorm at the statistics the policy (:meth:`_bn_plan`)
        prescribes for this forward: batch statistics (updating a set, or nothing), or a
        set of running statistics read in eval mode."""
        running, target = self._bn_plan(k, pair, step, inner)
        if target is not None and not self._replaying:
            stats = self._statistics_set(target)
        else:
            stats = (*running, None) if running is not None else (None, None, None)
        pair.patched.training = running is None
        for key, value in zip(("running_mean", "running_var", "num_batches_tracked"), stats):
            pair.patched._buffers[key] = value

    def _statistics_set(self, target: tuple) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """(running mean, running var, batch count or None) that a :meth:`_bn_plan` update
        target names: per-step set s of layer k, or layer k's own running statistics."""
        if target[0] == "step":
            _, k, s = target
            return getattr(self, f"bn_mean_{k}")[s], getattr(self, f"bn_var_{k}")[s], None
        module = self._pairs[1][target[1]].module
        return module.running_mean, module.running_var, module.num_batches_tracked


class _ConstantDirectionStep(torch.autograd.Function):
    """θ'_a = θ_a − α_a · d_a for every tensor a, with directions d_a that are constants (first
    order: ∇L detached) and step sizes α_a that are learned (0-d tensors), as one autograd node.

    Forward: one fused pass per tensor (``addcmul``, reads θ_a and d_a, writes θ'_a). Backward:
    ∂L'/∂θ_a = ∂L'/∂θ'_a (passed through, no copy) and ∂L'/∂α_a = −⟨∂L'/∂θ'_a, d_a⟩ (one dot
    product per tensor). The general path (``_foreach_mul`` then ``_foreach_sub``) computes the
    same with a temporary α·d, a negated copy of ∂L'/∂θ' and an elementwise product before the
    sum: three extra passes over every weight, which dominate MLTP_FO on networks with large
    layers (CNet1's 33.5M-weight Fc). The same math; θ' rounds as a fused multiply-add.
    """

    @staticmethod
    def forward(ctx, ds, *ps_and_alphas):
        n = len(ds)
        ps, alphas = ps_and_alphas[:n], ps_and_alphas[n:]
        ctx.save_for_backward(*ds)
        return tuple(torch.addcmul(p, d, -a) for p, d, a in zip(ps, ds, alphas))

    @staticmethod
    def backward(ctx, *grads):
        ds = ctx.saved_tensors
        d_alpha = [-torch.dot(g.reshape(-1), d.reshape(-1)) for g, d in zip(grads, ds)]
        return (None, *grads, *d_alpha)


# ------------------------------------------------------------------------- task batching
TASK_BATCHING = ("auto", "on", "off")
_log = logging.getLogger("fewshot.inner_loop")
_logged_fallback = set()


def _update_weights(momentum: Optional[float], count: Optional[Tensor], tasks: int,
                    device: torch.device) -> Tuple[Union[float, Tensor], Tensor]:
    """(keep, w) with T updates r ← (1 − f_i) r + f_i s_i = r·keep + Σ_i w_i s_i, w (T, 1).

    keep = Π_i(1 − f_i), w_i = f_i Π_{u>i}(1 − f_u); f_i = momentum, or (momentum None) the
    cumulative average 1/n_i with n_i = count + i + 1, computed on the count's device (reading
    the count on the host would make it wait for the device once per layer and forward); no
    count and no momentum: no update. Products are taken from the last task back, in float64.
    """
    f64 = dict(dtype=torch.float64, device=device)
    if momentum is None and count is not None:
        f = 1.0 / (count.to(**f64) + torch.arange(1, tasks + 1, **f64))
        kept = torch.cumprod((1.0 - f).flip(0), 0).flip(0)  # Π_{u>=i}(1 − f_u)
        return kept[0], (f * torch.cat([kept[1:], kept.new_ones(1)])).unsqueeze(1)
    f = float(momentum) if momentum is not None else 0.0
    keep, weights = 1.0, [0.0] * tasks
    for i in reversed(range(tasks)):
        weights[i] = f * keep
        keep *= 1.0 - f
    return keep, torch.tensor(weights, **f64).unsqueeze(1)


def task_shapes(tasks: Sequence[Sequence[Tensor]]) -> List[tuple]:
    """The shapes of each task's tensors (a task is a sequence of tensors)."""
    return [tuple(tuple(t.shape) for t in task) for task in tasks]


def resolve_task_batching(option: str, tasks: Sequence[Sequence[Tensor]], device: torch.device,
                          who: str = "learner") -> bool:
    """Whether ``tasks`` adapt as one batched computation under ``task_batching=option``.

    ``"off"``: never. ``"on"``: always, and tasks of unequal shapes are a ConfigError naming
    the shapes. ``"auto"``: when ``device`` is CUDA and all tasks have equal shapes; a ragged
    meta-batch (any-way / any-shot) falls back to the sequential loop with one log line.
    One task alone is never batched under ``"auto"`` (nothing to gain). Not on a CPU under
    ``"auto"``: there the batched step is slower than the sequential one (measured 2-2.6x for
    FO-MAML, Conv-4, meta-batch 32): each elementwise op streams the T tasks' activations
    (T·B·C·H·W, 240 MB a layer at T=32, 75 queries, 32 channels, 28x28) through memory where
    one task's fit in cache, vmap's convolution with per-task weights is a grouped
    convolution, and its BatchNorm applies per-task affine weights as separate mul/add
    passes plus layout copies between the conv (B, T·C) and pooling (T·B, C) layouts.
    """
    if option not in TASK_BATCHING:
        raise ConfigError(f"{who} option 'task_batching' must be one of "
                          f"{', '.join(TASK_BATCHING)}, got {option!r}")
    if option == "off":
        return False
    shapes = task_shapes(tasks)
    equal = all(s == shapes[0] for s in shapes)
    if option == "on":
        if not equal:
            distinct = list(dict.fromkeys(shapes))
            raise ConfigError(f"{who} option task_batching='on' needs tasks of equal shapes, got "
                              f"{len(distinct)} different: {distinct[:3]}; use task_batching="
                              "'auto' (falls back to sequential) or equal-shaped episodes")
        return True
    if torch.device(device).type != "cuda" or len(tasks) < 2:
        return False
    if not equal and who not in _logged_fallback:
        _logged_fallback.add(who)
        _log.info("%s: tasks of unequal shapes in one meta-batch (ragged any-way/any-shot "
                  "episodes); adapting them sequentially (task_batching='auto')", who)
    return equal


@contextlib.contextmanager
def batched_oom_guard(meta_batch: int, who: str = "learner"):
    """Turn a CUDA out-of-memory error inside a task-batched step into one TrainingError
    that names the meta-batch and the ways out (no retry: the caller's state is untouched
    because the optimiser has not stepped yet)."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        raise TrainingError(
            f"{who}: CUDA out of memory while adapting a meta-batch of {meta_batch} tasks "
            f"as one batched computation; set task_batching='off' (sequential, one task in "
            f"memory at a time) or a smaller meta_batch") from e


class _TaskNet:
    """One task's network inside ``vmap``: ``net(x)`` runs the patched model at ``params``
    with the batched BatchNorm of :meth:`InnerLoop._task_bn`; ``step`` as :class:`Adapted`; ``stats`` collects the batch
    statistics that update running statistics (returned out of vmap, applied in task order)."""

    __slots__ = ("_loop", "params", "step", "_inner", "stats", "targets")

    def __init__(self, loop: "InnerLoop", params: List[Tensor], step: int, inner: bool):
        self._loop, self.params, self.step, self._inner = loop, params, step, inner
        self.stats: List[Tensor] = []
        self.targets: List[tuple] = []

    def __call__(self, x: Tensor, *args, **kwargs):
        return self._loop._vforward(self, x, *args, **kwargs)


class BatchedAdapted:
    """T adapted networks at once: ``net(x_T, ...)`` maps (T, B, ...) to (T, B, ...).

    ``params`` is aligned with ``model.parameters()``; ``batched[i]`` says whether
    ``params[i]`` carries a leading task dimension T (adapted tensors after >= 1 step) or is
    θ_0 shared by all tasks. Tensor arguments of a call are split along dim 0, other
    arguments (e.g. ``ways``) go to every task as they are. ``inner_losses[t]`` (T,) and
    ``aux[t]`` are what ``loss_fn`` returned at inner step t (detached).
    """

    def __init__(self, loop: "InnerLoop", params: List[Tensor], batched: List[bool], step: int,
                 tasks: int, inner_losses: List[Tensor], aux: List[object], seen: set):
        self._loop, self.params, self.batched, self.step = loop, params, batched, step
        self.tasks, self.inner_losses, self.aux = tasks, inner_losses, aux
        self._seen = seen  # running-statistics sets updated so far (see InnerLoop.adapt_batched)

    def __call__(self, *args, **kwargs):
        return self._loop._batched_forward(self, args, kwargs)

    def stacked_params(self) -> List[Tensor]:
        """Every parameter with a leading task dimension (θ_0 expanded, no copy)."""
        return [p if b else p.unsqueeze(0).expand(self.tasks, *p.shape)
                for p, b in zip(self.params, self.batched)]


def _task_count(task_tensors: Sequence[Tensor]) -> int:
    """T, the common leading dimension of the task tensors (ConfigError otherwise)."""
    if not task_tensors:
        raise ConfigError("adapt_batched() needs at least one task tensor (leading dim = tasks)")
    n = task_tensors[0].shape[0]
    for j, t in enumerate(task_tensors):
        if t.shape[0] != n:
            raise ConfigError(f"adapt_batched(): task tensor {j} has {t.shape[0]} tasks, "
                              f"tensor 0 has {n}")
    return n


# ------------------------------------------------------------- recomputed (checkpointed) steps
def _check_recompute(recompute, first_order: bool, optimizer: str) -> None:
    """ConfigError for a ``recompute`` the inner loop cannot honour."""
    if not isinstance(recompute, bool):
        raise ConfigError(f"inner loop option 'recompute' (learner option inner_checkpoint) must "
                          f"be true or false, got {recompute!r}")
    if recompute and first_order:
        raise ConfigError("inner_checkpoint recomputes second-order inner steps; first-order "
                          "steps keep no inner graph already: set inner_checkpoint = false "
                          "or first_order = false")
    if recompute and optimizer != "sgd":
        raise ConfigError(f"inner_checkpoint supports inner optimizer 'sgd' only, got "
                          f"{optimizer!r}: set inner_checkpoint = false")


def adapt_recomputed(loop: InnerLoop, loss_fn: Callable, params: List[Tensor], steps: int,
                     alphas, after_step: Optional[Callable] = None) -> Adapted:
    """:meth:`InnerLoop.adapt`'s second-order SGD steps, each one a :class:`_RecomputedStep`.

    Same θ_T and same meta-gradients as the ordinary loop, but the forward pass keeps no
    step's graph: step t saves θ_t (and α) only, and the backward pass recomputes it. Peak
    memory is one step's double-backward graph plus T copies of the adapted tensors, instead
    of T steps' graphs. ``after_step`` as in :meth:`InnerLoop.adapt` (MAML++'s multi-step loss:
    each θ_{t+1} is an output of step t's function, so its loss back-propagates through it).
    """
    spec = _StepSpec(loop, loss_fn, alphas, params)
    notify = None if after_step is None else (lambda ps, t: after_step(Adapted(loop, ps, t + 1)))
    return Adapted(loop, _run_steps(spec, params, steps, notify), steps)


def adapt_batched_recomputed(loop: InnerLoop, loss_fn: Callable, task_tensors, steps: int,
                             alphas, after_step: Optional[Callable] = None) -> "BatchedAdapted":
    """:meth:`InnerLoop.adapt_batched`'s second-order SGD steps as :class:`_RecomputedStep`
    (the vmapped task losses of :meth:`InnerLoop._batched_grads`, recomputed in the backward
    pass; running statistics updated by the forward only)."""
    params = list(loop._model.parameters())
    spec = _BatchedStepSpec(loop, loss_fn, alphas, params, task_tensors)
    tasks = _task_count(task_tensors)

    def adapted(ps, t):
        batched = [t > 0 and i in spec.adapted for i in range(len(ps))]
        return BatchedAdapted(loop, ps, batched, t, tasks, spec.losses, spec.aux, spec.seen)

    notify = None if after_step is None else (lambda ps, t: after_step(adapted(ps, t + 1)))
    return adapted(_run_steps(spec, params, steps, notify), steps)


def _run_steps(spec: "_StepSpec", params: List[Tensor], steps: int,
               notify: Optional[Callable] = None) -> List[Tensor]:
    """θ_T from θ_0 = ``params`` by ``steps`` :class:`_RecomputedStep` s. Inputs of a step:
    θ_t, the distinct α tensors, and the loop's other parameters requiring grad;
    ``notify(θ_{t+1}, t)`` after each step."""
    loop, alphas = spec.loop, spec.alpha_inputs
    extras = [p for p in loop.parameters() if p.requires_grad and all(p is not a for a in alphas)]
    for t in range(steps):
        spec.t = t
        new = _RecomputedStep.apply(spec, *params, *alphas, *extras)
        params = list(params)
        for k, i in enumerate(loop._adapted_idx):
            params[i] = new[k]
        if notify is not None:
            notify(params, t)
    return params


class _StepSpec:
    """What :class:`_RecomputedStep` needs besides tensors: the loop, the inner loss, the
    step index t, and α per adapted tensor (``alphas`` of :meth:`InnerLoop._start`: one row
    per step row of α (MAML++ LSLR), each fixed floats or views of a learnable α, passed to
    every step once each as ``alpha_inputs``; step t uses row min(t, rows − 1))."""

    def __init__(self, loop: InnerLoop, loss_fn: Callable, alphas, params: List[Tensor]):
        self.loop, self.loss_fn, self.t = loop, loss_fn, 0
        self.n_params = len(params)
        self.adapted = set(loop._adapted_idx)
        self.alpha_inputs = list({id(a): a for row in alphas for a in row
                                  if isinstance(a, Tensor)}.values())
        index = {id(a): j for j, a in enumerate(self.alpha_inputs)}
        #: per step row, adapted tensor k's α: an index into the α inputs, or a float
        self.alpha_rows = [[index[id(a)] if isinstance(a, Tensor) else float(a) for a in row]
                           for row in alphas]

    @property
    def alpha_of(self) -> list:
        """Step t's row of :attr:`alpha_rows`."""
        return self.alpha_rows[min(self.t, len(self.alpha_rows) - 1)]

    def split(self, inputs) -> tuple:
        """(θ_t, α inputs, extra inputs) of a step's flat inputs."""
        n, m = self.n_params, len(self.alpha_inputs)
        return list(inputs[:n]), list(inputs[n:n + m]), list(inputs[n + m:])

    def alpha(self, k: int, alpha_inputs: List[Tensor]):
        """α of adapted tensor k: an α input, or a fixed float."""
        a = self.alpha_of[k]
        return alpha_inputs[a] if isinstance(a, int) else a

    def gradients(self, leaves: List[Tensor], create_graph: bool):
        """∇_{θ[a]} L(θ_t) for the adapted a (None where unused) at ``leaves`` = θ_t."""
        loop = self.loop
        with torch.enable_grad():
            loss = self.loss_fn(Adapted(loop, leaves, self.t, inner=True))
            return torch.autograd.grad(loss, [leaves[i] for i in loop._adapted_idx],
                                       create_graph=create_graph, allow_unused=True)


class _BatchedStepSpec(_StepSpec):
    """:class:`_StepSpec` for T tasks: ∇_{θ[a]} L_i(θ^i_t), each (T, ...), by
    :meth:`InnerLoop._batched_grads`; the forward records the inner losses and aux."""

    def __init__(self, loop: InnerLoop, loss_fn: Callable, alphas, params: List[Tensor],
                 task_tensors):
        super().__init__(loop, loss_fn, alphas, params)
        self.tasks, self.seen = task_tensors, set()
        self.losses: List[Tensor] = []
        self.aux: List[object] = []

    def gradients(self, leaves: List[Tensor], create_graph: bool):
        batched = [self.t > 0 and i in self.adapted for i in range(len(leaves))]
        with torch.enable_grad():  # (a backward pass runs without grad mode)
            grads, loss, aux = self.loop._batched_grads(self.loss_fn, leaves, batched,
                                                        self.tasks, self.t, create_graph,
                                                        self.seen)
        if not self.loop._replaying:
            self.losses.append(loss)
            self.aux.append(aux)
        return grads


class _StepState:
    """The RNG states and train/eval flags at a step's forward, restored for its replay
    (dropout draws the same masks; BatchNorm takes the same branch) with the replay flag
    that keeps BatchNorm from updating running statistics a second time."""

    def __init__(self, loop: InnerLoop, tensors: Sequence[Tensor]):
        self.loop = loop
        self.devices = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]
        self.flags = [m.training for m in loop.model.modules()]

    @contextlib.contextmanager
    def replay(self):
        modules = list(self.loop.model.modules())
        now = [m.training for m in modules]
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for d, state in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(state, d)
            try:
                for m, flag in zip(modules, self.flags):
                    m.training = flag
                object.__setattr__(self.loop, "_replaying", True)
                self.loop._sync()
                yield
            finally:
                object.__setattr__(self.loop, "_replaying", False)
                for m, flag in zip(modules, now):
                    m.training = flag


def _foreign_leaves(tensors: Sequence[Tensor], known: set) -> int:
    """How many leaves requiring grad the graphs of ``tensors`` reach besides ``known`` (ids)."""
    found, seen, stack = 0, set(), [t.grad_fn for t in tensors]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None and id(var) not in known:
            found += 1
        stack.extend(fn for fn, _ in node.next_functions)
    return found


class _RecomputedStep(torch.autograd.Function):
    """One second-order SGD step θ_{t+1}[a] = θ_t[a] − α_a ∇_a L(θ_t) (MAML eq. 1) whose
    backward pass recomputes it (activation checkpointing of the inner loop).

    Inputs: θ_t (every parameter tensor, adapted or not), the distinct learnable α tensors,
    and the inner loop's other parameters ("extras", which a loss may read through the loop).
    Outputs: θ_{t+1}[a] for the adapted a. Forward: g = ∇L(θ_t) at detached leaves, no
    graph kept; saves θ_t, α, the RNG states and the train/eval flags. Backward, for the
    outer gradient v = ∂L'/∂θ_{t+1}[a]: recompute g with ``create_graph`` (same RNG, flags;
    BatchNorm running statistics are not updated again), then with w = ∂⟨g, α ⊙ v⟩/∂(θ_t,
    extras) (one ``torch.autograd.grad`` with ``grad_outputs = α ⊙ v``, i.e. α·H_t v):

        ∂L'/∂θ_t[b] = v_b·[b adapted] − w_b,   ∂L'/∂α_a = −⟨v_a, g_a⟩,   ∂L'/∂extra = −w_extra,

    the exact vector-Jacobian product of the step, hence the ordinary second-order
    meta-gradient (no approximation). Task-batched (θ_0[a] shared, g and v of shape (T, ...)):
    v_a is summed over tasks for θ_0[a], and ⟨v_a, g_a⟩ runs over tasks too. If ∇L depends
    on another tensor requiring grad (a closure over another model), its gradient could not
    be returned: ConfigError in the backward pass.
    """

    @staticmethod
    def forward(ctx, spec: _StepSpec, *inputs: Tensor):
        theta, alpha_in, _ = spec.split(inputs)
        ctx.spec, ctx.state, ctx.t = spec, _StepState(spec.loop, theta), spec.t
        grads = spec.gradients([p.detach().requires_grad_(True) for p in theta], False)
        ctx.save_for_backward(*inputs)
        out = []
        for k, i in enumerate(spec.loop._adapted_idx):
            g = grads[k]
            out.append(theta[i].clone() if g is None else theta[i] - spec.alpha(k, alpha_in) * g)
        return tuple(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *v: Tensor):
        spec = ctx.spec
        spec.t = ctx.t
        theta, alpha_in, extras = spec.split(ctx.saved_tensors)
        with ctx.state.replay():
            leaves = [p.detach().requires_grad_(True) for p in theta]
            grads = spec.gradients(leaves, True)
            used = [k for k, g in enumerate(grads) if g is not None and g.requires_grad]
            _refuse_foreign([grads[k] for k in used], leaves + extras)
            w = (torch.autograd.grad([grads[k] for k in used], leaves + extras,
                                     [spec.alpha(k, alpha_in) * v[k] for k in used],
                                     allow_unused=True) if used else [None] * (len(leaves) + len(extras)))
        d_theta = [None if x is None else -x for x in w[:len(theta)]]
        for k, i in enumerate(spec.loop._adapted_idx):
            vk = v[k].sum_to_size(theta[i].shape)  # task-batched step 0: θ_0 shared by the tasks
            d_theta[i] = vk if d_theta[i] is None else d_theta[i] + vk
        d_alpha = [torch.zeros_like(a) for a in alpha_in]
        for k, g in enumerate(grads):
            a = spec.alpha_of[k]
            if g is not None and isinstance(a, int):
                d_alpha[a] = d_alpha[a] - (v[k] * g.detach()).sum()
        return (None, *d_theta, *d_alpha, *[None if x is None else -x for x in w[len(theta):]])


def _refuse_foreign(grads: Sequence[Tensor], inputs: Sequence[Tensor]) -> None:
    """ConfigError if the graph of ∇L reaches a leaf requiring grad that is not an input."""
    if _foreign_leaves(grads, {id(x) for x in inputs}):
        raise ConfigError("inner_checkpoint: the inner loss's gradient depends on tensors that "
                          "require grad besides the network's parameters (e.g. a closure over "
                          "another model); their meta-gradient would be lost: set "
                          "inner_checkpoint = false")
