"""Transductive test-time inference for metric learners: BD-CSPN and TIM-GD (``[eval] inference``).

Both use the whole query set of an episode (never its labels) and work on any learner that
exposes the metric-learner interface:

* ``episode_features(episode) -> (support_z, query_z)``: the learner's (S, D) and (Q, D)
  features, as its own nearest-prototype rule sees them (after SimpleShot's normalisation,
  for instance); called here in eval mode without a graph;
* ``prototype_logits(query_z, protos) -> (Q, N)``: its metric to class prototypes
  (ProtoNet: −‖z − c_k‖²; Meta-Baseline: τ·cos; Baseline++: s·cos; SimpleShot: −‖x̂ − c̄_k‖²).

BD-CSPN (Liu, Song & Qin, "Prototype Rectification for Few-Shot Learning", ECCV 2020, sec. 3):

1. cross-class bias (sec. 3.2.2): ξ = (1/|S|) Σ_{x ∈ S} x − (1/|Q|) Σ_{x ∈ Q} x, every query
   x ← x + ξ;
2. intra-class bias (sec. 3.2.1): basic prototypes P_n (support means); each shifted query gets
   the pseudo-label argmax_n cos(x, P_n); S'_n is class n's support with its pseudo-labelled
   queries (the ``top_z`` most similar per class; default: all, as easyfsl's implementation);
   the rectified prototype is P'_n = Σ_{x_i ∈ S'_n} w_{i,n} x_i with
   w_{i,n} = exp(ε cos(x_i, P_n)) / Σ_{x_j ∈ S'_n} exp(ε cos(x_j, P_n)), ε = 10;
3. the shifted queries are classified by the learner's metric to P'.

TIM-GD (Boudiaf, Ziko, Rony, Dolz, Piantanida & Ben Ayed, "Information Maximization for Few-Shot
Learning", NeurIPS 2020, eq. 3 and sec. 3.2; defaults of their code ``mboudiaf/TIM``): features
are L2-normalised; classifier weights W (N, D) start at the support class means; p_ik ∝
exp(−(T/2)‖w_k − z_i‖²), T = 15; W minimises with Adam (lr 1e-4, 1000 iterations)

    λ · CE(support) − (H(Ŷ_Q) − α · H(Ŷ_Q | X_Q)),   λ = 0.1, α = 0.1,

CE the mean support cross-entropy, H(Ŷ_Q) = −Σ_k p̂_k log p̂_k the entropy of the mean query
prediction p̂ = (1/|Q|) Σ_i p_i, H(Ŷ_Q | X_Q) = −(1/|Q|) Σ_i Σ_k p_ik log p_ik (their loss
weights [0.1, 1.0, 0.1]). The queries' final log-probabilities logits are returned.

Imports: learners (base, common, registry), errors.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.errors import ConfigError
from fewshot.learners.common import (check_episode, cosine_logits, eval_mode, l2_normalize,
                                     one_hot, prototypes, squared_euclidean_logits)
from fewshot.learners.registry import list_learners

__all__ = ["INFERENCE", "DESCRIPTIONS", "supports", "metric_learners", "check_inference",
           "bd_cspn", "tim_gd", "predict"]

#: the choices of ``[eval] inference``
INFERENCE = ("inductive", "bd-cspn", "tim")
#: how the report names each transductive method
DESCRIPTIONS = {"bd-cspn": "BD-CSPN prototype rectification (Liu et al. 2020)",
                "tim": "TIM-GD (Boudiaf et al. 2020)"}


def supports(learner) -> bool:
    """Whether ``learner`` (a learner or its class) has the metric-learner interface."""
    return all(callable(getattr(learner, a, None)) for a in ("episode_features", "prototype_logits"))


def metric_learners() -> List[str]:
    """Names of the registered learners that support transductive inference."""
    return [name for name, cls in list_learners().items() if supports(cls)]


def check_inference(method: str, learner_name: str, learner=None) -> None:
    """One-line ConfigError for an unknown ``[eval] inference`` or a learner without features."""
    if method not in INFERENCE:
        raise ConfigError(f"config key 'eval.inference' must be one of {', '.join(INFERENCE)}, "
                          f"found {method!r}")
    if method == "inductive":
        return
    if learner is None:
        learner = list_learners().get(learner_name)
    if learner is not None and not supports(learner):
        raise ConfigError(f"[eval] inference = '{method}' needs a learner with features and "
                          f"prototypes ({', '.join(metric_learners())}); learner '{learner_name}' "
                          f"has none: use inference = 'inductive'")


def bd_cspn(fs: Tensor, sy: Tensor, fq: Tensor, ways: int,
            logits_fn: Callable[[Tensor, Tensor], Tensor], epsilon: float = 10.0,
            top_z: Optional[int] = None) -> Tensor:
    """BD-CSPN's query logits ``logits_fn(shifted queries, rectified prototypes)`` (module doc)."""
    fq = fq + (fs.mean(0) - fq.mean(0))  # ξ: shift the queries towards the support
    basic = prototypes(fs, sy, ways)
    cos_q = cosine_logits(fq, basic)  # (Q, N)
    pseudo = cos_q.argmax(1)
    member_q = one_hot(pseudo, ways, fq.dtype)
    if top_z is not None:  # rank of each query among those of its pseudo-class, by similarity
        conf = cos_q.gather(1, pseudo[:, None]).squeeze(1)
        same = pseudo[:, None] == pseudo[None, :]
        rank = (same & (conf[None, :] > conf[:, None])).sum(1)
        member_q = member_q * (rank < top_z).to(fq.dtype)[:, None]
    x = torch.cat([fs, fq])
    member = torch.cat([one_hot(sy, ways, fs.dtype), member_q])  # (S+Q, N): x_i ∈ S'_n
    scores = (epsilon * cosine_logits(x, basic)).masked_fill(member == 0, float("-inf"))
    w = torch.softmax(scores, dim=0)  # over the members of each class (columns)
    return logits_fn(fq, w.t() @ x)


