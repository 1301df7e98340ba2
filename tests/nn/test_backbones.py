"""Backbones, the MLTP paper's classifiers and the relation module: shapes, parameter counts
computed by hand from the papers' descriptions, initialisation statistics and errors."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fewshot.errors import ConfigError
from fewshot.nn import (
    RelationModule,
    build_backbone,
    build_classifier,
    count_parameters,
    layer_kind,
    list_backbones,
    list_classifiers,
)
from fewshot.nn.cnet import ARCHITECTURES


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # small networks: one intra-op thread is faster than two on a shared 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


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


def test_resnet12_full_width():
    with torch.device("meta"):  # shapes and counts without the cost of initialising 12M weights
        net = build_backbone("resnet12", in_channels=3, image_size=84)
        assert count_parameters(net) == _resnet12_count(3, (64, 160, 320, 640)) == 12_424_320
        # 76,160 + 564,480 + 2,357,760 + 9,425,920 (blocks 1..4)
        assert net.out_shape == (640, 5, 5) and net.out_features == 640
        assert net(torch.empty(2, 3, 84, 84)).shape == (2, 640)
    net = build_backbone("resnet12", in_channels=3, image_size=32)
    x = torch.randn(2, 3, 32, 32)
    feats = net(x)
    assert feats.shape == (2, 640)
    net.flatten = False
    maps = net(x)
    assert maps.shape == (2, 640, 2, 2)
    torch.testing.assert_close(feats, maps.mean(dim=(2, 3)))  # global average pooling
    slopes = {m.negative_slope for m in net.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.1}
    # Kaiming-normal, fan_out, leaky-ReLU gain sqrt(2/(1+0.1^2)): block 4's conv2 has 640*9 fan_out
    w = net.blocks[3].conv2.weight
    assert w.std().item() == pytest.approx(math.sqrt(2.0 / 1.01) / math.sqrt(640 * 9), rel=0.02)


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
        with torch.device("meta"):
            net = build_backbone("resnet18", in_channels=3, image_size=size, drop_maxpool=drop, flatten=False)
            n = _stem_then_stages(size, drop)
            assert net.out_shape == (512, n, n)
            assert net(torch.empty(2, 3, size, size)).shape == (2, 512, n, n)
        if size == 64:  # the MLTP Tiny ImageNet case: 64 -> 2x2 with the max-pool, 4x4 without
            assert n == (4 if drop else 2)


def test_resnet_parameter_counts_match_torchvision_without_fc():
    import torchvision

    for depth, fn in ((18, torchvision.models.resnet18), (34, torchvision.models.resnet34)):
        with torch.device("meta"):
            ref = fn(weights=None)
            expected = count_parameters(ref) - (512 * 1000 + 1000)  # minus torchvision's fc
            net = build_backbone(f"resnet{depth}", in_channels=3, image_size=64, drop_maxpool=True)
            assert count_parameters(net) == expected
            assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
            assert any(isinstance(m, nn.MaxPool2d) for m in ref.modules())
    with torch.device("meta"):
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


# ----------------------------------------------------------------------------- MLTP CNet / CCNet
# Hand counts from sec. IV of Deng & Zhang (ICPR 2020), 32x32 RGB, 3x3 'same' convs, 2x2 max-pools.
# Conv(c_out, 3) on c_in channels: 9*c_in*c_out + c_out. Fc(m) on d inputs: d*m + m.
def _conv(c_in, c_out):
    return 9 * c_in * c_out + c_out


def _fc(d, m):
    return d * m + m


HAND_COUNTS = {
    # CNet1: Conv(256,3) + MP (32 -> 16) + Fc(512) + Softmax(n)
    1: lambda n: _conv(3, 256) + _fc(256 * 16 * 16, 512) + _fc(512, n),
    # CNet2: Conv(128,3) + Conv(128,3) + MP (-> 16) + Fc(256) + Softmax(n)
    2: lambda n: _conv(3, 128) + _conv(128, 128) + _fc(128 * 16 * 16, 256) + _fc(256, n),
    # CNet3: CNet2 + a second Fc(256)
    3: lambda n: _conv(3, 128) + _conv(128, 128) + _fc(128 * 16 * 16, 256) + _fc(256, 256) + _fc(256, n),
    # CNet4: 2x Conv(128) MP 2x Conv(256) MP 2x Conv(512) MP (32 -> 4) Fc(1024) Softmax(n)
    4: lambda n: (_conv(3, 128) + _conv(128, 128) + _conv(128, 256) + _conv(256, 256) + _conv(256, 512)
                  + _conv(512, 512) + _fc(512 * 4 * 4, 1024) + _fc(1024, n)),
}


def test_cnet_hand_counts_written_out():
    # CNet1: 7,168 + 33,554,944 + 5,130 ; CNet4: 4,576,384 conv + 8,389,632 + 10,250
    assert HAND_COUNTS[1](10) == 7_168 + 33_554_944 + 5_130 == 33_567_242
    assert HAND_COUNTS[2](10) == 3_584 + 147_584 + 8_388_864 + 2_570 == 8_542_602
    assert HAND_COUNTS[3](10) == 8_542_602 + 65_792 == 8_608_394
    assert HAND_COUNTS[4](10) == 4_576_384 + 8_389_632 + 10_250 == 12_976_266


@pytest.mark.parametrize("variant", [1, 2, 3, 4])
def test_cnet_and_ccnet_parameter_counts_and_layers(variant):
    # CIFAR-10 nets with 10 outputs, CIFAR-100 nets with 100 outputs (Softmax(10) / Softmax(100))
    with torch.device("meta"):  # counts and layers without initialising up to 33M weights
        for prefix, n in (("cnet", 10), ("ccnet", 100)):
            net = build_classifier(f"{prefix}{variant}", in_channels=3, image_size=32, num_classes=n)
            assert count_parameters(net) == HAND_COUNTS[variant](n)
            assert net.head.out_features == n
            assert net(torch.empty(2, 3, 32, 32)).shape == (2, n)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.kernel_size == (3, 3) and m.padding == (1, 1) for m in convs)
    assert len(convs) == {1: 1, 2: 2, 3: 2, 4: 6}[variant]
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == (3 if variant == 4 else 1)
    assert sum(isinstance(m, nn.ReLU) for m in net.modules()) == len(convs) + len(ARCHITECTURES[variant][1])
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in net.modules())
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert linears[-1] is net.head  # the paper's Softmax(n) layer is the last Linear, named head


def test_cnet4_forward_on_cpu():
    net = build_classifier("cnet4", in_channels=3, image_size=32, num_classes=10)
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and bool(torch.isfinite(out).all())
    assert net.out_shape == (512, 4, 4)  # three 2x2 max-pools: 32 -> 4


def test_cnet_xavier_init_statistics():
    net = build_classifier("cnet2", in_channels=3, image_size=32, num_classes=10)
    conv2 = net.features[2]  # Conv(128, 3) on 128 channels: fan_in = fan_out = 128*9
    assert isinstance(conv2, nn.Conv2d) and conv2.in_channels == 128
    std = math.sqrt(2.0 / (128 * 9 + 128 * 9))
    assert conv2.weight.std().item() == pytest.approx(std, rel=0.02)
    fc = net.hidden[0]  # Fc(256) on 32768 inputs
    std = math.sqrt(2.0 / (32_768 + 256))
    assert fc.weight.std().item() == pytest.approx(std, rel=0.01)
    assert fc.weight.abs().max().item() <= math.sqrt(3.0) * std * (1 + 1e-6)  # uniform(-a, a)
    assert all(m.bias.abs().max().item() == 0.0 for m in (conv2, fc, net.head))


def test_cnet_options_and_errors():
    net = build_classifier("cnet3", in_channels=3, image_size=32, num_classes=10, batch_norm=True, dropout=0.5)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 2
    assert sum(isinstance(m, nn.Dropout) for m in net.modules()) == 2
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    assert net.forward_features(x).shape == (2, 256)
    with pytest.raises(ConfigError, match="dropout"):
        build_classifier("cnet1", in_channels=3, image_size=32, num_classes=10, dropout=1.5)
    with pytest.raises(ConfigError, match="too small"):
        build_classifier("cnet4", in_channels=3, image_size=4, num_classes=10)  # 4 -> 2 -> 1 -> 0
    with pytest.raises(ConfigError, match="Did you mean 'cnet4'"):
        build_classifier("cnet5", in_channels=3, image_size=32, num_classes=10)
    with pytest.raises(ConfigError, match="Did you mean 'dropout'"):
        build_classifier("cnet1", in_channels=3, image_size=32, num_classes=10, droput=0.1)
    with pytest.raises(ConfigError, match=r"\(batch, 3, 32, 32\), got \(2, 3, 28, 28\)"):
        net(torch.randn(2, 3, 28, 28))
    with pytest.raises(ConfigError, match="num_classes"):
        build_classifier("cnet1", in_channels=3, image_size=32, num_classes=0)


# ----------------------------------------------------------------------------- relation module
@pytest.mark.parametrize(
    "size, channels, pool_blocks, padding, fc_in",
    [
        # L2G RelationNet embedding on 84x84: 64x21x21; unpadded: 21 -> 19 -> 9 -> 7 -> 3; 64*3*3
        (84, 3, 2, 0, 576),
        # Conv-4 on 84x84: 64x5x5; unpadded would vanish (5 -> 3 -> 1 -> -1), padded: 5 -> 2 -> 1
        (84, 3, 4, 1, 64),
        # Omniglot with two pools: 64x7x7; padded: 7 -> 3 -> 1
        (28, 1, 2, 1, 64),
        # Omniglot Conv-4: 64x1x1; padded convs keep 1x1, the pools are skipped
        (28, 1, 4, 1, 64),
    ],
)
def test_relation_module_sizes_and_range(size, channels, pool_blocks, padding, fc_in):
    emb = build_backbone("conv4", in_channels=channels, image_size=size, pool_blocks=pool_blocks, flatten=False)
    rel = RelationModule.for_backbone(emb, hidden=8)
    assert rel.padding == padding and rel.fc1.in_features == fc_in and rel.fc1.out_features == 8
    assert rel.in_shape == (128, *emb.out_shape[1:])
    feats = emb(torch.randn(7, channels, size, size))
    scores = rel.pairwise(feats[:5], feats)  # 5 prototypes, 7 queries
    assert scores.shape == (7, 5)
    assert bool(((scores > 0) & (scores < 1)).all())
    # pairwise(c, m) is the score of concat(prototype c, query m) (eval: BN without batch statistics)
    rel.eval()
    scores = rel.pairwise(feats[:5], feats)
    direct = rel(torch.cat([feats[2:3], feats[4:5]], dim=1))
    torch.testing.assert_close(scores[4, 2:3], direct)


def test_relation_module_sigmoid_of_fc2():
    rel = RelationModule(128, 8, feature_size=5)
    with torch.no_grad():
        rel.fc2.bias.fill_(50.0)
    rel.eval()
    pairs = torch.randn(3, 128, 5, 5)
    # with a large bias s = sigmoid(w.h + 50) is at the top of (0, 1)
    assert torch.allclose(rel(pairs), torch.ones(3), atol=1e-6)
    with torch.no_grad():
        rel.fc2.bias.fill_(0.0)
        rel.fc2.weight.zero_()
    torch.testing.assert_close(rel(pairs), torch.full((3,), 0.5))  # sigmoid(0)


def test_relation_module_errors():
    with pytest.raises(ConfigError, match="feature_size"):
        RelationModule(128, 8)
    with pytest.raises(ConfigError, match="flatten=False"):
        RelationModule.for_backbone(build_backbone("conv4", in_channels=1, image_size=28))
    with pytest.raises(ConfigError, match="vanish"):
        RelationModule(128, 8, feature_size=3, padding=0)  # 3 -> 1 -> 1 -> -1
    rel = RelationModule(128, 8, feature_size=5)
    with pytest.raises(ConfigError, match=r"\(batch, 128, 5, 5\), got \(2, 64, 5, 5\)"):
        rel(torch.randn(2, 64, 5, 5))


# ----------------------------------------------------------------------------- misc
def test_layer_kind_and_count_parameters():
    assert layer_kind(nn.Conv2d(1, 2, 3)) == "conv"
    assert layer_kind(nn.Linear(2, 3)) == "fc"
    assert layer_kind(nn.BatchNorm2d(3)) == "norm"
    assert layer_kind(nn.ReLU()) is None
    lin = nn.Linear(4, 3)
    lin.bias.requires_grad_(False)
    assert count_parameters(lin) == 15 and count_parameters(lin, trainable_only=True) == 12


def test_unknown_names_and_bad_sizes():
    with pytest.raises(ConfigError, match="unknown backbone 'resnet19'"):
        build_backbone("resnet19", in_channels=3, image_size=32)
    with pytest.raises(ConfigError, match="unknown classifier 'cnet'"):
        build_classifier("cnet", in_channels=3, image_size=32, num_classes=10)
    with pytest.raises(ConfigError, match="image_size"):
        build_backbone("conv4", in_channels=3, image_size=(32,))
    with pytest.raises(ConfigError, match="in_channels"):
        build_backbone("conv4", in_channels=0, image_size=32)
    with pytest.raises(ConfigError, match="'drop_maxpool' must be true or false"):
        build_backbone("resnet18", in_channels=3, image_size=64, drop_maxpool="yes")
    with pytest.raises(ConfigError, match="Did you mean 'drop_maxpool'"):
        build_backbone("resnet34", in_channels=3, image_size=64, drop_max_pool=True)
    assert set(list_backbones()) >= {"conv4", "resnet12", "resnet18", "resnet34"}
    assert set(list_classifiers()) >= {f"{p}{i}" for p in ("cnet", "ccnet") for i in range(1, 5)}


def test_functional_call_with_higher_matches_module():
    # the shared inner loop runs models through higher.monkeypatch: shape checks and names survive
    higher = pytest.importorskip("higher")
    net = build_classifier("conv4", in_channels=1, image_size=28, num_classes=5)
    x = torch.randn(4, 1, 28, 28)
    fnet = higher.patch.monkeypatch(net, copy_initial_weights=True, track_higher_grads=False)
    torch.testing.assert_close(fnet(x), net(x))
    params = [p + 1.0 if n == "head.bias" else p for n, p in net.named_parameters()]
    torch.testing.assert_close(fnet(x, params=params), net(x) + 1.0)
    with pytest.raises(ConfigError, match="expected input"):
        fnet(torch.randn(4, 3, 28, 28))


@pytest.mark.peers
def test_conv4_matches_learn2learn_cnn4():
    # learn2learn's CNN4 (MAML's 4-conv net): same layers, so with the same weights the same logits
    l2l_models = pytest.importorskip("learn2learn.vision.models")
    ours = build_classifier("conv4", in_channels=3, image_size=84, num_classes=5)
    peer = l2l_models.CNN4(output_size=5, hidden_size=64, layers=4, channels=3)
    assert count_parameters(ours) == count_parameters(peer) == 113_088 + 1600 * 5 + 5
    for kind in (nn.Conv2d, nn.BatchNorm2d, nn.Linear):
        mine = [m for m in ours.modules() if isinstance(m, kind)]
        theirs = [m for m in peer.modules() if isinstance(m, kind)]
        assert len(mine) == len(theirs)
        for a, b in zip(mine, theirs):
            b.load_state_dict(a.state_dict())
    x = torch.randn(6, 3, 84, 84)
    torch.testing.assert_close(ours(x), peer(x))  # training mode: batch statistics
    ours.eval(), peer.eval()
    torch.testing.assert_close(ours(x), peer(x))  # eval: the running statistics both just updated
