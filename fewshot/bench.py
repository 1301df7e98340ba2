"""``fewshot bench SPEC.toml [--quick]``: several learners x seeds, the same test episodes, one table.

A spec is a TOML file::

    name = "quickstart"              # title of the report
    out = "runs/quickstart"          # where runs and the report go (--out overrides)
    seeds = [0, 1]                   # training seeds; every learner is trained once per seed

    [data]  ...                      # shared [data], [train], [eval] tables of a run config
    [train] ...
    [eval]  ...

    [[learners]]                     # one entry per learner
    name = "protonet"                # registered name
    label = "ProtoNet"               # optional display name (default: name)
    options = { lr = 1e-3 }          # [learner] options
    train = { episodes = 2000 }      # per-learner [train] overrides (optional)

    [quick]                          # the short CPU version (--quick): overrides of the above
    seeds = [0]
    train = { episodes = 200 }
    eval = { episodes = 200 }
    learners.fomaml.train = { episodes = 100 }   # per-learner quick overrides, by label or name

With --quick the [train] keys apply in this order, later winning: the spec's [train], the
learner's ``train``, [quick] ``train``, ``quick.learners.<label>.train`` (so a quick run is
short even for learners whose full entry sets its own ``episodes``).

Every run config is built and validated (learner names and options, the evaluation grid
against the split) before the first training starts. Each run goes to
``OUT/<label>/seed<k>``; a finished run whose config and evaluation match is reused, an
interrupted one is resumed, anything else needs ``--force``. All learners are evaluated on
the same fixed episodes (same [eval] seed). Per learner and cell the report gives the mean
over seeds of the per-episode accuracy, with the 95% interval over episodes
(1.96·s/√n of the seed-averaged per-episode accuracies), the standard deviation of the
per-seed means when there are several seeds, and the paired difference to the first
learner (significant when its 95% interval excludes 0). Supervised learners are evaluated
on every test image: a "top-1" column and, from the cell's extra metrics, a "top-5" column
(seed-averaged per-image correctness, same interval, sd of the per-seed means; k = min(5,
classes)). Files: ``OUT/bench.json``,
``bench.csv``, ``bench.md`` and ``OUT/plots/bench.png``.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from fewshot.atomic import atomic_write_text
from fewshot.config import config_from_dict, config_hash, tomllib
from fewshot.data.store import open_split
from fewshot.errors import ConfigError, FewShotError, closest
from fewshot.evaluation import check_grid, evaluate_run
from fewshot.learners import get_learner
from fewshot.report import mean_ci
from fewshot.run import open_run
from fewshot.trainer import Trainer

__all__ = ["BenchSpec", "load_spec", "run_bench", "BenchResult"]

SPEC_KEYS = ["name", "description", "out", "seeds", "data", "train", "eval", "learners", "quick"]
LEARNER_KEYS = ["name", "label", "options", "train"]


@dataclass
class BenchEntry:
    name: str
    label: str
    options: Dict[str, Any] = field(default_factory=dict)
    train: Dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchSpec:
    name: str
    out: str
    seeds: List[int]
    base: Dict[str, Any]  # {"data":..., "train":..., "eval":...}
    learners: List[BenchEntry]
    description: str = ""
    source: str = ""

    def run_config(self, entry: BenchEntry, seed: int) -> Dict[str, Any]:
        raw = copy.deepcopy(self.base)
        raw.setdefault("train", {}).update(copy.deepcopy(entry.train))
        raw["train"]["seed"] = seed
        raw["learner"] = {"name": entry.name, **copy.deepcopy(entry.options)}
        return raw


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", s).strip("-") or "run"


def _merge(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _entries(path, learners_raw, quick_raw) -> List[BenchEntry]:
    """The [[learners]] of a spec, each with its [quick] overrides when ``quick_raw`` is given."""
    quick = quick_raw is not None
    entries = []
    labels = set()
    for i, lr in enumerate(learners_raw):
        if not isinstance(lr, dict) or "name" not in lr:
            raise ConfigError(f"bench spec {path}: learners[{i}] needs name = \"<learner>\"")
        for k in lr:
            if k not in LEARNER_KEYS:
                raise ConfigError(f"unknown key 'learners[{i}].{k}' in bench spec {path}."
                                  f"{closest(k, LEARNER_KEYS)} Valid keys: {', '.join(LEARNER_KEYS)}")
        e = BenchEntry(name=str(lr["name"]), label=str(lr.get("label", lr["name"])),
                       options=dict(lr.get("options", {})), train=dict(lr.get("train", {})))
        if e.label in labels:
            raise ConfigError(f"bench spec {path}: label '{e.label}' used twice; give each entry "
                              f"its own label")
        labels.add(e.label)
        if quick:
            per = quick_raw.get("learners", {})
            for key in per:
                if key not in {x.get("label", x.get("name")) for x in learners_raw} | \
                        {x.get("name") for x in learners_raw}:
                    raise ConfigError(f"bench spec {path}: quick.learners.{key} names no learner "
                                      f"of the spec")
            q = per.get(e.label, per.get(e.name, {}))
            e.options = _merge(e.options, q.get("options", {}))
            # precedence: [train] < learner train < [quick] train < quick.learners.<label>.train
            e.train = _merge(_merge(e.train, quick_raw.get("train", {})), q.get("train", {}))
        entries.append(e)
    return entries


def load_spec(path, quick: bool = False) -> BenchSpec:
    """Read a bench spec; with ``quick`` apply its [quick] table. Unknown keys are errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"bench spec {path} not found; give a TOML file such as "
                          f"benchmarks/quickstart.toml")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"bench spec {path} is not valid TOML: {e}") from None
    for k in raw:
        if k not in SPEC_KEYS:
            raise ConfigError(f"unknown key '{k}' in bench spec {path}.{closest(k, SPEC_KEYS)} "
                              f"Valid keys: {', '.join(SPEC_KEYS)}")
    learners_raw = raw.get("learners")
    if not isinstance(learners_raw, list) or not learners_raw:
        raise ConfigError(f"bench spec {path} lists no learners; add [[learners]] tables with name = ...")
    quick_raw = raw.get("quick", {})
    if quick:
        if not quick_raw:
            raise ConfigError(f"bench spec {path} has no [quick] table; run without --quick or add one")
        for k in quick_raw:
            if k not in ("seeds", "data", "train", "eval", "learners", "out"):
                raise ConfigError(f"unknown key 'quick.{k}' in bench spec {path}."
                                  f"{closest(k, ['seeds', 'data', 'train', 'eval', 'learners', 'out'])}")
    entries = _entries(path, learners_raw, quick_raw if quick else None)
    base = {k: dict(raw.get(k, {})) for k in ("data", "train", "eval")}
    seeds = raw.get("seeds", [0])
    out = raw.get("out", f"runs/{_slug(raw.get('name', path.stem))}")
    if quick:
        base = _merge(base, {k: quick_raw.get(k, {}) for k in ("data", "train", "eval")})
        seeds = quick_raw.get("seeds", seeds)
        out = quick_raw.get("out", out + "-quick")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"bench spec {path}: seeds must be a non-empty list of integers, got {seeds!r}")
    return BenchSpec(name=str(raw.get("name", path.stem)), out=str(out), seeds=seeds, base=base,
                     learners=entries, description=str(raw.get("description", "")), source=str(path))


