"""Load dataset pickles without running arbitrary code.

A pickle can name any importable callable (``os.system``, ``subprocess.Popen``...) and the
standard unpickler calls it. Dataset pickles (CIFAR batches, mini-ImageNet caches, tiered-ImageNet
label/image pickles) only ever need numpy arrays and plain containers, so :func:`safe_load`
resolves globals through an allow-list and refuses everything else with a :class:`DataError`
naming the file and the forbidden global. Python 2 pickles are read with ``encoding="latin1"``
(numpy arrays' raw bytes round-trip) or ``encoding="bytes"`` (CIFAR's dict keys stay ``bytes``).
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import BinaryIO, Union

from fewshot.errors import DataError

# (module, name) pairs a dataset pickle may reference. Modules are given after Python 2 -> 3
# name fixing; numpy's ``numpy.core`` and ``numpy._core`` spellings are both accepted.
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_ALLOWED: set[tuple[str, str]] = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
    ("builtins", "str"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("builtins", "complex"),
    ("builtins", "bool"),
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    # protocol-2 pickles written by Python 3 encode ``bytes`` objects as _codecs.encode(s, "latin1")
    ("_codecs", "encode"),
}
for _m in _NUMPY_MODULES:
    _ALLOWED.update({(_m, "_reconstruct"), (_m, "scalar")})


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, fh: BinaryIO, name: str, encoding: str):
        super().__init__(fh, encoding=encoding, fix_imports=True)
        self._name = name

    def find_class(self, module: str, name: str):
        mod, nm = module, name
        # Python 2 names (__builtin__, copy_reg...) -> Python 3; these names do not exist in
        # Python 3, so mapping them unconditionally is what fix_imports does for protocol < 3
        import _compat_pickle
        if True:
            if (mod, nm) in _compat_pickle.NAME_MAPPING:
                mod, nm = _compat_pickle.NAME_MAPPING[(mod, nm)]
            elif mod in _compat_pickle.IMPORT_MAPPING:
                mod = _compat_pickle.IMPORT_MAPPING[mod]
        if (mod, nm) not in _ALLOWED:
            raise DataError(
                f"{self._name}: refusing to unpickle forbidden global '{module}.{name}' (dataset "
                "pickles may only hold numpy arrays and plain containers); the file is not a "
                "dataset pickle or was tampered with: re-download it from its official source")
        if mod.startswith("numpy."):
            import importlib
            for candidate in (mod, mod.replace("numpy.core", "numpy._core"),
                              mod.replace("numpy._core", "numpy.core")):
                try:
                    return getattr(importlib.import_module(candidate), nm)
                except (ImportError, AttributeError):
                    continue
        return super().find_class(mod, nm)


def safe_load(file: Union[str, os.PathLike, BinaryIO, bytes], *, encoding: str = "latin1"):
    """Unpickle ``file`` (a path, a binary file object or the pickle's bytes) allowing only
    numpy arrays/dtypes/scalars and builtin containers.

    ``encoding`` decodes Python 2 ``str`` objects: ``"latin1"`` (default, needed for numpy
    arrays pickled by Python 2) or ``"bytes"`` (keeps them as ``bytes``, as the official CIFAR
    loader does). Raises :class:`DataError` naming the file for a forbidden global, a missing
    file or a truncated/invalid pickle."""
    if isinstance(file, (bytes, bytearray)):
        name, fh, close = "<bytes>", io.BytesIO(file), True
    elif isinstance(file, (str, os.PathLike)):
        path = Path(file)
        name = str(path)
        try:
            fh, close = open(path, "rb"), True
        except FileNotFoundError:
            raise DataError(f"{path}: file not found") from None
        except OSError as e:
            raise DataError(f"{path}: cannot open ({e.strerror})") from None
    else:
        name, fh, close = str(getattr(file, "name", "<stream>")), file, False
    try:
        return _SafeUnpickler(fh, name, encoding).load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, UnicodeDecodeError, MemoryError, OverflowError) as e:
        raise DataError(f"{name}: not a valid pickle ({type(e).__name__}: {e}); the file is "
                        "truncated or corrupt, re-download it") from None
    finally:
        if close:
            fh.close()
