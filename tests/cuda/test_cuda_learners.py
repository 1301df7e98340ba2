"""Every learner on CUDA against the CPU, the declared autocast paths on CUDA, batched against
sequential tasks on CUDA. Skipped (with the reason) where no CUDA device is visible.

Each check builds the learner twice from the same seed (identical weights), once on the CPU and
once on CUDA, and feeds both the same batch. Compared are functions, not parameters: the query
logits of ``predict`` (``predict_batch`` for the supervised classifiers) before training, the
loss ``train_step`` returns from those weights, and the logits again after the step. Parameters
are not compared one by one: Adam's first step is ≈ lr·sign(g), and a gradient that is rounding
noise (the bias of a convolution followed by BatchNorm, which the output does not depend on)
flips sign between devices without changing any output. TF32 is switched off for these tests,
so CUDA float32 differs from the CPU by reordered sums only (relative ~1e-6 per operation).

``FEWSHOT_TEST_TWIN_DEVICE=cpu`` runs the same checks with both twins on the CPU: a check of
the test code itself on a machine without CUDA (every comparison then holds exactly).
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

from fewshot.data.episodes import Episode
from fewshot.data.supervised import TaskPairBatch
from fewshot.learners import get_learner, list_learners

TWIN = os.environ.get("FEWSHOT_TEST_TWIN_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(TWIN == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA device (torch.cuda.is_available() is False)")

BUILTIN = sorted(n for n, c in list_learners().items() if c.__module__.startswith("fewshot.learners"))
WAYS, NUM_BASE = 5, 20


@pytest.fixture(autouse=True)
def exact_float32():
    """No TF32 in matmuls or convolutions (restored after the test)."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _episode(g, classes=None) -> Episode:
    means = torch.randn(WAYS, 1, 28, 28, generator=g)
    classes = torch.randperm(NUM_BASE, generator=g)[:WAYS] if classes is None else classes

    def part(k):
        y = torch.arange(WAYS).repeat_interleave(k)
        return means[y] + 0.3 * torch.randn(len(y), 1, 28, 28, generator=g), y

    (sx, sy), (qx, qy) = part(1), part(3)
    return Episode(sx, sy, qx, qy, classes, base_support_y=classes[sy], base_query_y=classes[qy])


def make_batch(kind: str, seed: int = 0):
    """A small training batch of ``kind`` (episodes, pairs or supervised) on the CPU."""
    g = torch.Generator().manual_seed(seed)
    if kind == "supervised":
        x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
        return TaskPairBatch(x[:8], y[:8], x[8:], y[8:])
    if kind == "pairs":
        perms = [torch.randperm(NUM_BASE, generator=g) for _ in range(2)]  # disjoint classes
        return [(_episode(g, c[:WAYS]), _episode(g, c[WAYS:2 * WAYS])) for c in perms]
    return [_episode(g) for _ in range(2)]


def to(batch, device):
    if isinstance(batch, TaskPairBatch):
        return batch.to(device)
    return [tuple(e.to(device) for e in b) if isinstance(b, tuple) else b.to(device) for b in batch]