@dataclass
class BenchResult:
    spec: BenchSpec
    out: Path
    cells: List[Tuple[int, int]]
    table: Dict[str, Dict[Tuple[int, int], Dict[str, Any]]]  # label -> cell -> stats
    runs: Dict[str, List[str]]
    seconds: Dict[str, float]
    notes: Dict[str, Dict[str, Any]]

    def _metric_columns(self) -> List[Tuple[Tuple[int, int], str]]:
        """(cell, metric) of the extra metrics (the supervised top-5), in first-seen order."""
        out: List[Tuple[Tuple[int, int], str]] = []
        for c in self.cells:
            for row in self.table.values():
                for m in (row.get(c) or {}).get("metrics", {}):
                    if (c, m) not in out:
                        out.append((c, m))
        return out

    def markdown(self) -> str:
        cells = self.cells
        extra = self._metric_columns()
        lines = [f"## {self.spec.name}" + (" (quick)" if self.out.name.endswith("-quick") else ""), ""]
        lines.append("| learner | " + " | ".join([_cell_label(w, s) for w, s in cells]
                                                 + [f"{m}, {c[0]} classes" for c, m in extra])
                     + " | train s |")
        lines.append("|---|" + "---|" * (len(cells) + len(extra)) + "---|")
        for label, row in self.table.items():
            vals = []
            for c in cells:
                st = row.get(c)
                if st is None:
                    vals.append("n/a" if f"{c[0]}x{c[1]}" in self.notes.get(label, {}).get("skipped", {})
                                else "—")
                    continue
                v = f"{st['mean'] * 100:.2f} ± {st['ci95'] * 100:.2f}"
                if st.get("seed_std") is not None:
                    v += f" (sd {st['seed_std'] * 100:.2f})"
                if st.get("vs_first") is not None and st["vs_first"]["significant"]:
                    v += " *" if st["vs_first"]["diff"] > 0 else " †"
                vals.append(v)
            for c, m in extra:
                st = (row.get(c) or {}).get("metrics", {}).get(m)
                if st is None:
                    vals.append("—")
                    continue
                v = f"{st['mean'] * 100:.2f} ± {st['ci95'] * 100:.2f}"
                if st.get("seed_std") is not None:
                    v += f" (sd {st['seed_std'] * 100:.2f})"
                vals.append(v)
            lines.append(f"| {label} | " + " | ".join(vals) + f" | {self.seconds.get(label, 0):.0f} |")
        first = next(iter(self.table), "")
        n = sorted({st["episodes"] for row in self.table.values() for (_, sh), st in row.items()
                    if sh})
        seeds = len(self.spec.seeds)
        text = (f"Accuracy % ± 95% CI per cell over the same {', '.join(map(str, n))} fixed test "
                f"episodes (1.96·sample std/√n of the per-episode accuracy"
                + (f" averaged over {seeds} seeds; sd: std of the per-seed means" if seeds > 1 else "")
                + ")")
        if any(sh == 0 for _, sh in cells):
            text += "; top-1" + "".join(sorted({f"/{m}" for _, m in extra})) + " columns: every test image"
        if len(self.table) > 1:
            text += (f". */†: significantly above/below {first} (paired 95% CI of the "
                     f"per-episode differences excludes 0)")
        lines += ["", text + "."] + self._note_lines()
        return "\n".join(lines) + "\n"

    def _note_lines(self) -> List[str]:
        """One ``- label: flags.`` line per learner with a test-time behaviour or n/a cells."""
        lines = []
        for label, note in self.notes.items():
            flags = []
            if note.get("fine_tunes"):
                flags.append("fine-tunes on the support set")
            if note.get("transductive_bn"):
                flags.append("transductive BatchNorm")
            if note.get("inference", "inductive") != "inductive":
                flags.append(f"transductive inference ({note['inference']})")
            by_reason: Dict[str, List[str]] = {}
            for cell, reason in note.get("skipped", {}).items():
                by_reason.setdefault(reason, []).append(cell.replace("x", "-way ") + "-shot")
            for reason, cs in by_reason.items():
                flags.append(f"n/a for {', '.join(cs)}: {reason}")
            if flags:
                lines.append(f"- {label}: {'; '.join(flags)}.")
        return lines

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.spec.name, "spec": self.spec.source, "seeds": self.spec.seeds,
                "cells": [list(c) for c in self.cells],
                "table": {lab: {f"{w}x{s}": st for (w, s), st in row.items()}
                          for lab, row in self.table.items()},
                "runs": self.runs, "train_seconds": self.seconds, "notes": self.notes}

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        names = list(dict.fromkeys(m for _, m in self._metric_columns()))  # extra columns if any
        w.writerow(["learner", "ways", "shots", "episodes", "seeds", "mean", "ci95", "seed_std",
                    "diff_vs_first", "diff_ci95", "significant"]
                   + [f"{m} {s}" for m in names for s in ("mean", "ci95", "seed_std")])
        for lab, row in self.table.items():
            for (ways, shots), st in row.items():
                vf = st.get("vs_first") or {}
                more = []
                for m in names:
                    ms = st.get("metrics", {}).get(m)
                    more += ["", "", ""] if ms is None else [
                        repr(ms["mean"]), repr(ms["ci95"]),
                        "" if ms.get("seed_std") is None else repr(ms["seed_std"])]
                w.writerow([lab, ways, shots, st["episodes"], st["seeds"], repr(st["mean"]),
                            repr(st["ci95"]), "" if st.get("seed_std") is None else repr(st["seed_std"]),
                            repr(vf["diff"]) if vf else "", repr(vf["ci95"]) if vf else "",
                            int(vf["significant"]) if vf else ""] + more)
        return buf.getvalue()


