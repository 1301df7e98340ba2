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
tensors, adapted or not) and to α. ``first_order=True`` detaches ∇L (no second derivatives:
first-order MAML, MLTP_FO); α still receives ∂L'/∂α = −Σ_t ⟨∇_{θ_{t+1}} L', ∇L(θ_t)⟩.
``optimizer="adam"`` replaces the SGD step by an Adam step (Reptile's inner optimiser).

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
ADAPT_PRESETS = ("all", "conv", "fc", "head", "first_conv", "last_fc")
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
    ``nn.Linear`` modules; ``"head"``: of the module named ``head`` (else the last Linear).
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
    if adapt == "head":
        head = _head_module_name(model)
        if head is None:
            return [False] * len(names)
        return [owners[n][0] == head or owners[n][0].startswith(head + ".") for n in names]
    raise ConfigError(f"inner loop option 'adapt' must be one of {', '.join(ADAPT_PRESETS)} "
                      f"or a callable, got {adapt!r}")


def _check_options(steps, bn: str, optimizer: str, lr_per: str, lr_init_std: float) -> None:
    """ConfigError naming the inner-loop option that is out of range."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ConfigError(f"inner loop option 'steps' must be an integer >= 0, got {steps!r}")
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
    """

    def __init__(self, model: nn.Module, steps: int = 1, lr: Union[float, Mapping[str, float]] = 0.01,
                 learn_lr: bool = False, lr_per: str = "tensor", adapt: Selector = "all",
                 first_order: bool = False, bn: str = "transductive", optimizer: str = "sgd",
                 lr_init_std: float = 0.0, adam_betas: Sequence[float] = (0.0, 0.999),
                 adam_eps: float = 1e-8, generator: Optional[torch.Generator] = None):
        super().__init__()
        _check_options(steps, bn, optimizer, lr_per, lr_init_std)
        object.__setattr__(self, "_model", model)
        self.steps = steps
        self.first_order = bool(first_order)
        self.bn = bn
        self.optimizer = optimizer
        self.adam_betas = tuple(float(b) for b in adam_betas)
        self.adam_eps = float(adam_eps)
        self.lr_per = lr_per
        self.param_names = [n for n, _ in model.named_parameters()]
        self._select(model, adapt, lr_per)
        init = self._initial_alpha(model, lr, lr_init_std, generator)
        if learn_lr:
            self.alpha = nn.Parameter(init)
        else:
            self.register_buffer("alpha", init)
        self._init_bn(model, bn, steps)
        object.__setattr__(self, "_fmodel", None)
        object.__setattr__(self, "_pairs", None)
        object.__setattr__(self, "_alpha_cache", None)  # (α's identity, fixed α per tensor)

    def _select(self, model: nn.Module, adapt: Selector, lr_per: str) -> None:
        """The adapted tensors (indices, names) and their step-size groups."""
        mask = select_parameters(model, adapt)
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

    # ------------------------------------------------------------------ public
    @property
    def model(self) -> nn.Module:
        return self._model

    def step_sizes(self) -> Dict[str, Tensor]:
        """α by group name (a parameter tensor's name, or a module's under ``lr_per="layer"``)."""
        return {g: self.alpha[k] for k, g in enumerate(self.group_names)}

    def functional(self, params: Optional[Sequence[Tensor]] = None, step: int = 0) -> Adapted:
        """The model at ``params`` (default: its own parameters) as an outer-forward network."""
        self._sync()
        return Adapted(self, list(self._model.parameters()) if params is None else list(params), step)

    def adapt(self, loss_fn: Callable[[Adapted], Tensor], *, steps: Optional[int] = None,
              params: Optional[Sequence[Tensor]] = None,
              differentiable: Optional[bool] = None) -> Adapted:
        """Take ``steps`` inner steps on ``loss_fn`` and return the adapted network.

        ``loss_fn(net)`` is called once per step with the current weights (``net.step`` is
        the step index, for learners that change the batch per step, e.g. MTL's k
        sub-batches). ``differentiable`` (default: ``model.training``) keeps the graph so
        the outer loss reaches θ_0 and α; without it the steps run detached (test-time
        fine-tuning: no graph is kept, memory stays flat).
        """
        steps, differentiable, alphas = self._start(steps, differentiable)
        params = list(self._model.parameters()) if params is None else list(params)
        if len(params) != len(self.param_names):
            raise ConfigError(f"adapt() got {len(params)} parameter tensors, the model has "
                              f"{len(self.param_names)}")
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
        if not differentiable:
            params = [p.detach() for p in params]
        return Adapted(self, params, steps)


    # ------------------------------------------------------------ task batching
    def adapt_batched(self, loss_fn: Callable, *task_tensors: Tensor, steps: Optional[int] = None,
                      differentiable: Optional[bool] = None) -> "BatchedAdapted":
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
        (``randomness="different"``), not the sequential path's draws.
        """
        steps, differentiable, alphas = self._start(steps, differentiable)
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
        for k, pair in enumerate(bn_pairs):
            plan = self._bn_plan(k, pair, net.step, net._inner)
            object.__setattr__(pair.patched, "forward", functools.partial(self._task_bn, k, plan, net))
        try:
            return fmodel(x, *args, params=net.params, **kwargs)
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

    def _task_bn(self, k: int, plan: tuple, net: "_TaskNet", x: Tensor) -> Tensor:
        """BatchNorm of layer k inside vmap under the policy's ``plan``; records the batch
        mean and unbiased variance when they update running statistics."""
        running, target = plan
        iw, ib = self._bn_param_idx[k]
        w = net.params[iw] if iw is not None else None
        b = net.params[ib] if ib is not None else None
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
            n0 = int(nbt) if nbt is not None else 0
            if nbt is not None:
                nbt.add_(tasks)
            if momentum is not None:
                f = [float(momentum)] * tasks
            else:
                f = [1.0 / (n0 + i + 1) if nbt is not None else 0.0 for i in range(tasks)]
            keep, weights = 1.0, [0.0] * tasks
            for i in reversed(range(tasks)):
                weights[i] = f[i] * keep
                keep *= 1.0 - f[i]
            w = torch.tensor(weights, dtype=torch.float64, device=mean.device).unsqueeze(1)
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

    def _alpha_per_tensor(self, differentiable: bool) -> Union[List[Tensor], List[float]]:
        """α_{g(a)} for every adapted tensor a, gathered once per adaptation.

        A learnable α (``differentiable`` and α requires grad): 0-d views of one
        ``α.unbind()`` (one autograd node, one view per group); otherwise Python floats, read from α once and cached
        until α changes (its version counter or storage), so fixed-α steps neither build a
        graph to α nor index it per tensor (and cost no host sync per step).
        """
        alpha = self.alpha
        if differentiable and alpha.requires_grad:
            parts = alpha.unbind()
            return [parts[g] for g in self._group_idx]
        key = (alpha.data_ptr(), alpha._version, alpha.device)
        if self._alpha_cache is None or self._alpha_cache[0] != key:
            values = alpha.detach().tolist()
            object.__setattr__(self, "_alpha_cache", (key, [float(values[g]) for g in self._group_idx]))
        return self._alpha_cache[1]

    def _update(self, params: List[Tensor], grads, alphas, t: int, m_state, v_state,
                differentiable: bool) -> List[Tensor]:
        """θ_{t+1}[a] = θ_t[a] − α_{g(a)} · d_a for the adapted a (d = ∇L, or Adam's direction),
        as ``torch._foreach_*`` over the adapted tensors (one autograd node per op). Tensors
        without a gradient (unused by the loss) stay as they are."""
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
            return fmodel(x, *args, params=params, **kwargs)
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

    def _configure_bn(self, k: int, pair: _BNPair, step: int, inner: bool) -> None:
        """Point the patched BatchNorm at the statistics the policy (:meth:`_bn_plan`)
        prescribes for this forward: batch statistics (updating a set, or nothing), or a
        set of running statistics read in eval mode."""
        running, target = self._bn_plan(k, pair, step, inner)
        if target is not None:
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
