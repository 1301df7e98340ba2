"""Supervised evaluation reports top-1 and top-5 (MLTP's Tiny ImageNet tables): a tiny
`standard` run on glyphs, its per-image top-5 checked against numpy on the learner's own
logits, the files (json/csv/md), old results files without the field, and the bench table."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot.report import CellResult, GridResult, load_results, mean_ci, write_results


def _direct_logits(learner, store) -> np.ndarray:
    """Logits of every test image, normalised by hand: (x/255 − mean)/std per channel, NCHW."""
    x = torch.as_tensor(np.asarray(store.images[:]), dtype=torch.float32) / 255.0
    mean = torch.tensor(store.mean, dtype=torch.float32)
    std = torch.tensor(store.std, dtype=torch.float32)
    x = ((x - mean) / std).permute(0, 3, 1, 2).contiguous()
    learner.eval()
    with torch.no_grad():
        return learner.predict_batch(x).numpy()


def test_supervised_run_reports_top1_and_top5(glyphs_root, tmp_path, capsys):
    from fewshot.api import evaluate, train
    from fewshot.config import dump_toml
    from fewshot.data.store import open_split

    torch.manual_seed(0)
    cfg = tmp_path / "sup.toml"
    cfg.write_text(dump_toml({
        "data": {"dataset": "glyphs", "root": str(glyphs_root), "train_split": "test",
                 "val_split": "test", "test_split": "test"},
        "learner": {"name": "standard", "backbone": "conv4", "backbone_options": {"hidden": 8}},
        "train": {"epochs": 1, "batch_size": 100, "log_every": 1, "val_every": 1,
                  "checkpoint_every": 0, "quiet": True, "device": "cpu", "threads": 1},
        "eval": {"checkpoint": "last"}}))
    run = train(cfg, out=tmp_path / "run")
    (cell,) = run.results.cells
    assert (cell.ways, cell.shots, cell.episodes) == (25, 0, 500)
    top1, top5 = np.asarray(cell.accuracies), np.asarray(cell.metrics["top-5"])
    assert top5.shape == (500,) and set(top5.tolist()) <= {0.0, 1.0}
    assert np.all(top5 >= top1) and cell.metric_stats("top-5")[0] >= cell.mean
    assert 0.0 < top5.mean() < 1.0  # an informative check: neither trivially 0 nor 1

    learner, _, _ = run.load_learner("last")
    store = open_split("glyphs", "test", glyphs_root)
    try:
        logits, labels = _direct_logits(learner, store), np.asarray(store.labels)
    finally:
        store.close()
    order = np.argsort(-logits, axis=1, kind="stable")
    want1 = (order[:, 0] == labels).astype(float)
    want5 = (order[:, :5] == labels[:, None]).any(axis=1).astype(float)
    np.testing.assert_array_equal(top1, want1)
    np.testing.assert_array_equal(top5, want5)
    m5, s5, ci5 = cell.metric_stats("top-5")
    assert m5 == pytest.approx(want5.mean())
    assert ci5 == pytest.approx(1.96 * want5.std(ddof=1) / np.sqrt(500))

    # the files: json keeps per-image values and the summary, csv and md show both metrics
    data = json.loads((run.run_dir / "results.json").read_text())
    jc = data["cells"][0]
    assert jc["metrics"]["top-5"] == want5.tolist()
    assert jc["metric_stats"]["top-5"]["mean"] == pytest.approx(want5.mean())
    (row,) = list(csv.DictReader((run.run_dir / "results.csv").open()))
    assert float(row["mean"]) == pytest.approx(want1.mean())
    assert float(row["top-5 mean"]) == pytest.approx(want5.mean())
    assert float(row["top-5 ci95"]) == pytest.approx(ci5)
    md = (run.run_dir / "results.md").read_text()
    assert "top-5 (all test images)" in md and f"{m5 * 100:.2f} ± {ci5 * 100:.2f}" in md
    back = load_results(run.run_dir)
    assert back.cells[0].metrics["top-5"] == want5.tolist()

    # `fewshot eval` (the API behind it) prints both
    grid = evaluate(run, checkpoint="last")
    assert grid.cells[0].metrics["top-5"] == want5.tolist()
    assert "top-1 (all test images)" in grid.table() and "top-5 (all test images)" in grid.table()


def test_old_results_without_metrics_load_and_episodic_files_keep_their_layout(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, 20)
    g = GridResult("protonet", "glyphs", "test",
                   [CellResult(ways=5, shots=1, queries=3, seed=1, accuracies=a, fingerprint="f")])
    paths = write_results(g, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert "metrics" not in data["cells"][0] and "metric_stats" not in data["cells"][0]
    header = paths["csv"].read_text().splitlines()[0]
    assert header.endswith("fine_tunes,fingerprint")
    # a supervised results.json written before top-5 existed (no "metrics" key) still loads
    old = {"learner": "standard", "dataset": "glyphs", "split": "test", "checkpoint": "last (step 5)",
           "step": 5, "cells": [{"ways": 25, "shots": 0, "queries": 0, "seed": 0, "accuracies": [1.0, 0.0, 1.0],
                                 "fingerprint": "", "mean": 0.67, "std": 0.5, "ci95": 0.6,
                                 "seconds": 0.0, "episodes": 3}]}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text(json.dumps(old))
    back = load_results(tmp_path / "old")
    assert back.cells[0].metrics == {} and back.cells[0].mean == pytest.approx(2 / 3)
    assert "top-5" not in back.table() and "top-1 (all test images)" in back.table()


def test_bench_table_shows_top5_averaged_over_seeds(tmp_path):
    from fewshot.bench import BenchSpec, _aggregate

    rng = np.random.default_rng(1)
    grids, want = {}, {}
    for label in ("Standard", "MLTP_FO"):
        gl, t1s, t5s = [], [], []
        for seed in range(2):
            t1 = (rng.uniform(size=40) < 0.4).astype(float)
            t5 = np.maximum(t1, (rng.uniform(size=40) < 0.5).astype(float))
            gl.append(GridResult(label, "glyphs", "test", [CellResult(
                ways=25, shots=0, queries=0, seed=0, accuracies=t1, fingerprint="fp",
                metrics={"top-5": t5})]))
            t1s.append(t1)
            t5s.append(t5)
        grids[label], want[label] = gl, (np.mean(t5s, axis=0), [t.mean() for t in t5s])
    spec = BenchSpec("t", str(tmp_path), [0, 1], {}, [])
    res = _aggregate(spec, tmp_path, grids, {k: 1.0 for k in grids}, {k: [] for k in grids})
    md = res.markdown()
    assert "top-1, 25 classes" in md and "top-5, 25 classes" in md
    for label, (avg, per_seed) in want.items():
        st = res.table[label][(25, 0)]["metrics"]["top-5"]
        m, _, ci = mean_ci(avg)
        assert st["mean"] == pytest.approx(m) and st["ci95"] == pytest.approx(ci)
        assert st["seed_std"] == pytest.approx(np.std(per_seed, ddof=1))
        assert f"{m * 100:.2f} ± {ci * 100:.2f} (sd {np.std(per_seed, ddof=1) * 100:.2f})" in md
    rows = list(csv.DictReader(res.csv().splitlines()))
    assert float(rows[1]["top-5 mean"]) == pytest.approx(mean_ci(want["MLTP_FO"][0])[0])
    assert json.loads(json.dumps(res.to_dict()))["table"]["Standard"]["25x0"]["metrics"]["top-5"]
