"""Recomputed second-order inner steps (``InnerLoop(recompute=True)``, learner option
``inner_checkpoint``): the same meta-gradients as the ordinary second-order loop (float64,
1e-6 relative) and as torch.func, the same BatchNorm buffers, no per-step graph kept, and
one-line errors where the option cannot apply."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot.errors import ConfigError
from fewshot.inner_loop import InnerLoop
from fewshot.learners import get_learner

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "learners"))
from conftest import TinyNet, random_episode  # noqa: E402
from test_inner_loop import data, reference_maml_grads, small_net  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def bn_dropout_net():
    """conv - BN - ReLU - dropout - linear (float64): BatchNorm and RNG in the inner loss."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Flatten(), nn.Dropout(0.3), nn.Linear(3 * 4 * 4, 5)).double()


def build(recompute, bn, learn_lr, adapt, steps=3):
    net = bn_dropout_net()
    return net, InnerLoop(net, steps=steps, lr=0.2, learn_lr=learn_lr, lr_per="layer",
                          adapt=adapt, bn=bn, recompute=recompute)


def buffers_of(net, loop):
    return [b.detach().clone() for b in list(net.buffers()) + list(loop.buffers())]


def meta_run(recompute, bn, learn_lr, adapt):
    """(meta-gradients w.r.t. the model's parameters and α, buffers after the step)."""
    net, loop = build(recompute, bn, learn_lr, adapt)
    xs, ys = data(seed=1)
    xq, yq = data(seed=2)
    torch.manual_seed(7)  # dropout masks: the same draws in both runs
    adapted = loop.adapt(lambda f: F.cross_entropy(f(xs), ys))
    loss = F.cross_entropy(adapted(xq), yq)
    wrt = list(net.parameters()) + list(loop.parameters())
    grads = torch.autograd.grad(loss, wrt)
    return grads, buffers_of(net, loop)


def assert_relative(got, want, rel=1e-6):
    """Every tensor within ``rel`` of the largest meta-gradient entry (a parameter whose true
    gradient is 0, e.g. a conv bias before BatchNorm, has only rounding noise)."""
    scale = max(float(w.abs().max()) for w in want)
    assert scale > 0
    for g, w in zip(got, want):
        assert float((g - w).abs().max()) <= rel * scale


@pytest.mark.parametrize("bn", ["transductive", "running", "per_step"])
@pytest.mark.parametrize("learn_lr", [False, True])
@pytest.mark.parametrize("adapt", ["all", "head"])
def test_meta_gradients_and_buffers_equal_the_ordinary_loop(bn, learn_lr, adapt):
    ordinary, buffers = meta_run(False, bn, learn_lr, adapt)
    recomputed, buffers_r = meta_run(True, bn, learn_lr, adapt)
    assert len(ordinary) == len(recomputed) == 6 + learn_lr
    assert_relative(recomputed, ordinary)
    # running statistics updated once, not again by the replays (equal up to the rounding of
    # θ_T, which the two loops compute with different fused ops)
    for a, b in zip(buffers_r, buffers):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    initial = buffers_of(*build(False, bn, learn_lr, adapt))
    moved = max(float((b.double() - i.double()).abs().max()) for b, i in zip(buffers, initial))
    assert (moved > 1e-3) == (bn != "transductive")  # so the check above is not vacuous


def batched_run(recompute, bn, learn_lr, adapt):
    """adapt_batched over 3 tasks: (meta-gradients, buffers, inner losses per step)."""
    net, loop = build(recompute, bn, learn_lr, adapt)
    net[4].p = 0.0  # no dropout: vmap's per-task draws are not the sequential ones
    g = torch.Generator().manual_seed(1)
    xs, xq = (torch.randn(3, n, 1, 4, 4, generator=g, dtype=torch.float64) for n in (10, 8))
    ys, yq = (torch.randint(0, 5, (3, n), generator=g) for n in (10, 8))
    adapted = loop.adapt_batched(lambda f, x, y: F.cross_entropy(f(x), y), xs, ys)
    loss = F.cross_entropy(adapted(xq).flatten(0, 1), yq.flatten())
    grads = torch.autograd.grad(loss, list(net.parameters()) + list(loop.parameters()))
    return grads, buffers_of(net, loop), torch.stack(adapted.inner_losses)


@pytest.mark.parametrize("bn", ["transductive", "running", "per_step"])
@pytest.mark.parametrize("learn_lr, adapt", [(False, "all"), (True, "head"), (True, "all")])
def test_task_batched_meta_gradients_equal_the_ordinary_batched_loop(bn, learn_lr, adapt):
    grads, buffers, losses = batched_run(False, bn, learn_lr, adapt)
    grads_r, buffers_r, losses_r = batched_run(True, bn, learn_lr, adapt)
    assert losses.shape == losses_r.shape == (3, 3)  # (inner steps, tasks)
    torch.testing.assert_close(losses_r, losses, rtol=1e-12, atol=0)
    assert_relative(grads_r, grads)
    for a, b in zip(buffers_r, buffers):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("steps", [1, 4])
