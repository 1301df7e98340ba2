"""MTL (meta-transfer learning, Algorithm 1): reductions β = 1 / β = 0 against independent
torch.func computations, the closed form of MTL+Reptile on a linear softmax model, test-time
fine-tuning of a new head, and bad input."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from fewshot.data.episodes import Episode
from fewshot.errors import ConfigError, DataError
from fewshot.learners import get_learner
from fewshot.learners.mtl import sub_batches

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import random_episode  # noqa: E402

C = 12  # base classes


class MLP(nn.Module):
    def __init__(self, d_in=16, hidden=10, d_out=8):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)
        self.out_features = d_out

    def forward(self, x):
        return torch.tanh(self.fc2(torch.tanh(self.fc1(x.flatten(1)))))


class Flat(nn.Module):
    """No parameters: the MTL model on top is linear softmax regression."""

    out_features = 16

    def forward(self, x):
        return x.flatten(1)


def _episodes(n, seed=0, ways=3, shots=3, queries=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        e = random_episode(ways=ways, shots=shots, queries=queries, size=4, generator=g,
                           num_base=C, noise=1.0)
        out.append(Episode(e.support_x.double(), e.support_y, e.query_x.double(), e.query_y,
                           e.classes, e.base_support_y, e.base_query_y))
    return out


def _learner(name, backbone, **options):
    cls = get_learner(name)
    base = dict(ways=3, inner_steps=2, inner_batch=None, inner_lr=0.3, inner_optimizer="sgd",
                meta_optimizer="sgd", transfer_optimizer="sgd", transfer_lr=0.2, lr=0.7)
    base.update(options)
    torch.manual_seed(0)
    return cls(cls.Config(**base), in_channels=1, image_size=4, num_classes=C,
               backbone=backbone.double()).double()


def _params(learner):
    return {n: p.detach().clone() for n, p in learner.net.named_parameters()}


def _ce(net, params, x, y, base=False):
    return F.cross_entropy(functional_call(net, params, (x,), {"base": base}), y)


def _inner(net, params, x, y, batches, alpha, create_graph):
    """k plain SGD steps θ ← θ − α ∇L on the sub-batches (base head untouched)."""
    p = dict(params)
    for b in batches:
        gr = grad(lambda q: _ce(net, q, x[b], y[b]))(p)
        p = {k: (v - alpha * gr[k] if not k.startswith("base_head") else v) for k, v in p.items()}
        if not create_graph:
            p = {k: v.detach() for k, v in p.items()}
    return p


def test_beta_one_is_reptile():
    """β = 1: θ ← θ + α_outer · mean_i(θ_i − θ), θ_i = k SGD steps (Algorithm 1, line 8)."""
    learner = _learner("mtl+reptile", MLP(), beta=1.0)
    eps = _episodes(3)
    theta = _params(learner)
    g = torch.Generator().manual_seed(learner.config.seed)
    deltas = []
    for e in eps:
        x, y = torch.cat([e.support_x, e.query_x]), torch.cat([e.support_y, e.query_y])
        batches = sub_batches(len(y), 2, None, g)
        th_i = _inner(learner.net, theta, x, y, batches, 0.3, False)
        deltas.append({k: th_i[k] - theta[k] for k in theta})
    learner.train_step(eps)
    for k, v in learner.net.named_parameters():
        expect = theta[k] + 0.7 * sum(d[k] for d in deltas) / 3
        torch.testing.assert_close(v.detach(), expect, rtol=1e-12, atol=1e-13)
    assert learner.net.base_head is None  # β = 1: no transfer side at all


def test_beta_one_is_maml():
    """β = 1: θ ← θ − α_outer · mean_i ∇_θ L_τi(f_θi) with second-order θ_i (line 7)."""
    learner = _learner("mtl+maml", MLP(), beta=1.0, inner_batch=3)
    eps = _episodes(2)
    theta = _params(learner)
    g = torch.Generator().manual_seed(learner.config.seed)
    batches = [sub_batches(len(e.support_y), 2, 3, g) for e in eps]

    def meta(p):
        tot = 0.0
        for e, b in zip(eps, batches):
            th_i = _inner(learner.net, p, e.support_x, e.support_y, b, 0.3, True)
            tot = tot + _ce(learner.net, th_i, e.query_x, e.query_y)
        return tot / len(eps)

    ref = grad(meta)(theta)
    learner.train_step(eps)
    for k, v in learner.net.named_parameters():
        torch.testing.assert_close(v.detach(), theta[k] - 0.7 * ref[k], rtol=1e-12, atol=1e-13)
    assert ref["backbone.fc1.weight"].abs().max() > 1e-3  # the step is not trivially zero


@pytest.mark.parametrize("name", ["mtl+reptile", "mtl+maml"])
def test_beta_zero_is_the_transfer_update(name):
    """β = 0: θ ← θ − α_d ∇ L_(x,y) over all instances, base-class labels (line 9)."""
    learner = _learner(name, MLP(), beta=0.0)
    eps = _episodes(3, seed=1)
    theta = _params(learner)
    x = torch.cat([torch.cat([e.support_x, e.query_x]) for e in eps])
    y = torch.cat([torch.cat([e.base_support_y, e.base_query_y]) for e in eps])
    ref = grad(lambda p: _ce(learner.net, p, x, y, base=True))(theta)
    learner.train_step(eps)
    for k, v in learner.net.named_parameters():
        torch.testing.assert_close(v.detach(), theta[k] - 0.2 * ref[k], rtol=1e-12, atol=1e-13)
    assert torch.equal(learner.net.head.weight, theta["head.weight"])  # N-way head untouched
    assert ref["base_head.weight"].abs().max() > 1e-3


def _softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _sgd_softmax_regression(W, b, x, y, ways, lr):
    """One SGD step of mean cross-entropy for logits x Wᵀ + b: ∇W = (P − Y)ᵀ x / m."""
    P = _softmax(x @ W.T + b)
    Y = np.eye(ways)[y]
    return W - lr * (P - Y).T @ x / len(y), b - lr * (P - Y).mean(0)


def test_reptile_mtl_closed_form_on_linear_model():
    """MTL+Reptile on softmax regression (zero-initialised heads), written out in numpy."""
    beta, a_in, a_out, a_d, k = 0.6, 0.5, 0.8, 0.4, 3
    learner = _learner("mtl+reptile", Flat(), beta=beta, inner_steps=k, inner_lr=a_in,
                       lr=a_out, transfer_lr=a_d, inner_batch=4)
    eps = _episodes(4, seed=2)
    g = torch.Generator().manual_seed(learner.config.seed)
    W_meta = np.zeros((3, 16))
    b_meta = np.zeros(3)
    for e in eps:
        x = torch.cat([e.support_x, e.query_x]).flatten(1).numpy()
        y = torch.cat([e.support_y, e.query_y]).numpy()
        W, b = np.zeros((3, 16)), np.zeros(3)
        for idx in sub_batches(len(y), k, 4, g):
            W, b = _sgd_softmax_regression(W, b, x[idx.numpy()], y[idx.numpy()], 3, a_in)
        W_meta += a_out * W / len(eps)   # θ + α_outer · mean(θ_i − θ), θ = 0
        b_meta += a_out * b / len(eps)
    xa = np.concatenate([torch.cat([e.support_x, e.query_x]).flatten(1).numpy() for e in eps])
    ya = np.concatenate([torch.cat([e.base_support_y, e.base_query_y]).numpy() for e in eps])
    V, c = _sgd_softmax_regression(np.zeros((C, 16)), np.zeros(C), xa, ya, C, a_d)
    learner.train_step(eps)
    net = learner.net
    np.testing.assert_allclose(net.head.weight.detach().numpy(), beta * W_meta, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(net.head.bias.detach().numpy(), beta * b_meta, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(net.base_head.weight.detach().numpy(), (1 - beta) * V, rtol=1e-10,
                               atol=1e-13)
    np.testing.assert_allclose(net.base_head.bias.detach().numpy(), (1 - beta) * c, rtol=1e-10,
                               atol=1e-13)


def test_predict_fine_tunes_a_new_head():
    """One SGD step from a zero head: W = −η (P − Y)ᵀ z / S with z = f(x) (features fixed,
    their gradient through a zero head being zero); the model's own weights do not move."""
    learner = _learner("mtl+reptile", MLP(), eval_steps=1, eval_lr=0.9, eval_batch=None)
    e = _episodes(1, ways=7, shots=2, queries=3)[0]
    before = _params(learner)
    logits = learner.predict(e)
    assert logits.shape == (21, 7)
    with torch.no_grad():
        z_s, z_q = learner.net.features(e.support_x), learner.net.features(e.query_x)
    P = np.full((14, 7), 1 / 7)
    Y = np.eye(7)[e.support_y.numpy()]
    W = -0.9 * (P - Y).T @ z_s.numpy() / 14
    b = -0.9 * (P - Y).mean(0)
    np.testing.assert_allclose(logits.numpy(), z_q.numpy() @ W.T + b, rtol=1e-10, atol=1e-12)
    assert all(torch.equal(v, before[k]) for k, v in learner.net.named_parameters())


