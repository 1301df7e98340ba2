"""A training step that fails with TrainingError leaves every learner exactly as it was.

Each registered learner (:func:`fewshot.learners.list_learners`) is driven to a non-finite loss
in two ways: by huge step sizes (every learning-rate option of its Config, inner and outer, set
to 1e30; a few steps until the loss overflows) and by a NaN pixel in every image of the batch
(which reaches every learner's loss, whatever its options). After the ``TrainingError`` its
parameters, buffers (BatchNorm statistics, per-step sets, learned step sizes), optimiser and
scheduler states and step count must be bitwise those from before the failed step.
"""
from __future__ import annotations

import pytest

from fewshot.errors import ConfigError, TrainingError
from fewshot.learners import list_learners

from .any_learner import build, first_images, make_batch, option_names, state_bytes

HUGE = 1e30

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _step_size_options(name: str):
    """Options that size a training update (not the test-time fine-tuning ones)."""
    return sorted(n for n in option_names(name)
                  if (n.endswith("lr") or n.endswith("step_size") or n == "alpha_mean")
                  and not n.startswith(("eval", "finetune")))


def _build_with_huge_steps(name: str):
    """The learner with every step-size option it accepts at 1e30 (an option whose check
    refuses 1e30 keeps its default); None when it has none."""
    chosen = {}
    for option in _step_size_options(name):
        try:
            build(name, **chosen, **{option: HUGE})
        except ConfigError:
            continue
        chosen[option] = HUGE
    return build(name, **chosen) if chosen else None


def _assert_unchanged(name, before, after):
    changed = sorted(k for k in before if before[k] != after.get(k))
    added = sorted(set(after) - set(before))
    assert not changed and not added, (f"{name}: a failed step changed {changed[:6]} "
                                       f"(of {len(changed)}) and added {added[:6]}")


@pytest.mark.parametrize("name", list(list_learners()))
def test_a_step_with_a_nan_image_leaves_the_learner_as_it_was(name):
    learner = build(name)
    learner.train_step(make_batch(learner.input_kind, seed=1))  # optimiser state exists
    batch = make_batch(learner.input_kind, seed=2)
    for x in first_images(batch):
        x[0, 0, 0, 0] = float("nan")
    before = state_bytes(learner)
    with pytest.raises(TrainingError):
        learner.train_step(batch)
    _assert_unchanged(name, before, state_bytes(learner))


@pytest.mark.parametrize("name", list(list_learners()))
def test_a_step_with_huge_step_sizes_leaves_the_learner_as_it_was(name):
    learner = _build_with_huge_steps(name)
    if learner is None:
        pytest.skip(f"{name} has no step-size option; the NaN-image test covers it")
    for seed in range(6):
        before = state_bytes(learner)
        try:
            learner.train_step(make_batch(learner.input_kind, seed=seed))
        except TrainingError:
            _assert_unchanged(name, before, state_bytes(learner))
            return
    pytest.fail(f"{name}: step sizes of {HUGE:g} ({_step_size_options(name)}) never made the "
                "loss non-finite in 6 steps")
