"""MLTP (Deng & Zhang, ICPR 2020): eq. 4 against eq. 5, finite differences, torch.func, variants.

Every check compares the learner's J = L_i(w) + η L_j(w − α ∂L_i/∂w) and its gradients with an
independent computation (the first-order Taylor identity of eq. 5, central differences in
float64, Hessian-vector products from ``torch.func``), or asserts an error.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp

from fewshot.errors import ConfigError, TrainingError
from fewshot.learners import get_learner

from fewshot.data.supervised import TaskPairBatch

pytestmark = pytest.mark.usefixtures("one_thread")  # small convolutions on a shared 2-core machine

CLASSES = 4


class SmoothNet(nn.Module):
    """conv3x3(3) - tanh - flatten (a smooth map, so Taylor and finite differences are clean)."""

    def __init__(self, in_channels=1, size=6, hidden=3, bn=False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.bn = nn.BatchNorm2d(hidden) if bn else nn.Identity()
        self.out_features = hidden * size * size

    def forward(self, x):
        return torch.tanh(self.bn(self.conv(x))).flatten(1)


class MLP(nn.Module):
    """No convolution at all (for the 'no layer to adapt' error)."""

    def __init__(self, size=6):
        super().__init__()
        self.fc = nn.Linear(size * size, 5)
        self.out_features = 5

    def forward(self, x):
        return torch.tanh(self.fc(x.flatten(1)))


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def make(name="mltp", backbone=None, **cfg):
    cls = get_learner(name)
    return cls(cls.Config(**cfg), in_channels=1, image_size=6, num_classes=CLASSES,
               backbone=backbone if backbone is not None else SmoothNet())


def batch(n=6, seed=0, dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, 1, 6, 6, generator=g, dtype=dtype or torch.get_default_dtype())
    y = torch.randint(0, CLASSES, (2 * n,), generator=g)
    return TaskPairBatch(x[:n], y[:n], x[n:], y[n:])


def as_dict(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def layer_alpha(learner):
    """α broadcast to every parameter name (the inner loop groups a module's weight and bias)."""
    sizes = learner.step_sizes()
    out = {}
    for n in learner.inner.adapted_names:
        module = n.rsplit(".", 1)[0]
        out[n] = sizes[module].detach()
    return out


def batch_stats(model):
    """A copy whose BatchNorm always normalises with batch statistics and keeps no running ones
    (what the learner's training forwards compute; torch.func cannot mutate buffers)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return model


def losses(model, params, b):
    """L_i and L_j as functions of a parameter dict (independent of the learner's code)."""
    model = batch_stats(model)
    def L(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    return (lambda p: L(p, b.x_i, b.y_i)), (lambda p: L(p, b.x_j, b.y_j))


# ------------------------------------------------------------------------ eq. 5 (Taylor)
def test_eq5_gap_shrinks_quadratically_in_alpha(f64):
    """J − [L_i + η L_j − η α ⟨∇L_i, ∇L_j⟩] = O(α²): halving α quarters the gap."""
    torch.manual_seed(0)
    b = batch()
    eta = 0.7
    base = make(eta=eta, learn_alpha=False, alpha_mean=0.08, alpha_std=0.0)
    model = base.model
    P = {n: p.detach() for n, p in model.named_parameters()}
    Li, Lj = losses(model, P, b)
    gi, gj = grad(Li)(P), grad(Lj)(P)
    dot = sum((gi[n] * gj[n]).sum() for n in P)
    first_order = Li(P) + eta * Lj(P)
    gaps = []
    for a in (0.08, 0.04, 0.02):
        learner = make(eta=eta, learn_alpha=False, alpha_mean=a, alpha_std=0.0)
        learner.model.load_state_dict(model.state_dict())
        J = learner.objective(b.x_i, b.y_i, b.x_j, b.y_j)["J"].detach()
        gaps.append(float(J - (first_order - eta * a * dot)))
    assert abs(gaps[0]) > 1e-7  # the second-order term is really there
    for big, small in zip(gaps, gaps[1:]):
        assert 3.5 < big / small < 4.5, gaps
    # and the first-order term itself is not O(α²): dropping it leaves an O(α) gap
    assert abs(float(-eta * 0.02 * dot)) > 5 * abs(gaps[-1])


# ------------------------------------------------------------------ finite differences
def test_gradients_of_J_match_central_differences(f64):
    torch.manual_seed(1)
    b = batch(seed=1)
    learner = make(eta=1.3, alpha_mean=0.05, alpha_std=0.02)
    params = list(learner.model.parameters())
    alpha = learner.inner.alpha
    assert alpha.numel() == 2  # one α per layer: the conv and the head
    J = learner.objective(b.x_i, b.y_i, b.x_j, b.y_j)["J"]
    g_w = torch.autograd.grad(J, params + [alpha])
    g_alpha = g_w[-1]

    def J_at():
        with torch.no_grad():
            return float(learner.objective(b.x_i, b.y_i, b.x_j, b.y_j)["J"])

    eps = 1e-6
    for k in range(alpha.numel()):
        with torch.no_grad():
            alpha[k] += eps
        up = J_at()
        with torch.no_grad():
            alpha[k] -= 2 * eps
        down = J_at()
        with torch.no_grad():
            alpha[k] += eps
        assert abs((up - down) / (2 * eps) - float(g_alpha[k])) < 1e-6 * max(1.0, abs(float(g_alpha[k])))
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):  # random directions v in w-space: (J(w+εv) − J(w−εv)) / 2ε = ⟨∂J/∂w, v⟩
        v = [torch.randn(p.shape, generator=gen) for p in params]
        with torch.no_grad():
            for p, d in zip(params, v):
                p += eps * d
        up = J_at()
        with torch.no_grad():
            for p, d in zip(params, v):
                p -= 2 * eps * d
        down = J_at()
        with torch.no_grad():
            for p, d in zip(params, v):
                p += eps * d
        analytic = float(sum((g * d).sum() for g, d in zip(g_w[:-1], v)))
        assert abs((up - down) / (2 * eps) - analytic) < 1e-6 * max(1.0, abs(analytic))


# ------------------------------------------------------------ FO = full − second-order term
def test_first_order_gradient_is_full_gradient_without_hessian_term(f64):
    torch.manual_seed(3)
    b = batch(seed=3)
    eta = 0.9
    full = make("mltp", eta=eta, alpha_mean=0.05, alpha_std=0.02)
    fo = make("mltp_fo", eta=eta, alpha_mean=0.05, alpha_std=0.02)
    fo.load_state_dict(full.state_dict() | {"learner": "mltp_fo"})
    names = [n for n, _ in full.model.named_parameters()]

    def grads(learner):
        out = learner.objective(b.x_i, b.y_i, b.x_j, b.y_j)
        gs = torch.autograd.grad(out["J"], list(learner.model.parameters()) + [learner.inner.alpha])
        return dict(zip(names, gs[:-1])), gs[-1], out["J"].detach()

    g_full, a_full, J_full = grads(full)
    g_fo, a_fo, J_fo = grads(fo)
    torch.testing.assert_close(J_fo, J_full, rtol=0, atol=1e-12)  # same objective value

    # independent: torch.func on the plain model
    model = copy.deepcopy(full.model)
    P = {n: p.detach() for n, p in model.named_parameters()}
    Li, Lj = losses(model, P, b)
    A = layer_alpha(full)
    gi = grad(Li)(P)
    W1 = {n: P[n] - A[n] * gi[n] for n in P}
    gj1 = grad(Lj)(W1)
    tangent = {n: A[n] * gj1[n] for n in P}
    _, hvp = jvp(grad(Li), (P,), (tangent,))  # H_i · diag(α) ∇L_j(w')
    second = {n: -eta * hvp[n] for n in P}  # the second-derivative term of ∂J/∂w
    for n in names:
        expected_full = gi[n] + eta * gj1[n] + second[n]
        torch.testing.assert_close(g_full[n], expected_full, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(g_fo[n], expected_full - second[n], rtol=1e-9, atol=1e-11)
    assert max(float(second[n].abs().max()) for n in names) > 1e-6  # the term is not negligible
    # ∂J/∂α needs first derivatives only: equal in both, −η ⟨∇_l L_i(w), ∇_l L_j(w')⟩ per layer
    groups = full.inner.group_names
    for k, layer in enumerate(groups):
        want = -eta * sum((gi[n] * gj1[n]).sum() for n in names if n.rsplit(".", 1)[0] == layer)
        torch.testing.assert_close(a_full[k], want, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(a_fo[k], want, rtol=1e-9, atol=1e-12)


def test_first_order_with_partial_adaptation_matches_torch_func(f64):
    """first_order with adapt='conv' (learner 'mltp'): the head's ∂L_i/∂w is still counted."""
    torch.manual_seed(4)
    b = batch(seed=4)
    learner = make("mltp", adapt="conv", first_order=True, eta=1.0, alpha_mean=0.05, alpha_std=0.0)
    out = learner.objective(b.x_i, b.y_i, b.x_j, b.y_j)
    names = [n for n, _ in learner.model.named_parameters()]
    gs = dict(zip(names, torch.autograd.grad(out["J"], list(learner.model.parameters()))))
    model = copy.deepcopy(learner.model)
    P = {n: p.detach() for n, p in model.named_parameters()}
    Li, Lj = losses(model, P, b)
    gi = grad(Li)(P)
    W1 = {n: P[n] - (0.05 * gi[n] if n.startswith("features.conv") else 0) for n in P}
    gj1 = grad(Lj)(W1)
    for n in names:
        torch.testing.assert_close(gs[n], gi[n] + gj1[n], rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------- conv-only / fc-only
@pytest.mark.parametrize("name,kind", [("mltp_conv", nn.Conv2d), ("mltp_fc", nn.Linear)])
def test_variant_inner_step_moves_only_its_layers(f64, name, kind):
    torch.manual_seed(5)
    b = batch(seed=5)
    learner = make(name, backbone=SmoothNet(bn=True), alpha_mean=0.05, alpha_std=0.01)
    model = learner.model
    owners = {f"{m_name}.{p_name}": m for m_name, m in model.named_modules()
              for p_name, _ in m.named_parameters(recurse=False)}
    before = as_dict(model)
    w1 = learner.objective(b.x_i, b.y_i, b.x_j, b.y_j)["adapted"].named_params()
    P = {n: p.detach() for n, p in copy.deepcopy(model).named_parameters()}
    gi = grad(losses(model, P, b)[0])(P)
    sizes = learner.step_sizes()
    moved = 0
    for n, w in before.items():
        if isinstance(owners[n], kind):
            a = sizes[n.rsplit(".", 1)[0]].detach()
            torch.testing.assert_close(w1[n].detach(), w - a * gi[n], rtol=1e-10, atol=1e-12)
            if n.endswith("weight"):  # (a conv bias before BatchNorm has zero gradient)
                assert not torch.equal(w1[n].detach(), w)
            moved += 1
        else:  # BatchNorm affine and the other kind: exactly w
            assert torch.equal(w1[n].detach(), w), n
    assert moved == 2  # weight and bias of the one layer of that kind


# ------------------------------------------------------- η = 0 is standard training on task_i
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_eta_zero_is_standard_training_on_first_half(optimizer):
    torch.manual_seed(6)
    cfg = dict(eta=0.0, lr=1e-2, optimizer=optimizer, weight_decay=1e-3, momentum=0.9)
    learner = make("mltp", backbone=SmoothNet(bn=True), **cfg)
    ref = copy.deepcopy(learner.model)
    alpha0 = learner.inner.alpha.detach().clone()
    if optimizer == "adam":
        opt = torch.optim.Adam(ref.parameters(), lr=1e-2, weight_decay=1e-3)
    else:
        opt = torch.optim.SGD(ref.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-3)
    for s in range(3):
        b = batch(seed=10 + s, dtype=torch.float32)
        learner.train_step(b)
        opt.zero_grad()
        F.cross_entropy(ref(b.x_i), b.y_i).backward()
        opt.step()
        for (n, p), q in zip(learner.model.named_parameters(), ref.parameters()):
            assert torch.equal(p, q), (s, n, float((p - q).abs().max()))
    assert torch.equal(learner.inner.alpha.detach(), alpha0)  # ∂J/∂α = 0 · (...) = 0


# -------------------------------------------------------------------- BatchNorm policy
def test_batchnorm_running_stats_updated_once_by_task_j_forward():
    torch.manual_seed(7)
    learner = make("mltp", backbone=SmoothNet(bn=True), alpha_mean=0.05, alpha_std=0.0,
                   learn_alpha=False)
    b = batch(seed=7, dtype=torch.float32)
    bn = learner.model.features.bn
    w1 = {n: p.detach() for n, p in learner.objective(b.x_i, b.y_i, b.x_j, b.y_j)["adapted"].named_params().items()}
    # independent: a fresh copy at w' sees only x_j, once
    fresh = copy.deepcopy(learner.model)
    fresh.features.bn.reset_running_stats()
    with torch.no_grad():
        functional_call(fresh, w1, (b.x_j,))
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, fresh.features.bn.running_mean)
    torch.testing.assert_close(bn.running_var, fresh.features.bn.running_var)
    learner.train_step(b)
    assert int(bn.num_batches_tracked) == 2  # one more per training iteration, not two


def test_predict_batch_is_the_network_at_w_in_eval_mode():
    torch.manual_seed(8)
    learner = make("mltp_fo", backbone=SmoothNet(bn=True))
    for s in range(2):
        learner.train_step(batch(seed=s, dtype=torch.float32))
    x = batch(seed=9, dtype=torch.float32).x_i
    logits = learner.predict_batch(x)
    ref = copy.deepcopy(learner.model).eval()
    assert logits.shape == (6, CLASSES)
    torch.testing.assert_close(logits, ref(x), rtol=0, atol=0)
    assert learner.model.training  # mode restored


# --------------------------------------------------------------------- step-size policy
def test_alpha_is_learned_clamped_or_refused():
    torch.manual_seed(9)
    b = batch(seed=9, dtype=torch.float32)
    clamp = make("mltp", lr=1e-6, alpha_mean=0.0, alpha_std=0.0)
    with torch.no_grad():
        clamp.inner.alpha.fill_(-1e-3)
    clamp.train_step(b)
    assert torch.equal(clamp.inner.alpha.detach(), torch.zeros(2))
    err = make("mltp", lr=1e-6, alpha_mean=0.0, alpha_std=0.0, alpha_negative="error")
    with torch.no_grad():
        err.inner.alpha.fill_(-1e-3)
    with pytest.raises(TrainingError, match="turned negative"):
        err.train_step(b)
    # learned: one Adam step moves every α by about lr, in the direction of −∂J/∂α
    learn = make("mltp", lr=1e-3, alpha_mean=0.01, alpha_std=0.0)
    out = learn.objective(b.x_i, b.y_i, b.x_j, b.y_j)
    g_alpha = torch.autograd.grad(out["J"], learn.inner.alpha)[0]
    learn.train_step(b)
    torch.testing.assert_close(learn.inner.alpha.detach(), 0.01 - 1e-3 * torch.sign(g_alpha),
                               rtol=0, atol=1e-6)
    fixed = make("mltp", learn_alpha=False, alpha_mean=0.01, alpha_std=0.0)
    fixed.train_step(b)
    assert torch.equal(fixed.inner.alpha, torch.full((2,), 0.01))
    assert list(fixed.inner.parameters()) == []


def test_initial_alpha_drawn_per_layer_and_clamped():
    torch.manual_seed(10)
    learner = make("mltp", alpha_mean=1e-3, alpha_std=1e-3)
    a = learner.inner.alpha.detach()
    assert a.shape == (2,) and bool((a >= 0).all()) and a[0] != a[1]
    learner = make("mltp", alpha_mean=-1.0, alpha_std=0.0, alpha_negative="allow")
    assert torch.equal(learner.inner.alpha.detach(), torch.full((2,), -1.0))


# ------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_clearly():
    torch.manual_seed(11)
    learner = make("mltp")
    b = batch(seed=11, dtype=torch.float32)
    odd = TaskPairBatch(torch.cat([b.x_i, b.x_j[:1]]), torch.cat([b.y_i, b.y_j[:1]]),
                        b.x_j[1:], b.y_j[1:])
    with pytest.raises(ConfigError, match="even batch_size"):
        learner.train_step(odd)
    with pytest.raises(ConfigError, match="labels must lie in 0..3"):
        learner.train_step(TaskPairBatch(b.x_i, b.y_i + CLASSES, b.x_j, b.y_j))
    before = as_dict(learner.model)
    nan = b.x_i.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(TrainingError, match="non-finite MLTP objective"):
        learner.train_step(TaskPairBatch(nan, b.y_i, b.x_j, b.y_j))
    for n, p in learner.model.named_parameters():
        assert torch.equal(p, before[n])  # nothing moved
    with pytest.raises(ConfigError, match="no convolutional"):
        make("mltp_conv", backbone=MLP())
    with pytest.raises(ConfigError, match="fixes adapt='conv'"):
        make("mltp_conv", adapt="fc")
    with pytest.raises(ConfigError, match="'eta' must be >= 0"):
        make("mltp", eta=-1.0)
    with pytest.raises(ConfigError, match="num_classes"):
        get_learner("mltp")(in_channels=1, image_size=6, backbone=SmoothNet())


def test_fc_variant_refuses_network_without_linear_layers():
    """A classifier whose only layers are convolutions: mltp_fc names nothing to adapt."""
    from fewshot.learners.mltp import MLTPFc

    class ConvOnly(MLTPFc):  # the learner with a network built of convolutions only
        def _build_model(self):
            return nn.Sequential(nn.Conv2d(1, CLASSES, 6), nn.Flatten())

    with pytest.raises(ConfigError, match="no fully-connected.*use adapt='conv'"):
        ConvOnly(ConvOnly.Config(), in_channels=1, image_size=6, num_classes=CLASSES)


def test_registered_variants_and_paper_networks():
    for name, adapt, fo in [("mltp", "all", False), ("mltp_conv", "conv", False),
                            ("mltp_fc", "fc", False), ("mltp_fo", "all", True)]:
        cls = get_learner(name)
        assert cls.input_kind == "supervised"
        c = cls.Config()
        assert (c.adapt, c.first_order, c.eta, c.alpha_mean, c.alpha_std) == (adapt, fo, 1.0, 1e-3, 1e-3)
    torch.manual_seed(12)
    learner = get_learner("mltp_conv")(in_channels=3, image_size=8, num_classes=10)  # CNet1
    assert learner.inner.group_names == ["features.0"]  # its single Conv(256, 3)
    learner = get_learner("mltp_fc")(in_channels=3, image_size=8, num_classes=10)
    assert learner.inner.group_names == ["hidden.0", "head"]  # Fc(512) and Softmax(10)


@pytest.mark.parametrize("name", ["mltp", "mltp_fo"])
def test_train_step_is_one_optimiser_step_on_grad_J(f64, name):
    """train_step (MLTP_FO takes a cheaper route to the same gradient) = Adam on ∂J/∂(w, α)."""
    torch.manual_seed(13)
    b = batch(seed=13)
    learner = make(name, lr=1e-2, weight_decay=1e-3, alpha_mean=0.05, alpha_std=0.01)
    ref = copy.deepcopy(learner)
    out = ref.objective(b.x_i, b.y_i, b.x_j, b.y_j)
    params = list(ref.model.parameters()) + [ref.inner.alpha]
    gs = torch.autograd.grad(out["J"], params)
    opt = torch.optim.Adam([{"params": params[:-1], "weight_decay": 1e-3},
                            {"params": params[-1:], "weight_decay": 0.0}], lr=1e-2)
    for p, g in zip(params, gs):
        p.grad = g
    opt.step()
    metrics = learner.train_step(b)
    torch.testing.assert_close(metrics["loss"], out["J"].detach(), rtol=0, atol=1e-12)
    for p, q in zip(list(learner.model.parameters()) + [learner.inner.alpha], params):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_checkpoint_roundtrip_keeps_alpha_and_optimiser_state():
    torch.manual_seed(14)
    learner = make("mltp_fo", backbone=SmoothNet(bn=True), lr=1e-2)
    for s in range(2):
        learner.train_step(batch(seed=20 + s, dtype=torch.float32))
    state = copy.deepcopy(learner.state_dict())
    torch.manual_seed(99)  # a different initial draw of w and α, overwritten by the load
    resumed = make("mltp_fo", backbone=SmoothNet(bn=True), lr=1e-2)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.inner.alpha, learner.inner.alpha)
    for s in range(2, 4):
        b = batch(seed=20 + s, dtype=torch.float32)
        learner.train_step(b)
        resumed.train_step(b)
    for p, q in zip(learner.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------- sec. III-E: only the first conv / the last fc layer
class TwoConvNet(nn.Module):
    """conv - tanh - conv - tanh - fc - tanh: two layers of each kind, so 'first_conv' and
    'last_fc' (the learner's ``head``) differ from 'conv' and 'fc'."""

    def __init__(self, size=6):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(2 * size * size, 5)
        self.out_features = 5

    def forward(self, x):
        z = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        return torch.tanh(self.fc(z.flatten(1)))


@pytest.mark.parametrize("adapt,layer", [("first_conv", "features.conv1"), ("last_fc", "head")])
def test_one_layer_variant_moves_only_that_layer(f64, adapt, layer):
    """Only the chosen layer takes the inner step (w' = w − α_l ∂L_i/∂w there, exactly w
    elsewhere), built through the config path (learner option ``adapt``)."""
    from fewshot.config import config_from_dict

    cfg = config_from_dict({"learner": {"name": "mltp", "options": {
        "adapt": adapt, "alpha_mean": 0.05, "alpha_std": 0.0}}})
    assert cfg.learner.options["adapt"] == adapt
    torch.manual_seed(21)
    options = {k: v for k, v in cfg.learner.options.items() if k not in ("backbone", "backbone_options")}
    learner = make("mltp", backbone=TwoConvNet(), **options)
    assert learner.inner.group_names == [layer]
    b = batch(seed=21)
    before = as_dict(learner.model)
    w1 = learner.objective(b.x_i, b.y_i, b.x_j, b.y_j)["adapted"].named_params()
    P = {n: p.detach() for n, p in copy.deepcopy(learner.model).named_parameters()}
    gi = grad(losses(learner.model, P, b)[0])(P)
    for n, w in before.items():
        if n.rsplit(".", 1)[0] == layer:
            torch.testing.assert_close(w1[n].detach(), w - 0.05 * gi[n], rtol=1e-10, atol=1e-12)
            assert (w1[n].detach() - w).abs().max() > 1e-6, n  # it does move
        else:
            assert torch.equal(w1[n].detach(), w), n  # the others stay w


def test_first_conv_meta_gradient_matches_torch_func(f64):
    """∂J/∂w and ∂J/∂α of second-order MLTP adapting only the first conv layer, against an
    independent torch.func computation of eq. 4 (nested grad: the Hessian term included)."""
    torch.manual_seed(22)
    b = batch(seed=22)
    learner = make("mltp", backbone=TwoConvNet(), adapt="first_conv", eta=0.7,
                   alpha_mean=0.05, alpha_std=0.0)
    out = learner.objective(b.x_i, b.y_i, b.x_j, b.y_j)
    params = list(learner.model.parameters()) + [learner.inner.alpha]
    got = torch.autograd.grad(out["J"], params)
    names = [n for n, _ in learner.model.named_parameters()]
    model = copy.deepcopy(learner.model)
    Li, Lj = losses(model, None, b)

    def J(P, a):
        gi = grad(Li)(P)
        W1 = {n: P[n] - a[0] * gi[n] if n.startswith("features.conv1.") else P[n] for n in P}
        return Li(P) + 0.7 * Lj(W1)

    P = {n: p.detach() for n, p in model.named_parameters()}
    gP, ga = grad(J, argnums=(0, 1))(P, learner.inner.alpha.detach().clone())
    torch.testing.assert_close(out["J"].detach(), J(P, learner.inner.alpha.detach()))
    for n, g in zip(names, got[:-1]):
        torch.testing.assert_close(g, gP[n], rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(got[-1], ga, rtol=1e-8, atol=1e-11)
    assert ga.abs().item() > 0


def test_one_layer_variant_refuses_a_network_without_that_layer():
    with pytest.raises(ConfigError, match="first_conv.*no convolutional"):
        make("mltp", backbone=MLP(), adapt="first_conv")
    with pytest.raises(ConfigError, match="adapt.*must be one of.*last_fc"):
        make("mltp", adapt="middle")
