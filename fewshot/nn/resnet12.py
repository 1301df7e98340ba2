"""ResNet-12, the residual embedding common in few-shot learning (TADAM, Oreshkin et al. 2018;
MetaOptNet, Lee et al. 2019; MTL, Sun et al. 2019).

Four residual blocks with 64, 160, 320, 640 filters. Block: three
``conv3x3 (no bias) -> BatchNorm -> LeakyReLU(0.1)`` layers (the last activation after the residual
addition), shortcut ``conv1x1 -> BatchNorm``, then a 2x2 max-pool:

    y = MaxPool2( LeakyReLU( BN3(conv3(a2)) + BN_s(conv_s(x)) ) ),
    a2 = LReLU(BN2(conv2(a1))), a1 = LReLU(BN1(conv1(x))).

Spatial size ⌊n/2⌋ per block: 84 -> 640x5x5, 64 -> 640x4x4, 32 -> 640x2x2, 28 -> 640x1x1.
Features: global average pooling (``pool="avg"``, 640 features, the usual choice) or flattening
(``pool="flatten"``, 640·h·w). DropBlock is not included. Initialisation: Kaiming-normal
(He et al. 2015, fan_out, leaky-ReLU gain for slope 0.1) for the convolutions, BN weight 1 / bias 0.
"""
from __future__ import annotations

import torch
from torch import nn

from fewshot.errors import ConfigError
from fewshot.nn.registry import FeatureExtractor, boolean, image_hw, positive_int, register_backbone

__all__ = ["ResBlock12", "ResNet12"]


class ResBlock12(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, negative_slope: float = 0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.act = nn.LeakyReLU(negative_slope)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.pool(self.act(out + self.shortcut(x)))


class ResNet12(FeatureExtractor):
    """See the module docstring. Options: ``channels`` (64,160,320,640), ``pool`` ("avg"|"flatten"),
    ``flatten`` (False: maps ``(B, 640, h, w)``), ``negative_slope`` (0.1)."""

    def __init__(self, *, in_channels: int, image_size, channels=(64, 160, 320, 640), pool: str = "avg",
                 flatten: bool = True, negative_slope: float = 0.1, name: str = "resnet12"):
        super().__init__()
        where = f"backbone '{name}'"
        self.name = name
        if isinstance(channels, (str, bytes)) or not hasattr(channels, "__len__") or len(channels) == 0:
            raise ConfigError(
                f"{where}: option 'channels' must be a list of positive ints, got {channels!r}."
            )
        channels = [positive_int(c, "channels", where) for c in channels]
        if pool not in ("avg", "flatten"):
            raise ConfigError(f"{where}: option 'pool' must be 'avg' or 'flatten', got {pool!r}.")
        h, w = image_hw(image_size, where)
        self.in_shape = (int(in_channels), h, w)
        blocks, c = [], in_channels
        for i, out in enumerate(channels):
            h, w = h // 2, w // 2
            if h < 1 or w < 1:
                raise ConfigError(
                    f"{where}: image_size {image_size!r} is too small: the feature map vanishes after "
                    f"block {i + 1} (each block halves it); use images of at least "
                    f"{2 ** len(channels)} pixels."
                )
            blocks.append(ResBlock12(c, out, negative_slope))
            c = out
        self.blocks = nn.Sequential(*blocks)
        self.pool_mode = pool
        self.flatten = boolean(flatten, "flatten", where)
        self.out_shape = (c, h, w)
        self.out_features = c if pool == "avg" else c * h * w
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=negative_slope, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()

    def forward_maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def pool_features(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.mean(dim=(2, 3)) if self.pool_mode == "avg" else maps.flatten(1)


@register_backbone("resnet12")
def resnet12(*, in_channels: int, image_size, channels=(64, 160, 320, 640), pool: str = "avg",
             flatten: bool = True, negative_slope: float = 0.1) -> ResNet12:
    """ResNet-12 (64-160-320-640); see :class:`ResNet12`."""
    return ResNet12(in_channels=in_channels, image_size=image_size, channels=channels, pool=pool,
                    flatten=flatten, negative_slope=negative_slope)
