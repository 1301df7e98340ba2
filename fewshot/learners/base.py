"""The Learner protocol every method implements.

A learner owns its model(s), its step sizes and its optimiser state. The trainer feeds it
batches of the kind named by :attr:`Learner.input_kind`:

* ``"episodes"``: a list of :class:`~fewshot.data.episodes.Episode` (one meta-batch);
* ``"pairs"``: a list of ``(T_i, T_j)`` episode pairs whose classes are disjoint (L2G);
* ``"supervised"``: a :class:`~fewshot.data.supervised.TaskPairBatch` (two half-batch
  tasks of one ordinary minibatch; MLTP and standard training).

``train_step(batch)`` runs one outer (meta-)update and returns a dict of metrics (0-dim
tensors; the trainer decides when to synchronise them to Python floats).
``predict(episode)`` returns query logits ``(Q, ways)`` for one episode, fine-tuning on
the support set first where the method's paper evaluates that way.
``state_dict()`` / ``load_state_dict()`` cover modules, learnable step sizes and optimisers.
"""
from __future__ import annotations

import abc
import functools
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor, nn

from fewshot.distributed import all_reduce_mean_grads
from fewshot.errors import CheckpointError, ConfigError, TrainingError
from fewshot.nn import build_backbone


@dataclass
class LearnerConfig:
    """Hyper-parameters common to every learner; subclasses add their own fields."""

    lr: float = 1e-3  # outer (meta-) learning rate of the learner's optimiser
    backbone: str = "conv4"  # a name known to fewshot.nn.build_backbone
    backbone_options: Dict[str, Any] = field(default_factory=dict)  # e.g. {"hidden": 32}

    def validate(self) -> None:
        """Raise :class:`ConfigError` for an invalid value (called by the constructor)."""
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if v != v:  # NaN
                    raise ConfigError(f"learner option '{f.name}' is NaN; give a number")
        if self.lr <= 0:
            raise ConfigError(f"learner option 'lr' must be > 0, got {self.lr}")


def host_label_span(y: Tensor) -> Optional[Tuple[int, int]]:
    """(min, max) of labels held on the host; None when empty or on an accelerator, where
    reading them would make the host wait for the device at every step."""
    if y.device.type != "cpu" or y.numel() == 0:
        return None
    # numpy: a check on a few labels dispatches no tensor operators
    a = (y.detach() if y.requires_grad else y).numpy()
    return int(a.min()), int(a.max())


def read_on_cpu(flag: Tensor) -> Optional[bool]:
    """``bool(flag)`` where reading it costs nothing (a tensor on the host); None on an
    accelerator, where reading it would make the host wait for the device."""
    return bool(flag) if flag.device.type == "cpu" else None


