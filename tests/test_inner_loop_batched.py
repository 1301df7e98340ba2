"""Task-batched adaptation (InnerLoop.adapt_batched) against the sequential higher loop, the
reference: meta-gradients of θ_0 and α, outputs and BatchNorm statistics, on a Conv-4 with
BatchNorm, over first/second order, SGD/Adam, fixed/learnable α, adapted subsets and BN policies."""
import logging

import pytest
import torch
import torch.nn.functional as F

from fewshot.errors import ConfigError, TrainingError
from fewshot.inner_loop import InnerLoop, batched_oom_guard, resolve_task_batching
from fewshot.learners.common import HeadNet
from fewshot.nn import build_backbone

T, S, Q, WAYS = 3, 6, 4, 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def conv4():
    torch.manual_seed(0)
    return HeadNet(build_backbone("conv4", in_channels=1, image_size=8, hidden=3, pool_blocks=3),
                   WAYS).double()


def tasks(seed=1):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(T, S, 1, 8, 8, generator=g, dtype=torch.float64)
    qx = torch.randn(T, Q, 1, 8, 8, generator=g, dtype=torch.float64)
    return sx, torch.randint(0, WAYS, (T, S), generator=g), qx, torch.randint(0, WAYS, (T, Q), generator=g)


def run(mode, first_order, optimizer, learn, adapt, bn, steps=2, train=True, momentum=0.1, **loop_options):
    net = conv4()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum  # None: cumulative average over num_batches_tracked
    loop = InnerLoop(net, steps=steps, lr=0.1, learn_lr=learn, first_order=first_order,
                     optimizer=optimizer, bn=bn, adapt=adapt, **loop_options)
    net.train(train)
    sx, sy, qx, qy = tasks()
    if mode == "seq":
        outs = []
        for i in range(T):
            a = loop.adapt(lambda n: F.cross_entropy(n(sx[i]), sy[i]), differentiable=True)
            outs.append(a(qx[i]))
            (F.cross_entropy(outs[-1], qy[i]) / T).backward()
        out = torch.stack(outs)
    else:
        a = loop.adapt_batched(lambda n, x, y: F.cross_entropy(n(x), y), sx, sy, differentiable=True)
        out = a(qx)
        F.cross_entropy(out.transpose(1, 2), qy, reduction="none").mean(1).mean().backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    if learn:
        grads["alpha"] = loop.alpha.grad
    grads.update({n: p.grad for n, p in loop.named_parameters() if n.startswith("bn_")})
    buffers = {n: b for n, b in list(net.named_buffers()) + list(loop.named_buffers())}
    return out.detach(), grads, buffers


@pytest.mark.parametrize("bn", ["transductive", "running", "per_step"])
@pytest.mark.parametrize("subset", [False, True])
@pytest.mark.parametrize("learn", [False, True])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("first_order", [False, True])
def test_batched_equals_sequential(first_order, optimizer, learn, subset, bn):
    adapt = ("head" if optimizer == "sgd" else "conv") if subset else "all"
    seq = run("seq", first_order, optimizer, learn, adapt, bn)
    bat = run("bat", first_order, optimizer, learn, adapt, bn)
    torch.testing.assert_close(bat[0], seq[0], rtol=1e-7, atol=1e-9)
    assert seq[1].keys() == bat[1].keys()
    for k in seq[1]:
        assert torch.isfinite(seq[1][k]).all(), k
        torch.testing.assert_close(bat[1][k], seq[1][k], rtol=1e-6, atol=1e-8, msg=k)
    for k in seq[2]:  # running / per-step statistics: the T updates in task order
        torch.testing.assert_close(bat[2][k], seq[2][k], rtol=1e-7, atol=1e-8, msg=k)


@pytest.mark.parametrize("bn", ["transductive", "per_step"])
@pytest.mark.parametrize("first_order", [False, True])
def test_per_step_step_sizes_and_bn_affine_batched_equals_sequential(first_order, bn):
    """MAML++'s LSLR (α of shape (steps, groups)) and BNWB (γ_s, β_s): batched == sequential
    for θ_0, α and every γ_s, β_s, three steps."""
    opts = dict(lr_per_step=True, bn_affine_per_step=True, steps=3)
    seq = run("seq", first_order, "sgd", True, "all", bn, **opts)
    bat = run("bat", first_order, "sgd", True, "all", bn, **opts)
    torch.testing.assert_close(bat[0], seq[0], rtol=1e-7, atol=1e-9)
    assert seq[1]["alpha"].shape == (3, 10) and seq[1]["bn_weight_0"].shape == (4, 3)
    for k in seq[1]:
        if seq[1][k] is None:  # the layers' own γ, β: replaced by γ_s, β_s
            assert k.endswith(("bn.weight", "bn.bias")) and bat[1][k] is None, k
            continue
        torch.testing.assert_close(bat[1][k], seq[1][k], rtol=1e-6, atol=1e-8, msg=k)
    for k in seq[2]:
        torch.testing.assert_close(bat[2][k], seq[2][k], rtol=1e-7, atol=1e-8, msg=k)


def test_first_order_detaches_at_the_outer_level():
    """Batched first order equals sequential first order and differs from second order: the
    inner gradient is a constant for the outer backward."""
    fo = run("bat", True, "sgd", True, "all", "transductive")[1]
    so = run("bat", False, "sgd", True, "all", "transductive")[1]
    ref = run("seq", True, "sgd", True, "all", "transductive")[1]
    for k in fo:
        torch.testing.assert_close(fo[k], ref[k], rtol=1e-6, atol=1e-8)
    assert max((fo[k] - so[k]).abs().max() for k in fo) > 1e-4


