"""Helpers shared by the speed benchmarks in this folder.

Every script here runs as ``python benchmarks/perf/NAME.py [--quick] [--json PATH]``: it
prints a table and, with ``--json``, writes ``{"benchmark", "machine", "command", "metrics",
"ratios"}`` (CONVENTIONS.md, "Benchmarks speak a common format"). This module holds what
they all need for that: the argument parser, a one-line machine description, timing
medians after warm-up, the command line and the atomic JSON/text writers.

Scripts run as files, so Python puts this folder first on ``sys.path``; each script also
inserts it explicitly (``Path(__file__).resolve().parent``) before ``import _common``, and
importing this module puts the repository root on ``sys.path`` so ``import fewshot`` finds
the checkout, not an installed copy.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

median = statistics.median


def parser(doc: str, quick_help: Optional[str] = None,
           json_help: Optional[str] = None) -> argparse.ArgumentParser:
    """ArgumentParser described by the first line of ``doc``, with ``--quick`` and
    ``--json PATH`` (a :class:`Path`); scripts add their own options."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--json", type=Path, help=json_help)
    return ap


def cpu() -> str:
    """``CPU <model> x<logical cores>``."""
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def load_average() -> str:
    """``load average <1-minute load>`` (the machine is shared; timings depend on it)."""
    return f"load average {os.getloadavg()[0]:.1f}"


def machine(device=None, *extra: str, with_torch: bool = True, threads: bool = True) -> str:
    """One line naming the hardware and software a result was measured on.

    ``CPU <model> x<cores>, torch <version>, <n> intra-op threads``, preceded by the GPU
    name and count when ``device`` is a CUDA device (a ``torch.device`` or a string), and
    followed by ``extra`` items (library versions, load average). ``threads=False`` leaves
    out this process's thread count (when the timed work runs in other processes with their
    own); ``with_torch=False`` leaves torch out (and does not import it), for benchmarks
    that do not use it.
    """
    parts = [cpu()]
    if with_torch:
        import torch

        parts.append(f"torch {torch.__version__}")
        if threads:
            parts.append(f"{torch.get_num_threads()} intra-op threads")
        if device is not None and str(device).startswith("cuda"):
            parts.insert(0, f"{torch.cuda.get_device_name(torch.device(device))} "
                            f"x{torch.cuda.device_count()}")
    return ", ".join(parts + list(extra))


def sync(device) -> None:
    """Wait for queued CUDA work on ``device`` (no-op on the CPU), so a timer sees it."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return median(times)


def interleaved_times(fns: Dict[str, Callable[[], object]], warmup: int, repeats: int,
                      cpu_time: bool = False) -> Dict[str, List]:
    """Time each of ``fns`` ``repeats`` times after ``warmup`` untimed rounds, round-robin
    (one call of each in turn, so a change of load on the shared machine hits all sides
    alike). Returns ``{name: [wall seconds]}``, or with ``cpu_time`` ``{name: [(wall
    seconds, process CPU seconds)]}``; take the medians of these."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t, c = time.perf_counter(), time.process_time()
            f()
            wall = time.perf_counter() - t
            times[k].append((wall, time.process_time() - c) if cpu_time else wall)
    return times


def command(script: str, argv: Optional[Sequence[str]] = None) -> str:
    """``python benchmarks/perf/<script> <arguments>`` (``argv`` default: ``sys.argv[1:]``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", f"benchmarks/perf/{script}", *args])


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file in the same folder, then
    ``os.replace``), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, benchmark: str, *, machine, command: str, metrics: dict,
               ratios: dict, indent: int = 2, **extra) -> dict:
    """Write the common result format ``{"benchmark", "machine", "command", "metrics",
    "ratios", **extra}`` to ``path`` atomically; returns the payload."""
    payload = {"benchmark": benchmark, "machine": machine, "command": command,
               "metrics": metrics, "ratios": ratios, **extra}
    write_text(path, json.dumps(payload, indent=indent) + "\n")
    return payload

