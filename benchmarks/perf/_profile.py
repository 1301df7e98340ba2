"""Device-independent cost figures from ``torch.profiler``: dispatched operators and host syncs.

A step that is bound by launch overhead (small tensors on a GPU) costs in proportion to the
number of operators it dispatches, whatever the device; a host sync (``.item()``,
``bool(tensor)``, ``int(tensor)``, ``.tolist()`` on a device tensor) stalls the CPU until the
device has caught up, so the CPU can no longer queue the next operators while the device works.
Both can be counted on a CPU, which is how CI without a GPU records them.

* ``ops``: every ``aten::`` event the profiler records while ``fn`` runs (nested calls such as
  ``aten::linear -> aten::addmm`` count each; a CUDA kernel launch is one of these);
* ``syncs``: ``aten::_local_scalar_dense`` events, the operator every tensor-to-Python-scalar
  conversion goes through (on CUDA each is a device-to-host copy that waits for the stream).
"""
from __future__ import annotations

from typing import Callable, Dict


def count_ops(fn: Callable[[], object], warmup: int = 1) -> Dict[str, int]:
    """``{"ops": n, "syncs": m}`` for one call of ``fn`` after ``warmup`` untimed calls."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        fn()
    ops = syncs = 0
    for e in prof.events():
        name = e.name
        if name.startswith("aten::"):
            ops += 1
            if name == "aten::_local_scalar_dense":
                syncs += 1
    return {"ops": ops, "syncs": syncs}
