"""Transductive inference (issue 15 item 6): BD-CSPN and TIM-GD against hand-written references
on fixed features, the metric-learner interface, the ConfigError and the report flag."""
import copy

import numpy as np
import pytest
import torch

from fewshot.errors import ConfigError
from fewshot.learners import get_learner
from fewshot.learners.common import prototypes, squared_euclidean_logits
from fewshot.report import CellResult, GridResult
from fewshot.transductive import bd_cspn, check_inference, metric_learners, predict, tim_gd

pytestmark = pytest.mark.usefixtures("one_thread")


def fixed_features(ways=3, shots=2, queries=4, dim=5, seed=0):
    g = np.random.default_rng(seed)
    centres = g.normal(size=(ways, dim)) * 2
    sy = np.repeat(np.arange(ways), shots)
    qy = np.repeat(np.arange(ways), queries)
    fs = centres[sy] + g.normal(size=(len(sy), dim)) + 0.5
    fq = centres[qy] + g.normal(size=(len(qy), dim)) - 0.5  # a support/query shift to remove
    return fs, sy, fq, qy


def _cos(a, b):
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


def bd_cspn_reference(fs, sy, fq, ways, eps=10.0, top_z=None):
    """Liu et al. 2020 sec. 3.2 as loops: shift queries by ξ, pseudo-label by cosine to the
    basic prototypes, top-Z per class, softmax(ε cos) weights within each class."""
    fq = fq + (fs.mean(0) - fq.mean(0))
    basic = np.stack([fs[sy == n].mean(0) for n in range(ways)])
    pseudo = [int(np.argmax([_cos(q, p) for p in basic])) for q in fq]
    rect = []
    for n in range(ways):
        mine = [i for i in range(len(fq)) if pseudo[i] == n]
        mine = sorted(mine, key=lambda i: -_cos(fq[i], basic[n]))
        if top_z is not None:
            mine = mine[:top_z]
        members = [x for x in fs[sy == n]] + [fq[i] for i in mine]
        e = np.array([np.exp(eps * _cos(x, basic[n])) for x in members])
        rect.append(sum(w * x for w, x in zip(e / e.sum(), members)))
    rect = np.stack(rect)
    return np.array([[-((q - p) ** 2).sum() for p in rect] for q in fq])


@pytest.mark.parametrize("top_z", [None, 1, 2])
def test_bd_cspn_equals_the_papers_loops(top_z):
    fs, sy, fq, _ = fixed_features()
    want = bd_cspn_reference(fs, sy, fq, 3, top_z=top_z)
    got = bd_cspn(torch.from_numpy(fs), torch.from_numpy(sy), torch.from_numpy(fq), 3,
                  squared_euclidean_logits, top_z=top_z)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)


def tim_reference(fs, sy, fq, ways, iters, lr, temp=15.0, weights=(0.1, 1.0, 0.1)):
    """TIM-GD from the paper's equations with a hand-written Adam (β = 0.9, 0.999, ε = 1e-8):
    z/‖z‖, W at the support means, p ∝ exp(−T/2 ‖z − w‖²),
    loss = λ CE − (H(Ŷ) − α H(Ŷ|X)) in their code's form (log(p + 1e-12))."""
    zs = torch.from_numpy(fs / np.linalg.norm(fs, axis=1, keepdims=True))
    zq = torch.from_numpy(fq / np.linalg.norm(fq, axis=1, keepdims=True))
    w = torch.stack([zs[torch.from_numpy(sy) == k].mean(0) for k in range(ways)])
    m, v = torch.zeros_like(w), torch.zeros_like(w)

    def probs(z, w):
        d = ((z[:, None] - w[None]) ** 2).sum(-1)
        e = torch.exp(-temp / 2 * d)
        return e / e.sum(1, keepdim=True)

    y = torch.eye(ways, dtype=torch.float64)[torch.from_numpy(sy)]
    for t in range(1, iters + 1):
        w = w.detach().requires_grad_(True)
        ps, pq = probs(zs, w), probs(zq, w)
        ce = -(y * torch.log(ps + 1e-12)).sum(1).mean()
        cond = -(pq * torch.log(pq + 1e-12)).sum(1).mean()
        marg = -(pq.mean(0) * torch.log(pq.mean(0))).sum()
        loss = weights[0] * ce - (weights[1] * marg - weights[2] * cond)
        (g,) = torch.autograd.grad(loss, w)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w = w.detach() - lr * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
    return (-temp / 2 * ((zq[:, None] - w[None]) ** 2).sum(-1)).numpy()


