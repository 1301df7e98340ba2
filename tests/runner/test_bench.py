"""fewshot bench: learners x seeds on the same episodes; the report against the runs' results."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fewshot.cli import main



def _spec(path: Path, root: Path, learners: str) -> Path:
    path.write_text(f"""
name = "tiny"
out = "{path.parent / 'bench'}"
seeds = [0, 1]
[data]
dataset = "glyphs"
root = "{root}"
[train]
episodes = 50
meta_batch = 1
queries = 3
val_every = 2
val_episodes = 3
log_every = 1
quiet = true
threads = 1
device = "cpu"
[eval]
ways = [5]
shots = [1, 2]
queries = 3
episodes = 6
seed = 5
{learners}
[quick]
train = {{ episodes = 2 }}
learners.B.train = {{ episodes = 3 }}
""")
    return path


LEARNERS = """
[[learners]]
name = "protonet"
label = "A"
options = { backbone_options = { hidden = 8 } }
[[learners]]
name = "protonet"
label = "B"
options = { lr = 0.01, backbone_options = { hidden = 8 } }
"""


def test_bench_report_matches_runs_and_reuses_them(glyphs_root, tmp_path, capsys):
    spec = _spec(tmp_path / "spec.toml", glyphs_root, LEARNERS)
    assert main(["bench", str(spec), "--quick"]) == 0
    out = capsys.readouterr().out
    bench = tmp_path / "bench-quick"
    data = json.loads((bench / "bench.json").read_text())
    assert (bench / "plots" / "bench.png").is_file() and (bench / "bench.csv").is_file()
    acc = {}
    for label, steps in (("A", 2), ("B", 3)):
        for seed in (0, 1):
            run = bench / label / f"seed{seed}"
            assert json.loads((run / "run.json").read_text())["step"] == steps
            res = json.loads((run / "results.json").read_text())
            for c in res["cells"]:
                acc.setdefault(label, {}).setdefault(f"{c['ways']}x{c['shots']}", []).append(c["accuracies"])
    for label in ("A", "B"):
        for cell, per_seed in acc[label].items():
            pe = np.mean(per_seed, axis=0)  # per-episode accuracy averaged over the seeds
            st = data["table"][label][cell]
            assert st["mean"] == pytest.approx(pe.mean())
            assert st["ci95"] == pytest.approx(1.96 * pe.std(ddof=1) / np.sqrt(pe.size))
            assert st["seed_std"] == pytest.approx(np.std([np.mean(a) for a in per_seed], ddof=1))
            assert f"{pe.mean() * 100:.2f} ± {st['ci95'] * 100:.2f}" in out
    for cell in acc["B"]:
        d = np.mean(acc["B"][cell], axis=0) - np.mean(acc["A"][cell], axis=0)
        vf = data["table"]["B"][cell]["vs_first"]
        assert vf["diff"] == pytest.approx(d.mean())
        assert vf["ci95"] == pytest.approx(1.96 * d.std(ddof=1) / np.sqrt(d.size))
    # a second invocation reuses every finished run
    assert main(["bench", str(spec), "--quick"]) == 0
    assert capsys.readouterr().out.count("reusing") == 4


def test_bench_unknown_learner_fails_before_any_training(glyphs_root, tmp_path, capsys):
    spec = _spec(tmp_path / "spec.toml", glyphs_root,
                 LEARNERS + '[[learners]]\nname = "protonet-xl"\nlabel = "C"\n')
    assert main(["bench", str(spec), "--quick"]) == 2
    assert "unknown learner 'protonet-xl'. Did you mean 'protonet'?" in capsys.readouterr().err
    assert not (tmp_path / "bench-quick").exists()
