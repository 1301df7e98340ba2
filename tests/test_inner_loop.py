"""The shared inner loop against independent computations (torch.func, finite differences,
torch.optim.Adam) and its BatchNorm policies."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from fewshot.errors import ConfigError
from fewshot.inner_loop import InnerLoop


def small_net(bn=False, dtype=torch.float64):
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 3, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(3))
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)]
    return nn.Sequential(*layers).to(dtype)


def data(n=10, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g, dtype=dtype)
    y = torch.randint(0, 5, (n,), generator=g)
    return x, y


def reference_maml_grads(net, xs, ys, xq, yq, lr, steps, first_order):
    """MAML meta-gradient by torch.func, written from eq. 1 of Finn et al. (no fewshot code)."""
    params = {k: v.detach().clone() for k, v in net.named_parameters()}

    def inner_loss(p):
        return F.cross_entropy(functional_call(net, p, (xs,)), ys)

    def outer(p):
        q = p
        for _ in range(steps):
            g = grad(inner_loss)(q)
            if first_order:
                g = {k: v.detach() for k, v in g.items()}
            q = {k: q[k] - lr * g[k] for k in q}
        return F.cross_entropy(functional_call(net, q, (xq,)), yq)

    return grad(outer)(params)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_meta_gradient_matches_torch_func(first_order, steps):
    net = small_net()
    xs, ys = data(seed=1)
    xq, yq = data(seed=2)
    loop = InnerLoop(net, steps=steps, lr=0.3, first_order=first_order)
    adapted = loop.adapt(lambda f: F.cross_entropy(f(xs), ys))
    loss = F.cross_entropy(adapted(xq), yq)
    ours = torch.autograd.grad(loss, list(net.parameters()))
    ref = reference_maml_grads(net, xs, ys, xq, yq, 0.3, steps, first_order)
    for (name, _), g in zip(net.named_parameters(), ours):
        torch.testing.assert_close(g, ref[name], rtol=1e-10, atol=1e-12)


def test_first_order_gradient_is_query_gradient_at_adapted_weights():
    """FOMAML's meta-gradient is ∇L_q(θ'), evaluated at the adapted weights (one step)."""
    net = small_net()
    xs, ys = data(seed=3)
    xq, yq = data(seed=4)
    loop = InnerLoop(net, steps=1, lr=0.5, first_order=True)
    adapted = loop.adapt(lambda f: F.cross_entropy(f(xs), ys))
    ours = torch.autograd.grad(F.cross_entropy(adapted(xq), yq), list(net.parameters()))
    theta_prime = {n: p.detach().clone().requires_grad_() for n, p in adapted.named_params().items()}
    direct = torch.autograd.grad(F.cross_entropy(functional_call(net, theta_prime, (xq,)), yq),
                                 list(theta_prime.values()))
    for a, b in zip(ours, direct):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_learnable_step_size_gradient_matches_finite_differences():
    net = small_net()
    xs, ys = data(seed=5)
    xq, yq = data(seed=6)
    loop = InnerLoop(net, steps=2, lr=0.2, learn_lr=True, lr_per="layer").double()
    assert loop.group_names == ["0", "3"]

    def outer_loss():
        adapted = loop.adapt(lambda f: F.cross_entropy(f(xs), ys))
        return F.cross_entropy(adapted(xq), yq)

    g_alpha = torch.autograd.grad(outer_loss(), [loop.alpha])[0]
    eps = 1e-6
    for k in range(2):
        with torch.no_grad():
            loop.alpha[k] += eps
        plus = outer_loss().item()
        with torch.no_grad():
            loop.alpha[k] -= 2 * eps
        minus = outer_loss().item()
        with torch.no_grad():
            loop.alpha[k] += eps
        fd = (plus - minus) / (2 * eps)
        assert abs(g_alpha[k].item() - fd) < 1e-6 * max(1.0, abs(fd)), (k, g_alpha[k].item(), fd)


def test_first_order_alpha_gradient_closed_form_one_step():
    """One step, first order: ∂L_q/∂α_g = −⟨∇_{θ'_g} L_q, ∇_{θ_g} L_s⟩ exactly."""
    net = small_net()
    xs, ys = data(seed=7)
    xq, yq = data(seed=8)
    loop = InnerLoop(net, steps=1, lr=0.1, learn_lr=True, first_order=True).double()
    adapted = loop.adapt(lambda f: F.cross_entropy(f(xs), ys))
    g_alpha = torch.autograd.grad(F.cross_entropy(adapted(xq), yq), [loop.alpha])[0]
    gs = torch.autograd.grad(F.cross_entropy(net(xs), ys), list(net.parameters()))
    tp = [p.detach().clone().requires_grad_() for p in adapted.params]
    gq = torch.autograd.grad(F.cross_entropy(functional_call(net, dict(zip(loop.param_names, tp)), (xq,)), yq), tp)
    expected = torch.stack([-(a * b).sum() for a, b in zip(gq, gs)])
    torch.testing.assert_close(g_alpha, expected, rtol=1e-10, atol=1e-12)


def test_first_order_learned_alpha_steps_match_a_hand_written_unrolled_loop():
    """Two first-order steps with per-layer learned α (MLTP_FO's update, one fused autograd
    node): the adapted weights, ∂L_q/∂θ = ∇_{θ_T} L_q and ∂L_q/∂α_g = −Σ_t Σ_{a∈g}
    ⟨∇_{θ_T[a]} L_q, ∇_{θ_t[a]} L_s⟩ (with ∇L constant, θ_T = θ_0 − α Σ_t ∇L(θ_t)) equal a
    loop written with functional_call."""
    net = small_net()
    xs, ys = data(seed=11)
    xq, yq = data(seed=12)
    loop = InnerLoop(net, steps=2, lr=0.3, learn_lr=True, lr_per="layer", first_order=True,
                     lr_init_std=0.05, generator=torch.Generator().manual_seed(0)).double()
    adapted = loop.adapt(lambda f: F.cross_entropy(f(xs), ys))
    outer = F.cross_entropy(adapted(xq), yq)
    theta = list(net.parameters())
    got = torch.autograd.grad(outer, theta + [loop.alpha])
    names = loop.param_names
    group = [0, 0, 1, 1]  # small_net: conv "0" (weight, bias), linear "3" (weight, bias)
    alpha = loop.alpha.detach()
    ws, directions = [p.detach() for p in theta], []
    for _ in range(2):
        w = [p.clone().requires_grad_() for p in ws]
        d = torch.autograd.grad(F.cross_entropy(functional_call(net, dict(zip(names, w)), (xs,)), ys), w)
        directions.append(d)
        ws = [p - alpha[g] * gi for p, gi, g in zip(ws, d, group)]
    for a, b in zip(adapted.params, ws):
        torch.testing.assert_close(a.detach(), b, rtol=1e-12, atol=1e-12)
    w = [p.clone().requires_grad_() for p in ws]
    gq = torch.autograd.grad(F.cross_entropy(functional_call(net, dict(zip(names, w)), (xq,)), yq), w)
    for a, b in zip(got[:-1], gq):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    want_alpha = torch.zeros(2, dtype=torch.float64)
    for d in directions:
        for gqa, da, g in zip(gq, d, group):
            want_alpha[g] -= (gqa * da).sum()
    torch.testing.assert_close(got[-1], want_alpha, rtol=1e-10, atol=1e-12)


def test_conv_only_leaves_fc_untouched_and_vice_versa():
    net = small_net()
    xs, ys = data()
    conv = InnerLoop(net, steps=2, lr=0.5, adapt="conv").adapt(lambda f: F.cross_entropy(f(xs), ys))
    fc = InnerLoop(net, steps=2, lr=0.5, adapt="fc").adapt(lambda f: F.cross_entropy(f(xs), ys))
    orig = dict(net.named_parameters())
    for name, p in conv.named_params().items():
        same = torch.equal(p, orig[name])
        assert same == name.startswith("3."), name  # fc (module 3) unchanged, conv changed
    for name, p in fc.named_params().items():
        assert torch.equal(p, orig[name]) == name.startswith("0."), name


def test_head_and_body_presets_split_the_parameters():
    """"head": the last Linear (no module named head here); "body": everything else."""
    net = small_net(bn=True)
    names = [n for n, _ in net.named_parameters()]
    head = InnerLoop(net, adapt="head").adapted_names
    body = InnerLoop(net, adapt="body").adapted_names
    assert head == ["4.weight", "4.bias"]
    assert body == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert sorted(head + body) == sorted(names)


def test_per_step_step_sizes_and_bn_affine_match_torch_func():
    """θ_{t+1}[a] = θ_t[a] − α[t, a] ∇_a L(θ_t) with α's row t (the last row past T), and the
    BatchNorm of a forward after s steps at (γ_s, β_s), s <= T; BatchNorm's own γ, β are
    neither adapted nor read; three test-time steps after T = 2 training steps."""
    net = small_net(bn=True)
    xs, ys = data()
    loop = InnerLoop(net, steps=2, lr=0.3, learn_lr=True, lr_per_step=True, bn_affine_per_step=True)
    assert loop.adapted_names == ["0.weight", "0.bias", "4.weight", "4.bias"]
    assert loop.alpha.shape == (2, 4) and loop.step_sizes()["4.bias"].shape == (2,)
    assert loop.bn_weight_0.shape == (3, 3) and loop.bn_bias_0.shape == (3, 3)  # s = 0..T
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        loop.alpha.uniform_(0.1, 0.5, generator=g)
        loop.bn_weight_0.normal_(1.0, 0.3, generator=g)
        loop.bn_bias_0.normal_(0.0, 0.3, generator=g)
    alpha, gam, bet = (t.detach().clone() for t in (loop.alpha, loop.bn_weight_0, loop.bn_bias_0))
    ref_net = copy.deepcopy(net)
    ref_net[1].track_running_stats = False
    ref_net[1].running_mean = ref_net[1].running_var = ref_net[1].num_batches_tracked = None

    def run(p, s, x):
        return functional_call(ref_net, {**p, "1.weight": gam[min(s, 2)], "1.bias": bet[min(s, 2)]}, (x,))

    p = {k: v.detach().clone() for k, v in net.named_parameters()}
    for t in range(3):
        gr = grad(lambda r: F.cross_entropy(run(r, t, xs), ys))(p)
        p = {k: p[k] - alpha[min(t, 1), loop.adapted_names.index(k)] * gr[k]
             if k in loop.adapted_names else p[k] for k in p}
    adapted = loop.adapt(lambda f: F.cross_entropy(f(xs), ys), steps=3, differentiable=False)
    for k, v in adapted.named_params().items():
        torch.testing.assert_close(v, p[k], rtol=1e-10, atol=1e-12, msg=k)
    torch.testing.assert_close(adapted(xs), run(p, 3, xs), rtol=1e-10, atol=1e-12)


def test_after_step_sees_every_step():
    net = small_net()
    xs, ys = data()
    loop = InnerLoop(net, steps=3, lr=0.5)
    seen = []
    final = loop.adapt(lambda f: F.cross_entropy(f(xs), ys),
                       after_step=lambda n: seen.append((n.step, n(xs).detach())))
    assert [s for s, _ in seen] == [1, 2, 3]
    torch.testing.assert_close(seen[-1][1], final(xs).detach())
    two = loop.adapt(lambda f: F.cross_entropy(f(xs), ys), steps=2)
    torch.testing.assert_close(seen[1][1], two(xs).detach())


def test_non_adapted_parameters_still_receive_outer_gradients():
    net = small_net()
    xs, ys = data()
    adapted = InnerLoop(net, steps=1, lr=0.5, adapt="fc").adapt(lambda f: F.cross_entropy(f(xs), ys))
    F.cross_entropy(adapted(xs), ys).backward()
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0


def test_selecting_no_parameters_is_a_clear_error():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    with pytest.raises(ConfigError, match="selects no parameter.*0 fully-connected"):
        InnerLoop(net, adapt="fc")


@pytest.mark.parametrize("kwargs,match", [({"steps": -1}, "steps"), ({"bn": "magic"}, "bn"),
                                          ({"optimizer": "lbfgs"}, "optimizer"),
                                          ({"adapt": "everything"}, "adapt"),
                                          ({"steps": 0, "lr_per_step": True}, "lr_per_step"),
                                          ({"bn_affine_per_step": True}, "needs BatchNorm")])
def test_invalid_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        InnerLoop(small_net(), **kwargs)


def test_adam_inner_steps_equal_torch_optim_adam():
    net = small_net()
    xs, ys = data()
    loop = InnerLoop(net, steps=4, lr=0.05, optimizer="adam", adam_betas=(0.0, 0.999))
    adapted = loop.adapt(lambda f: F.cross_entropy(f(xs), ys), differentiable=False)
    ref = copy.deepcopy(net)
    opt = torch.optim.Adam(ref.parameters(), lr=0.05, betas=(0.0, 0.999), eps=1e-8)
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(ref(xs), ys).backward()
        opt.step()
    for a, b in zip(adapted.params, ref.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-9, atol=1e-12)


def test_non_differentiable_adaptation_keeps_no_graph():
    net = small_net()
    xs, ys = data()
    net.eval()
    adapted = InnerLoop(net, steps=3, lr=0.5).adapt(lambda f: F.cross_entropy(f(xs), ys))
    assert all(not p.requires_grad and p.grad_fn is None for p in adapted.params)
    with torch.no_grad():  # works inside no_grad too (evaluation)
        adapted2 = InnerLoop(net, steps=3, lr=0.5).adapt(lambda f: F.cross_entropy(f(xs), ys))
    for a, b in zip(adapted.params, adapted2.params):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ BatchNorm policies
def bn_state(net):
    bn = net[1]
    return bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()


def batch_stat_output(net, params, x):
    """Forward with batch statistics computed by hand (independent of the loop)."""
    p = dict(zip([n for n, _ in net.named_parameters()], params))
    h = F.conv2d(x, p["0.weight"], p["0.bias"], padding=1)
    mu = h.mean(dim=(0, 2, 3), keepdim=True)
    var = h.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    h = (h - mu) / torch.sqrt(var + 1e-5) * p["1.weight"].view(1, -1, 1, 1) + p["1.bias"].view(1, -1, 1, 1)
    return F.linear(F.relu(h).flatten(1), p["4.weight"], p["4.bias"])


def running_stat_output(net, params, x):
    p = dict(zip([n for n, _ in net.named_parameters()], params))
    bn = net[1]
    h = F.conv2d(x, p["0.weight"], p["0.bias"], padding=1)
    h = (h - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + 1e-5)
    h = h * p["1.weight"].view(1, -1, 1, 1) + p["1.bias"].view(1, -1, 1, 1)
    return F.linear(F.relu(h).flatten(1), p["4.weight"], p["4.bias"])


@pytest.mark.parametrize("training", [True, False])
def test_bn_transductive_uses_batch_stats_and_never_touches_running_stats(training):
    net = small_net(bn=True)
    net.train(training)
    before = bn_state(net)
    xs, ys = data()
    loop = InnerLoop(net, steps=2, lr=0.1, bn="transductive")
    adapted = loop.adapt(lambda f: F.cross_entropy(f(xs), ys))
    out = adapted(xs)
    torch.testing.assert_close(out, batch_stat_output(net, adapted.params, xs))
    for a, b in zip(before, bn_state(net)):
        assert torch.equal(a, b)


def test_bn_running_policy_inner_steps_do_not_update_outer_forward_does():
    net = small_net(bn=True)
    xs, ys = data()
    loop = InnerLoop(net, steps=3, lr=0.1, bn="running")
    before = bn_state(net)
    adapted = loop.adapt(lambda f: F.cross_entropy(f(xs), ys))
    for a, b in zip(before, bn_state(net)):
        assert torch.equal(a, b), "inner steps changed the running statistics"
    xq, _ = data(seed=9)
    out = adapted(xq)  # outer forward: batch statistics, and one running update
    torch.testing.assert_close(out, batch_stat_output(net, adapted.params, xq))
    h = F.conv2d(xq, adapted.params[0], adapted.params[1], padding=1).detach()
    expected_mean = 0.9 * before[0] + 0.1 * h.mean(dim=(0, 2, 3))
    torch.testing.assert_close(net[1].running_mean, expected_mean)
    assert int(net[1].num_batches_tracked) == 1
    # at test time every forward uses the running statistics
    net.eval()
    frozen = bn_state(net)
    test_adapted = loop.adapt(lambda f: F.cross_entropy(f(xs), ys))
    torch.testing.assert_close(test_adapted(xq), running_stat_output(net, test_adapted.params, xq))
    for a, b in zip(frozen, bn_state(net)):
        assert torch.equal(a, b)


def test_bn_per_step_keeps_one_set_of_statistics_per_step():
    net = small_net(bn=True)
    xs, ys = data()
    own = bn_state(net)
    loop = InnerLoop(net, steps=2, lr=0.1, bn="per_step").double()
    adapted = loop.adapt(lambda f: F.cross_entropy(f(xs), ys))
    adapted(xs)
    means = loop.bn_mean_0
    assert means.shape == (3, 3)
    # every step index saw one training forward, so every row moved away from zero
    assert all(means[s].abs().sum() > 0 for s in range(3))
    assert not torch.equal(means[0], means[2])
    # the model's own statistics are never touched
    for a, b in zip(own, bn_state(net)):
        assert torch.equal(a, b)
    # step 0's row equals the momentum update with the step-0 forward's batch mean
    h0 = F.conv2d(xs, net[0].weight, net[0].bias, padding=1).detach()
    torch.testing.assert_close(means[0], 0.1 * h0.mean(dim=(0, 2, 3)))
    assert "bn_mean_0" in loop.state_dict()


def test_dropout_follows_model_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    loop = InnerLoop(net, steps=0)
    net.eval()
    torch.testing.assert_close(loop.functional()(x), net(x))
    net.train()
    torch.manual_seed(3)
    a = loop.functional()(x)
    torch.manual_seed(3)
    b = net(x)
    torch.testing.assert_close(a, b)


def sgd_reference(net, x, y, lrs, steps):
    """``steps`` plain SGD steps θ ← θ − α_n ∇_θ L by torch.func (α per parameter name)."""
    p = {k: v.detach().clone() for k, v in net.named_parameters()}
    loss = lambda q: F.cross_entropy(functional_call(net, q, (x,)), y)  # noqa: E731
    for _ in range(steps):
        g = grad(loss)(p)
        p = {k: p[k] - lrs[k] * g[k] for k in p}
    return p


@pytest.mark.parametrize("learn", [False, True])
def test_step_size_changed_in_place_is_used_by_the_next_adaptation(learn):
    """Fixed α is read once and cached (the foreach update takes Python floats); an in-place
    change of α (an optimiser step, a clamp, ``fill_``) must reach the next adaptation, with
    and without a graph, for per-tensor step sizes that differ."""
    net = small_net()
    names = [n for n, _ in net.named_parameters()]
    lrs = {n: 0.1 * (k + 1) for k, n in enumerate(names)}
    loop = InnerLoop(net, steps=2, lr=lrs, learn_lr=learn)
    x, y = data()
    for scale in (1.0, 3.0):
        for differentiable in (True, False):
            adapted = loop.adapt(lambda f: F.cross_entropy(f(x), y), differentiable=differentiable)
            ref = sgd_reference(net, x, y, {n: scale * v for n, v in lrs.items()}, 2)
            for n, p in adapted.named_params().items():
                torch.testing.assert_close(p.detach(), ref[n], rtol=1e-10, atol=1e-12)
        with torch.no_grad():
            loop.alpha.mul_(3.0)


def test_equal_fixed_step_sizes_and_unused_parameters():
    """One α for every tensor (the single ``_foreach_add`` path) equals plain SGD, and a
    parameter the loss does not use keeps its value (no gradient, no step)."""
    net = small_net()
    net.register_parameter("unused", nn.Parameter(torch.ones(2, dtype=torch.float64)))
    loop = InnerLoop(net, steps=3, lr=0.2)
    x, y = data()
    adapted = loop.adapt(lambda f: F.cross_entropy(f(x), y))
    ref = sgd_reference(net, x, y, {n: 0.2 for n, _ in net.named_parameters()}, 3)
    got = adapted.named_params()
    for n in ref:
        torch.testing.assert_close(got[n].detach(), ref[n], rtol=1e-10, atol=1e-12)
    assert got["unused"] is net.unused
