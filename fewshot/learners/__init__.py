"""Learners behind one registry (see :mod:`fewshot.learners.registry`)."""
from fewshot.learners.base import Learner, LearnerConfig
from fewshot.learners.registry import get_learner, list_learners, register_learner

__all__ = ["Learner", "LearnerConfig", "get_learner", "list_learners", "register_learner"]
