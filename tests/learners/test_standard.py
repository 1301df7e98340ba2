"""Standard supervised training (MLTP's baseline, eq. 1): steps, schedule, resume, top-k, errors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot.errors import ConfigError, TrainingError
from fewshot.learners import get_learner
from fewshot.learners.standard import topk_correct

from fewshot.data.supervised import TaskPairBatch

pytestmark = pytest.mark.usefixtures("one_thread")  # small convolutions on a shared 2-core machine

CLASSES = 5


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.out_features = 4 * 4 * 4

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))).flatten(1)


def make(**cfg):
    cls = get_learner("standard")
    return cls(cls.Config(**cfg), in_channels=1, image_size=4, num_classes=CLASSES, backbone=Net())


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, 1, 4, 4, generator=g)
    y = torch.randint(0, CLASSES, (2 * n,), generator=g)
    return TaskPairBatch(x[:n], y[:n], x[n:], y[n:])


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_steps_equal_plain_torch_on_the_whole_minibatch(optimizer):
    torch.manual_seed(0)
    learner = make(lr=0.05, optimizer=optimizer, momentum=0.9, weight_decay=1e-3)
    ref = copy.deepcopy(learner.model)
    opt = (torch.optim.Adam(ref.parameters(), lr=0.05, weight_decay=1e-3) if optimizer == "adam"
           else torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3))
    for s in range(3):
        b = batch(seed=s)
        out = learner.train_step(b)
        x, y = torch.cat([b.x_i, b.x_j]), torch.cat([b.y_i, b.y_j])
        opt.zero_grad()
        loss = F.cross_entropy(ref(x), y)
        loss.backward()
        opt.step()
        assert torch.equal(out["loss"], loss.detach())
        for p, q in zip(learner.model.parameters(), ref.parameters()):
            assert torch.equal(p, q)
    for a, c in zip(learner.model.buffers(), ref.buffers()):  # BN statistics: one update per step
        assert torch.equal(a, c)


def test_checkpoint_resume_continues_identically():
    torch.manual_seed(1)
    learner = make(lr=0.1, optimizer="sgd", momentum=0.9)
    for s in range(2):
        learner.train_step(batch(seed=s))
    state = copy.deepcopy(learner.state_dict())
    for s in range(2, 4):
        learner.train_step(batch(seed=s))
    resumed = make(lr=0.1, optimizer="sgd", momentum=0.9)
    resumed.load_state_dict(state)
    assert resumed.steps_done == 2
    for s in range(2, 4):
        resumed.train_step(batch(seed=s))
    for p, q in zip(learner.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)  # momentum buffers restored too


def test_topk_correct_against_brute_force():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(50, 7, generator=g)
    y = torch.randint(0, 7, (50,), generator=g)
    got = topk_correct(logits, y, ks=(1, 3, 9))
    rank = (logits > logits.gather(1, y[:, None])).sum(1)  # classes scored above the label
    assert int(got[1]) == int((rank < 1).sum())
    assert int(got[3]) == int((rank < 3).sum())
    assert int(got[9]) == 50  # k above the number of classes


def test_errors():
    torch.manual_seed(3)
    with pytest.raises(ConfigError, match="'optimizer' must be one of adam, sgd"):
        make(optimizer="rmsprop")
    with pytest.raises(ConfigError, match="'momentum' must lie in"):
        make(optimizer="sgd", momentum=1.5)
    learner = make()
    b = batch()
    with pytest.raises(ConfigError, match=r"task_i images must be \(B, 1, H, W\)"):
        learner.train_step(TaskPairBatch(b.x_i.repeat(1, 3, 1, 1), b.y_i, b.x_j, b.y_j))
    with pytest.raises(TrainingError, match="non-finite loss"):
        learner.train_step(TaskPairBatch(b.x_i * float("inf"), b.y_i, b.x_j, b.y_j))
    with pytest.raises(ConfigError, match="predict_batch"):
        learner.predict(None)
    with pytest.raises(ConfigError, match="TaskPairBatch"):
        learner.train_step((b.x_i, b.y_i))


def test_autocast_step_close_to_float32(steps_agree_under_autocast):
    torch.manual_seed(0)
    assert get_learner("standard").supports_autocast
    steps_agree_under_autocast(make(lr=0.01), batch(n=8, seed=1))
