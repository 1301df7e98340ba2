"""Build any registered learner small, and a training batch of the kind it consumes.

Used by the tests that must hold for every learner (:func:`fewshot.learners.list_learners`,
so learners added later are covered without editing the tests): Conv-4 with 8 filters on
1x28x28 episodes of 3 ways, 2 shots, 2 queries; a ``supervised`` learner on 3x32x32 images of
10 classes with its default backbone. Options a learner does not have are left out.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List

import torch

from fewshot.data.episodes import Episode
from fewshot.data.supervised import TaskPairBatch
from fewshot.learners import get_learner

WAYS, SHOTS, QUERIES, SIZE, NUM_BASE = 3, 2, 2, 28, 12
#: small settings applied where the learner's Config has the option
SMALL = {"ways": WAYS, "inner_steps": 2, "eval_steps": 2, "finetune_steps": 2,
         "inner_batch": None, "eval_batch": None, "relation_hidden": 4, "lr_halve_every": 0}


def option_names(name: str) -> set:
    return {f.name for f in dataclasses.fields(get_learner(name).Config)}


def build(name: str, **options):
    """Learner ``name`` from seed 0 with ``options`` over :data:`SMALL` (where it has them)."""
    cls = get_learner(name)
    names = option_names(name)
    opts = {k: v for k, v in SMALL.items() if k in names}
    if cls.input_kind == "supervised":
        shape, num_classes = dict(in_channels=3, image_size=32), 10
    else:
        shape, num_classes = dict(in_channels=1, image_size=SIZE), NUM_BASE
        opts["backbone_options"] = {"hidden": 8}
    opts.update(options)
    torch.manual_seed(0)
    return cls(cls.Config(**opts), num_classes=num_classes, **shape)


def episode(g: torch.Generator, classes: torch.Tensor, checked: bool = False,
            shots: int = SHOTS, size: int = SIZE) -> Episode:
    """A ``WAYS``-way episode on store classes ``classes``; ``checked`` as a sampler marks it."""
    means = torch.randn(WAYS, 1, size, size, generator=g)

    def part(k):
        y = torch.arange(WAYS).repeat_interleave(k)
        return means[y] + 0.3 * torch.randn(len(y), 1, size, size, generator=g), y

    (sx, sy), (qx, qy) = part(shots), part(QUERIES)
    return Episode(sx, sy, qx, qy, classes, base_support_y=classes[sy], base_query_y=classes[qy],
                   checked=checked)


def make_batch(kind: str, seed: int = 0, checked: bool = False, tasks: int = 2):
    """A training batch of ``kind`` ("episodes", "pairs" or "supervised") of ``tasks`` tasks."""
    g = torch.Generator().manual_seed(seed)
    if kind == "supervised":
        x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
        return TaskPairBatch(x[:8], y[:8], x[8:], y[8:])
    perms = [torch.randperm(NUM_BASE, generator=g) for _ in range(tasks)]
    if kind == "pairs":  # T_i and T_j on disjoint classes
        return [(episode(g, c[:WAYS], checked), episode(g, c[WAYS:2 * WAYS], checked)) for c in perms]
    return [episode(g, c[:WAYS], checked) for c in perms]


def first_images(batch) -> List[torch.Tensor]:
    """The image tensors of ``batch`` that every learner's loss reads (to inject a NaN)."""
    if isinstance(batch, TaskPairBatch):
        return [batch.x_i, batch.x_j]
    eps = [e for b in batch for e in (b if isinstance(b, tuple) else (b,))]
    return [t for e in eps for t in (e.support_x, e.query_x)]


def state_bytes(learner) -> Dict[str, bytes]:
    """Every parameter, buffer, optimiser and scheduler state of ``learner`` as raw bytes (a
    bitwise comparison that also holds where a value is NaN)."""
    out: Dict[str, bytes] = {}

    def walk(prefix, value):
        if torch.is_tensor(value):
            t = value.detach().cpu().contiguous()
            out[prefix] = repr((t.dtype, tuple(t.shape))).encode() + t.view(-1).view(torch.uint8).numpy().tobytes()
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for k, v in enumerate(value):
                walk(f"{prefix}[{k}]", v)
        else:
            out[prefix] = repr(value).encode()

    for k, v in learner.named_parameters():
        walk(f"param {k}", v)
    for k, v in learner.named_buffers():
        walk(f"buffer {k}", v)
    for k, o in learner.optimizers.items():
        walk(f"optimizer {k}", o.state_dict())
    for k, s in learner.schedulers.items():
        if s is not None:
            walk(f"scheduler {k}", s.state_dict())
    out["steps_done"] = repr(learner.steps_done).encode()
    return out
