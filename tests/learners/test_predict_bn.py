"""``predict`` of every episodic learner normalises exactly as its BatchNorm policy says.

Every ``F.batch_norm`` call made during ``predict`` is captured (a ``TorchFunctionMode``), and
its output is checked against a hand normalisation (x − μ) / √(σ² + ε) · γ + β with the μ, σ²
the policy prescribes (see :mod:`fewshot.inner_loop`):

* ``transductive``: the mean and biased variance of the call's own input batch;
* ``running``: the learner's BatchNorm modules' running statistics (eval mode);
* ``per_step``: the training loop's per-step set of step min(t, T) for the forward after t
  fine-tuning steps (learners that do not fine-tune test at θ, step 0).

Learners without a ``bn`` option (ProtoNet, RelationNet, Transfer) test in eval mode with
running statistics, which is checked as ``running``. Each learner trains one step first, so the
statistics it should read differ from the initial mean 0 / variance 1. ``predict`` is called in
eval mode (as the evaluator does) and, for learners that do not fine-tune, also in training
mode: it must apply the policy whatever mode the caller left it in.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from fewshot.errors import ConfigError
from fewshot.inner_loop import BN_POLICIES, InnerLoop
from fewshot.learners.registry import get_learner, list_learners

from .conftest import random_episode

EPISODIC = [n for n in list_learners() if get_learner(n).input_kind in ("episodes", "pairs")]


def _cases():
    for name in EPISODIC:
        fields = get_learner(name).Config.__dataclass_fields__
        for bn in (BN_POLICIES if "bn" in fields else ("running",)):
            yield name, bn


class _CaptureBN(TorchFunctionMode):
    """Record (input, output, weight, bias, eps) of every ``F.batch_norm`` call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.batch_norm:
            names = ("input", "running_mean", "running_var", "weight", "bias", "training",
                     "momentum", "eps")
            a = dict(zip(names, args), **(kwargs or {}))
            self.calls.append((a["input"].detach(), out.detach(), a["weight"], a["bias"],
                               a.get("eps", 1e-5)))
        return out


def _build(name, bn):
    cls = get_learner(name)
    fields = cls.Config.__dataclass_fields__
    opts = {"backbone_options": {"hidden": 8}}
    small = {"inner_steps": 2, "eval_steps": 3, "inner_batch": 6, "eval_batch": None,
             "finetune_steps": 3, "ways": 3, "lr_halve_every": 0, "relation_hidden": 4}
    opts.update({k: v for k, v in small.items() if k in fields})
    if "bn" in fields:
        opts["bn"] = bn
    if "beta" in fields:
        opts["beta"] = 0.5
    torch.manual_seed(0)
    return cls(cls.Config(**opts), in_channels=1, image_size=28, num_classes=12)


def _episode(seed, classes):
    g = torch.Generator().manual_seed(seed)
    e = random_episode(ways=3, shots=2, queries=2, size=28, generator=g, num_base=12)
    e.classes = torch.tensor(classes)
    e.base_support_y, e.base_query_y = e.classes[e.support_y], e.classes[e.query_y]
    return e


def _train_one_step(learner):
    a, b = _episode(1, [0, 1, 2]), _episode(2, [3, 4, 5])
    batch = [(a, b)] if learner.input_kind == "pairs" else [a]
    learner.train_step(batch)
    learner.train()


def _expected_stats(learner, bn, layer, forward, x):
    """(μ, σ²) the policy prescribes for BN layer ``layer`` in forward number ``forward``."""
    if bn == "transductive":
        dims = [0] + list(range(2, x.dim()))
        return x.mean(dims), x.var(dims, unbiased=False)
    if bn == "running":
        bns = [m for m in learner.modules() if isinstance(m, _BatchNorm)]
        return bns[layer].running_mean, bns[layer].running_var
    (loop,) = [m for m in learner.modules() if isinstance(m, InnerLoop)]
    step = min(forward, loop.steps) if learner.fine_tunes_at_test else 0
    return getattr(loop, f"bn_mean_{layer}")[step], getattr(loop, f"bn_var_{layer}")[step]


@pytest.mark.parametrize("name,bn", list(_cases()))
def test_predict_normalises_as_the_bn_policy_says(name, bn):
    try:
        learner = _build(name, bn)
    except ConfigError as e:
        assert bn != "transductive" and "reptile" in name, e  # Reptile: only batch statistics
        return
    _train_one_step(learner)
    n_bn = sum(isinstance(m, _BatchNorm) for m in learner.modules())
    assert n_bn > 0
    # eval mode (the evaluator's call); learners without fine-tuning also from training mode
    for training in ((False, True) if not learner.fine_tunes_at_test else (False,)):
        learner.train(training)
        _check_predict(learner, name, bn, n_bn)
        assert learner.training == training  # the caller's mode is restored


def _check_predict(learner, name, bn, n_bn):
    episode = _episode(3, [6, 7, 8])
    with _CaptureBN() as cap:
        logits = learner.predict(episode)
    assert logits.shape == (6, 3)
    assert cap.calls and len(cap.calls) % n_bn == 0, (len(cap.calls), n_bn)
    for c, (x, out, w, b, eps) in enumerate(cap.calls):
        forward, layer = divmod(c, n_bn)
        mean, var = _expected_stats(learner, bn, layer, forward, x)
        if bn != "transductive":  # trained statistics, not the initial 0 / 1
            assert not torch.allclose(mean, torch.zeros_like(mean)), (c, "untrained mean")
        shape = [1, -1] + [1] * (x.dim() - 2)
        ref = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
        if w is not None:
            ref = ref * w.detach().view(shape) + b.detach().view(shape)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{name} bn={bn} call {c}: {m}")
