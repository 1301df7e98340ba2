"""No learner makes the host wait for the device during a training step.

On an accelerator, reading a tensor's value on the host (``.item()``, ``bool``/``int``/``float``
of a tensor, ``.tolist()``, ``.numpy()``, ``.cpu()``) waits for every queued kernel: one such
read per step serialises host and device. These tests count those calls during one
``train_step`` of every registered learner (after a warm-up step, so one-time reads such as a
cached step size are not counted), for each BatchNorm policy and task-batching setting the
learner has, with episodes marked ``checked`` as a sampler marks them.

Counted are calls made by fewshot's own code (the caller's file lies in the fewshot package),
except in the host checks that read only host data: the CPU-only finiteness checks
(:meth:`Learner.check_finite`, the supervised learners' ``_guard_finite``: both return at once
off the CPU), :func:`fewshot.learners.base.host_label_span` and ``read_on_cpu`` (None off
the CPU), L2G's
disjoint-class check (``Episode.classes`` stays on the host) and the supervised learners'
label-range check (only for labels on the CPU).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fewshot
from fewshot.errors import ConfigError, DataError, TrainingError
from fewshot.inner_loop import BN_POLICIES
from fewshot.learners import list_learners

from .any_learner import build, make_batch, option_names

FEWSHOT = str(Path(fewshot.__file__).parent)
READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
#: host checks that read only host data on an accelerator run (see the module docstring),
#: as (module file, function)
HOST_ONLY = {("base.py", "check_finite"), ("base.py", "host_label_span"), ("base.py", "read_on_cpu"),
             ("standard.py", "_guard_finite"), ("standard.py", "check_batch"),
             ("l2g.py", "check_disjoint_pairs")}


def _cases():
    for name in list_learners():
        names = option_names(name)
        bns = [None] + [b for b in BN_POLICIES if b != "transductive"] if "bn" in names else [None]
        batchings = ["off", "on"] if "task_batching" in names else [None]
        for bn in bns:
            for batching in batchings:
                options = {k: v for k, v in (("bn", bn), ("task_batching", batching)) if v}
                yield pytest.param(name, options, id="-".join([name, *options.values()]))
    if "mltp" in list_learners():  # the α sign check of alpha_negative="error"
        yield pytest.param("mltp", {"alpha_negative": "error", "alpha_mean": 0.1, "alpha_std": 0.0,
                                    "lr": 1e-4}, id="mltp-alpha_negative=error")


class _Reads:
    """Patches the host-read methods of ``torch.Tensor`` to record fewshot's calls."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.on = False
        for method in READS:
            monkeypatch.setattr(torch.Tensor, method, self._spy(method, getattr(torch.Tensor, method)))

    def _spy(self, method, real):
        reads = self

        def spy(tensor, *args, **kwargs):
            if reads.on:
                reads._record(method)
            return real(tensor, *args, **kwargs)

        return spy

    def _record(self, method):
        caller = sys._getframe(2)
        if not caller.f_code.co_filename.startswith(FEWSHOT):
            return
        frame = caller
        while frame is not None:
            code = frame.f_code
            if (code.co_filename.startswith(FEWSHOT)
                    and (Path(code.co_filename).name, code.co_name) in HOST_ONLY):
                return
            frame = frame.f_back
        where = f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno} ({caller.f_code.co_name})"
        self.calls.append(f"{method} at {where}")


@pytest.mark.parametrize("name,options", list(_cases()))
def test_a_training_step_reads_nothing_back_from_the_device(name, options, monkeypatch):
    try:
        learner = build(name, **options)
    except ConfigError as e:  # e.g. Reptile refuses statistics it would never learn
        pytest.skip(f"{name} refuses {options}: {e}")
    kind = learner.input_kind
    learner.train_step(make_batch(kind, seed=0, checked=True))  # warm-up: one-time reads
    batch = make_batch(kind, seed=1, checked=True)
    reads = _Reads(monkeypatch)
    reads.on = True
    try:
        learner.train_step(batch)
    finally:
        reads.on = False
    assert reads.calls == [], f"{name} {options}: host reads per step: {reads.calls}"


def test_mtl_base_labels_out_of_range_are_still_refused_on_the_host():
    learner = build("mtl+maml")
    batch = make_batch("episodes", seed=0)
    batch[1].base_query_y = batch[1].base_query_y + 100
    with pytest.raises(DataError, match=r"base-class labels \d+\.\.1\d\d do not fit the C-way head "
                                        r"\(C = num_classes = 12\); build the learner"):
        learner.train_step(batch)


def test_mltp_negative_alpha_off_the_cpu_is_recorded_and_refused_at_the_checkpoint(monkeypatch):
    """alpha_negative='error' where α cannot be read without waiting (``read_on_cpu`` gives
    None, as on an accelerator): the steps run on, the first step that drove α below 0 is
    recorded, and ``state_dict`` (a checkpoint) refuses with that step."""
    import fewshot.learners.mltp as mltp

    learner = build("mltp", alpha_negative="error", alpha_mean=0.1, alpha_std=0.0, lr=1e-4)
    learner.train_step(make_batch("supervised", seed=0))
    learner.state_dict()  # α still >= 0: nothing recorded
    monkeypatch.setattr(mltp, "read_on_cpu", lambda flag: None)
    with torch.no_grad():
        learner.inner.alpha.fill_(-1e-3)  # the next update leaves it negative (lr 1e-4)
    learner.train_step(make_batch("supervised", seed=1))
    learner.train_step(make_batch("supervised", seed=2))
    assert learner.steps_done == 3
    with pytest.raises(TrainingError, match=r"turned negative \(-[0-9.e-]+\) at step 2;"):
        learner.state_dict()
