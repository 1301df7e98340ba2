"""``predict_batch`` refuses episodes of unequal shapes with one line naming the difference
(it used to fail inside ``torch.stack`` with "stack expects each tensor to be equal size", or,
for equal image counts but a different N, to score every episode with the first one's N)."""
from __future__ import annotations

import pytest
import torch

from fewshot.errors import ConfigError
from fewshot.learners import get_learner, list_learners

from .any_learner import NUM_BASE, SIZE, WAYS, build
from .conftest import random_episode

BATCH_PREDICTORS = [n for n, c in list_learners().items()
                    if callable(getattr(c, "predict_batch", None)) and c.input_kind in ("episodes", "pairs")]


def _episode(ways, shots, queries, seed):
    g = torch.Generator().manual_seed(seed)
    return random_episode(ways=ways, shots=shots, queries=queries, size=SIZE, generator=g,
                          num_base=NUM_BASE)


@pytest.mark.parametrize("name", BATCH_PREDICTORS)
def test_predict_batch_on_episodes_of_unequal_shots_is_one_config_error(name):
    learner = build(name).eval()
    one_shot, two_shot = _episode(WAYS, 1, 2, seed=0), _episode(WAYS, 2, 2, seed=1)
    with pytest.raises(ConfigError) as err:
        learner.predict_batch([one_shot, two_shot])
    assert str(err.value) == (
        "episodes of unequal shapes cannot be batched: episode 1's support_x has shape "
        f"(6, 1, {SIZE}, {SIZE}), episode 0's (3, 1, {SIZE}, {SIZE}); call predict on each "
        "episode (evaluation does for unequal ones)")


@pytest.mark.parametrize("name", BATCH_PREDICTORS)
def test_predict_batch_on_episodes_of_unequal_ways_is_one_config_error(name):
    """3-way 2-shot 2-query and 2-way 3-shot 3-query: 6 support and 6 query images each, so
    only ``classes`` tells them apart."""
    learner = build(name).eval()
    episodes = [_episode(3, 2, 2, seed=0), _episode(2, 3, 3, seed=1)]
    assert episodes[0].support_x.shape == episodes[1].support_x.shape
    with pytest.raises(ConfigError, match=r"^(episodes of unequal shapes cannot be batched: "
                                          r"episode 1's classes has shape \(2,\), episode 0's "
                                          r"\(3,\)|.*ways=3 but the episode is 2-way.*)") as err:
        learner.predict_batch(episodes)
    assert "\n" not in str(err.value)
