"""Learners with task_batching='on' against the same learners sequential ('off'): meta-gradients
(all parameters and α), Reptile's update, MTL's meta step, batched test-time fine-tuning
(predict_batch) and the evaluator's batched chunks, on a Conv-4 with BatchNorm in float64."""
import copy

import pytest
import torch

from fewshot.errors import ConfigError
from fewshot.evaluation import evaluate_episodes
from fewshot.learners import get_learner

from .conftest import random_episode

pytestmark = pytest.mark.usefixtures("one_thread")
WAYS, T = 3, 3


def build(name, size=16, **cfg):
    cls = get_learner(name)
    opts = {"hidden": 4}
    if name.endswith("relationnet"):
        opts["pool_blocks"] = 2
    torch.manual_seed(0)
    config = cls.Config(backbone="conv4", backbone_options=opts, **cfg)
    return cls(config, in_channels=1, image_size=size, num_classes=12).double()


def episodes(n=T, ways=WAYS, shots=2, queries=3, seed=10, size=16):
    out = []
    for s in range(n):
        ep = random_episode(ways=ways, shots=shots, queries=queries, size=size, noise=1.0,
                            generator=torch.Generator().manual_seed(seed + s), num_base=12)
        ep.support_x, ep.query_x = ep.support_x.double(), ep.query_x.double()
        out.append(ep)
    return out


def gradients_of_step(learner, batch, optimizer="meta"):
    """The gradients the learner hands to its optimiser in one train_step (no step taken)."""
    seen = {}

    def capture(name="meta", *args, **kwargs):
        if name == optimizer:
            seen.update({n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None})

    learner.outer_step = capture
    metrics = learner.train_step(batch)
    return seen, metrics


def assert_same_step(name, batch, metric_keys=("loss", "acc"), **cfg):
    seq, bat = build(name, task_batching="off", **cfg), build(name, task_batching="on", **cfg)
    g_seq, m_seq = gradients_of_step(seq, copy.deepcopy(batch))
    g_bat, m_bat = gradients_of_step(bat, copy.deepcopy(batch))
    assert g_seq and g_seq.keys() == g_bat.keys()
    for k in g_seq:
        torch.testing.assert_close(g_bat[k], g_seq[k], rtol=1e-5, atol=1e-8, msg=k)
    for k in metric_keys:
        torch.testing.assert_close(m_bat[k].double(), m_seq[k].double(), rtol=1e-6, atol=1e-7)
    for (k, a), (_, b) in zip(seq.state_dict()["modules"].items(), bat.state_dict()["modules"].items()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8, msg=k)  # running statistics too
    return g_seq


@pytest.mark.parametrize("name,cfg", [
    ("maml", {"inner_steps": 2, "inner_lr": 0.3}),
    ("fomaml", {"inner_steps": 2, "inner_lr": 0.3}),
    ("maml", {"inner_steps": 2, "inner_lr": 0.3, "learn_inner_lr": True, "lr_per": "layer"}),  # Meta-SGD
    ("maml", {"inner_steps": 2, "inner_lr": 0.3, "bn": "per_step", "adapt": "head"}),
    ("anil", {"inner_steps": 2, "inner_lr": 0.3}),
    ("boil", {"inner_steps": 2, "inner_lr": 0.3}),
    # MAML++ with its final-step loss: LSLR, per-step BatchNorm statistics and weights
    ("maml++", {"inner_steps": 2, "inner_lr": 0.3, "msl": False, "first_order_epochs": 0}),
])
def test_maml_family_meta_gradients(name, cfg):
    grads = assert_same_step(name, episodes(), ways=WAYS, **cfg)
    if cfg.get("learn_inner_lr"):
        assert "loop.alpha" in grads


@pytest.mark.parametrize("name,cfg", [
    ("maml+protonet", {"bn": "running"}),
    ("l2g+protonet", {"learn_inner_lr": True}),
    ("l2g+relationnet", {"bn": "running", "grad_clip": 0.0}),
])
def test_l2g_family_meta_gradients(name, cfg):
    eps = episodes(n=2 * T)
    batch = eps[:T] if name.startswith("maml") else list(zip(eps[:T], eps[T:]))
    if name.startswith("l2g"):  # T_j's classes disjoint from T_i's
        for k, (_, tj) in enumerate(batch):
            tj.classes = tj.classes + 100
    assert_same_step(name, batch, metric_keys=("loss", "acc", "inner_loss"), **cfg)