@pytest.mark.parametrize("options,match", [
    ({"beta": 1.5}, r"'beta'.*\[0, 1\]"),
    ({"beta": -0.1}, r"'beta'"),
    ({"inner_lr": 0}, "inner_lr"),
    ({"meta_optimizer": "rmsprop"}, "meta_optimizer"),
    ({"bn": "none"}, "'bn'"),
])
def test_bad_options(options, match):
    with pytest.raises(ConfigError, match=match):
        _learner("mtl+reptile", MLP(), **options)


def test_task_too_small_for_k_sub_batches():
    learner = _learner("mtl+reptile", MLP(), inner_steps=20, inner_batch=None)
    eps = _episodes(1)  # 3 ways x (3 + 2) = 15 examples < k = 20
    theta = _params(learner)
    with pytest.raises(ConfigError, match="k=20 sub-batches"):
        learner.train_step(eps)
    with pytest.raises(ConfigError, match="k=20"):
        learner.validate_task(3, 3, 2)
    assert all(torch.equal(v, theta[k]) for k, v in learner.net.named_parameters())
    learner = _learner("mtl+maml", MLP(), inner_batch=10)
    theta = _params(learner)
    with pytest.raises(ConfigError, match="inner_batch=10 exceeds the task's 9"):
        learner.train_step(eps)  # MAML adapts on the 9 support examples only
    with pytest.raises(ConfigError, match="N=3 .* 5-way"):
        learner.validate_task(5, 3, 2)
    # nothing moved
    assert all(torch.equal(v, theta[k]) for k, v in learner.net.named_parameters())


