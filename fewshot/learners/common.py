"""What several learners share: option checks, episode checks, the heads and update rules
more than one learner uses, and task batching (stacking equal-shaped episodes for
:meth:`fewshot.inner_loop.InnerLoop.adapt_batched`; the sequential path stays the reference
and tests hold the two equal). A learner imports base, registry and this module, and another
learner only to subclass it.

Imports: base, errors, inner_loop (never a learner module).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.errors import ConfigError
from fewshot.inner_loop import batched_oom_guard, resolve_task_batching
from fewshot.learners.base import Learner, accuracy, require

__all__ = ["positive_int", "positive_float", "choice", "fraction", "boolean", "check_lr_halve_every",
           "check_images", "check_batch", "check_episode", "HeadNet", "eval_mode",
           "halve_lr_every", "scale_lrs_at_milestones", "mean_episode_update",
           "minibatch_indices", "minibatch_loss", "class_sums", "prototypes",
           "squared_euclidean_logits", "one_hot", "meta_adam", "batches_tasks", "stack",
           "all_examples", "stacked_examples", "episode_tensors", "batched_query_loss", "support_loss", "batched_episode_update",
           "MultiStepLoss", "check_inner_checkpoint",
           "FEATURE_NORMS", "l2_normalize", "normalize_features", "cosine_logits",
           "chen_cosine_scale", "encode_episode", "CosineHead"]


# ------------------------------------------------------------------ option checks
def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(value, option: str, minimum: int = 1) -> None:
    """ConfigError unless the learner option ``option`` is an integer >= ``minimum``."""
    require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
            f"learner option '{option}' must be an integer >= {minimum}, got {value!r}")


def positive_float(value, option: str, allow_zero: bool = False, note: str = "") -> None:
    """ConfigError unless the learner option ``option`` is a number > 0 (>= 0 with
    ``allow_zero``; ``note`` is appended to the bound, e.g. "(0 = off)")."""
    ok = _is_number(value) and (value >= 0 if allow_zero else value > 0)
    bound = (">= 0" if allow_zero else "> 0") + (f" {note}" if note else "")
    require(ok, f"learner option '{option}' must be {bound}, got {value!r}")


def choice(value, option: str, choices: Sequence[str]) -> None:
    """ConfigError unless the learner option ``option`` is one of ``choices``."""
    require(value in choices, f"learner option '{option}' must be one of "
                              f"{', '.join(choices)}, got {value!r}")


def fraction(value, option: str) -> None:
    """ConfigError unless the learner option ``option`` is a number in [0, 1)."""
    require(_is_number(value) and 0 <= value < 1,
            f"learner option '{option}' must lie in [0, 1), got {value!r}")


def boolean(value, option: str) -> None:
    """ConfigError unless the learner option ``option`` is true or false."""
    require(isinstance(value, bool), f"learner option '{option}' must be true or false, "
                                     f"got {value!r}")


def check_inner_checkpoint(config) -> None:
    """ConfigError for a learner option ``inner_checkpoint`` (recomputed second-order inner
    steps, :class:`fewshot.inner_loop.InnerLoop`'s ``recompute``) that cannot apply."""
    boolean(config.inner_checkpoint, "inner_checkpoint")
    require(not (config.inner_checkpoint and config.first_order), "learner option "
            "'inner_checkpoint' recomputes second-order inner steps; first-order ones keep no "
            "inner graph already: set inner_checkpoint = false (or first_order = false)")


# ------------------------------------------------------------------ episode checks
def check_images(learner: Learner, x: Tensor, what: str = "episode") -> None:
    """Refuse images that do not fit the learner's ``in_channels`` x ``image_size``.

    The backbone is built for (C, H, W) = (in_channels, image_size, image_size); an
    episode of another shape would fail deep inside a convolution with an unreadable
    message, so it is caught here.
    """
    if x.dim() != 4:
        raise ConfigError(f"{what} images must be a (B, C, H, W) tensor, got shape "
                          f"{tuple(x.shape)}")
    c, h, w = x.shape[1:]
    if (c, h, w) != (learner.in_channels, learner.image_size, learner.image_size):
        raise ConfigError(
            f"{what} images are {c}x{h}x{w} but learner '{learner.name}' was built for "
            f"{learner.in_channels}x{learner.image_size}x{learner.image_size}; build the "
            f"learner with the dataset's in_channels/image_size or resize the images")
    if not x.is_floating_point():
        raise ConfigError(f"{what} images must be float tensors (normalised), got {x.dtype}")


def check_batch(learner: Learner, episodes: Sequence, ways: int | None = None) -> List:
    """Validate a meta-batch (a non-empty list of episodes) and return it as a list.

    Each episode passes :meth:`Learner.check_episode` (labels in ``0..N-1``, matching
    support/query shapes) and :func:`check_images`; every class needs at least one
    support example; ``ways`` (when given) is the N the learner's head was built for.
    """
    if not isinstance(episodes, (list, tuple)) or len(episodes) == 0:
        raise ConfigError(f"learner '{learner.name}' trains on a non-empty list of episodes, "
                          f"got {type(episodes).__name__}")
    for ep in episodes:
        check_episode(learner, ep, ways)
    return list(episodes)


def check_episode(learner: Learner, ep, ways: int | None = None) -> None:
    """:func:`check_batch` for one episode."""
    learner.check_episode(ep)
    check_images(learner, ep.support_x, "support")
    check_images(learner, ep.query_x, "query")
    if ep.support_x.shape[0] != ep.support_y.shape[0] or ep.query_x.shape[0] != ep.query_y.shape[0]:
        raise ConfigError(f"episode has {ep.support_x.shape[0]} support images for "
                          f"{ep.support_y.shape[0]} labels and {ep.query_x.shape[0]} query images "
                          f"for {ep.query_y.shape[0]} labels; they must match")
    if ways is not None and ep.ways != ways:
        raise ConfigError(f"learner '{learner.name}' was configured with ways={ways} but the "
                          f"episode is {ep.ways}-way; set the learner option 'ways' to {ep.ways}")
    # shots per class from host labels only (on a device it would be a sync every step), and
    # not again for a sampler's episode (it checked them before the copy)
    shots = (np.bincount(ep.support_y.numpy(), minlength=ep.ways)
             if ep.support_y.device.type == "cpu" and not getattr(ep, "checked", False) else None)
    if ep.support_y.numel() == 0 or (shots is not None and not shots.all()):
        raise ConfigError(f"episode has a class without support examples (shots per class "
                          f"{ep.shots.tolist()}); every class needs at least one")


# ------------------------------------------------------------- modules and updates
class HeadNet(nn.Module):
    """``head(backbone(x))``: a backbone with an N-way ``nn.Linear`` named ``head``.

    The head is initialised by ``backbone.init_head`` when the backbone has one (Conv-4:
    Xavier-uniform weights, zero bias as in MAML's code), else by PyTorch's default.
    """

    def __init__(self, backbone: nn.Module, ways: int):
        super().__init__()
        self.backbone = backbone
        features = getattr(backbone, "out_features", None)
        if not isinstance(features, int) or features < 1:
            raise TypeError("the backbone must expose out_features (its flat feature size)")
        self.head = nn.Linear(features, ways)
        init = getattr(backbone, "init_head", None)
        if callable(init):
            init(self.head)

    def forward(self, x: Tensor) -> Tensor:
        z = self.backbone(x)
        return self.head(z.reshape(z.shape[0], -1))


class eval_mode:
    """Context manager: put ``module`` in eval mode and restore its previous mode after.

    Fine-tuning learners predict in eval mode so that a BatchNorm policy with running
    statistics reads them (and never updates them) at test time, whatever mode the caller
    left the learner in.
    """

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.was_training = self.module.training
        self.module.eval()
        return self.module

    def __exit__(self, *exc):
        self.module.train(self.was_training)
        return False


def check_lr_halve_every(value) -> None:
    """ConfigError unless the option ``lr_halve_every`` is an integer >= 0 (0 = never)."""
    require(isinstance(value, int) and value >= 0,
            f"learner option 'lr_halve_every' must be an integer >= 0 (0 = never), "
            f"got {value!r}")


def halve_lr_every(learner: Learner, every: int, optimizer_name: str = "meta") -> None:
    """Halve the learning rate of ``learner.optimizers[optimizer_name]`` every ``every`` outer
    steps (a StepLR with gamma 0.5, stepped by :meth:`Learner.outer_step`); 0 = constant."""
    if every:
        learner.schedulers[optimizer_name] = torch.optim.lr_scheduler.StepLR(
            learner.optimizers[optimizer_name], step_size=every, gamma=0.5)


def meta_adam(params, lr: float, **options) -> torch.optim.Adam:
    """The outer Adam of the episodic learners, fused (one kernel for all parameter tensors on
    the CPU and on CUDA, instead of a dozen dispatched operators per tensor group and step).
    It computes Adam's update; it rounds differently from the per-tensor loop in the last bit."""
    return torch.optim.Adam(params, lr=lr, fused=True, **options)


def mean_episode_update(learner: Learner, episodes: List,
                        episode_loss: Callable[[object], Tuple[Tensor, Tensor]],
                        optimizer_name: str = "meta", **outer_options) -> Dict[str, Tensor]:
    """One outer step on the mean of ``episode_loss`` over ``episodes``; returns loss / acc.

    ``episode_loss(ep) -> (loss, (Q, N) scores)``. Each episode's ``loss / n`` is
    back-propagated on its own, so its graph is freed before the next episode is processed
    (memory holds one task at a time); the gradient is that of the mean. Then a
    non-finite check, :meth:`Learner.outer_step` (``outer_options``: clipping) and the
    step count. Metrics: mean loss and mean query accuracy of the scores' arg-max.
    """
    learner.optimizers[optimizer_name].zero_grad(set_to_none=True)
    losses, accs = [], []
    n = len(episodes)
    for ep in episodes:
        loss, scores = episode_loss(ep)
        (loss / n).backward()
        losses.append(loss.detach())
        accs.append(accuracy(scores.detach(), ep.query_y))
    loss = torch.stack(losses).mean()
    learner.check_finite(loss, learner.steps_done)
    learner.outer_step(optimizer_name, **outer_options)
    learner.steps_done += 1
    return {"loss": loss, "acc": torch.stack(accs).mean()}


def scale_lrs_at_milestones(optimizers: Dict[str, torch.optim.Optimizer],
                            base_lrs: Dict[str, List[float]], epoch: int, milestones: Sequence[int],
                            gamma: float) -> None:
    """At the start of ``epoch``: every learning rate = its base × gamma^(milestones passed)
    (a MultiStepLR over epochs). ``base_lrs`` records each optimiser's first learning rates
    (and is saved with the trainer state); no milestones leave the rates untouched."""
    if not milestones:
        return
    k = sum(1 for m in milestones if epoch >= m)
    for name, opt in optimizers.items():
        bases = base_lrs.setdefault(name, [g["lr"] for g in opt.param_groups])
        for g, base in zip(opt.param_groups, bases):
            g["lr"] = base * (gamma ** k)


def minibatch_indices(n: int, batch: Optional[int], steps: int, generator: torch.Generator) -> List[Tensor]:
    """Row indices of the ``steps`` inner mini-batches over ``n`` examples.

    As Reptile's ``_mini_batches``: the examples are shuffled, consumed ``batch`` at a time,
    and reshuffled when exhausted (a batch may span two shuffles). ``batch=None`` or
    ``batch >= n`` uses all examples at every step (in their original order).
    """
    if batch is None or batch >= n:
        full = torch.arange(n)
        return [full] * steps
    need = steps * batch
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(-(-need // n))])
    return [order[t * batch:(t + 1) * batch] for t in range(steps)]


def minibatch_loss(x: Tensor, y: Tensor, batches: List[Tensor], last: Dict[str, Tensor]):
    """Inner-loop loss ``loss_fn(net)`` for :meth:`InnerLoop.adapt`: step t's cross-entropy
    on the rows ``batches[t]`` of (x, y). ``last`` receives the detached ``loss`` and
    ``acc`` of the latest step's mini-batch (before its update), so the training metrics
    need no extra forward pass."""

    def loss_fn(net):
        rows = batches[net.step]
        logits = net(x[rows])
        loss = F.cross_entropy(logits, y[rows])
        last["loss"], last["acc"] = loss.detach(), accuracy(logits.detach(), y[rows])
        return loss

    return loss_fn


def one_hot(labels: Tensor, ways: int, dtype: torch.dtype) -> Tensor:
    """(S, ways) one-hot rows of ``labels``; unlike ``F.one_hot`` it works under
    ``torch.func.vmap`` and never reads the labels back to check their range (a host sync)."""
    return (labels.unsqueeze(-1) == torch.arange(ways, device=labels.device)).to(dtype)


def class_sums(maps: Tensor, labels: Tensor, ways: int) -> Tensor:
    """ρ_c = Σ_{x ∈ S_c} f_θ(x) (L2G eq. 9): (S, C, h, w) maps -> (ways, C, h, w)."""
    onehot = one_hot(labels, ways, maps.dtype)  # (S, N)
    return (onehot.t() @ maps.reshape(maps.shape[0], -1)).reshape(ways, *maps.shape[1:])


def prototypes(embeddings: Tensor, labels: Tensor, ways: int) -> Tensor:
    """c_k = mean of the support embeddings of class k (Snell et al. eq. 1), (ways, D).

    Works for any number of shots per class (variable-shot episodes).
    """
    onehot = one_hot(labels, ways, embeddings.dtype)  # (S, N)
    sums = onehot.t() @ embeddings  # (N, D)
    counts = onehot.sum(0).clamp_min(1).unsqueeze(1)
    return sums / counts


def squared_euclidean_logits(queries: Tensor, protos: Tensor) -> Tensor:
    """−‖f_φ(x) − c_k‖² for each query and prototype, (Q, N) (Snell et al. eq. 2).

    Computed as the difference itself (not ‖a‖² + ‖b‖² − 2a·b, which cancels badly when
    queries lie close to a prototype).
    """
    diff = queries.unsqueeze(1) - protos.unsqueeze(0)  # (Q, N, D)
    return -(diff * diff).sum(-1)


# ------------------------------------------------------------------ task batching
_EPISODE = ("support_x", "support_y", "query_x", "query_y", "classes")


def episode_tensors(item) -> List[Tensor]:
    """The tensors whose shapes must agree for an episode (or an (T_i, T_j) pair) to batch."""
    if isinstance(item, (tuple, list)):
        return [t for ep in item for t in episode_tensors(ep)]
    return [getattr(item, a) for a in _EPISODE]


def batches_tasks(learner, items: Sequence) -> bool:
    """Whether ``learner`` adapts ``items`` (episodes or pairs) as one batched computation."""
    return resolve_task_batching(learner.config.task_batching,
                                 [episode_tensors(it) for it in items], learner.device,
                                 f"learner '{learner.name}'")


def all_examples(episode) -> Tuple[Tensor, Tensor]:
    """(x, y): an episode's support then query examples as one set (the data a Reptile-type
    inner loop fine-tunes on)."""
    return (torch.cat([episode.support_x, episode.query_x]),
            torch.cat([episode.support_y, episode.query_y]))


def stacked_examples(episodes: Sequence) -> Tuple[Tensor, Tensor]:
    """:func:`all_examples` of T equal-shaped episodes, stacked: (T, S+Q, ...), (T, S+Q)."""
    xs, ys = zip(*(all_examples(ep) for ep in episodes))
    return torch.stack(xs), torch.stack(ys)


def stack(episodes: Sequence, name: str) -> Tensor:
    """``torch.stack`` of attribute ``name`` over episodes: (T, ...); ConfigError unless the
    episodes agree in the shape of every tensor (images, labels and ``classes``: the same N)."""
    first = [tuple(t.shape) for t in episode_tensors(episodes[0])]
    for k, ep in enumerate(episodes[1:], 1):
        for field, want, t in zip(_EPISODE, first, episode_tensors(ep)):
            if tuple(t.shape) != want:
                raise ConfigError(f"episodes of unequal shapes cannot be batched: episode {k}'s "
                                  f"{field} has shape {tuple(t.shape)}, episode 0's {want}; call "
                                  f"predict on each episode (evaluation does for unequal ones)")
    return torch.stack([getattr(ep, name) for ep in episodes])


def batched_query_loss(logits: Tensor, y: Tensor):
    """Per-task mean cross-entropy (T,) and accuracy (T,) of (T, Q, N) logits, (T, Q) labels."""
    loss = F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)
    acc = (logits.detach().argmax(-1) == y).float().mean(1)
    return loss, acc


def support_loss(net, x: Tensor, y: Tensor) -> Tensor:
    """One task's support cross-entropy L(f; D) (the inner loss of MAML eq. 1)."""
    return F.cross_entropy(net(x), y)


class MultiStepLoss:
    """An ``after_step`` observer of :meth:`~fewshot.inner_loop.InnerLoop.adapt` /
    ``adapt_batched`` that sums the multi-step loss Σ_{t=1..T} v_t · loss(f_{θ_t}(x), y)
    (MAML++'s MSL, Antoniou et al. 2019, sec. 4). Steps with v_t = 0 run no query forward;
    ``scores`` is the query output of the last step that ran one."""

    def __init__(self, weights: Sequence[float], x: Tensor, y: Tensor,
                 loss: Callable[[Tensor, Tensor], Tensor]):
        self.weights, self.x, self.y, self.loss = list(weights), x, y, loss
        self.total: Tensor | float = 0.0
        self.scores: Optional[Tensor] = None

    def __call__(self, net) -> None:
        v = self.weights[net.step - 1]
        if v:
            self.scores = net(self.x)
            self.total = self.total + v * self.loss(self.scores, self.y)


def batched_episode_update(learner, loop, episodes: Sequence, inner_loss: Callable = support_loss,
                           optimizer_name: str = "meta", step_weights: Optional[Sequence[float]] = None,
                           **outer_options) -> Dict[str, Tensor]:
    """The batched twin of ``mean_episode_update`` for MAML-type learners.

    θ'_i from ``loop.adapt_batched`` on the support sets, then one backward of
    (1/T) Σ_i L_i(f_{θ'_i}; D'_i) (MAML eq. 3 with the mean), the finiteness check, the
    outer step, the step count; metrics: mean query loss and accuracy over tasks. With
    ``step_weights`` (v_1..v_S) the loop takes S steps and L_i is the multi-step loss
    Σ_t v_t L_i(f_{θ_t,i}; D'_i) (:class:`MultiStepLoss`).
    """
    learner.optimizers[optimizer_name].zero_grad(set_to_none=True)
    sx, sy, qx, qy = (stack(episodes, a) for a in _EPISODE[:4])
    with batched_oom_guard(len(episodes), f"learner '{learner.name}'"):
        if step_weights is None:
            adapted = loop.adapt_batched(inner_loss, sx, sy)
            losses, accs = batched_query_loss(adapted(qx), qy)
        else:
            msl = MultiStepLoss(step_weights, qx, qy, lambda s, y: batched_query_loss(s, y)[0])
            loop.adapt_batched(inner_loss, sx, sy, steps=len(step_weights), after_step=msl)
            losses, accs = msl.total, batched_query_loss(msl.scores, qy)[1]
        losses.mean().backward()
    loss = losses.detach().mean()
    learner.check_finite(loss, learner.steps_done)
    learner.outer_step(optimizer_name, **outer_options)
    learner.steps_done += 1
    return {"loss": loss, "acc": accs.mean()}


# ------------------------------------------------------------------ closed-form heads
__all__ += ["ridge_regression"]


def ridge_regression(x: Tensor, y: Tensor, lam: Tensor) -> Tensor:
    """The ridge-regression weights W = Xᵀ (X Xᵀ + λ I)⁻¹ Y, (D, N), differentiable in X, Y, λ.

    X (S, D) holds one example per row, Y (S, N) its targets, λ > 0 a scalar (a tensor, so a
    learned λ gets its gradient). W minimises ‖X W − Y‖² + λ ‖W‖²; the primal solution
    (Xᵀ X + λ I)⁻¹ Xᵀ Y is rewritten with the Woodbury identity into this dual form, whose
    linear system is S x S (Bertinetto et al., ICLR 2019, sec. 3.2): cheap in few-shot
    episodes, where the S support examples are far fewer than the D features. The system is
    symmetric positive definite for λ > 0 and solved with ``torch.linalg.solve`` (no explicit
    inverse); leading batch dimensions of X and Y are carried through.
    """
    gram = x @ x.transpose(-1, -2)  # (S, S)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return x.transpose(-1, -2) @ torch.linalg.solve(gram + lam * eye, y)


# ------------------------------------------ cosine heads and feature normalisations
#: feature normalisations of SimpleShot (Wang et al. 2019, sec. 3.2): unnormalised, L2, centred L2
FEATURE_NORMS = ("UN", "L2N", "CL2N")


def l2_normalize(z: Tensor, eps: float = 1e-12) -> Tensor:
    """L2N: x̂ = x / ‖x‖₂ per row (SimpleShot sec. 3.2); rows of norm 0 stay 0."""
    return z / z.norm(dim=-1, keepdim=True).clamp_min(eps)


def normalize_features(z: Tensor, norm: str, mean: Optional[Tensor] = None) -> Tensor:
    """SimpleShot's feature transformation (Wang et al. 2019, sec. 3.2) of rows ``z``.

    UN: z as is. L2N: z / ‖z‖. CL2N: (z − x̄) / ‖z − x̄‖ with x̄ the mean feature of the
    base (training) set, ``mean``.
    """
    if norm == "UN":
        return z
    if norm == "L2N":
        return l2_normalize(z)
    if norm == "CL2N":
        if mean is None:
            raise ConfigError("feature normalisation 'CL2N' needs the base-class mean feature")
        return l2_normalize(z - mean)
    raise ConfigError(f"feature normalisation must be one of {', '.join(FEATURE_NORMS)}, "
                      f"got {norm!r}")


def cosine_logits(z: Tensor, w: Tensor, scale: Union[float, Tensor] = 1.0,
                  eps: float = 1e-12) -> Tensor:
    """s · cos(z_i, w_k) = s · ⟨z_i/‖z_i‖, w_k/‖w_k‖⟩ for each row z_i and class vector w_k, (.., Q, N).

    Baseline++'s class scores (Chen et al. 2019, sec. 3.2, with w_k the class weight vectors)
    and Meta-Baseline's ⟨z, w_k⟩_cos · τ (Chen et al. 2021, eq. 2, w_k the prototypes).
    """
    return scale * (l2_normalize(z, eps) @ l2_normalize(w, eps).transpose(-1, -2))


def chen_cosine_scale(classes: int) -> float:
    """The fixed scale of Baseline++'s cosine head in Chen et al.'s code (``distLinear``): 2 for
    up to 200 classes, 10 above ("in omniglot, a larger scale factor is required to handle
    >1000 output classes")."""
    return 2.0 if classes <= 200 else 10.0


def encode_episode(encoder: nn.Module, episode) -> Tuple[Tensor, Tensor]:
    """(support, query) features of an episode, (S, D) and (Q, D): both sets through ``encoder``
    in one batch, flattened, half precision (autocast) raised to float32."""
    z = encoder(torch.cat([episode.support_x, episode.query_x]))
    z = z.reshape(z.shape[0], -1)
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    s = episode.support_x.shape[0]
    return z[:s], z[s:]


class CosineHead(nn.Module):
    """Baseline++'s classifier (Chen et al. 2019, sec. 3.2; ``distLinear`` of their code).

    Scores s · g_k ⟨x/‖x‖, v_k/‖v_k‖⟩: the weight vectors w_k = g_k v_k/‖v_k‖ are weight
    normalised (Salimans & Kingma) with a learnable per-class norm g_k initialised to ‖v_k‖ as
    ``WeightNorm.apply(..., dim=0)`` does ("class-wise learnable norm", their issues #4 and #8);
    ``learnable_norm=False`` fixes g_k = 1 (the paper's plain cosine). No bias. ``scale`` is
    :func:`chen_cosine_scale` of the number of classes unless given. The ``x`` norm gets their
    1e-5 guard: x / (‖x‖ + 1e-5).
    """

    def __init__(self, in_features: int, classes: int, scale: Optional[float] = None,
                 learnable_norm: bool = True):
        super().__init__()
        self.scale = float(scale if scale is not None else chen_cosine_scale(classes))
        linear = nn.Linear(in_features, classes, bias=False)  # PyTorch's default init, as theirs
        self.weight_v = nn.Parameter(linear.weight.detach().clone())
        norms = linear.weight.detach().norm(dim=1)
        self.weight_g = nn.Parameter(norms) if learnable_norm else None
        self.in_features, self.out_features = in_features, classes

    def weight(self) -> Tensor:
        """w_k = g_k v_k / ‖v_k‖ (rows)."""
        direction = l2_normalize(self.weight_v)
        return direction if self.weight_g is None else self.weight_g.unsqueeze(1) * direction

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        return self.scale * (x / (x.norm(dim=1, keepdim=True) + 1e-5)) @ self.weight().t()
