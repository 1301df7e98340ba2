"""Outputs that are either complete or absent: write to a temporary file beside the target,
flush and fsync, then ``os.replace`` (atomic on POSIX); on any error the temporary file is
removed and the target is left as it was."""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import IO, Iterator, Union


@contextlib.contextmanager
def atomic_output(path: Union[str, os.PathLike], mode: str = "wb") -> Iterator[IO]:
    """``with atomic_output(path, "w") as fh: fh.write(...)`` — ``path`` appears only complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temp(path)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _new_temp(path: Path):
    """(fd, name) of a new file beside ``path``, created with mode 0o666 less the umask, as
    ``open`` creates files (``tempfile.mkstemp`` would make it 0o600, and ``os.replace`` keeps
    the mode)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            return os.open(tmp, flags, 0o666), str(tmp)
        except FileExistsError:  # another writer's name: draw again
            continue


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_output`)."""
    with atomic_output(path, "w") as fh:
        fh.write(text)
    return Path(path)