def test_transfer_needs_base_classes():
    cls = get_learner("mtl+reptile")
    with pytest.raises(ConfigError, match="num_classes"):
        cls(cls.Config(ways=3), in_channels=1, image_size=4, backbone=MLP())
    learner = _learner("mtl+reptile", MLP(), inner_steps=2)
    e = _episodes(1)[0]
    e.base_query_y = None
    with pytest.raises(DataError, match="base-class labels"):
        learner.train_step([e])
    e = _episodes(1)[0]
    e.base_support_y = e.base_support_y + C
    with pytest.raises(DataError, match="C-way head"):
        learner.train_step([e])


@pytest.mark.slow
@pytest.mark.parametrize("name,options", [
    ("mtl+reptile", dict(inner_steps=5, inner_batch=10, lr=1.0, inner_lr=3e-3, transfer_lr=3e-3)),
    ("mtl+maml", dict(inner_steps=2, inner_batch=None, lr=3e-3, inner_lr=0.1)),
])
def test_learns_glyphs(learn_glyphs, name, options):
    """5-way 1-shot on unseen glyph classes after a short run (chance 0.2).

    Fine-tuning a new head on *random* Conv-4 features already gives ~0.65 on glyphs;
    60 MTL iterations bring it to ~0.72-0.76 (seeded)."""
    cls = get_learner(name)
    torch.manual_seed(0)
    learner = cls(cls.Config(backbone_options={"hidden": 16}, eval_steps=10, eval_lr=0.1,
                             **options), in_channels=1, image_size=28, num_classes=100)
    before, after = learn_glyphs(learner, steps=60, meta_batch=2)
    # measured (torch 2.14 CPU): 0.655 -> 0.72 (mtl+reptile), 0.76 (mtl+maml); the gain over
    # the fine-tuned random features is small, so half of it is the margin kept
    assert after - before > 0.033, (before, after)


