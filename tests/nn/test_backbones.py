"""Backbones, the MLTP paper's classifiers and the relation module: shapes, parameter counts
computed by hand from the papers' descriptions, initialisation statistics and errors."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fewshot.errors import ConfigError
from fewshot.nn import build_backbone, build_classifier, count_parameters, layer_kind


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- conv4
@pytest.mark.parametrize(
    "size, channels, maps",
    [(28, 1, (64, 1, 1)), (32, 3, (64, 2, 2)), (64, 3, (64, 4, 4)), (84, 3, (64, 5, 5))],
)
def test_conv4_shapes(size, channels, maps):
    # each block: 3x3 conv with padding 1 keeps n, the 2x2 max-pool gives floor(n/2); four times.
    n = size
    for _ in range(4):
        n //= 2
    assert maps == (64, n, n)
    net = build_backbone("conv4", in_channels=channels, image_size=size)
    x = torch.randn(2, channels, size, size)
    assert net.out_features == 64 * n * n
    assert net(x).shape == (2, 64 * n * n)
    net_maps = build_backbone("conv4", in_channels=channels, image_size=size, flatten=False)
    assert net_maps.out_shape == maps
    assert net_maps(x).shape == (2, *maps)


def test_conv4_parameter_count_and_hidden():
    # conv l: 9*c_in*h + h weights+bias, BN: 2h; c_in = 3 then h.
    for h in (64, 32):
        expected = (9 * 3 * h + h + 2 * h) + 3 * (9 * h * h + h + 2 * h)
        net = build_backbone("conv4", in_channels=3, image_size=84, hidden=h)
        assert count_parameters(net) == expected
    assert count_parameters(build_backbone("conv4", in_channels=3, image_size=84)) == 113_088


def test_conv4_relationnet_embedding_pools_only_first_two_blocks():
    # L2G: "the max-pooling layers of the latter two blocks are removed": 84 -> 42 -> 21 -> 21 -> 21
    net = build_backbone("conv4", in_channels=3, image_size=84, pool_blocks=2, flatten=False)
    assert net.out_shape == (64, 21, 21)
    assert net(torch.randn(1, 3, 84, 84)).shape == (1, 64, 21, 21)
    # Sung et al.'s paddings 0,0,1,1 on Omniglot: 28 -> 26 -> 13 -> 11 -> 5 -> 5 -> 5
    net = build_backbone("conv4", in_channels=1, image_size=28, pool_blocks=2, padding=[0, 0, 1, 1],
                         flatten=False)
    assert net.out_shape == (64, 5, 5)


def test_conv4_xavier_init_statistics():
    net = build_backbone("conv4", in_channels=3, image_size=84, hidden=64)
    conv = [m for m in net.modules() if isinstance(m, nn.Conv2d)][1]
    fan_in, fan_out = 64 * 9, 64 * 9
    std = math.sqrt(2.0 / (fan_in + fan_out))
    assert conv.weight.std().item() == pytest.approx(std, rel=0.03)
    assert conv.weight.abs().max().item() <= math.sqrt(3) * std + 1e-6  # uniform(-a, a), a = sqrt(3)*std
    assert conv.bias.abs().max().item() == 0.0


def test_conv4_errors():
    with pytest.raises(ConfigError, match="Did you mean 'conv4'"):
        build_backbone("conv5", in_channels=1, image_size=28)
    with pytest.raises(ConfigError, match="too small"):
        build_backbone("conv4", in_channels=1, image_size=8)  # 8 -> 4 -> 2 -> 1 -> 0
    build_backbone("conv4", in_channels=1, image_size=16)  # 16 -> 1: the smallest that fits
    with pytest.raises(ConfigError, match="Did you mean 'hidden'"):
        build_backbone("conv4", in_channels=1, image_size=28, hiden=32)
    net = build_backbone("conv4", in_channels=1, image_size=28)
    with pytest.raises(ConfigError, match=r"expected input of shape \(batch, 1, 28, 28\), got \(2, 3, 28, 28\)"):
        net(torch.randn(2, 3, 28, 28))
    with pytest.raises(ConfigError, match="got \\(2, 1, 32, 32\\)"):
        net(torch.randn(2, 1, 32, 32))


def test_classifier_on_backbone_has_linear_head():
    net = build_classifier("conv4", in_channels=1, image_size=28, num_classes=5)
    assert isinstance(net.head, nn.Linear) and net.head.out_features == 5 and net.head.in_features == 64
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 5)
    kinds = {layer_kind(m) for m in net.modules()} - {None}
    assert kinds == {"conv", "fc", "norm"}
    with pytest.raises(ConfigError, match="flatten=False"):
        build_classifier("conv4", in_channels=1, image_size=28, num_classes=5, flatten=False)
