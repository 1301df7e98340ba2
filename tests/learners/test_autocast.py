"""Learners that declare ``supports_autocast``: under bf16 autocast their training step keeps a
float32 loss, their gradients point where the float32 ones do, and their predictions stay
close to float32's (bf16 keeps ~3 significant digits)."""
import copy

import pytest
import torch
from torch import nn

from fewshot.data.supervised import TaskPairBatch
from fewshot.learners import get_learner

pytestmark = pytest.mark.usefixtures("one_thread")


class Maps(nn.Module):
    """conv3x3(8) - BN - ReLU - maxpool2: (B, 8, 4, 4) feature maps for 8x8 input."""

    flatten = False
    out_shape = (8, 4, 4)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)


def grads(learner):
    return torch.cat([p.grad.flatten() for p in learner.parameters() if p.grad is not None])


def step_both_ways(learner, batch):
    """(float32 metrics, grads), (bf16-autocast metrics, grads) of one step from the same weights."""
    twin = copy.deepcopy(learner)
    full = learner.train_step(batch)
    g_full = grads(learner)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = twin.train_step(batch)
    return (full, g_full), (low, grads(twin))


def assert_close_step(full, low):
    (m_full, g_full), (m_low, g_low) = full, low
    assert m_low["loss"].dtype == torch.float32
    assert torch.isfinite(m_low["loss"])
    assert abs(float(m_low["loss"]) - float(m_full["loss"])) < 0.05 * max(1.0, abs(float(m_full["loss"])))
    cos = torch.nn.functional.cosine_similarity(g_full, g_low.float(), dim=0)
    assert cos > 0.98, float(cos)


def test_relationnet(make_episode):
    torch.manual_seed(0)
    cls = get_learner("relationnet")
    assert cls.supports_autocast
    learner = cls(cls.Config(grad_clip=0), in_channels=1, image_size=8, backbone=Maps())
    ep = make_episode(ways=3, shots=2, queries=3, noise=1.0)
    assert_close_step(*step_both_ways(learner, [ep]))
    learner.eval()
    full = learner.predict(ep)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = learner.predict(ep)
    torch.testing.assert_close(low.float(), full, rtol=0.05, atol=0.02)


def test_transfer(tiny_net, make_episode):
    torch.manual_seed(0)
    cls = get_learner("transfer")
    assert cls.supports_autocast
    learner = cls(cls.Config(finetune_steps=5), in_channels=1, image_size=8, num_classes=12,
                  backbone=tiny_net(1, 8))
    ep = make_episode(ways=3, shots=2, queries=3, noise=1.0, num_base=12)
    assert_close_step(*step_both_ways(learner, [ep]))
    learner.eval()
    full = learner.predict(ep)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = learner.predict(ep)
    assert torch.equal(low.argmax(-1), full.argmax(-1)) or \
        (low.float() - full).abs().max() < 0.05 * full.abs().max()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.out_features = 4 * 4 * 4

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))).flatten(1)


def test_standard():
    torch.manual_seed(0)
    cls = get_learner("standard")
    assert cls.supports_autocast
    learner = cls(cls.Config(lr=0.01), in_channels=1, image_size=4, num_classes=5, backbone=Net())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1, 4, 4, generator=g)
    y = torch.randint(0, 5, (16,), generator=g)
    assert_close_step(*step_both_ways(learner, TaskPairBatch(x[:8], y[:8], x[8:], y[8:])))


@pytest.mark.parametrize("name", ["maml", "mltp", "l2g+protonet", "mtl+maml"])
def test_second_order_learners_refuse_autocast(name):
    assert not get_learner(name).supports_autocast
