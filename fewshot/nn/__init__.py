"""Networks: backbones (feature extractors), the MLTP paper's classifiers and the relation module.

Entry points: :func:`build_backbone`, :func:`build_classifier`, :class:`RelationModule`.
"""
from fewshot.nn.registry import (
    BackboneClassifier,
    FeatureExtractor,
    build_backbone,
    build_classifier,
    count_parameters,
    layer_kind,
    list_backbones,
    list_classifiers,
    register_backbone,
    register_classifier,
)
from fewshot.nn import conv4 as _conv4  # noqa: F401  (registers conv4)
from fewshot.nn.conv4 import Conv4, ConvBlock

__all__ = [
    "BackboneClassifier",
    "FeatureExtractor",
    "build_backbone",
    "build_classifier",
    "count_parameters",
    "layer_kind",
    "list_backbones",
    "list_classifiers",
    "register_backbone",
    "register_classifier",
    "Conv4",
    "ConvBlock",
]
