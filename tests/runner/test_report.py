"""Report math (mean, sample std, 95% CI, paired comparison) against numpy; files' contents."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from fewshot.errors import FewShotError
from fewshot.report import (CellResult, GridResult, compare, load_results, mean_ci, write_results)


def _grid(acc_by_cell, learner="a", seed=3, fp="f"):
    cells = [CellResult(ways=w, shots=s, queries=15, seed=seed, accuracies=a, fingerprint=fp)
             for (w, s), a in acc_by_cell.items()]
    return GridResult(learner=learner, dataset="glyphs", split="test", cells=cells)


def test_mean_ci_is_sample_std_over_sqrt_n():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.3, 1.0, size=37)
    m, s, ci = mean_ci(a)
    assert m == pytest.approx(a.mean())
    assert s == pytest.approx(np.sqrt(((a - a.mean()) ** 2).sum() / 36))
    assert ci == pytest.approx(1.96 * s / np.sqrt(37))
    assert math.isnan(mean_ci([0.5])[2])


def test_paired_comparison_against_numpy_and_significance():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.4, 0.9, size=200)
    a = np.clip(base + 0.03 + rng.normal(0, 0.01, 200), 0, 1)
    b = base
    ga = _grid({(5, 1): a, (5, 5): b + 0.0})
    gb = _grid({(5, 1): b, (5, 5): b})
    comp = compare(ga, gb)
    c = comp.cells[0]
    d = a - b
    assert c.diff == pytest.approx(d.mean())
    assert c.ci95 == pytest.approx(1.96 * d.std(ddof=1) / np.sqrt(200))
    assert c.significant
    # paired interval is far tighter than the unpaired one of each run
    assert c.ci95 < 0.2 * ga.cells[0].ci95
    assert not comp.cells[1].significant  # identical accuracies: difference 0, CI 0
    assert "| 5-way 1-shot |" in comp.table()


def test_compare_refuses_different_episodes():
    ga = _grid({(5, 1): [0.5, 0.6]}, seed=1)
    with pytest.raises(FewShotError, match="different episodes .*seed 1 vs 2"):
        compare(ga, _grid({(5, 1): [0.5, 0.6]}, seed=2))
    with pytest.raises(FewShotError, match="fingerprint"):
        compare(ga, _grid({(5, 1): [0.5, 0.6]}, seed=1, fp="g"))
    with pytest.raises(FewShotError, match="share no grid cell"):
        compare(ga, _grid({(20, 1): [0.5, 0.6]}, seed=1))


def test_result_files_match_the_accuracies(tmp_path):
    rng = np.random.default_rng(2)
    accs = {(5, 1): rng.uniform(0, 1, 50), (5, 5): rng.uniform(0, 1, 50),
            (20, 1): rng.uniform(0, 1, 50)}
    g = _grid(accs, learner="protonet")
    g.transductive_bn = True
    paths = write_results(g, tmp_path)
    data = json.loads(paths["json"].read_text())
    for cell in data["cells"]:
        a = accs[(cell["ways"], cell["shots"])]
        assert cell["accuracies"] == pytest.approx(a.tolist())
        assert cell["mean"] == pytest.approx(a.mean())
        assert cell["ci95"] == pytest.approx(1.96 * a.std(ddof=1) / np.sqrt(a.size))
        assert cell["episodes"] == 50
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 3
    for r in rows:
        a = accs[(int(r["ways"]), int(r["shots"]))]
        assert float(r["mean"]) == pytest.approx(a.mean())
        assert float(r["std"]) == pytest.approx(a.std(ddof=1))
    md = paths["md"].read_text()
    a51 = accs[(5, 1)]
    assert f"{a51.mean() * 100:.2f} ± {1.96 * a51.std(ddof=1) / np.sqrt(50) * 100:.2f}" in md
    assert "transductive" in md and "| protonet | 20 |" in md and "—" in md  # 20-way 5-shot absent
    back = load_results(tmp_path)
    assert back.cell(5, 5).accuracies == pytest.approx(accs[(5, 5)].tolist())
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left
