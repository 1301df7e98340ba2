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

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import higher
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fewshot.errors import ConfigError

BN_POLICIES = ("transductive", "running", "per_step")
ADAPT_PRESETS = ("all", "conv", "fc", "head")
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
    BatchNorm affine parameters are neither conv nor fc. A callable receives
    ``(name, parameter, owning_module)``.
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
        model = self._model
        self._sync()
        steps = self.steps if steps is None else int(steps)
        if steps < 0:
            raise ConfigError(f"number of inner steps must be >= 0, got {steps}")
        if differentiable is None:
            differentiable = model.training
        params = list(model.parameters()) if params is None else list(params)
        if len(params) != len(self.param_names):
            raise ConfigError(f"adapt() got {len(params)} parameter tensors, the model has "
                              f"{len(self.param_names)}")
        alpha = self.alpha if differentiable else self.alpha.detach()
        create_graph = differentiable and not self.first_order
        idx = self._adapted_idx
        if not differentiable:
            params = [p.detach() for p in params]
        m_state: List[Optional[Tensor]] = [None] * len(idx)
        v_state: List[Optional[Tensor]] = [None] * len(idx)
        with torch.enable_grad():
            for t in range(steps):
                if not differentiable:
                    for i in idx:
                        params[i] = params[i].detach().requires_grad_(True)
                loss = loss_fn(Adapted(self, params, t, inner=True))
                grads = torch.autograd.grad(loss, [params[i] for i in idx], create_graph=create_graph,
                                            allow_unused=True)
                new = list(params)
                for k, (i, g) in enumerate(zip(idx, grads)):
                    if g is None:
                        continue
                    if not create_graph:
                        g = g.detach()
                    a = alpha[self._group_idx[k]]
                    if self.optimizer == "adam":
                        g = self._adam_direction(k, g, t + 1, m_state, v_state)
                    new[i] = params[i] - a * g
                params = new
        if not differentiable:
            params = [p.detach() for p in params]
        return Adapted(self, params, steps)

    # ---------------------------------------------------------------- internal
    def _adam_direction(self, k: int, g: Tensor, t: int, m_state, v_state) -> Tensor:
        """Adam's bias-corrected direction m̂ / (√v̂ + ε) for adapted tensor ``k`` at step ``t``."""
        b1, b2 = self.adam_betas
        m = (1 - b1) * g if m_state[k] is None else b1 * m_state[k] + (1 - b1) * g
        v = (1 - b2) * g * g if v_state[k] is None else b2 * v_state[k] + (1 - b2) * g * g
        m_state[k], v_state[k] = m, v
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        return m_hat / (v_hat.sqrt() + self.adam_eps)

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
        """Point the patched BatchNorm at the statistics the policy prescribes for this forward."""
        module, twin = pair.module, pair.patched
        training = module.training
        buffers = twin._buffers
        if self.bn == "per_step":
            s = min(step, self.steps)
            twin.training = training
            buffers["running_mean"] = getattr(self, f"bn_mean_{k}")[s]
            buffers["running_var"] = getattr(self, f"bn_var_{k}")[s]
            buffers["num_batches_tracked"] = None
            return
        use_running = self.bn == "running" and (not training or not inner)
        if use_running and module.track_running_stats:
            twin.training = training
            buffers["running_mean"] = module.running_mean
            buffers["running_var"] = module.running_var
            buffers["num_batches_tracked"] = module.num_batches_tracked
        else:  # batch statistics, nothing read or written
            twin.training = True
            buffers["running_mean"] = None
            buffers["running_var"] = None
            buffers["num_batches_tracked"] = None