def build(name: str, device, **options):
    """``name`` from seed 0 on ``device``: Conv-4/8 on 1x28x28 episodes, CNet1 on 3x32x32."""
    cls = get_learner(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    if cls.input_kind == "supervised":
        shape, num_classes = dict(in_channels=3, image_size=32), 10
    else:
        shape, num_classes = dict(in_channels=1, image_size=28), NUM_BASE
        options.setdefault("backbone_options", {"hidden": 8})
    if "ways" in fields:
        options.setdefault("ways", WAYS)
    if name.startswith("mtl"):
        options.setdefault("inner_batch", None)  # k sub-batches of the 5 support images
    for key, value in (("eval_steps", 3), ("finetune_steps", 3), ("inner_steps", 2)):
        if key in fields:
            options.setdefault(key, value)
    torch.manual_seed(0)
    learner = cls(cls.Config(**options), in_channels=shape["in_channels"],
                  image_size=shape["image_size"], num_classes=num_classes)
    return learner.to(device)


def outputs(learner, batch):
    """Logits of the learner's evaluation path on ``batch`` (float32, on the CPU)."""
    learner.eval()
    try:
        if isinstance(batch, TaskPairBatch):
            return learner.predict_batch(batch.x_j).float().cpu()
        eps = [b[0] if isinstance(b, tuple) else b for b in batch]
        return torch.stack([learner.predict(e).detach().float().cpu() for e in eps])
    finally:
        learner.train()


def close(a, b, rel: float, what: str) -> None:
    scale = float(b.abs().max()) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * max(scale, 1e-3), msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", BUILTIN)
def test_train_step_and_predict_on_cuda_match_the_cpu(name):
    cpu, dev = build(name, "cpu"), build(name, TWIN)
    batch = make_batch(cpu.input_kind)
    batch_dev = to(batch, TWIN)
    close(outputs(dev, batch_dev), outputs(cpu, batch), 1e-4, f"{name} logits before training")
    m_cpu, m_dev = cpu.train_step(batch), dev.train_step(batch_dev)
    loss_cpu, loss_dev = m_cpu["loss"].detach().float(), m_dev["loss"].detach().float().cpu()
    assert torch.isfinite(loss_cpu), name
    close(loss_dev, loss_cpu, 1e-4, f"{name} training loss")
    # after one update the weights differ by rounding (see the module docstring): looser
    close(outputs(dev, batch_dev), outputs(cpu, batch), 1e-2, f"{name} logits after one step")


AUTOCAST = [n for n in BUILTIN if get_learner(n).supports_autocast]


@pytest.mark.parametrize("name", AUTOCAST)
def test_declared_autocast_paths_on_cuda(name):
    """A bf16-autocast step on CUDA agrees with the float32 step from the same weights: loss
    within 5%, gradients with cosine similarity > 0.98 (bf16 keeps ~3 significant digits)."""
    if TWIN != "cuda":
        pytest.skip("autocast on CUDA needs a CUDA device")
    full, low = build(name, "cuda"), build(name, "cuda")
    batch = to(make_batch(full.input_kind), "cuda")
    m_full = full.train_step(batch)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        m_low = low.train_step(batch)
    g_full = torch.cat([p.grad.flatten() for p in full.parameters() if p.grad is not None])
    g_low = torch.cat([p.grad.flatten().float() for p in low.parameters() if p.grad is not None])
    assert m_low["loss"].dtype == torch.float32 and torch.isfinite(m_low["loss"])
    assert abs(float(m_low["loss"]) - float(m_full["loss"])) < 0.05 * max(1.0, abs(float(m_full["loss"])))
    assert float(F.cosine_similarity(g_full, g_low, dim=0)) > 0.98


BATCHING = [n for n in BUILTIN
            if "task_batching" in {f.name for f in dataclasses.fields(get_learner(n).Config)}]


FINETUNE_ONLY = {"transfer"}  # trains as plain supervised learning; only its fine-tuning batches


@pytest.fixture
def batched_calls(monkeypatch):
    """Counts calls of ``InnerLoop.adapt_batched`` (the one batched path of every learner)."""
    from fewshot.inner_loop import InnerLoop

    calls, real = [], InnerLoop.adapt_batched

    def spy(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(InnerLoop, "adapt_batched", spy)
    return calls


@pytest.mark.parametrize("name", BATCHING or ["maml"])
def test_batched_tasks_match_sequential_on_cuda(name, batched_calls):
    """task_batching='on' against 'off' on the device: the same loss, the same logits; the
    'off' learner never reaches ``adapt_batched``, the 'on' learner does."""
    if not BATCHING:
        pytest.skip("no learner has the 'task_batching' option in this checkout (issue 11 item 1)")
    seq, bat = build(name, TWIN, task_batching="off"), build(name, TWIN, task_batching="on")
    batch = to(make_batch(seq.input_kind), TWIN)
    ref = outputs(seq, batch)
    m_seq = seq.train_step(batch)
    assert not batched_calls, f"{name}: task_batching='off' reached adapt_batched"
    close(outputs(bat, batch), ref, 1e-4, f"{name} logits before training")
    m_bat = bat.train_step(batch)
    assert batched_calls or name in FINETUNE_ONLY, f"{name}: task_batching='on' trained sequentially"
    close(m_bat["loss"].detach().float().cpu(), m_seq["loss"].detach().float().cpu(), 1e-4,
          f"{name} training loss")
    close(outputs(bat, batch), outputs(seq, batch), 1e-2, f"{name} logits after one step")
    if hasattr(bat, "predict_batch") and seq.input_kind != "supervised":
        eps = [b[0] if isinstance(b, tuple) else b for b in batch]
        bat.eval()
        close(bat.predict_batch(eps).float().cpu(), outputs(seq, batch), 1e-4,
              f"{name} predict_batch against predict")
    assert batched_calls, f"{name}: task_batching='on' never reached adapt_batched"