def test_reptile_update_equals_sequential():
    cfg = dict(ways=WAYS, inner_steps=3, inner_batch=4, meta_step_size=0.5)
    seq, bat = build("reptile", task_batching="off", **cfg), build("reptile", task_batching="on", **cfg)
    batch = episodes()
    m_seq, m_bat = seq.train_step(copy.deepcopy(batch)), bat.train_step(copy.deepcopy(batch))
    moved = 0.0
    for (k, a), b in zip(seq.net.named_parameters(), bat.net.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-10, msg=k)
    for p, q in zip(seq.net.parameters(), build("reptile", **cfg).net.parameters()):
        moved = max(moved, float((p - q).detach().abs().max()))
    assert moved > 1e-3  # the update is not trivially zero
    torch.testing.assert_close(m_bat["loss"], m_seq["loss"])
    torch.testing.assert_close(m_bat["acc"], m_seq["acc"])


@pytest.mark.parametrize("name", ["mtl+maml", "mtl+reptile"])
def test_mtl_meta_step_equals_sequential(name):
    cfg = dict(ways=WAYS, inner_steps=2, inner_batch=4, beta=1.0)
    assert_same_step(name, episodes(), metric_keys=("meta_loss", "meta_acc"), **cfg)


@pytest.mark.parametrize("name,cfg", [
    ("maml", {"ways": WAYS, "eval_steps": 3, "inner_lr": 0.3}),
    ("maml", {"ways": WAYS, "eval_steps": 2, "bn": "running"}),
    ("anil", {"ways": WAYS, "eval_steps": 3, "inner_lr": 0.3}),
    ("boil", {"ways": WAYS, "eval_steps": 2, "inner_lr": 0.3}),
    ("maml++", {"ways": WAYS, "inner_steps": 2, "eval_steps": 3, "inner_lr": 0.3}),
    ("reptile", {"ways": WAYS, "eval_steps": 3, "eval_batch": 4}),
    ("mtl+maml", {"ways": WAYS, "eval_steps": 3, "eval_batch": 4, "beta": 1.0, "inner_batch": 4}),
    ("transfer", {"finetune_steps": 3, "finetune_lr": 0.5}),
    ("transfer", {"finetune_steps": 3, "finetune_lr": 0.5, "finetune_body": True}),
])
def test_predict_batch_equals_predict_per_episode(name, cfg):
    learner = build(name, task_batching="on", **cfg)
    learner.train_step(episodes(seed=40)) if name != "transfer" else None
    eps = episodes(n=4, seed=50)
    ref = torch.stack([learner.predict(ep) for ep in eps])
    out = learner.predict_batch(eps)
    assert out.shape == (4, 3 * WAYS, WAYS) and not out.requires_grad
    torch.testing.assert_close(out, ref, rtol=1e-7, atol=1e-9)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_evaluator_batched_chunks_equal_sequential_accuracies(monkeypatch):
    learner = build("maml", task_batching="on", ways=WAYS, eval_steps=2, inner_lr=0.3)
    eps = episodes(n=7, seed=70)
    calls = []
    original = learner.predict_batch
    monkeypatch.setattr(learner, "predict_batch", lambda e: calls.append(len(e)) or original(e))
    acc_b, trans_b = evaluate_episodes(learner, eps, range(7), chunk=4)
    learner.config.task_batching = "off"
    acc_s, trans_s = evaluate_episodes(learner, eps, range(7))
    assert calls == [4, 2]  # episode 0 through predict (BN probe), then chunks of <= 4
    assert acc_b == acc_s and trans_b == trans_s is True
    assert len(set(acc_s)) > 1  # the accuracies say something


def test_ragged_batch_falls_back_and_on_is_a_config_error():
    ragged = episodes(n=1, shots=2) + episodes(n=1, shots=3, seed=20)
    auto = build("maml", ways=WAYS, inner_steps=1)
    assert torch.isfinite(auto.train_step(ragged)["loss"])  # auto on CPU: sequential
    on = build("maml", ways=WAYS, inner_steps=1, task_batching="on")
    with pytest.raises(ConfigError, match=r"task_batching='on' needs tasks of equal shapes.*\(6, 1, 16, 16\)"):
        on.train_step(ragged)
    with pytest.raises(ConfigError, match="task_batching"):
        build("maml", task_batching="always")