def test_meta_gradient_matches_torch_func(steps):
    """Independent reference: eq. 1 unrolled with torch.func (test_inner_loop's)."""
    net = small_net()
    xs, ys = data(seed=1)
    xq, yq = data(seed=2)
    loop = InnerLoop(net, steps=steps, lr=0.3, recompute=True)
    adapted = loop.adapt(lambda f: F.cross_entropy(f(xs), ys))
    ours = torch.autograd.grad(F.cross_entropy(adapted(xq), yq), list(net.parameters()))
    ref = reference_maml_grads(net, xs, ys, xq, yq, 0.3, steps, first_order=False)
    assert_relative(ours, [ref[n] for n, _ in net.named_parameters()], rel=1e-10)


def _graph_node_names(tensors):
    seen, stack, names = set(), [t.grad_fn for t in tensors], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(f for f, _ in node.next_functions)
    return names


def test_forward_keeps_no_inner_graph():
    """After T recomputed steps the adapted weights hang on T step nodes and nothing of the
    support forwards (no convolution node), where the ordinary loop keeps all of them."""
    xs, ys = data(seed=1)
    counts = {}
    for recompute in (False, True):
        net = small_net(bn=True)
        loop = InnerLoop(net, steps=5, lr=0.2, recompute=recompute)
        adapted = loop.adapt(lambda f: F.cross_entropy(f(xs), ys))
        names = _graph_node_names(adapted.params)
        counts[recompute] = (sum("Convolution" in n for n in names),
                             sum("_RecomputedStep" in n for n in names))
    assert counts[False][0] >= 5 and counts[False][1] == 0
    assert counts[True] == (0, 5)


# ------------------------------------------------------------------ learners
def _maml(**cfg):
    cls = get_learner(cfg.pop("name", "maml"))
    torch.manual_seed(0)
    learner = cls(cls.Config(ways=3, inner_steps=3, inner_lr=0.25, **cfg), in_channels=1,
                  image_size=8, backbone=TinyNet(1, 8))
    return learner.double()


def _episodes(n=2):
    out = []
    for s in range(n):
        ep = random_episode(ways=3, shots=2, queries=3, noise=2.0,
                            generator=torch.Generator().manual_seed(10 + s))
        ep.support_x, ep.query_x = ep.support_x.double(), ep.query_x.double()
        out.append(ep)
    return out


def _step_grads(learner, batch, modules):
    """The meta-gradients ``train_step`` leaves in ``.grad`` (the optimiser step skipped)."""
    grads = []
    learner.outer_step = lambda *a, **k: grads.extend(  # unused (None) as zeros: MAML++'s own γ/β
        torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        for m in modules(learner) for p in m.parameters())
    learner.train_step(batch)
    return grads


@pytest.mark.parametrize("options", [
    dict(),                                                     # MAML, fixed α
    dict(learn_inner_lr=True, lr_per="layer"),                  # Meta-SGD
    dict(learn_inner_lr=True, adapt="head", bn="running"),
    dict(adapt="head", bn="per_step"),
])
@pytest.mark.parametrize("task_batching", ["off", "on"])
def test_maml_and_meta_sgd_train_step(options, task_batching):
    eps = _episodes()
    modules = lambda lr: (lr.net, lr.loop)  # noqa: E731
    want = _step_grads(_maml(task_batching=task_batching, **options), eps, modules)
    learner = _maml(inner_checkpoint=True, task_batching=task_batching, **options)
    got = _step_grads(learner, eps, modules)
    assert len(got) == len(want) > 0
    assert_relative(got, want)
    assert learner.loop.recompute


@pytest.mark.parametrize("bn", ["transductive", "per_step"])
@pytest.mark.parametrize("task_batching", ["off", "on"])
def test_maml_pp_train_step(bn, task_batching):
    """MAML++ with every feature on (learned per-step α rows, per-step BatchNorm γ_s/β_s owned by
    the loop, the multi-step loss reading every θ_{t+1} through ``after_step``), second order:
    recomputed steps give the unrolled loop's meta-gradients for θ, α and γ_s/β_s."""
    eps = _episodes()
    modules = lambda lr: (lr.net, lr.loop)  # noqa: E731
    options = dict(name="maml++", bn=bn, first_order_epochs=0, msl=True, msl_epochs=5,
                   steps_per_epoch=1, eval_steps=3, total_epochs=0, task_batching=task_batching)
    want = _step_grads(_maml(**dict(options)), eps, modules)
    learner = _maml(inner_checkpoint=True, **dict(options))
    got = _step_grads(learner, eps, modules)
    assert len(got) == len(want) > 0
    assert any(g.abs().max() > 0 for g in got)
    assert_relative(got, want)
    assert learner.loop.recompute and learner.loop.alpha.dim() == 2


