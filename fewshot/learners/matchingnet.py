"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, NeurIPS 2016).

For an episode with support set S = {(x_i, y_i)}, i = 1..k, over N classes and a query x̂,
the predicted class distribution is an attention-weighted sum of the one-hot support labels
(eq. 1), the attention a softmax over cosine similarities c of the embeddings (eq. 2):

    ŷ = Σ_i a(x̂, x_i) y_i,     a(x̂, x_i) = exp(c(f(x̂), g(x_i))) / Σ_j exp(c(f(x̂), g(x_j))).

Training maximises log P(ŷ = y | x̂, S) over episodes (sec. 2.2): the loss is the negative
log of ŷ at the true class, computed exactly as

    log ŷ_n = logsumexp_{i: y_i = n} log a(x̂, x_i)

(no ε clamp; common implementations take log(ŷ + ε)). :meth:`MatchingNet.predict` returns
log ŷ (Q, N): normalised log-probabilities, so softmax of them is ŷ itself. ``scale``
multiplies c before the softmax; the paper has none (1, the default) and a 1-shot episode's
attention then stays soft (cosines lie in [-1, 1]).

Embeddings: f' = g' = the backbone (one shared network, as the paper's Omniglot and
miniImageNet models). With ``fce = true`` the full-context embeddings of the paper's
appendix are used:

* g(x_i, S) = h⃗_i + h⃖_i + g'(x_i), with h⃗, h⃖ the outputs of a bidirectional LSTM (hidden
  size D = the embedding size) run over g'(x_1..x_k) in the episode's order (appendix A.2);
