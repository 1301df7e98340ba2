"""Results: the N-way K-shot grid, its files, and paired comparisons between runs.

Per cell, the accuracies a_1..a_n of n fixed test episodes give

    mean  = (1/n) Σ a_e
    std   = sqrt( Σ (a_e − mean)² / (n − 1) )         (sample standard deviation, ddof = 1)
    ci95  = 1.96 · std / √n                          (half-width of the 95% interval)

and the table reports ``mean ± ci95``. Two runs evaluated on the same episodes (same seed,
same shape, same fingerprint) are compared *paired*: d_e = a_e^A − a_e^B, reported as
mean(d) ± 1.96·std(d)/√n; a difference is significant when that interval excludes 0.
Pairing removes the episode-to-episode variance both learners share, so the interval is
much tighter than the two unpaired ones.

Files written into a run directory (each atomically): ``results.json`` (everything,
per-episode accuracies included), ``results.csv`` (one row per cell) and ``results.md``
(the Markdown table).

A cell may carry further metrics of the same samples in ``CellResult.metrics`` (name ->
per-sample values): the supervised evaluation stores its per-image top-1 correctness in
``accuracies`` and the per-image top-k correctness (k = min(5, classes)) as
``metrics["top-5"]``, each summarised with the same ``mean ± ci95`` over images. Files
written before this field existed load with ``metrics = {}``.

``GridResult.train_dataset`` records the dataset(s) the weights were trained on ("a+b" for a
multi-source run) next to ``dataset``, the evaluated one: always in ``results.json``; in
``results.csv`` (a ``train_dataset`` column) and ``results.md`` (a note with the image
conversion) when the two differ. :func:`compare` refuses grids of different evaluation datasets.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from fewshot.atomic import atomic_write_text
from fewshot.errors import FewShotError

Z95 = 1.96

__all__ = ["Z95", "mean_ci", "metric_names", "CellResult", "GridResult", "write_results", "load_results",
           "CellComparison", "Comparison", "compare", "compare_runs", "markdown_table"]


def mean_ci(values: Sequence[float]) -> Tuple[float, float, float]:
    """(mean, sample std with ddof=1, 95% half-width 1.96·std/√n) of ``values``.

    One value has no spread estimate: std and ci95 are NaN then.
    """
    a = np.asarray(values, dtype=np.float64)
    n = a.size
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(a.mean())
    if n < 2:
        return mean, float("nan"), float("nan")
    std = float(a.std(ddof=1))
    return mean, std, Z95 * std / math.sqrt(n)


@dataclass
class CellResult:
    """One grid cell: ``ways``-way ``shots``-shot over ``len(accuracies)`` fixed episodes."""

    ways: int
    shots: int
    queries: int
    seed: int
    accuracies: List[float]
    fingerprint: str = ""  # digest of the episodes' classes, labels and pixels
    mean: float = float("nan")
    std: float = float("nan")
    ci95: float = float("nan")
    seconds: float = 0.0
    # further metrics of the same samples, name -> per-sample values (e.g. "top-5" -> per-image
    # 0/1 of the supervised evaluation); summarised by :meth:`metric_stats`
    metrics: Dict[str, List[float]] = field(default_factory=dict)

    def __post_init__(self):
        self.accuracies = [float(a) for a in self.accuracies]
        self.mean, self.std, self.ci95 = mean_ci(self.accuracies)
        self.metrics = {str(k): [float(a) for a in v] for k, v in (self.metrics or {}).items()}

    def metric_stats(self, name: str) -> Tuple[float, float, float]:
        """(mean, sample std, 95% half-width) of the per-sample values of metric ``name``."""
        return mean_ci(self.metrics[name])

    @property
    def episodes(self) -> int:
        return len(self.accuracies)

    @property
    def key(self) -> Tuple[int, int]:
        return (self.ways, self.shots)

    def spec(self) -> Dict[str, Any]:
        return {"ways": self.ways, "shots": self.shots, "queries": self.queries,
                "episodes": self.episodes, "seed": self.seed, "fingerprint": self.fingerprint}

    def label(self) -> str:
        return f"{self.ways}-way {self.shots}-shot"


@dataclass
class GridResult:
    """The evaluation of one learner on an N-way K-shot grid of fixed episodes."""

    learner: str
    dataset: str
    split: str
    cells: List[CellResult]
    checkpoint: str = ""          # which weights: best / last (and the step)
    step: int = 0                 # training steps of those weights
    transductive_bn: bool = False  # BatchNorm used the query batch's statistics at test
    fine_tunes: bool = False      # predict() fine-tuned on the support set
    inference: str = "inductive"  # or a transductive method over the query set (bd-cspn, tim)
    run_dir: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    # the dataset(s) the weights were trained on ("a+b" for several sources); "" in files
    # written before it was recorded. Differs from ``dataset`` for a cross-domain evaluation.
    train_dataset: str = ""

    def cell(self, ways: int, shots: int) -> CellResult:
        for c in self.cells:
            if c.ways == ways and c.shots == shots:
                return c
        raise KeyError(f"no {ways}-way {shots}-shot cell in this grid")

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        for c in d["cells"]:
            c["episodes"] = len(c["accuracies"])
            if not c["metrics"]:
                del c["metrics"]  # episodic grids: the file keeps its former layout
            else:
                c["metric_stats"] = {k: dict(zip(("mean", "std", "ci95"), mean_ci(v)))
                                     for k, v in c["metrics"].items()}
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "GridResult":
        d = dict(d)
        cells = []
        for c in d.pop("cells"):
            c = {k: v for k, v in c.items()
                 if k not in ("mean", "std", "ci95", "episodes", "metric_stats")}
            cells.append(CellResult(**c))
        known = {f for f in cls.__dataclass_fields__}
        return cls(cells=cells, **{k: v for k, v in d.items() if k in known})

    def table(self, title: Optional[str] = None) -> str:
        return markdown_table(self, title=title)

    def __str__(self) -> str:
        return self.table()


def _fmt(mean: float, ci: float, scale: float = 100.0) -> str:
    if math.isnan(ci):
        return f"{mean * scale:.2f}"
    return f"{mean * scale:.2f} ± {ci * scale:.2f}"


def metric_names(cells: Sequence[CellResult]) -> List[str]:
    """The extra metric names of ``cells`` in first-seen order."""
    out: List[str] = []
    for c in cells:
        for k in c.metrics:
            if k not in out:
                out.append(k)
    return out


def markdown_table(grid: GridResult, title: Optional[str] = None) -> str:
    """A Markdown table: one row per ways, one column per shots, accuracy % ± 95% CI; then one
    column per extra metric (the supervised top-5), also % ± 95% CI over the same samples."""
    ways = sorted({c.ways for c in grid.cells})
    shots = sorted({c.shots for c in grid.cells})
    extra = metric_names(grid.cells)
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines.append("| " + " | ".join(["learner", "ways"] + [f"{s}-shot" if s else "top-1 (all test images)"
                                                           for s in shots]
                                   + [f"{m} (all test images)" for m in extra]) + " |")
    lines.append("|" + "---|" * (2 + len(shots) + len(extra)))
    for w in ways:
        row = [grid.learner, str(w)]
        for s in shots:
            try:
                c = grid.cell(w, s)
                row.append(_fmt(c.mean, c.ci95))
            except KeyError:
                row.append("n/a" if f"{w}x{s}" in grid.extra.get("skipped", {}) else "—")
        for m in extra:
            have = [c for c in grid.cells if c.ways == w and m in c.metrics]
            if have:
                mean, _, ci = have[0].metric_stats(m)
                row.append(_fmt(mean, ci))
            else:
                row.append("—")
        lines.append("| " + " | ".join(row) + " |")
    n = sorted({c.episodes for c in grid.cells})
    if grid.cells and all(c.shots == 0 for c in grid.cells):
        what = " and ".join(["top-1"] + extra)
        notes = [f"{what} accuracy % ± 95% CI (1.96·sample std/√n of the per-image 0/1 correctness) "
                 f"over the {', '.join(map(str, n))} images of split '{grid.split}' of {grid.dataset}"]
    else:
        notes = [f"accuracy % ± 95% CI (1.96·sample std/√n) over {', '.join(map(str, n))} fixed "
                 f"episodes of split '{grid.split}' of {grid.dataset}, "
                 f"{grid.cells[0].queries if grid.cells else 0} queries per class"]
    if _cross_domain(grid):
        notes.append(f"trained on {grid.train_dataset}, evaluated on {grid.dataset} (image "
                     f"conversion: {grid.extra.get('conversion', 'none')})")
    notes.append("BatchNorm: " + ("transductive (query-batch statistics)" if grid.transductive_bn
                                  else "running statistics / none"))
    notes.append("fine-tunes on the support set" if grid.fine_tunes else "no test-time fine-tuning")
    if grid.inference != "inductive":
        notes.append(f"inference: transductive ({grid.inference}: the whole query set of each "
                     f"episode is used)")
    if grid.checkpoint:
        notes.append(f"weights: {grid.checkpoint}")
    for cell, reason in grid.extra.get("skipped", {}).items():
        notes.append(f"{cell.replace('x', '-way ')}-shot n/a: {reason}")
    lines += ["", "; ".join(notes) + "."]
    return "\n".join(lines) + "\n"


def _cross_domain(grid: GridResult) -> bool:
    """The weights were trained on other data than the evaluated dataset (cross-domain or
    multi-source); files written before ``train_dataset`` was recorded say nothing."""
    return bool(grid.train_dataset) and grid.train_dataset != grid.dataset


def _csv_text(grid: GridResult) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    extra = metric_names(grid.cells)  # extra columns only where a cell has extra metrics
    cross = _cross_domain(grid)  # a train_dataset column only where it differs from dataset
    w.writerow(["learner", "dataset", "split", "ways", "shots", "queries", "episodes", "seed",
                "mean", "std", "ci95", "transductive_bn", "fine_tunes", "fingerprint"]
               + (["train_dataset"] if cross else [])
               + [f"{m} {s}" for m in extra for s in ("mean", "std", "ci95")])
    for c in grid.cells:
        more = []
        for m in extra:
            more += [repr(x) for x in c.metric_stats(m)] if m in c.metrics else ["", "", ""]
        w.writerow([grid.learner, grid.dataset, grid.split, c.ways, c.shots, c.queries,
                    c.episodes, c.seed, repr(c.mean), repr(c.std), repr(c.ci95),
                    int(grid.transductive_bn), int(grid.fine_tunes), c.fingerprint]
                   + ([grid.train_dataset] if cross else []) + more)
    return buf.getvalue()


def write_results(grid: GridResult, out_dir: Union[str, os.PathLike], stem: str = "results") -> Dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.csv`` and ``<stem>.md`` into ``out_dir`` atomically."""
    out_dir = Path(out_dir)
    paths = {
        "json": atomic_write_text(out_dir / f"{stem}.json",
                                  json.dumps(grid.to_dict(), indent=1, allow_nan=True) + "\n"),
        "csv": atomic_write_text(out_dir / f"{stem}.csv", _csv_text(grid)),
        "md": atomic_write_text(out_dir / f"{stem}.md", markdown_table(grid)),
    }
    return paths


