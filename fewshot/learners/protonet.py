"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017).

For an episode with support set S = {(x_i, y_i)} over N classes and an embedding
f_φ (the backbone), each class k gets a prototype, the mean of its support embeddings
(Snell et al. eq. 1; the L2G paper's eq. 6):

    c_k = 1/|S_k| Σ_{(x_i, y_i) ∈ S_k} f_φ(x_i)

and a query x is classified by a softmax over negative squared Euclidean distances
(Snell et al. eq. 2; the L2G paper's eq. 7):

    p_φ(y = k | x) = exp(−d(f_φ(x), c_k)) / Σ_k' exp(−d(f_φ(x), c_k')),   d(z, z') = ‖z − z'‖².

Training minimises J(φ) = −log p_φ(y = k | x) averaged over the episode's queries (and
over the episodes of a meta-batch) with Adam (lr 1e-3, halved every 2000 episodes in
Snell et al. sec. 3.2). There is no fine-tuning at test time: :meth:`ProtoNet.predict`
returns the logits −d(f_φ(x), c_k) of the episode's queries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.errors import ConfigError
from fewshot.learners.base import Learner, LearnerConfig, accuracy, require
from fewshot.learners.registry import register_learner

__all__ = ["ProtoNet", "prototypes", "squared_euclidean_logits", "check_images",
           "check_batch", "check_lr_halve_every", "halve_lr_every", "mean_episode_update"]


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
    if ep.support_y.numel() == 0 or bool((ep.shots == 0).any()):
        raise ConfigError(f"episode has a class without support examples (shots per class "
                          f"{ep.shots.tolist()}); every class needs at least one")


def prototypes(embeddings: Tensor, labels: Tensor, ways: int) -> Tensor:
    """c_k = mean of the support embeddings of class k (Snell et al. eq. 1), (ways, D).

    Works for any number of shots per class (variable-shot episodes).
    """
    onehot = (labels.unsqueeze(-1) == torch.arange(ways, device=labels.device)).to(embeddings.dtype)  # (S, N); vmap-safe one-hot
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


@register_learner("protonet")
class ProtoNet(Learner):
    """Prototypical Networks: nearest class mean in a learned embedding (Snell et al. 2017)."""

    description = "Prototypical Networks: softmax over negative squared distances to class-mean prototypes"
    paper = ("Snell, Swersky & Zemel, 'Prototypical Networks for Few-shot Learning', "
             "NeurIPS 2017")
    input_kind = "episodes"
    supports_autocast = True
    fine_tunes_at_test = False

    @dataclass
    class Config(LearnerConfig):
        """ProtoNet hyper-parameters (defaults: Snell et al. sec. 3.2).

        lr: Adam learning rate (1e-3).
        lr_halve_every: halve the learning rate every this many training steps (episodes
            in Snell et al.: 2000); 0 keeps it constant.
        """

        lr: float = 1e-3
        lr_halve_every: int = 2000

        def validate(self) -> None:
            super().validate()
            check_lr_halve_every(self.lr_halve_every)

    def __init__(self, config=None, *, in_channels, image_size, num_classes=None, backbone=None):
        super().__init__(config, in_channels=in_channels, image_size=image_size,
                         num_classes=num_classes, backbone=backbone)
        #: the embedding f_φ, (B, C, H, W) -> (B, D)
        self.encoder = self.make_backbone()
        self.optimizers["meta"] = torch.optim.Adam(self.encoder.parameters(), lr=self.config.lr)
        halve_lr_every(self, self.config.lr_halve_every)

    def episode_logits(self, episode) -> Tensor:
        """(Q, N) logits −‖f_φ(x̃) − c_k‖² of the episode's queries.

        Support and query images go through the encoder in one batch; distances are
        computed in float32 even under autocast.
        """
        s = episode.support_x.shape[0]
        z = self.encoder(torch.cat([episode.support_x, episode.query_x], 0))
        z = z.reshape(z.shape[0], -1).float()
        protos = prototypes(z[:s], episode.support_y, episode.ways)
        return squared_euclidean_logits(z[s:], protos)

    def episode_loss(self, episode) -> Tuple[Tensor, Tensor]:
        """(J(φ) = cross-entropy of the query logits (Snell et al. eq. 2-3), logits)."""
        logits = self.episode_logits(episode)
        return F.cross_entropy(logits, episode.query_y), logits

    def train_step(self, batch) -> Dict[str, Tensor]:
        """One Adam step on J(φ) averaged over the episodes of ``batch``."""
        episodes = check_batch(self, batch)
        self.train()
        return mean_episode_update(self, episodes, self.episode_loss)

    def predict(self, episode) -> Tensor:
        """Query logits from the support prototypes; no fine-tuning (Snell et al.)."""
        check_episode(self, episode)
        with torch.no_grad():
            return self.episode_logits(episode)