@pytest.mark.slow
def test_meta_transfer_spec_learners_do_what_their_labels_say():
    """Build every MTL learner of benchmarks/meta_transfer_table1.toml (its --quick form, on
    glyph-sized images) and take one training step on tasks of the spec's training shape:
    Transfer moves only the C-way head's side, Reptile/MAML have no transfer side, MTL moves
    both heads, "(20-way)" entries train a 20-way head on 20-way tasks, "(authors)" runs the
    authors' update (an inner optimiser that persists across tasks)."""
    from fewshot.bench import load_spec
    from fewshot.config import config_from_dict

    repo = Path(__file__).resolve().parents[2]
    spec = load_spec(repo / "benchmarks" / "meta_transfer_table1.toml", quick=True)
    seen = set()
    for e in spec.learners:
        cfg = config_from_dict(spec.run_config(e, 0))
        if not cfg.learner.name.startswith("mtl"):
            continue
        seen.add(e.label)
        cls = get_learner(cfg.learner.name)
        opts = dict(cfg.learner.options, backbone_options={"hidden": 4})
        torch.manual_seed(0)
        learner = cls(cls.Config(**opts), in_channels=1, image_size=28, num_classes=40)
        t = cfg.train
        want_ways = 20 if e.label.endswith("(20-way)") else 5
        assert t.ways == want_ways and learner.net.head.out_features == want_ways, e.label
        learner.validate_task(t.ways, t.shots, t.queries)
        with pytest.raises(ConfigError):
            learner.validate_task(25 - want_ways, t.shots, t.queries)
        assert ("inner" in learner.optimizers) == e.label.endswith("(authors)"), e.label
        g = torch.Generator().manual_seed(1)
        eps = [random_episode(ways=t.ways, shots=4, queries=1, size=28, generator=g,
                              num_base=40) for _ in range(2)]  # (fewer shots: a fast test)
        before = {n: p.detach().clone() for n, p in learner.net.named_parameters()}
        learner.train_step(eps)
        learner.train_step(eps[::-1])  # (zero heads: the features move from the second step)
        moved = {n.split(".")[0] for n, p in learner.net.named_parameters()
                 if not torch.equal(p.detach(), before[n])}
        kind = e.label.split(" ")[0]
        expect = {"Transfer": {"backbone", "base_head"}, "Reptile": {"backbone", "head"},
                  "MAML": {"backbone", "head"}}.get(kind, {"backbone", "head", "base_head"})
        assert moved == expect, (e.label, moved)
        assert (learner.net.base_head is None) == (kind in ("Reptile", "MAML")), e.label
    assert {"MTL+Reptile (authors)", "MTL+MAML (20-way)", "Transfer (20-way)"} <= seen
    assert len(seen) == 11


def test_any_way_evaluation_is_supported():
    """The evaluator asks ``supports_ways``: MTL fine-tunes a new head, so 35-way cells of a
    5-way-trained model are evaluated (not reported n/a)."""
    from fewshot.evaluation import unsupported_reason

    learner = _learner("mtl+maml", MLP())
    assert learner.config.ways == 3
    assert unsupported_reason(learner, 35) is None and unsupported_reason(learner, 3) is None
    e = _episodes(1, ways=6, shots=1, queries=2)[0]
    assert learner.predict(e).shape == (12, 6)


@pytest.mark.parametrize("name", ["mtl+reptile", "mtl+maml"])
def test_line_10_mixes_shared_parameters(name):
    """0 < β < 1 with a backbone that HAS shared parameters: every tensor (shared features,
    N-way head, C-way head) ends at β θ_meta + (1 − β) θ_disc, both copies hand-computed
    from the same θ (line 7/8 and line 9)."""
    beta = 0.4
    learner = _learner(name, MLP(), beta=beta, inner_batch=3 if name == "mtl+maml" else None)
    eps = _episodes(2, seed=3)
    with torch.no_grad():  # non-zero heads, so both sides move the shared features
        learner.net.base_head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        learner.net.head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    theta = _params(learner)
    g = torch.Generator().manual_seed(learner.config.seed)
    if name == "mtl+reptile":
        meta = dict(theta)
        for e in eps:
            x, y = torch.cat([e.support_x, e.query_x]), torch.cat([e.support_y, e.query_y])
            th_i = _inner(learner.net, theta, x, y, sub_batches(len(y), 2, None, g), 0.3, False)
            meta = {k: meta[k] + 0.7 * (th_i[k] - theta[k]) / len(eps) for k in theta}
    else:
        batches = [sub_batches(len(e.support_y), 2, 3, g) for e in eps]

        def outer(p):
            return sum(_ce(learner.net, _inner(learner.net, p, e.support_x, e.support_y, b, 0.3,
                                               True), e.query_x, e.query_y)
                       for e, b in zip(eps, batches)) / len(eps)

        gm = grad(outer)(theta)
        meta = {k: theta[k] - 0.7 * gm[k] for k in theta}
    x = torch.cat([torch.cat([e.support_x, e.query_x]) for e in eps])
    y = torch.cat([torch.cat([e.base_support_y, e.base_query_y]) for e in eps])
    gd = grad(lambda p: _ce(learner.net, p, x, y, base=True))(theta)
    disc = {k: theta[k] - 0.2 * gd[k] for k in theta}
    learner.train_step(eps)
    for k, v in learner.net.named_parameters():
        torch.testing.assert_close(v.detach(), beta * meta[k] + (1 - beta) * disc[k],
                                   rtol=1e-11, atol=1e-13)
    shared = "backbone.fc1.weight"  # moved by both sides, so the mixing is not trivial
    assert (meta[shared] - theta[shared]).abs().max() > 1e-4
    assert (disc[shared] - theta[shared]).abs().max() > 1e-4