def require(cond: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``cond``."""
    if not cond:
        raise ConfigError(message)


class _LearnerMeta(abc.ABCMeta, type(nn.Module)):
    """nn.Module's metaclass with abstract methods: a learner missing ``train_step`` or
    ``predict`` fails when it is instantiated, naming the missing method."""


class Learner(nn.Module, metaclass=_LearnerMeta):
    """Base class of all learners (see the module docstring for the protocol).

    A ``train_step`` that raises :class:`TrainingError` (a non-finite loss) leaves the learner
    as it was before the step: parameters, buffers (BatchNorm statistics the step's forwards
    updated), optimiser and scheduler states and the step count. Every subclass's
    ``train_step`` is wrapped for this (:func:`_restored_on_failure`).
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("train_step")
        if step is not None and not getattr(step, "__isabstractmethod__", False):
            cls.train_step = _restored_on_failure(step)

    #: registry name, set by ``@register_learner``
    name: ClassVar[str] = ""
    #: one line for ``fewshot learners``
    description: ClassVar[str] = ""
    #: the paper the learner implements (authors, title, venue, year)
    paper: ClassVar[str] = ""
    #: what ``train_step`` consumes: "episodes", "pairs" or "supervised"
    input_kind: ClassVar[str] = "episodes"
    #: its hyper-parameter dataclass
    Config: ClassVar[type] = LearnerConfig
    #: whether autocast (bf16/fp16) is numerically safe for this learner
    supports_autocast: ClassVar[bool] = False
    #: whether predict() fine-tunes on the support set (reported with results)
    fine_tunes_at_test: ClassVar[bool] = False
    #: inside a train_step that restores the learner on failure (see the class docstring)
    _restoring: ClassVar[bool] = False

    def __init__(self, config: Optional[LearnerConfig] = None, *, in_channels: int,
                 image_size: int, num_classes: Optional[int] = None,
                 backbone: Optional[nn.Module] = None):
        """Build the learner for images of ``in_channels`` x ``image_size`` x ``image_size``.

        ``num_classes`` is the number of training (base) classes, needed by learners with
        a head over all of them (transfer, MTL, supervised). ``backbone`` replaces the
        network named by ``config.backbone`` with a module of the user's (it must map
        (B, C, H, W) to (B, D) and expose ``out_features = D``).
        """
        super().__init__()
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise ConfigError(f"learner '{self.name}' expects a {self.Config.__name__}, "
                              f"got {type(self.config).__name__}")
        self.config.validate()
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)
        self.num_classes = num_classes
        # not registered here: the learner registers it where it uses it (no duplicate keys)
        object.__setattr__(self, "_given_backbone", backbone)
        self.optimizers: Dict[str, torch.optim.Optimizer] = {}
        self.schedulers: Dict[str, Any] = {}
        self.steps_done = 0

    # ----------------------------------------------------------------- protocol
    @abc.abstractmethod
    def train_step(self, batch) -> Dict[str, Tensor]:
        """One outer update on ``batch`` (see the module docstring); returns 0-dim metrics."""

    @abc.abstractmethod
    def predict(self, episode) -> Tensor:
        """Query logits (Q, ways) for one episode."""

    # ---------------------------------------------------------------- helpers
    def make_backbone(self, **overrides) -> nn.Module:
        """The user's backbone if one was given, else ``config.backbone`` built for the input.

        ``overrides`` (e.g. ``flatten=False`` for RelationNet's feature maps) are passed
        to :func:`fewshot.nn.build_backbone` on top of ``config.backbone_options``.
        """
        if self._given_backbone is not None:
            return self._given_backbone
        options = {**self.config.backbone_options, **overrides}
        return build_backbone(self.config.backbone, in_channels=self.in_channels,
                              image_size=self.image_size, **options)

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def outer_step(self, optimizer_name: str = "meta", params: Optional[Iterable[Tensor]] = None,
                   clip_norm: float = 0.0, clip_groups: Optional[Iterable[Iterable[Tensor]]] = None) -> None:
        """Average gradients over ranks (when torch.distributed runs) and step the optimiser.

        The ``higher`` inner loop bypasses DDP's module wrapper, so the all-reduce is
        explicit here: each rank's gradient is the mean over its share of the meta-batch,
        and the mean over ranks is the mean over the global meta-batch. With ``clip_norm``
        > 0 each of ``clip_groups`` (default: all the optimiser's parameters as one group)
        has its global gradient norm clipped *after* the average, so clipping sees the same
        gradient as in one process.
        """
        opt = self.optimizers[optimizer_name]
        if params is None:
            params = [p for g in opt.param_groups for p in g["params"]]
        params = list(params)
        all_reduce_mean_grads(params)
        if clip_norm > 0:
            for group in (clip_groups if clip_groups is not None else [params]):
                torch.nn.utils.clip_grad_norm_(list(group), clip_norm)
        opt.step()
        sched = self.schedulers.get(optimizer_name)
        if sched is not None:
            sched.step()

    @staticmethod
    def check_finite(loss: Tensor, step: int) -> None:
        """Raise :class:`TrainingError` when ``loss`` is NaN or infinite.

        Checked at once on the CPU (no device to wait for). On an accelerator the check would
        stall the device every step, so it is left to the trainer, which tracks the first
        non-finite ``loss`` metric on the device and reports its step at the next log window.
        """
        if loss.device.type == "cpu" and not torch.isfinite(loss).all():
            raise TrainingError(f"non-finite loss ({float(loss)}) at training step {step}")

    def check_episode(self, episode) -> None:
        """Refuse an episode whose labels or shapes cannot be right for any learner.

        Label ranges are read only from labels on the host (:func:`host_label_span`), and not
        at all for episodes a sampler made (``episode.checked``: it checked them on the host
        before the copy to the device).
        """
        ways = episode.ways
        if ways < 1:
            raise ConfigError("episode has zero ways")
        for part, y in (("support", episode.support_y), ("query", episode.query_y)):
            span = None if getattr(episode, "checked", False) else host_label_span(y)
            if span is not None and (span[0] < 0 or span[1] >= ways):
                raise ConfigError(f"episode {part} labels must lie in 0..{ways - 1}, "
                                  f"found {span[0]}..{span[1]}")
        if episode.support_x.shape[1:] != episode.query_x.shape[1:]:
            raise ConfigError(f"support images {tuple(episode.support_x.shape[1:])} and query "
                              f"images {tuple(episode.query_x.shape[1:])} differ in shape")

    # ----------------------------------------------------------- checkpoints
    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        return {
            "learner": self.name,
            "modules": super().state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items() if s is not None},
            "steps_done": self.steps_done,
        }

    def load_state_dict(self, state, strict: bool = True):  # type: ignore[override]
        if not isinstance(state, dict) or "modules" not in state:
            raise CheckpointError("checkpoint has no learner state ('modules' missing); "
                                  "was it written by fewshot?")
        if state.get("learner") not in (None, self.name):
            raise CheckpointError(f"checkpoint holds learner '{state.get('learner')}', "
                                  f"not '{self.name}'")
        try:
            super().load_state_dict(state["modules"], strict=strict)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint does not fit learner '{self.name}': "
                                  f"{str(e).splitlines()[0]}") from e
        for k, o in self.optimizers.items():
            if k in state.get("optimizers", {}):
                o.load_state_dict(state["optimizers"][k])
        for k, s in self.schedulers.items():
            if s is not None and k in state.get("schedulers", {}):
                s.load_state_dict(state["schedulers"][k])
        self.steps_done = int(state.get("steps_done", 0))
        return None


