"""Transfer baseline: base-class training loss, new-head fine-tuning against the closed-form
softmax-regression gradient, body fine-tuning against torch.func, errors, learning."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

from fewshot.errors import ConfigError, TrainingError
from fewshot.learners import get_learner

pytestmark = pytest.mark.usefixtures("one_thread")


def build(tiny_net, num_classes=12, **cfg):
    cls = get_learner("transfer")
    return cls(cls.Config(**cfg), in_channels=1, image_size=8, num_classes=num_classes,
               backbone=tiny_net(1, 8)).double()


def episode(make_episode, seed=0, ways=3):
    ep = make_episode(ways=ways, shots=2, queries=3, noise=1.0, num_base=12,
                      generator=torch.Generator().manual_seed(seed))
    ep.support_x, ep.query_x = ep.support_x.double(), ep.query_x.double()
    return ep


def test_train_step_is_base_class_cross_entropy(tiny_net, make_episode):
    torch.manual_seed(0)
    learner = build(tiny_net)
    eps = [episode(make_episode, s) for s in range(2)]
    x = torch.cat([t for e in eps for t in (e.support_x, e.query_x)])
    y = torch.cat([t for e in eps for t in (e.base_support_y, e.base_query_y)])
    learner.train()
    net = copy.deepcopy(learner.net)
    expected = F.cross_entropy(net(x), y)
    m = learner.train_step(eps)
    torch.testing.assert_close(m["loss"], expected.detach(), rtol=1e-10, atol=1e-12)
    assert m["acc"].dim() == 0
    assert learner.net.head.out_features == 12


def test_head_fine_tuning_equals_softmax_regression(tiny_net, make_episode):
    torch.manual_seed(1)
    learner = build(tiny_net, finetune_steps=5, finetune_lr=0.5)
    learner.train_step([episode(make_episode, 3)])  # running statistics != initial ones
    ep = episode(make_episode, 4)
    learner.eval()
    with torch.no_grad():
        fs = learner.net.backbone(ep.support_x)
        fq = learner.net.backbone(ep.query_x)
    W = torch.zeros(3, fs.shape[1], dtype=torch.float64)
    b = torch.zeros(3, dtype=torch.float64)
    Y = F.one_hot(ep.support_y, 3).double()
    for _ in range(5):  # ∇_W mean CE = (P − Y)ᵀ X / n
        D = torch.softmax(fs @ W.T + b, 1) - Y
        W, b = W - 0.5 * D.T @ fs / len(Y), b - 0.5 * D.mean(0)
    learner.train()
    running = learner.net.backbone.bn.running_mean.clone()
    logits = learner.predict(ep)
    assert learner.training
    assert logits.shape == (9, 3)
    torch.testing.assert_close(logits, fq @ W.T + b, rtol=1e-10, atol=1e-12)
    assert torch.equal(learner.net.backbone.bn.running_mean, running)


def test_body_fine_tuning_equals_torch_func(tiny_net, make_episode):
    torch.manual_seed(2)
    learner = build(tiny_net, finetune_steps=3, finetune_lr=0.25, finetune_body=True)
    learner.train_step([episode(make_episode, 5)])
    ep = episode(make_episode, 6, ways=4)
    body = copy.deepcopy(learner.net.backbone).eval()  # running BatchNorm statistics
    params = {f"b.{k}": v.detach().clone() for k, v in body.named_parameters()}
    params["W"] = torch.zeros(4, body.out_features, dtype=torch.float64)
    params["c"] = torch.zeros(4, dtype=torch.float64)
    buffers = {k: v.clone() for k, v in body.named_buffers()}

    def run(p, x):
        feats = functional_call(body, ({k[2:]: v for k, v in p.items() if k.startswith("b.")},
                                       buffers), (x,))
        return feats @ p["W"].T + p["c"]

    for _ in range(3):
        g = grad(lambda p: F.cross_entropy(run(p, ep.support_x), ep.support_y))(params)
        params = {k: params[k] - 0.25 * g[k] for k in params}
    before = {k: v.detach().clone() for k, v in learner.named_parameters()}
    logits = learner.predict(ep)
    torch.testing.assert_close(logits, run(params, ep.query_x), rtol=1e-10, atol=1e-12)
    for k, v in learner.named_parameters():  # the learner's own weights are untouched
        assert torch.equal(v.detach(), before[k])


def test_errors(tiny_net, make_episode):
    cls = get_learner("transfer")
    for bad, match in [({"finetune_steps": -1}, "finetune_steps"), ({"finetune_lr": 0}, "finetune_lr"),
                       ({"finetune_body": "yes"}, "finetune_body")]:
        with pytest.raises(ConfigError, match=match):
            cls.Config(**bad).validate()
    with pytest.raises(ConfigError, match="num_classes"):
        cls(in_channels=1, image_size=8, backbone=tiny_net(1, 8))
    learner = build(tiny_net, num_classes=5)
    with pytest.raises(ConfigError, match="num_classes=5"):
        learner.train_step([episode(make_episode, 7)])  # ids up to 11
    learner = build(tiny_net)
    ep = episode(make_episode, 8)
    ep.base_query_y = None
    with pytest.raises(ConfigError, match="base_support_y/base_query_y"):
        learner.train_step([ep])
    ep = episode(make_episode, 9)
    ep.query_x[0] = float("inf")
    with pytest.raises(TrainingError, match="step 0"):
        learner.train_step([ep])


@pytest.mark.slow
def test_learns_glyphs(learn_glyphs):
    torch.manual_seed(0)
    cls = get_learner("transfer")
    learner = cls(cls.Config(lr=3e-3, finetune_steps=50, finetune_lr=0.1,
                             backbone_options={"hidden": 16}),
                  in_channels=1, image_size=28, num_classes=100)
    before, after = learn_glyphs(learner, steps=100, meta_batch=2)
    # 5-way 1-shot: chance 0.2; 0.38 untrained, 0.62 after 100 steps (measured, torch 2.14
    # CPU); half the measured gain is kept as margin for other torch versions and devices
    assert after - before > 0.12, (before, after)


def test_autocast_step_close_to_float32(tiny_net, make_episode, steps_agree_under_autocast):
    torch.manual_seed(0)
    cls = get_learner("transfer")
    assert cls.supports_autocast
    learner = cls(cls.Config(finetune_steps=5), in_channels=1, image_size=8, num_classes=12,
                  backbone=tiny_net(1, 8))
    ep = make_episode(ways=3, shots=2, queries=3, noise=1.0, num_base=12)
    steps_agree_under_autocast(learner, [ep])