def _tim_logits(z: Tensor, w: Tensor, temperature: float) -> Tensor:
    return 0.5 * temperature * squared_euclidean_logits(z, w)


def tim_gd(fs: Tensor, sy: Tensor, fq: Tensor, ways: int, temperature: float = 15.0,
           iterations: int = 1000, lr: float = 1e-4, ce_weight: float = 0.1,
           marginal_weight: float = 1.0, conditional_weight: float = 0.1) -> Tensor:
    """TIM-GD's query logits −(T/2)‖z − w_k‖² after ``iterations`` Adam steps on W (module doc)."""
    zs, zq = l2_normalize(fs), l2_normalize(fq)
    w = prototypes(zs, sy, ways).detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    ys = one_hot(sy, ways, zs.dtype)
    with torch.enable_grad():
        for _ in range(iterations):
            ce = -(ys * F.log_softmax(_tim_logits(zs, w, temperature), 1)).sum(1).mean()
            log_pq = F.log_softmax(_tim_logits(zq, w, temperature), 1)
            pq = log_pq.exp()
            conditional = -(pq * log_pq).sum(1).mean()
            marginal = pq.mean(0)
            entropy = -(marginal * marginal.clamp_min(1e-12).log()).sum()
            loss = ce_weight * ce - (marginal_weight * entropy - conditional_weight * conditional)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return _tim_logits(zq, w, temperature)


def predict(learner, episode, method: str) -> Tensor:
    """(Q, N) query logits of ``learner`` on ``episode`` by the transductive ``method``."""
    if method == "inductive":
        return learner.predict(episode)
    check_inference(method, getattr(learner, "name", type(learner).__name__), learner)
    check_episode(learner, episode)
    with eval_mode(learner), torch.no_grad():
        fs, fq = learner.episode_features(episode)
        if method == "bd-cspn":
            return bd_cspn(fs, episode.support_y, fq, episode.ways, learner.prototype_logits)
    return tim_gd(fs, episode.support_y, fq, episode.ways)
