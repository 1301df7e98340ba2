"""ResNet-18 and ResNet-34 (He et al., 2016) from ``torchvision.models``, adapted for small images.

Built with ``weights=None`` (nothing is ever downloaded). Adaptations:

* ``in_channels``: the stem ``conv1`` (7x7, stride 2, 64 filters) takes ``in_channels`` inputs;
* ``drop_maxpool=True`` removes the stem's 3x3/2 max-pool, as MLTP does on Tiny ImageNet
  (Deng & Zhang, ICPR 2020, sec. IV-C: "We remove their first max-pooling layers as the input
  image size is already very small"). Sizes: 64x64 -> 512x2x2 with the max-pool, 512x4x4 without;
* the ``fc`` layer is removed: features are the global average of the last maps (512), or the maps
  themselves with ``flatten=False``. ``build_classifier('resnet18', ...)`` puts back a linear layer,
  named ``head``.

Initialisation (MLTP: "the weights are initialized with Kaiming initialization"): convolutions
Kaiming-normal with fan_out and ReLU gain, std = sqrt(2/(C_out·k·k)) (torchvision's choice);
BatchNorm weight 1 / bias 0; the classifier head Kaiming-normal with fan_in and unit gain (it feeds
the softmax, not a ReLU), std = 1/sqrt(512), bias 0. ``zero_init_residual`` as in torchvision.
Layer names follow torchvision (``conv1``, ``bn1``, ``layer1``..``layer4``).
"""
from __future__ import annotations


import torch
from torch import nn

from fewshot.nn.registry import FeatureExtractor, boolean, conv_output, image_hw, register_backbone

__all__ = ["TorchvisionResNet"]

_DEPTHS = {18: "resnet18", 34: "resnet34"}  # torchvision.models builders, imported on first use


class TorchvisionResNet(FeatureExtractor):
    """torchvision ResNet-``depth`` without ``fc``; see the module docstring."""

    def __init__(self, depth: int, *, in_channels: int, image_size, drop_maxpool: bool = False,
                 flatten: bool = True, zero_init_residual: bool = False):
        super().__init__()
        self.name = f"resnet{depth}"
        where = f"backbone '{self.name}'"
        h, w = image_hw(image_size, where)
        drop_maxpool = boolean(drop_maxpool, "drop_maxpool", where)
        flatten = boolean(flatten, "flatten", where)
        zero_init_residual = boolean(zero_init_residual, "zero_init_residual", where)
        self.in_shape = (int(in_channels), h, w)
        from torchvision import models  # only here: the rest of fewshot imports without torchvision

        net = getattr(models, _DEPTHS[depth])(weights=None, zero_init_residual=zero_init_residual)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.conv1, self.bn1, self.relu = net.conv1, net.bn1, net.relu
        self.maxpool = nn.Identity() if drop_maxpool else net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.drop_maxpool = drop_maxpool
        self.flatten = flatten

        def size(n: int) -> int:
            n = conv_output(n, 7, 2, 3)  # conv1
            if not drop_maxpool:
                n = conv_output(n, 3, 2, 1)  # max-pool
            for _ in range(3):  # layer2..layer4 start with a stride-2 3x3 conv (padding 1)
                n = conv_output(n, 3, 2, 1)
            return n

        self.out_shape = (512, size(h), size(w))
        self.out_features = 512

    def forward_maps(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def pool_features(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.mean(dim=(2, 3))

    def init_head(self, head: nn.Linear) -> None:
        nn.init.kaiming_normal_(head.weight, mode="fan_in", nonlinearity="linear")
        nn.init.zeros_(head.bias)


@register_backbone("resnet18")
def resnet18(*, in_channels: int, image_size, drop_maxpool: bool = False, flatten: bool = True,
             zero_init_residual: bool = False) -> TorchvisionResNet:
    """torchvision ResNet-18 (fc removed; ``drop_maxpool`` for 64x64 Tiny ImageNet as in MLTP)."""
    return TorchvisionResNet(18, in_channels=in_channels, image_size=image_size, drop_maxpool=drop_maxpool,
                             flatten=flatten, zero_init_residual=zero_init_residual)


@register_backbone("resnet34")
def resnet34(*, in_channels: int, image_size, drop_maxpool: bool = False, flatten: bool = True,
             zero_init_residual: bool = False) -> TorchvisionResNet:
    """torchvision ResNet-34 (fc removed; ``drop_maxpool`` for 64x64 Tiny ImageNet as in MLTP)."""
    return TorchvisionResNet(34, in_channels=in_channels, image_size=image_size, drop_maxpool=drop_maxpool,
                             flatten=flatten, zero_init_residual=zero_init_residual)
