"""Backbone and classifier registry, plus the small helpers every network here shares.

``build_backbone(name, in_channels=, image_size=, **options)`` returns a feature extractor
(:class:`FeatureExtractor`): ``forward`` maps images ``(B, C, H, W)`` to features
``(B, out_features)``, or, with ``flatten=False``, to feature maps ``(B, *out_shape)``.
``build_classifier(name, in_channels=, image_size=, num_classes=, **options)`` returns a network
giving logits ``(B, num_classes)`` whose last layer is the ``nn.Linear`` named ``head``.

Sizes are checked twice: at build time (a feature map that would shrink to nothing is a
:class:`~fewshot.errors.ConfigError` naming the smallest image size that works) and in
``forward`` (an input whose ``(C, H, W)`` differs from what the network was built for is a
``ConfigError`` naming both shapes). The forward check compares Python ints only, so it never
synchronises with an accelerator.

Layer kinds, as the inner loop selects them (MLTP_conv / MLTP_fc, Deng & Zhang, ICPR 2020,
sec. III-E): parameters of ``nn.Conv*`` are ``"conv"``, of ``nn.Linear`` ``"fc"``, of
normalisation layers ``"norm"`` (neither conv nor fc).
"""
from __future__ import annotations

import inspect
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from fewshot.errors import ConfigError, unknown_name

__all__ = [
    "FeatureExtractor",
    "BackboneClassifier",
    "register_backbone",
    "register_classifier",
    "build_backbone",
    "build_classifier",
    "list_backbones",
    "list_classifiers",
    "count_parameters",
    "layer_kind",
    "image_hw",
    "check_input",
    "boolean",
    "positive_int",
]

_BACKBONES: dict[str, Callable[..., "FeatureExtractor"]] = {}
_CLASSIFIERS: dict[str, Callable[..., nn.Module]] = {}


# ----------------------------------------------------------------------------- helpers
def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``module`` (only those with ``requires_grad`` if asked)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


_NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def layer_kind(module: nn.Module) -> str | None:
    """``"conv"`` for ``nn.Conv1d/2d/3d`` (and transposed), ``"fc"`` for ``nn.Linear``,
    ``"norm"`` for batch/group/layer/instance norm, ``None`` for anything else."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Linear):
        return "fc"
    if isinstance(module, _NORM_TYPES):
        return "norm"
    return None


def image_hw(image_size, where: str) -> tuple[int, int]:
    """``image_size`` as ``(H, W)``: an int ``s`` means ``(s, s)``; a pair is taken as is."""
    if isinstance(image_size, bool):
        raise ConfigError(f"{where}: image_size must be an int or (height, width), got {image_size!r}.")
    if isinstance(image_size, int):
        hw = (image_size, image_size)
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in image_size
    ):
        hw = (int(image_size[0]), int(image_size[1]))
    else:
        raise ConfigError(
            f"{where}: image_size must be an int or (height, width) of ints, got {image_size!r}."
        )
    if hw[0] < 1 or hw[1] < 1:
        raise ConfigError(f"{where}: image_size must be positive, got {image_size!r}.")
    return hw


def positive_int(value, option: str, where: str) -> int:
    """``value`` as an int >= 1, else a ConfigError naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: option '{option}' must be a positive integer, got {value!r}.")
    return int(value)


def boolean(value, option: str, where: str) -> bool:
    """``value`` if it is a bool, else a ConfigError naming ``option`` (no truthy strings)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: option '{option}' must be true or false, got {value!r}.")
    return value


def check_input(x: torch.Tensor, expected: tuple[int, ...], where: str) -> None:
    """Raise ConfigError unless ``x`` is ``(B, *expected)``. Python ints only (no device sync)."""
    got = tuple(x.shape[1:])
    if x.dim() != len(expected) + 1 or got != expected:
        raise ConfigError(
            f"{where}: expected input of shape (batch, {', '.join(map(str, expected))}), "
            f"got {tuple(x.shape)}; build the network with the in_channels/image_size of your data "
            "(or resize the images)."
        )


class FeatureExtractor(nn.Module):
    """Base of every backbone.

    Attributes: ``name``; ``in_shape`` = (C, H, W) accepted; ``out_shape`` = (C', h, w) of the
    feature maps; ``flatten``; ``out_features`` = size of the flattened output (``C'·h·w``, or
    ``C'`` for globally pooled backbones). Subclasses implement ``forward_maps(x)`` (and
    ``pool_features(maps)`` when they pool instead of flattening) and set these attributes.
    """

    name: str = "backbone"
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    out_features: int
    flatten: bool = True

    def pool_features(self, maps: torch.Tensor) -> torch.Tensor:
        """Feature maps -> flat features (default: flatten ``C'·h·w``)."""
        return maps.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_shape, f"backbone '{self.name}'")
        maps = self.forward_maps(x)
        return self.pool_features(maps) if self.flatten else maps

    def init_head(self, head: nn.Linear) -> None:
        """Initialise a linear classifier put on top of these features (default: PyTorch's)."""
        head.reset_parameters()

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, out_shape={self.out_shape}, flatten={self.flatten}"


class BackboneClassifier(nn.Module):
    """``head(backbone(x))``: any backbone plus an ``nn.Linear`` named ``head`` giving logits.

    ``forward_features(x)`` returns the backbone's flat features (``feature_dim`` of them).
    """

    def __init__(self, backbone: FeatureExtractor, num_classes: int):
        super().__init__()
        if not backbone.flatten:
            raise ConfigError(
                f"classifier on backbone '{backbone.name}': the backbone must flatten its features "
                "(drop the option flatten=False)."
            )
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_features, num_classes)
        backbone.init_head(self.head)
        self.name = backbone.name
        self.in_shape = backbone.in_shape
        self.num_classes = num_classes
        self.feature_dim = backbone.out_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The input of ``head``: the backbone's flat features ``(B, feature_dim)``."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# ----------------------------------------------------------------------------- registry
