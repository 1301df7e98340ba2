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


# ----------------------------------------------------------------------------- resnet12
def _resnet12_count(c_in, widths):
    # per block: conv1 9*i*o, conv2 and conv3 9*o*o each, shortcut 1x1 i*o, 4 BNs with 2*o each
    total = 0
    for o in widths:
        total += 9 * c_in * o + 2 * 9 * o * o + c_in * o + 4 * 2 * o
        c_in = o
    return total


def test_resnet12_full_width_84():
    net = build_backbone("resnet12", in_channels=3, image_size=84)
    assert count_parameters(net) == _resnet12_count(3, (64, 160, 320, 640)) == 12_424_320  # 76,160 + 564,480 + 2,357,760 + 9,425,920
    assert net.out_shape == (640, 5, 5) and net.out_features == 640
    x = torch.randn(2, 3, 84, 84)
    feats = net(x)
    assert feats.shape == (2, 640)
    net.flatten = False
    maps = net(x)
    assert maps.shape == (2, 640, 5, 5)
    torch.testing.assert_close(feats, maps.mean(dim=(2, 3)))  # global average pooling
    slopes = {m.negative_slope for m in net.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.1}


@pytest.mark.parametrize("size, hw", [(28, 1), (32, 2), (64, 4), (84, 5)])
def test_resnet12_sizes(size, hw):
    # four blocks, each ending in a 2x2 max-pool: floor(n / 16)
    assert hw == size // 16
    widths = (4, 8, 8, 16)  # narrow, to keep the test fast; sizes do not depend on widths
    net = build_backbone("resnet12", in_channels=3, image_size=size, channels=widths, pool="flatten")
    assert net.out_shape == (16, hw, hw) and net.out_features == 16 * hw * hw
    assert net(torch.randn(2, 3, size, size)).shape == (2, 16 * hw * hw)
    with pytest.raises(ConfigError, match="too small"):
        build_backbone("resnet12", in_channels=3, image_size=15, channels=widths)


# ----------------------------------------------------------------------------- torchvision ResNets
def _stem_then_stages(n, drop_maxpool):
    out = lambda n, k, s, p: (n + 2 * p - k) // s + 1  # noqa: E731
    n = out(n, 7, 2, 3)
    if not drop_maxpool:
        n = out(n, 3, 2, 1)
    for _ in range(3):
        n = out(n, 3, 2, 1)
    return n


@pytest.mark.parametrize("size", [28, 32, 64, 84])
def test_resnet18_sizes_and_drop_maxpool(size):
    for drop in (False, True):
        net = build_backbone("resnet18", in_channels=3, image_size=size, drop_maxpool=drop, flatten=False)
        n = _stem_then_stages(size, drop)
        assert net.out_shape == (512, n, n)
        if size == 64:  # the MLTP Tiny ImageNet case: 64 -> 2x2 with the max-pool, 4x4 without
            assert n == (4 if drop else 2)
            assert net(torch.randn(2, 3, 64, 64)).shape == (2, 512, n, n)


def test_resnet_parameter_counts_match_torchvision_without_fc():
    import torchvision

    for depth, fn in ((18, torchvision.models.resnet18), (34, torchvision.models.resnet34)):
        ref = fn(weights=None)
        expected = count_parameters(ref) - (512 * 1000 + 1000)  # minus torchvision's fc
        net = build_backbone(f"resnet{depth}", in_channels=3, image_size=64, drop_maxpool=True)
        assert count_parameters(net) == expected
        assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    assert count_parameters(build_backbone("resnet18", in_channels=3, image_size=64)) == 11_176_512


def test_resnet34_classifier_forward_64_and_kaiming_init():
    net = build_classifier("resnet34", in_channels=3, image_size=64, num_classes=200, drop_maxpool=True)
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 200)
    assert isinstance(net.head, nn.Linear) and net.head.in_features == 512
    # Kaiming-normal, fan_out, ReLU gain: std = sqrt(2 / (C_out * 3 * 3)) for layer3's 256-filter convs
    w = net.backbone.layer3[1].conv1.weight
    assert w.std().item() == pytest.approx(math.sqrt(2.0 / (256 * 9)), rel=0.02)
    # head: Kaiming-normal, fan_in, unit gain: std = 1/sqrt(512)
    assert net.head.weight.std().item() == pytest.approx(1 / math.sqrt(512), rel=0.03)
    assert net.head.bias.abs().max().item() == 0.0


def test_resnet_in_channels_one():
    net = build_backbone("resnet18", in_channels=1, image_size=28)
    assert net.conv1.in_channels == 1
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 512)
    # conv1: Kaiming fan_out = 64 * 7 * 7
    assert net.conv1.weight.std().item() == pytest.approx(math.sqrt(2.0 / (64 * 49)), rel=0.05)