def test_tim_gd_equals_the_papers_loss_with_a_hand_written_adam():
    fs, sy, fq, _ = fixed_features(seed=1)
    want = tim_reference(fs, sy, fq, 3, iters=25, lr=1e-2)
    got = tim_gd(torch.from_numpy(fs), torch.from_numpy(sy), torch.from_numpy(fq), 3,
                 iterations=25, lr=1e-2)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-7, atol=1e-9)
    start = tim_reference(fs, sy, fq, 3, iters=0, lr=1e-2)
    assert np.abs(want - start).max() > 1e-2  # the 25 steps moved W


def test_tim_defaults_are_the_papers():
    import inspect

    d = {k: p.default for k, p in inspect.signature(tim_gd).parameters.items()}
    assert (d["temperature"], d["iterations"], d["lr"]) == (15.0, 1000, 1e-4)
    assert (d["ce_weight"], d["marginal_weight"], d["conditional_weight"]) == (0.1, 1.0, 0.1)


def _learner(name, tiny_net, **cfg):
    cls = get_learner(name)
    kw = {"num_classes": 12} if name != "protonet" else {}
    return cls(cls.Config(**cfg), in_channels=1, image_size=8, backbone=tiny_net(1, 8), **kw).double()


@pytest.mark.parametrize("name", ["protonet", "simpleshot", "meta_baseline", "baseline++"])
def test_predict_applies_bd_cspn_to_the_learners_features_and_metric(tiny_net, make_episode, name):
    torch.manual_seed(0)
    learner = _learner(name, tiny_net)
    ep = make_episode(ways=3, shots=2, queries=4, noise=1.0, num_base=12,
                      generator=torch.Generator().manual_seed(1))
    ep.support_x, ep.query_x = ep.support_x.double(), ep.query_x.double()
    learner.train()
    twin = copy.deepcopy(learner).eval()
    with torch.no_grad():
        fs, fq = twin.episode_features(ep)
    got = predict(learner, ep, "bd-cspn")
    assert learner.training  # left as it was
    want = bd_cspn(fs, ep.support_y, fq, 3, twin.prototype_logits)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if name == "protonet":  # the inductive rule on the same features is the plain prototype rule
        torch.testing.assert_close(learner.predict(ep), squared_euclidean_logits(
            fq, prototypes(fs, ep.support_y, 3)), rtol=1e-12, atol=1e-12)


def test_metric_learners_are_the_four_and_protonet():
    assert set(metric_learners()) >= {"protonet", "simpleshot", "meta_baseline", "baseline++"}
    assert not {"maml", "relationnet", "baseline", "transfer"} & set(metric_learners())


@pytest.mark.parametrize("method", ["tim", "bd-cspn"])
def test_learner_without_features_is_a_one_line_config_error(method):
    with pytest.raises(ConfigError) as e:
        check_inference(method, "maml")
    msg = str(e.value)
    assert "\n" not in msg and f"inference = '{method}'" in msg and "learner 'maml'" in msg
    assert "protonet" in msg and "simpleshot" in msg and "inference = 'inductive'" in msg
    with pytest.raises(ConfigError, match="'eval.inference' must be one of inductive, bd-cspn, tim"):
        check_inference("em", "protonet")


def test_config_refuses_tim_for_maml():
    from fewshot.config import config_from_dict

    cfg = config_from_dict({"learner": {"name": "protonet"}, "eval": {"inference": "tim"}})
    assert cfg.eval.inference == "tim"
    with pytest.raises(ConfigError, match="inference = 'tim' needs a learner with features"):
        config_from_dict({"learner": {"name": "maml"}, "eval": {"inference": "tim"}})


def test_report_flags_transductive_inference():
    cell = CellResult(ways=5, shots=1, queries=15, seed=0, accuracies=[0.5, 0.7], fingerprint="x")
    plain = GridResult(learner="protonet", dataset="d", split="test", cells=[cell])
    tim = GridResult(learner="protonet", dataset="d", split="test", cells=[cell], inference="tim")
    assert "transductive (tim" not in plain.table()
    assert "inference: transductive (tim" in tim.table()
    assert GridResult.from_dict(tim.to_dict()).inference == "tim"