def register_backbone(name: str):
    """Decorator: register ``builder(*, in_channels, image_size, **options) -> FeatureExtractor``."""

    def deco(builder):
        _BACKBONES[name] = builder
        return builder

    return deco


def register_classifier(name: str):
    """Decorator: register ``builder(*, in_channels, image_size, num_classes, **options)``."""

    def deco(builder):
        _CLASSIFIERS[name] = builder
        return builder

    return deco


def _ensure_loaded() -> None:
    # The modules register themselves on import; importing the package imports them all.
    import fewshot.nn  # noqa: F401


def list_backbones() -> list[str]:
    _ensure_loaded()
    return sorted(_BACKBONES)


def list_classifiers() -> list[str]:
    """Names build_classifier accepts: the paper classifiers and every backbone."""
    _ensure_loaded()
    return sorted(set(_BACKBONES) | set(_CLASSIFIERS))


def _check_options(builder, options: dict, fixed: Iterable[str], where: str) -> None:
    params = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in fixed]
    for key in options:
        if key not in known:
            raise ConfigError(f"{where}: " + unknown_name("option", key, known))


def build_backbone(name: str, *, in_channels: int, image_size, **options) -> FeatureExtractor:
    """Build the feature extractor ``name`` for images of ``in_channels`` x ``image_size``.

    Names: see :func:`list_backbones` (conv4, resnet12, resnet18, resnet34, ...). Options are the
    builder's keyword arguments (e.g. ``hidden``, ``flatten``, ``drop_maxpool``); an unknown name or
    option is a ConfigError.
    """
    _ensure_loaded()
    if name not in _BACKBONES:
        raise ConfigError(unknown_name("backbone", name, _BACKBONES))
    where = f"backbone '{name}'"
    positive_int(in_channels, "in_channels", where)
    builder = _BACKBONES[name]
    _check_options(builder, options, ("in_channels", "image_size"), where)
    return builder(in_channels=in_channels, image_size=image_size, **options)


def build_classifier(name: str, *, in_channels: int, image_size, num_classes: int, **options) -> nn.Module:
    """Build a classifier giving logits ``(B, num_classes)``; its last layer is ``head``.

    ``name`` is a paper classifier (cnet1..4, ccnet1..4, resnet18, resnet34) or any backbone, which
    then gets an ``nn.Linear`` head on its flat features (:class:`BackboneClassifier`).
    """
    _ensure_loaded()
    where = f"classifier '{name}'"
    positive_int(in_channels, "in_channels", where)
    positive_int(num_classes, "num_classes", where)
    if name in _CLASSIFIERS:
        builder = _CLASSIFIERS[name]
        _check_options(builder, options, ("in_channels", "image_size", "num_classes"), where)
        return builder(in_channels=in_channels, image_size=image_size, num_classes=num_classes, **options)
    if name in _BACKBONES:
        if options.get("flatten", True) is not True:
            raise ConfigError(f"{where}: option flatten=False is not allowed for a classifier.")
        backbone = build_backbone(name, in_channels=in_channels, image_size=image_size, **options)
        return BackboneClassifier(backbone, num_classes)
    raise ConfigError(unknown_name("classifier", name, set(_BACKBONES) | set(_CLASSIFIERS)))


def conv_output(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output length of a convolution/pooling along one axis: ⌊(n + 2p − k)/s⌋ + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def as_tuple(value, n: int, option: str, where: str) -> tuple:
    """A scalar repeated ``n`` times, or a sequence of length ``n``."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ConfigError(f"{where}: option '{option}' needs {n} values, got {list(value)!r}.")
        return tuple(value)
    return (value,) * n
