"""Our MAML / first-order MAML / Meta-SGD meta-gradients equal learn2learn's on the same
model, data and initial weights (Conv-4 with BatchNorm in batch-statistics mode)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fewshot.data.episodes import Episode
from fewshot.learners import get_learner

l2l = pytest.importorskip("learn2learn", reason="learn2learn is not importable "
                          "(scripts/install_learn2learn.sh builds it)")

pytestmark = pytest.mark.peers


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tasks(n=2, ways=3, shots=2, queries=2, size=16):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        means = torch.randn(ways, 1, size, size, generator=g, dtype=torch.float64)
        sy = torch.arange(ways).repeat_interleave(shots)
        qy = torch.arange(ways).repeat_interleave(queries)
        sx = means[sy] + torch.randn(len(sy), 1, size, size, generator=g, dtype=torch.float64)
        qx = means[qy] + torch.randn(len(qy), 1, size, size, generator=g, dtype=torch.float64)
        out.append(Episode(sx, sy, qx, qy, torch.arange(ways)))
    return out


def ours_and_peer(name, **cfg):
    torch.manual_seed(0)
    cls = get_learner(name)
    learner = cls(cls.Config(ways=3, backbone_options={"hidden": 4}, **cfg), in_channels=1,
                  image_size=16).double()
    peer_net = copy.deepcopy(learner.net)
    return learner, peer_net


def our_meta_grad(learner, eps):
    learner.zero_grad(set_to_none=True)
    learner.train()
    for ep in eps:
        loss, _ = learner.task_loss(ep)
        (loss / len(eps)).backward()
    return [p.grad.clone() for p in learner.net.parameters()]


def peer_meta_grad(meta, eps, steps):
    meta.train()
    meta.zero_grad(set_to_none=True)
    for ep in eps:
        fast = meta.clone()
        for _ in range(steps):
            fast.adapt(F.cross_entropy(fast(ep.support_x), ep.support_y))
        (F.cross_entropy(fast(ep.query_x), ep.query_y) / len(eps)).backward()


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_meta_gradient_equals_learn2learn(first_order):
    name = "fomaml" if first_order else "maml"
    learner, peer_net = ours_and_peer(name, inner_steps=2, inner_lr=0.25)
    eps = tasks()
    ours = our_meta_grad(learner, eps)
    meta = l2l.algorithms.MAML(peer_net, lr=0.25, first_order=first_order)
    peer_meta_grad(meta, eps, 2)
    theirs = [p.grad for p in peer_net.parameters()]
    assert len(ours) == len(theirs) == 18  # 4 x (conv w, b, BN w, b) + head (w, b)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # and the train step applies exactly this gradient with Adam
    before = [p.detach().clone() for p in learner.net.parameters()]
    learner.train_step(eps)
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(learner.net.parameters(), before))
    assert moved == pytest.approx(learner.config.lr, rel=1e-3)  # Adam's first step: lr·sign(g)


def test_meta_sgd_gradient_equals_learn2learn():
    """Learnable per-tensor α (Meta-SGD) against l2l.MetaSGD's per-element lrs.

    At equal initial α, l2l's gradient for a per-element α, summed over the tensor, is the
    gradient for our one α per tensor.
    """
    learner, peer_net = ours_and_peer("maml", inner_steps=1, inner_lr=0.125, learn_inner_lr=True)
    eps = tasks()
    learner.zero_grad(set_to_none=True)
    learner.train()
    for ep in eps:
        loss, _ = learner.task_loss(ep)
        (loss / len(eps)).backward()
    meta = l2l.algorithms.MetaSGD(peer_net, lr=0.125).double()
    peer_meta_grad(meta, eps, 1)
    for a, b in zip(learner.net.parameters(), peer_net.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)
    ours_alpha = learner.loop.alpha.grad
    theirs_alpha = torch.stack([lr.grad.sum() for lr in meta.lrs])
    torch.testing.assert_close(ours_alpha, theirs_alpha, rtol=1e-9, atol=1e-12)