* f(x̂, S) = attLSTM(f'(x̂), g(S), K), K "processing steps" over the support set (A.1):

      ĥ_k, c_k = LSTM(f'(x̂), [h_{k−1}, r_{k−1}], c_{k−1}),    h_k = ĥ_k + f'(x̂),
      r_{k−1} = Σ_i a(h_{k−1}, g(x_i)) g(x_i),   a(h, g(x_i)) = softmax_i(hᵀ g(x_i)),

  f = h_K. The LSTM's state input [h, r] is written as input [f'(x̂), r] with state h, the
  same affine map of the same three vectors split differently. The appendix gives neither
  the initial state nor K: here ĥ_0 = c_0 = 0 (so h_0 = f'(x̂)) and K = ``fce_steps`` = 5.

The paper names no optimiser; Adam with lr 1e-3 at a constant rate is used (as ProtoNet's
Snell et al.). No fine-tuning at test. Every episode runs on its own (there is no inner loop
to batch over tasks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.errors import ConfigError
from fewshot.learners.base import Learner, LearnerConfig
from fewshot.learners.common import (boolean, check_batch, check_episode, check_lr_halve_every,
                                     eval_mode, halve_lr_every, mean_episode_update, meta_adam,
                                     one_hot, positive_float, positive_int)
from fewshot.learners.registry import register_learner

__all__ = ["MatchingNet", "attention_log_probs", "FullContextEmbedding"]


def attention_log_probs(query: Tensor, support: Tensor, support_y: Tensor, ways: int,
                        scale: float = 1.0) -> Tensor:
    """log ŷ (Q, N) of eqs. 1-2: the log of the cosine-softmax attention summed per class.

    ``query`` (Q, D) are f(x̂), ``support`` (S, D) are g(x_i); every class needs a support
    example (an empty class would get log 0 = −inf).
    """
    cos = F.normalize(query, dim=1) @ F.normalize(support, dim=1).t()  # c, (Q, S)
    log_a = F.log_softmax(scale * cos, dim=1)
    member = one_hot(support_y, ways, torch.bool)  # (S, N)
    per_class = log_a.unsqueeze(2).masked_fill(~member, float("-inf"))  # (Q, S, N)
    return torch.logsumexp(per_class, dim=1)


class FullContextEmbedding(nn.Module):
    """The full-context embeddings g(x_i, S) and f(x̂, S) of Vinyals et al.'s appendix
    (see the module docstring), for embeddings of size ``dim``."""

    def __init__(self, dim: int, steps: int):
        super().__init__()
        self.dim, self.steps = dim, steps
        #: g: the bidirectional LSTM over the support embeddings (appendix A.2)
        self.support_lstm = nn.LSTM(dim, dim, bidirectional=True)
        #: f: the attention LSTM over the query, input [f'(x̂), r], state (h, c) (appendix A.1)
        self.query_cell = nn.LSTMCell(2 * dim, dim)

    def support(self, g0: Tensor) -> Tensor:
        """g(x_i, S) = h⃗_i + h⃖_i + g'(x_i), (S, D), the sequence in the given order."""
        out, _ = self.support_lstm(g0.unsqueeze(1))  # (S, 1, 2D), the episode as one sequence
        out = out.squeeze(1)
        return out[:, :self.dim] + out[:, self.dim:] + g0

    def query(self, f0: Tensor, g: Tensor) -> Tensor:
        """f(x̂, S) = h_K, (Q, D): K attention-LSTM steps of each query over g(S)."""
        h, c = f0, torch.zeros_like(f0)
        for _ in range(self.steps):
            r = torch.softmax(h @ g.t(), dim=1) @ g  # r_{k−1}
            h_hat, c = self.query_cell(torch.cat([f0, r], 1), (h, c))
            h = h_hat + f0
        return h


@register_learner("matchingnet")
class MatchingNet(Learner):
    """Matching Networks; see the module docstring for the equations."""

    description = ("Matching Networks: softmax attention over cosine similarities to each support "
                   "example; optional full-context embeddings (LSTMs)")
    paper = ("Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, 'Matching Networks for One "
             "Shot Learning', NeurIPS 2016")
    input_kind = "episodes"
    fine_tunes_at_test = False

    @dataclass
    class Config(LearnerConfig):
        """Matching Networks hyper-parameters (the paper is silent on training; see the module
        docstring).

        lr: Adam learning rate (1e-3).
        lr_halve_every: halve the learning rate every this many steps; 0 = never (0).
        fce: full-context embeddings (the paper's appendix), off by default (false).
        fce_steps: K, the attention LSTM's processing steps over the support set (5).
        scale: multiplier of the cosine similarities before the softmax (1 = the paper's).
        """

        lr: float = 1e-3
        lr_halve_every: int = 0
        fce: bool = False
        fce_steps: int = 5
        scale: float = 1.0

        def validate(self) -> None:
            super().validate()
            check_lr_halve_every(self.lr_halve_every)
            boolean(self.fce, "fce")
            positive_int(self.fce_steps, "fce_steps")
            positive_float(self.scale, "scale")

    def __init__(self, config=None, *, in_channels, image_size, num_classes=None, backbone=None):
        super().__init__(config, in_channels=in_channels, image_size=image_size,
                         num_classes=num_classes, backbone=backbone)
        c = self.config
        #: the embedding f' = g', (B, C, H, W) -> (B, D)
        self.encoder = self.make_backbone()
        #: the full-context embeddings, or None
        self.context = None
        if c.fce:
            dim = getattr(self.encoder, "out_features", None)
            if not isinstance(dim, int) or dim < 1:
                raise ConfigError("learner 'matchingnet' with fce = true needs a backbone that "
                                  "exposes out_features (its flat embedding size); set fce = false "
                                  "or give the backbone out_features")
            self.context = FullContextEmbedding(dim, c.fce_steps)
        self.optimizers["meta"] = meta_adam(self.parameters(), c.lr)
        halve_lr_every(self, c.lr_halve_every)

    def embeddings(self, episode) -> Tuple[Tensor, Tensor]:
        """(g(x_i, S) (S, D), f(x̂, S) (Q, D)); support and query images go through the
        backbone in one batch."""
        s = episode.support_x.shape[0]
        z = self.encoder(torch.cat([episode.support_x, episode.query_x], 0))
        z = z.reshape(z.shape[0], -1)
        g, f = z[:s], z[s:]
        if self.context is not None:
            g = self.context.support(g)
            f = self.context.query(f, g)
        return g, f

    def episode_logits(self, episode) -> Tensor:
        """(Q, N) log ŷ of the episode's queries (eqs. 1-2)."""
        g, f = self.embeddings(episode)
        return attention_log_probs(f, g, episode.support_y, episode.ways, self.config.scale)

    def episode_loss(self, episode) -> Tuple[Tensor, Tensor]:
        """(−mean log ŷ at the true classes (sec. 2.2), log ŷ)."""
        log_probs = self.episode_logits(episode)
        return F.nll_loss(log_probs, episode.query_y), log_probs

    def train_step(self, batch) -> Dict[str, Tensor]:
        """One Adam step on the mean negative log-likelihood over the episodes of ``batch``."""
        episodes = check_batch(self, batch)
        self.train()
        return mean_episode_update(self, episodes, self.episode_loss)

    def predict(self, episode) -> Tensor:
        """log ŷ (Q, N) of the queries; no fine-tuning (the paper's main results).

        Always in eval mode (BatchNorm reads its running statistics and never updates them).
        """
        check_episode(self, episode)
        with eval_mode(self), torch.no_grad():
            return self.episode_logits(episode)