def _cell_label(ways: int, shots: int) -> str:
    """Column title: N-way K-shot, or top-1 accuracy over all images (supervised, shots 0)."""
    return f"top-1, {ways} classes" if shots == 0 else f"{ways}-way {shots}-shot"


def _reusable(run_dir: Path, cfg) -> str:
    """'done' (finished and evaluated on this grid), 'resume', 'absent' or 'conflict'."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return "absent"
    if not (run_dir / "config.toml").is_file():
        return "conflict"
    try:
        run = open_run(run_dir)
    except FewShotError:
        return "conflict"
    if config_hash(run.config) != config_hash(cfg):
        return "conflict"
    if run.state.get("complete") and run.step >= cfg.train.episodes or \
            (run.state.get("complete") and run.state.get("input_kind") == "supervised"):
        if run.results is not None and _same_grid(run.results, cfg):
            return "done"
        return "evaluate"
    if (run_dir / "checkpoints" / "last.pt").is_file():
        return "resume"
    return "conflict"


def _same_grid(grid, cfg) -> bool:
    e = cfg.eval
    want = {(w, s) for w in e.ways for s in e.shots}
    have = {c.key for c in grid.cells} | {tuple(int(x) for x in k.split("x"))
                                          for k in grid.extra.get("skipped", {})}
    return (want <= have and grid.split == cfg.eval_split() and grid.inference == e.inference and
            all(c.seed == e.seed and c.queries == e.queries and c.episodes == e.episodes
                for c in grid.cells if c.key in want))


def run_bench(spec_path, *, quick: bool = False, out: Optional[str] = None, force: bool = False,
              device: Optional[str] = None, quiet: bool = False, echo=print) -> BenchResult:
    """Train and evaluate every learner x seed of a spec and write the report."""
    spec = load_spec(spec_path, quick=quick)
    out_dir = Path(out or spec.out)
    # 1. every config built and checked before any training
    plan = []
    for e in spec.learners:
        for seed in spec.seeds:
            raw = spec.run_config(e, seed)
            if device:
                raw["train"]["device"] = device
            if quiet:
                raw["train"]["quiet"] = True
            cfg = config_from_dict(raw, where=f"{spec.source} (learner '{e.label}', seed {seed})")
            plan.append((e, seed, cfg, out_dir / _slug(e.label) / f"seed{seed}"))
    _check_grids(plan)
    echo(f"bench {spec.name}: {len(spec.learners)} learner(s) x {len(spec.seeds)} seed(s) -> {out_dir}")
    grids: Dict[str, list] = {e.label: [] for e in spec.learners}
    seconds: Dict[str, float] = {e.label: 0.0 for e in spec.learners}
    runs: Dict[str, List[str]] = {e.label: [] for e in spec.learners}
    for e, seed, cfg, run_dir in plan:
        state = "absent" if force else _reusable(run_dir, cfg)
        if state == "conflict":
            raise ConfigError(f"{run_dir} holds a different or broken run; pass --force to replace "
                              f"it or --out another directory")
        t0 = time.perf_counter()
        if state == "done":
            echo(f"- {e.label} seed {seed}: reusing {run_dir}")
            run = open_run(run_dir)
        elif state == "evaluate":
            echo(f"- {e.label} seed {seed}: evaluating {run_dir}")
            run = open_run(run_dir)
            evaluate_run(run, quiet=quiet)
        else:
            echo(f"- {e.label} seed {seed}: {'resuming' if state == 'resume' else 'training'} -> {run_dir}")
            if state == "resume":
                run = Trainer(None, run_dir, resume=True).run()
            else:
                run = Trainer(cfg, run_dir, force=True).run()
        grids[e.label].append(run.results)
        seconds[e.label] += float(run.state.get("train_seconds", 0.0)) or (time.perf_counter() - t0)
        runs[e.label].append(str(run_dir))
    result = _aggregate(spec, out_dir, grids, seconds, runs)
    atomic_write_text(out_dir / "bench.json", json.dumps(result.to_dict(), indent=1) + "\n")
    atomic_write_text(out_dir / "bench.csv", result.csv())
    md = result.markdown()
    atomic_write_text(out_dir / "bench.md", md)
    from fewshot.plots import plot_bench  # matplotlib: optional, and slow to import

    plot_bench({lab: {c: (st["mean"], st["ci95"]) for c, st in row.items()}
                for lab, row in result.table.items()}, out_dir / "plots" / "bench.png",
               title=f"{spec.name}: accuracy ± 95% CI")
    return result


def _check_grids(plan) -> None:
    """The evaluation grid and training tasks of every planned run, against the splits."""
    seen = set()
    for e, seed, cfg, _ in plan:
        if get_learner(cfg.learner.name).input_kind == "supervised":
            continue  # evaluated on every image of the test split, no episode grid
        key = (cfg.eval_dataset(), cfg.data.root, cfg.eval_split(), tuple(cfg.eval.ways),
               tuple(cfg.eval.shots), cfg.eval.queries)
        if key in seen:
            continue
        seen.add(key)
        store = open_split(cfg.eval_dataset(), cfg.eval_split(), cfg.data.root, in_memory=False)
        try:
            check_grid(store, cfg.eval.ways, cfg.eval.shots, cfg.eval.queries,
                       what=f"bench eval grid on split '{cfg.eval_split()}'")
        finally:
            store.close()


def _aggregate(spec, out_dir, grids, seconds, runs) -> BenchResult:
    """Seed-averaged cells per learner, each learner's paired difference to the first."""
    cells = _all_cells(grids)
    table: Dict[str, Dict[Tuple[int, int], Dict[str, Any]]] = {}
    per_episode: Dict[str, Dict[Tuple[int, int], np.ndarray]] = {}
    notes = {}
    for label, gl in grids.items():
        notes[label] = {"fine_tunes": any(g.fine_tunes for g in gl),
                        "transductive_bn": any(g.transductive_bn for g in gl),
                        "inference": next((g.inference for g in gl if g.inference != "inductive"),
                                          "inductive"),
                        "skipped": {k: v for g in gl for k, v in g.extra.get("skipped", {}).items()}}
        table[label], per_episode[label] = {}, {}
        for key in cells:
            cs = [g.cell(*key) for g in gl if key in {c.key for c in g.cells}]
            if cs:
                table[label][key], per_episode[label][key] = _cell_stats(label, key, cs)
    _paired_differences(table, per_episode)
    return BenchResult(spec, out_dir, cells, table, runs, seconds, notes)


