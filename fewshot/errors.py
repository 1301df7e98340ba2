"""One exception family for everything a user can get wrong.

Every message names the file or option, what was wrong and what to do. The CLI turns a
:class:`FewShotError` into one line on stderr and exit status 2 (``--debug`` shows the
traceback).
"""
from __future__ import annotations

import difflib
from typing import Iterable


class FewShotError(Exception):
    """Base class of every error the framework raises on bad input."""


class DataError(FewShotError):
    """A dataset, store or source file is missing, malformed or cannot satisfy a request."""


class ConfigError(FewShotError):
    """A configuration key, value, option or hyper-parameter is invalid."""


class CheckpointError(FewShotError):
    """A checkpoint or run directory is corrupt, foreign or would be overwritten."""


class TrainingError(FewShotError):
    """Training cannot go on (e.g. a non-finite loss)."""


class DistributedError(FewShotError):
    """torch.distributed set-up or communication failed (world size, timeouts, dead ranks)."""


def closest(name: str, known: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest known name, or ``""``."""
    match = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def unknown_name(kind: str, name: str, known: Iterable[str]) -> str:
    """Message for an unknown name of some kind, listing the known ones and the closest."""
    known = sorted(known)
    return f"unknown {kind} '{name}'.{closest(name, known)} Known: {', '.join(known)}."
