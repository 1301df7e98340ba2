"""Conv-4: the four-block convolutional embedding of MAML, Prototypical and Relation Networks.

Block ``l`` (l = 1..4): ``Conv2d(3x3, hidden, padding) -> BatchNorm2d -> ReLU -> MaxPool2d(2)``
(Snell et al., 2017; Finn et al., 2017; L2G, Lee et al., "Implementation Details": "four layers of
convolutional blocks where each block contains 64 filters, 3x3 convolution layer, a batch
normalization, a ReLU activation function and 2x2 max pooling layer at the end of each block").
With ``padding=1`` each block halves the map (⌊n/2⌋): 28x28 -> 64x1x1 (Omniglot), 32x32 -> 64x2x2,
84x84 -> 64x5x5 (mini-ImageNet, 1600 features).

Relation Networks' embedding (L2G: "the max-pooling layers of the latter two blocks are removed")
is ``pool_blocks=2``: 84x84 -> 64x21x21, 28x28 -> 64x7x7. MTL's meta-transfer experiments with a
4-conv net use ``hidden=32``. ``padding`` may be one int or four (Sung et al. use 0,0,1,1).

Initialisation as MAML's reference code: Xavier-uniform conv weights (Glorot & Bengio, 2010,
std = sqrt(2/(fan_in+fan_out))), zero biases, BatchNorm weight 1 / bias 0; a linear head put on
top (``build_classifier('conv4', ...)``) is Xavier-uniform with zero bias as well.
"""
from __future__ import annotations

import torch
from torch import nn

from fewshot.errors import ConfigError
from fewshot.nn.registry import (
    FeatureExtractor,
    as_tuple,
    boolean,
    conv_output,
    image_hw,
    positive_int,
    register_backbone,
)

__all__ = ["ConvBlock", "Conv4"]


class ConvBlock(nn.Module):
    """``conv`` (3x3) -> ``bn`` -> ReLU -> optional 2x2 max-pool."""

    def __init__(self, in_channels: int, out_channels: int, padding: int = 1, pool: bool = True,
                 bn_momentum: float = 0.1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=padding)
        self.bn = nn.BatchNorm2d(out_channels, momentum=bn_momentum)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.bn(self.conv(x))))


class Conv4(FeatureExtractor):
    """Four :class:`ConvBlock` s; see the module docstring for the architecture and sizes.

    Options: ``hidden`` (filters per block, 64), ``padding`` (1, or four values), ``pool_blocks``
    (how many leading blocks end in a max-pool, 4), ``depth`` (number of blocks, 4),
    ``flatten`` (True: ``(B, hidden·h·w)``; False: maps ``(B, hidden, h, w)``),
    ``bn_momentum`` (0.1).
    """

    def __init__(self, *, in_channels: int, image_size, hidden: int = 64, padding=1,
                 pool_blocks: int = 4, depth: int = 4, flatten: bool = True,
                 bn_momentum: float = 0.1, name: str = "conv4"):
        super().__init__()
        where = f"backbone '{name}'"
        self.name = name
        depth = positive_int(depth, "depth", where)
        hidden = positive_int(hidden, "hidden", where)
        paddings = as_tuple(padding, depth, "padding", where)
        for p in paddings:
            if isinstance(p, bool) or not isinstance(p, int) or p < 0:
                raise ConfigError(f"{where}: option 'padding' must be integers >= 0, got {padding!r}.")
        if isinstance(pool_blocks, bool) or not isinstance(pool_blocks, int) or not 0 <= pool_blocks <= depth:
            raise ConfigError(
                f"{where}: option 'pool_blocks' must be an int in 0..{depth}, got {pool_blocks!r}."
            )
        h, w = image_hw(image_size, where)
        self.in_shape = (int(in_channels), h, w)
        self.flatten = boolean(flatten, "flatten", where)
        momentum_ok = isinstance(bn_momentum, (int, float)) and not isinstance(bn_momentum, bool)
        if not momentum_ok or not 0 < bn_momentum <= 1:
            raise ConfigError(f"{where}: option 'bn_momentum' must be in (0, 1], got {bn_momentum!r}.")

        blocks = []
        channels = in_channels
        for i in range(depth):
            pool = i < pool_blocks
            h, w = conv_output(h, 3, 1, paddings[i]), conv_output(w, 3, 1, paddings[i])
            if pool:
                h, w = h // 2, w // 2
            if h < 1 or w < 1:
                raise ConfigError(
                    f"{where}: image_size {image_size!r} is too small: the feature map vanishes after "
                    f"block {i + 1} (padding={paddings[i]}, max-pool={pool}); use larger images, "
                    "fewer pool_blocks or more padding."
                )
            blocks.append(ConvBlock(channels, hidden, paddings[i], pool, bn_momentum))
            channels = hidden
        self.blocks = nn.Sequential(*blocks)
        self.out_shape = (hidden, h, w)
        self.out_features = hidden * h * w
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()

    def forward_maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def init_head(self, head: nn.Linear) -> None:
        nn.init.xavier_uniform_(head.weight)
        nn.init.zeros_(head.bias)


@register_backbone("conv4")
def conv4(*, in_channels: int, image_size, hidden: int = 64, padding=1, pool_blocks: int = 4,
          depth: int = 4, flatten: bool = True, bn_momentum: float = 0.1) -> Conv4:
    """Conv-4 (64 filters by default); see :class:`Conv4`."""
    return Conv4(in_channels=in_channels, image_size=image_size, hidden=hidden, padding=padding,
                 pool_blocks=pool_blocks, depth=depth, flatten=flatten, bn_momentum=bn_momentum)
