"""BOIL, Body Only update in Inner Loop (Oh, Yoo, Kim & Yun, "BOIL: Towards Representation
Change for Few-shot Learning", ICLR 2021).

MAML (:mod:`fewshot.learners.maml`) whose inner loop adapts the body (the feature extractor)
and freezes the head (Oh et al. sec. 3, eq. 3 with the head's inner step size α_h = 0): with
θ = (θ_b, θ_h), for each task T_i

    θ'_b,i = θ_b − α_b ∇_{θ_b} L_{T_i}(f_{θ_b, θ_h}; D_i),      θ'_h,i = θ_h,

and the outer update meta-trains both θ_b and θ_h on L_{T_i}(f_{θ'_b,i, θ_h}; D'_i) (Adam,
mean over the meta-batch). The frozen head forces the features to move towards it
("representation change"). At test the body is fine-tuned the same way (``eval_steps``
steps on the support set, head frozen) and the queries are classified by the frozen head.

Defaults from the authors' code (HJ-Yoo/BOIL, ``main.py`` and ``run_4conv.sh``): one inner
step of size α_b = 0.5 (``--extractor-step-size=0.5 --classifier-step-size=0.0``), one step at
test as in training, second order, meta-batch 4, Adam with β = 1e-3; BatchNorm with batch
statistics (torchmeta's, ``bn="transductive"``).
"""
from __future__ import annotations

from dataclasses import dataclass

from fewshot.learners.base import require
from fewshot.learners.maml import MAML
from fewshot.learners.registry import register_learner

__all__ = ["BOIL"]


@register_learner("boil")
class BOIL(MAML):
    """MAML whose inner loop adapts everything but the head (``adapt="body"``); see the
    module docstring."""

    description = ("BOIL: MAML with the inner loop over the body, head frozen in the inner loop "
                   "(test: fine-tunes the body)")
    paper = ("Oh, Yoo, Kim & Yun, 'BOIL: Towards Representation Change for Few-shot "
             "Learning', ICLR 2021")

    @dataclass
    class Config(MAML.Config):
        """As :class:`MAML.Config` with ``adapt="body"`` (required), α_b = ``inner_lr`` = 0.5,
        one inner step in training and at test (the authors' code)."""

        adapt: str = "body"
        inner_lr: float = 0.5
        inner_steps: int = 1
        eval_steps: int = 1

        def validate(self) -> None:
            super().validate()
            require(self.adapt == "body", "learner 'boil' adapts the body only (head frozen in "
                    "the inner loop): 'adapt' must be 'body' (use learner 'maml' or 'anil' for "
                    "other choices)")
