"""Learners by name: ``@register_learner("name")``, :func:`get_learner`, :func:`list_learners`.

Built-in learners are the modules of the :mod:`fewshot.learners` package. Third-party
learners register through the ``fewshot.learners`` entry-point group: each entry point
names either a :class:`~fewshot.learners.base.Learner` subclass (registered under the
entry point's name) or a module whose import runs ``@register_learner``.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from typing import Dict, Type

from fewshot.errors import ConfigError, unknown_name
from fewshot.learners.base import Learner

_REGISTRY: Dict[str, type] = {}
_LOADED = False
ENTRY_POINT_GROUP = "fewshot.learners"
_NOT_LEARNERS = {"base", "registry"}


def register_learner(name: str):
    """Class decorator: register a Learner subclass under ``name``."""

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Learner)):
            raise ConfigError(f"@register_learner('{name}') must decorate a Learner subclass")
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ConfigError(f"learner name '{name}' is taken by {existing.__module__}."
                              f"{existing.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import fewshot.learners as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in _NOT_LEARNERS and not info.name.startswith("_"):
            importlib.import_module(f"fewshot.learners.{info.name}")
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if isinstance(obj, type) and ep.name not in _REGISTRY:
            register_learner(ep.name)(obj)


def reload_entry_points() -> None:
    """Look for entry points again (after installing a plugin in a running process)."""
    global _LOADED
    _LOADED = False
    _load_all()


def get_learner(name: str) -> Type:
    """The learner class registered as ``name``; unknown names list the known ones."""
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(unknown_name("learner", name, _REGISTRY)) from None


def list_learners() -> Dict[str, type]:
    """All registered learners, sorted by name."""
    _load_all()
    return dict(sorted(_REGISTRY.items()))