def test_running_statistics_updated_in_task_order_and_read_in_eval():
    """bn='running': training forwards update the module's statistics T times, as T
    sequential outer forwards (num_batches_tracked counts them); eval forwards read them."""
    seq = run("seq", False, "sgd", False, "all", "running")[2]
    bat = run("bat", False, "sgd", False, "all", "running")[2]
    key = "backbone.blocks.0.bn.num_batches_tracked"
    assert int(bat[key]) == int(seq[key]) == T
    assert not torch.allclose(bat["backbone.blocks.0.bn.running_mean"], torch.zeros(3, dtype=torch.float64))
    seq_eval = run("seq", False, "sgd", False, "all", "running", train=False)
    bat_eval = run("bat", False, "sgd", False, "all", "running", train=False)
    torch.testing.assert_close(bat_eval[0], seq_eval[0])


def test_cumulative_average_running_statistics_match_sequential():
    """BatchNorm with momentum=None (running statistics = the mean over all batches so far,
    weights 1/n_i from num_batches_tracked, n_i = 1, 2, 3 for the T = 3 tasks): batched
    updates equal nn.BatchNorm's own sequential ones."""
    seq = run("seq", False, "sgd", False, "all", "running", momentum=None)[2]
    bat = run("bat", False, "sgd", False, "all", "running", momentum=None)[2]
    for k in seq:
        torch.testing.assert_close(bat[k], seq[k], rtol=1e-12, atol=1e-14, msg=k)
    assert int(bat["backbone.blocks.0.bn.num_batches_tracked"]) == T


def test_non_differentiable_batched_adaptation_keeps_no_graph():
    net = conv4()
    loop = InnerLoop(net, steps=3, lr=0.1, learn_lr=True)
    sx, sy, qx, _ = tasks()
    a = loop.adapt_batched(lambda n, x, y: F.cross_entropy(n(x), y), sx, sy, differentiable=False)
    assert all(not p.requires_grad and p.grad_fn is None for p in a.params)
    ref = [loop.adapt(lambda n: F.cross_entropy(n(sx[i]), sy[i]), differentiable=False)(qx[i])
           for i in range(T)]
    with torch.no_grad():
        torch.testing.assert_close(a(qx), torch.stack(ref))
    assert [p.shape[0] for p in a.stacked_params()] == [T] * len(a.params)
    assert len(a.inner_losses) == 3 and a.inner_losses[0].shape == (T,)


def test_mismatched_task_counts_are_a_config_error():
    loop = InnerLoop(conv4(), steps=1)
    sx, sy, _, _ = tasks()
    with pytest.raises(ConfigError, match="task tensor 1 has 2 tasks"):
        loop.adapt_batched(lambda n, x, y: F.cross_entropy(n(x), y), sx, sy[:2])


def test_resolve_task_batching_auto_on_off_and_ragged_fallback(caplog):
    equal = [[torch.zeros(5, 1)], [torch.zeros(5, 1)]]
    ragged = [[torch.zeros(5, 1)], [torch.zeros(7, 1)]]
    cuda = torch.device("cuda")
    assert resolve_task_batching("auto", equal, cuda, "t1") is True
    assert resolve_task_batching("auto", equal, torch.device("cpu"), "t1") is False
    assert resolve_task_batching("off", equal, cuda, "t1") is False
    assert resolve_task_batching("on", equal, torch.device("cpu"), "t1") is True
    with caplog.at_level(logging.INFO, logger="fewshot.inner_loop"):
        assert resolve_task_batching("auto", ragged, cuda, "t-ragged") is False
        assert resolve_task_batching("auto", ragged, cuda, "t-ragged") is False
    lines = [r for r in caplog.records if "unequal shapes" in r.getMessage()]
    assert len(lines) == 1  # logged once
    with pytest.raises(ConfigError, match=r"task_batching='on' needs tasks of equal shapes.*\(5, 1\)"):
        resolve_task_batching("on", ragged, cuda, "t1")
    with pytest.raises(ConfigError, match="must be one of auto, on, off"):
        resolve_task_batching("yes", equal, cuda, "t1")


def test_cuda_out_of_memory_becomes_one_training_error():
    with pytest.raises(TrainingError, match="meta-batch of 32 tasks.*task_batching='off'.*smaller meta_batch"):
        with batched_oom_guard(32, "learner 'maml'"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")


def test_second_order_adam_is_finite_where_a_gradient_entry_is_exactly_zero():
    """A conv bias feeding BatchNorm has an exactly zero gradient; Adam's √v there once gave
    NaN meta-gradients (0 · ∞). The direction m̂/(√v̂+ε) has derivative 1/ε at g = 0 through
    m̂: checked against finite differences of the meta-loss along the bias."""
    net = conv4()
    loop = InnerLoop(net, steps=2, lr=0.1, optimizer="adam")
    sx, sy, qx, qy = tasks()

    def meta_loss():
        a = loop.adapt(lambda n: F.cross_entropy(n(sx[0]), sy[0]), differentiable=True)
        return F.cross_entropy(a(qx[0]), qy[0])

    bias = net.backbone.blocks[1].conv.bias
    (g,) = torch.autograd.grad(meta_loss(), [bias])
    assert torch.isfinite(g).all()
    h, d = 1e-6, torch.randn(bias.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        bias += h * d
        up = meta_loss()
        bias -= 2 * h * d
        down = meta_loss()
        bias += h * d
    torch.testing.assert_close((g * d).sum(), (up - down) / (2 * h), rtol=1e-4, atol=1e-7)