class _Adam:
    """Adam written out (Kingma & Ba, Algorithm 1) with a state that persists across calls."""

    def __init__(self, lr, b1, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps, self.state = lr, b1, b2, eps, {}

    def step(self, p, g):
        out = dict(p)
        for k, gk in g.items():
            m, v, t = self.state.get(k, (torch.zeros_like(gk), torch.zeros_like(gk), 0))
            m, v, t = self.b1 * m + (1 - self.b1) * gk, self.b2 * v + (1 - self.b2) * gk * gk, t + 1
            self.state[k] = (m, v, t)
            out[k] = p[k] - self.lr * (m / (1 - self.b1 ** t)) / ((v / (1 - self.b2 ** t)).sqrt()
                                                                  + self.eps)
        return out


def test_authors_mode_is_the_authors_update():
    """mode='authors' (MTL+Reptile): per task, k inner Adam steps and one transfer Adam step on
    the task's k mini-batches, both Adams keeping their state across tasks and iterations;
    θ ← θ + ½ β ε mean(θ_i − θ) + ½ (1 − β) mean(φ_i − θ). Two iterations, hand-computed."""
    beta, k, lr, a_in, a_d = 0.9, 2, 0.7, 0.05, 0.04
    learner = _learner("mtl+reptile", MLP(), beta=beta, mode="authors", inner_steps=k,
                       inner_batch=4, inner_optimizer="adam", inner_lr=a_in, lr=lr,
                       transfer_optimizer="adam", transfer_lr=a_d, adam_beta1=0.0)
    net, theta = learner.net, _params(learner)
    g = torch.Generator().manual_seed(learner.config.seed)
    inner, transfer = _Adam(a_in, 0.0), _Adam(a_d, 0.0)
    for it in range(2):
        eps = _episodes(2, seed=10 + it)
        d_meta = {n: torch.zeros_like(t) for n, t in theta.items()}
        d_disc = {n: torch.zeros_like(t) for n, t in theta.items()}
        for e in eps:
            x, y = torch.cat([e.support_x, e.query_x]), torch.cat([e.support_y, e.query_y])
            yb = torch.cat([e.base_support_y, e.base_query_y])
            batches = sub_batches(len(y), k, 4, g)
            p = dict(theta)
            for b in batches:
                gr = grad(lambda q: _ce(net, q, x[b], y[b]))(p)
                p = inner.step(p, {n: v for n, v in gr.items() if not n.startswith("base_head")})
            rows = torch.cat(batches)
            gr = grad(lambda q: _ce(net, q, x[rows], yb[rows], base=True))(theta)
            phi = transfer.step(theta, {n: v for n, v in gr.items() if not n.startswith("head.")})
            for n in theta:
                d_meta[n] += (p[n] - theta[n]) / len(eps)
                d_disc[n] += (phi[n] - theta[n]) / len(eps)
        theta = {n: theta[n] + 0.5 * beta * lr * d_meta[n] + 0.5 * (1 - beta) * d_disc[n]
                 for n in theta}
        learner.train_step(eps)
        for n, v in net.named_parameters():
            torch.testing.assert_close(v.detach(), theta[n], rtol=1e-10, atol=1e-12)
    assert inner.state["backbone.fc1.weight"][2] == 8  # 2 iterations x 2 tasks x k steps


def test_authors_mode_refusals():
    with pytest.raises(ConfigError, match="authors.*Reptile update only"):
        _learner("mtl+maml", MLP(), mode="authors", meta_optimizer="sgd")
    with pytest.raises(ConfigError, match="mode='authors'.*transductive"):
        _learner("mtl+reptile", MLP(), mode="authors", bn="running")
    with pytest.raises(ConfigError, match="'mode' must be"):
        _learner("mtl+reptile", MLP(), mode="code")
