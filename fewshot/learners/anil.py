"""ANIL, Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature
Reuse? Towards Understanding the Effectiveness of MAML", ICLR 2020).

MAML (:mod:`fewshot.learners.maml`) with the inner loop restricted to the network head
(Raghu et al. sec. 4, "ANIL"): with θ = (θ_body, θ_head), for each task T_i

    θ'_head,i = θ_head − α ∇_{θ_head} L_{T_i}(f_{θ_body, θ_head}; D_i)      (repeated T times)

and the outer loss L_{T_i}(f_{θ_body, θ'_head,i}; D'_i) meta-trains *both* θ_body and θ_head
(the body is reached through the adapted head's dependence on the features), with Adam and
the mean over the meta-batch. At test the head alone is fine-tuned on the support set for
``eval_steps`` steps; the body's features are reused unchanged.

Defaults: Raghu et al. train ANIL "with the same hyperparameters as MAML" (sec. 4 and
appendix), so every default is :class:`~fewshot.learners.maml.MAML`'s (Finn et al.'s
mini-ImageNet values: α = 0.01, 5 inner steps in training, 10 at test, meta-batch 4,
β = 1e-3, second order). The inner loop over a linear head is convex and cheap, so second
order costs little here.
"""
from __future__ import annotations

from dataclasses import dataclass

from fewshot.learners.base import require
from fewshot.learners.maml import MAML
from fewshot.learners.registry import register_learner

__all__ = ["ANIL"]


@register_learner("anil")
class ANIL(MAML):
    """MAML whose inner loop adapts the head only (``adapt="head"``); see the module docstring."""

    description = ("ANIL: MAML with the inner loop over the head only; the body is meta-learned "
                   "and reused (test: fine-tunes the head)")
    paper = ("Raghu, Raghu, Bengio & Vinyals, 'Rapid Learning or Feature Reuse? Towards "
             "Understanding the Effectiveness of MAML', ICLR 2020")

    @dataclass
    class Config(MAML.Config):
        """As :class:`MAML.Config` with ``adapt="head"`` (which it requires)."""

        adapt: str = "head"

        def validate(self) -> None:
            super().validate()
            require(self.adapt == "head", "learner 'anil' adapts the head only: 'adapt' must be "
                    "'head' (use learner 'maml' with another 'adapt', or 'boil' for the body)")