@pytest.mark.parametrize("task_batching", ["off", "on"])
def test_l2g_protonet_train_step(task_batching):
    """L2G + ProtoNet with learnable per-layer α (eq. 3-4), two disjoint task pairs."""
    g = torch.Generator().manual_seed(3)

    def ep(offset):
        e = random_episode(ways=3, shots=2, queries=2, size=8, generator=g, noise=1.0)
        e.support_x, e.query_x = e.support_x.double(), e.query_x.double()
        e.classes = torch.arange(3) + offset
        return e

    pairs = [(ep(0), ep(10)), (ep(20), ep(30))]
    modules = lambda lr: (lr.scorer, lr.inner)  # noqa: E731
    grads = []
    for flag in (False, True):
        cls = get_learner("l2g+protonet")
        torch.manual_seed(0)
        learner = cls(cls.Config(inner_lr=0.3, inner_steps=2, learn_inner_lr=True,
                                 inner_checkpoint=flag, task_batching=task_batching),
                      in_channels=1, image_size=8, backbone=TinyNet(1, 8)).double()
        grads.append(_step_grads(learner, pairs, modules))
    assert len(grads[0]) == len(grads[1]) == 5  # conv w, b, BN w, b; α (one per layer)
    assert_relative(grads[1], grads[0])


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("name, options, match", [
    ("fomaml", dict(inner_checkpoint=True), "first-order ones keep no inner graph"),
    ("maml", dict(inner_checkpoint=True, first_order=True), "first-order ones keep no inner"),
    ("maml", dict(inner_checkpoint="yes"), "'inner_checkpoint' must be true or false"),
])
def test_learner_option_errors(name, options, match):
    with pytest.raises(ConfigError, match=match):
        _maml(name=name, **options)


def test_inner_loop_errors():
    net = small_net()
    xs, ys = data(seed=1)
    with pytest.raises(ConfigError, match="inner optimizer 'sgd' only"):
        InnerLoop(net, optimizer="adam", recompute=True)
    with pytest.raises(ConfigError, match="'recompute'.*must be true or false"):
        InnerLoop(net, recompute=1)
    loop = InnerLoop(net, steps=2, lr=0.1, recompute=True)
    scale = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))  # a hidden input of the loss
    adapted = loop.adapt(lambda f: F.cross_entropy(scale * f(xs), ys))
    with pytest.raises(ConfigError, match="besides the network's parameters.*inner_checkpoint = false"):
        F.cross_entropy(adapted(xs), ys).backward()
    # a loss that only adds the hidden tensor: ∇L does not depend on it, nothing is lost
    adapted = loop.adapt(lambda f: F.cross_entropy(f(xs), ys) + scale)
    F.cross_entropy(adapted(xs), ys).backward()
    assert scale.grad is None and net[0].weight.grad.abs().sum() > 0


def test_predict_and_first_order_paths_unaffected():
    """Test-time fine-tuning (no graph) takes the ordinary path: same logits with the option."""
    ep = _episodes(1)[0]
    logits = [_maml(inner_checkpoint=flag).predict(ep) for flag in (False, True)]
    assert logits[0].shape == (9, 3)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_memory_flat_in_inner_steps_and_gradients_equal():
    """On CUDA: meta-gradients equal with and without the option (float64), and the peak
    allocated memory of a step at 10 inner steps is at most 1.3x the 1-step figure (issue 15)."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.MaxPool2d(4), nn.Flatten(), nn.Linear(16 * 8 * 8, 5)).double().to(dev)
    xs, xq = (torch.randn(n, 3, 32, 32, dtype=torch.float64, device=dev) for n in (25, 25))
    ys = yq = torch.arange(5, device=dev).repeat(5)

    def meta(steps, recompute):
        loop = InnerLoop(net, steps=steps, lr=0.05, recompute=recompute)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        adapted = loop.adapt(lambda f: F.cross_entropy(f(xs), ys))
        grads = torch.autograd.grad(F.cross_entropy(adapted(xq), yq), list(net.parameters()))
        torch.cuda.synchronize()
        return grads, torch.cuda.max_memory_allocated() - before

    plain, plain_peak = meta(10, False)
    ckpt, peak_10 = meta(10, True)
    _, peak_1 = meta(1, True)
    assert_relative(ckpt, plain)
    assert peak_10 <= 1.3 * peak_1 and plain_peak > 1.5 * peak_1


def test_first_order_switched_on_later_takes_the_first_order_steps():
    """Derivative-order annealing (MAML++) flips ``first_order`` on a built loop: the
    recomputing loop then gives first-order MAML's meta-gradient (torch.func reference)."""
    net = small_net()
    xs, ys = data(seed=1)
    xq, yq = data(seed=2)
    loop = InnerLoop(net, steps=2, lr=0.3, recompute=True)
    loop.first_order = True
    adapted = loop.adapt(lambda f: F.cross_entropy(f(xs), ys))
    ours = torch.autograd.grad(F.cross_entropy(adapted(xq), yq), list(net.parameters()))
    ref = reference_maml_grads(net, xs, ys, xq, yq, 0.3, 2, first_order=True)
    assert_relative(ours, [ref[n] for n, _ in net.named_parameters()], rel=1e-10)
