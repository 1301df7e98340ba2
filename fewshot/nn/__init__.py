"""Networks: backbones (feature extractors), the MLTP paper's classifiers and the relation module.

Entry points: :func:`build_backbone` (conv4, resnet12, resnet18, resnet34),
:func:`build_classifier` (cnet1..4, ccnet1..4 and any backbone + a linear ``head``),
:class:`RelationModule`. Helpers: :func:`count_parameters`, :func:`layer_kind`.
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
from fewshot.nn.conv4 import Conv4, ConvBlock
from fewshot.nn.resnet12 import ResNet12
from fewshot.nn.resnet import TorchvisionResNet
from fewshot.nn.cnet import PaperNet
from fewshot.nn.relation import RelationModule

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
    "ResNet12",
    "TorchvisionResNet",
    "PaperNet",
    "RelationModule",
]