def load_results(path: Union[str, os.PathLike]) -> GridResult:
    """A :class:`GridResult` from a run directory (its results.json) or a results .json file."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FewShotError(f"{path} not found; evaluate the run first: fewshot eval {path.parent}")
    try:
        return GridResult.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError) as e:
        raise FewShotError(f"{path} is not a fewshot results file ({e}); re-run `fewshot eval`") from None


# ---------------------------------------------------------------- comparison
@dataclass
class CellComparison:
    ways: int
    shots: int
    episodes: int
    mean_a: float
    mean_b: float
    diff: float    # mean of the paired differences a_e − b_e
    std: float     # sample std (ddof=1) of the differences
    ci95: float    # 1.96·std/√n
    significant: bool  # the 95% interval of the difference excludes 0


@dataclass
class Comparison:
    a: str
    b: str
    cells: List[CellComparison]

    def table(self) -> str:
        lines = [f"| cell | {self.a} | {self.b} | difference (A − B) ± 95% CI | significant |",
                 "|---|---|---|---|---|"]
        for c in self.cells:
            lines.append(f"| {c.ways}-way {c.shots}-shot | {c.mean_a * 100:.2f} | {c.mean_b * 100:.2f} "
                         f"| {_fmt(c.diff, c.ci95)} | {'yes' if c.significant else 'no'} |")
        n = sorted({c.episodes for c in self.cells})
        lines += ["", f"paired over the same {', '.join(map(str, n))} episodes per cell; "
                      f"CI = 1.96·sample std of the per-episode differences/√n; significant = "
                      f"the interval excludes 0."]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _trained_on(grid: GridResult) -> str:
    return f" (trained on {grid.train_dataset})" if grid.train_dataset else ""


def compare(a: GridResult, b: GridResult, name_a: str = "A", name_b: str = "B") -> Comparison:
    """Paired per-cell comparison of two grids evaluated on the same episodes.

    Raises :class:`FewShotError` when the grids were evaluated on different episodes
    (another evaluation dataset, whatever the training datasets, or another split, seed,
    shape, count or episode fingerprint).
    """
    if (a.dataset, a.split) != (b.dataset, b.split):
        raise FewShotError(f"cannot compare: {name_a} was evaluated on {a.dataset}/{a.split}"
                           f"{_trained_on(a)}, {name_b} on {b.dataset}/{b.split}{_trained_on(b)}; "
                           f"evaluate both on the same dataset and split (fewshot eval RUN "
                           f"--dataset NAME --split SPLIT)")
    cb = {c.key: c for c in b.cells}
    common = [c for c in a.cells if c.key in cb]
    if not common:
        raise FewShotError(f"cannot compare: {name_a} and {name_b} share no grid cell "
                           f"({[c.label() for c in a.cells]} vs {[c.label() for c in b.cells]}); "
                           f"evaluate both with the same --ways/--shots")
    out = []
    for ca in common:
        cbb = cb[ca.key]
        sa, sb = ca.spec(), cbb.spec()
        if sa != sb:
            diff = sorted(k for k in sa if sa[k] != sb[k])
            raise FewShotError(f"cannot compare {ca.label()}: the runs used different episodes "
                               f"({', '.join(f'{k} {sa[k]!r} vs {sb[k]!r}' for k in diff)}); "
                               f"re-evaluate both with the same --seed, --queries and --episodes")
        d = np.asarray(ca.accuracies) - np.asarray(cbb.accuracies)
        mean, std, ci = mean_ci(d)
        sig = bool(not math.isnan(ci) and abs(mean) > ci)
        out.append(CellComparison(ca.ways, ca.shots, len(d), ca.mean, cbb.mean, mean, std, ci, sig))
    return Comparison(name_a, name_b, out)


def compare_runs(run_a: Union[str, os.PathLike], run_b: Union[str, os.PathLike]) -> Comparison:
    """:func:`compare` of the results.json of two run directories."""
    ga, gb = load_results(run_a), load_results(run_b)
    return compare(ga, gb, name_a=f"{ga.learner} ({Path(run_a).name})",
                   name_b=f"{gb.learner} ({Path(run_b).name})")