def _all_cells(grids) -> List[Tuple[int, int]]:
    """Every (ways, shots) cell evaluated or skipped by any run, sorted."""
    cells = []
    for gl in grids.values():
        for g in gl:
            keys = [c.key for c in g.cells] + [tuple(int(x) for x in k.split("x"))
                                               for k in g.extra.get("skipped", {})]
            for key in keys:
                if key not in cells:
                    cells.append(key)
    return sorted(cells)


def _cell_stats(label, key, cs) -> Tuple[Dict[str, Any], np.ndarray]:
    """One learner's cell over its seeds: per-episode accuracies averaged over the seeds (the
    seeds saw the same episodes), mean ± 95% CI, the spread of the seed means, extra metrics."""
    specs = {json.dumps(c.spec(), sort_keys=True) for c in cs}
    if len(specs) > 1:
        raise FewShotError(f"bench: the seeds of '{label}' were evaluated on different "
                           f"{key[0]}-way {key[1]}-shot episodes; re-run with --force")
    acc = np.mean([c.accuracies for c in cs], axis=0)
    m, sd, ci = mean_ci(acc)
    seed_means = [c.mean for c in cs]
    stats = {"mean": m, "ci95": ci, "episodes": int(acc.size), "seeds": len(cs),
             "seed_std": float(np.std(seed_means, ddof=1)) if len(cs) > 1 else None,
             "fingerprint": cs[0].fingerprint, "vs_first": None}
    # extra metrics of the same samples (supervised top-5): seed-averaged per sample
    for name in dict.fromkeys(n for c in cs for n in c.metrics):
        if not all(name in c.metrics for c in cs):
            continue
        vals = np.mean([c.metrics[name] for c in cs], axis=0)
        mm, _, mci = mean_ci(vals)
        per_seed = [float(np.mean(c.metrics[name])) for c in cs]
        stats.setdefault("metrics", {})[name] = {
            "mean": mm, "ci95": mci,
            "seed_std": float(np.std(per_seed, ddof=1)) if len(cs) > 1 else None}
    return stats, acc


def _paired_differences(table, per_episode) -> None:
    """``vs_first`` of every learner after the first: the paired per-episode difference."""
    labels = list(table)
    if len(labels) < 2:
        return
    first = labels[0]
    fp = {k: st["fingerprint"] for k, st in table[first].items()}
    for label in labels[1:]:
        for key, st in table[label].items():
            if key not in per_episode[first]:
                continue
            if st["fingerprint"] != fp[key]:
                raise FewShotError(f"bench: '{label}' and '{first}' were evaluated on different "
                                   f"{key[0]}-way {key[1]}-shot episodes; re-run with --force")
            d = per_episode[label][key] - per_episode[first][key]
            m, sd, ci = mean_ci(d)
            st["vs_first"] = {"diff": m, "ci95": ci,
                              "significant": bool(not math.isnan(ci) and abs(m) > ci)}