class _Snapshot:
    """A learner's trainable state, copied, to put back after a failed step."""

    def __init__(self, learner: Learner):
        self.tensors = [(t, t.detach().clone()) for t in _state_tensors(learner)]
        self.optimizers = {k: _copied(o.state_dict()) for k, o in learner.optimizers.items()}
        self.schedulers = {k: _copied(s.state_dict()) for k, s in learner.schedulers.items()
                           if s is not None}
        self.steps_done = learner.steps_done

    @torch.no_grad()
    def restore(self, learner: Learner) -> None:
        for t, saved in self.tensors:
            t.copy_(saved)
        for k, state in self.optimizers.items():
            learner.optimizers[k].load_state_dict(state)
        for k, state in self.schedulers.items():
            learner.schedulers[k].load_state_dict(state)
        learner.steps_done = self.steps_done


def _copied(state):
    """A state dict with its tensors, dicts and lists copied (``copy.deepcopy`` costs ten
    times as much on an optimiser's state)."""
    if torch.is_tensor(state):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _copied(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_copied(v) for v in state]
    return state


def _state_tensors(learner: Learner):
    seen = set()
    for t in list(learner.parameters()) + list(learner.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            yield t


def _restored_on_failure(train_step):
    """``train_step`` that puts the learner back as it was when it raises TrainingError.

    Only on the CPU, where :meth:`Learner.check_finite` raises at once: the copy costs one pass
    over the weights and optimiser moments (well under 1% of a step). On an accelerator the
    finiteness check is the trainer's, after the step, and nothing is copied. A ``train_step``
    calling its parent's copies once.
    """

    @functools.wraps(train_step)
    def guarded(self, batch):
        if self._restoring or self.device.type != "cpu":
            return train_step(self, batch)
        snapshot = _Snapshot(self)
        object.__setattr__(self, "_restoring", True)
        try:
            return train_step(self, batch)
        except TrainingError:
            snapshot.restore(self)
            raise
        finally:
            object.__setattr__(self, "_restoring", False)

    return guarded


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of correct arg-max predictions (0-dim tensor, no host sync)."""
    return (logits.argmax(dim=-1) == labels).float().mean()
