"""End to end through the CLI on the built-in glyphs data: train, eval, compare, resume,
Ctrl-C, invalid grids, non-finite losses, embed. Report numbers are checked against the
per-episode accuracies they came from (numpy)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot.cli import main


REPO = Path(__file__).resolve().parents[2]


def _weights(run_dir: Path, which: str = "last"):
    obj = torch.load(run_dir / "checkpoints" / f"{which}.pt", weights_only=True)
    return obj["step"], obj["learner"]


def _assert_same_state(a, b):
    ma, mb = a["modules"], b["modules"]
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    oa, ob = a["optimizers"]["meta"]["state"], b["optimizers"]["meta"]["state"]
    for k in oa:
        for name in oa[k]:
            assert torch.equal(torch.as_tensor(oa[k][name]), torch.as_tensor(ob[k][name]))


@pytest.fixture(scope="module")
def trained(glyphs_root, tmp_path_factory, write_config):
    """Two short ProtoNet runs (seeds 0 and 1), trained and evaluated through the CLI."""
    tmp = tmp_path_factory.mktemp("runs")
    cfg = write_config(tmp / "proto.toml", glyphs_root)
    runs = []
    for seed in (0, 1):
        out = tmp / f"seed{seed}"
        assert main(["train", str(cfg), "--out", str(out), "--seed", str(seed)]) == 0
        runs.append(out)
    return cfg, runs


def test_run_directory_contents_and_metrics(trained):
    cfg, (run, _) = trained
    for name in ("config.toml", "env.json", "run.json", "metrics.jsonl", "results.json",
                 "results.csv", "results.md", "checkpoints/last.pt", "checkpoints/best.pt",
                 "plots/training.png", "plots/grid.png"):
        assert (run / name).is_file(), name
    env = json.loads((run / "env.json").read_text())
    assert env["seed"] == 0 and env["torch"] == torch.__version__ and "--seed" in env["command"]
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]  # log_every = 1
    assert all(np.isfinite(r["loss"]) for r in train_rows)
    val = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in val] == [3, 6]
    state = json.loads((run / "run.json").read_text())
    best = max(val, key=lambda r: r["acc"])  # first maximum wins ties
    assert state["best_step"] == best["step"] and state["best_val"] == pytest.approx(best["acc"])
    assert _weights(run, "best")[0] == best["step"] and _weights(run, "last")[0] == 6


def test_results_match_per_episode_accuracies(trained):
    _, (run, _) = trained
    res = json.loads((run / "results.json").read_text())
    assert {(c["ways"], c["shots"]) for c in res["cells"]} == {(5, 1), (5, 2), (20, 1), (20, 2)}
    md = (run / "results.md").read_text()
    csv_rows = (run / "results.csv").read_text().splitlines()[1:]
    for c in res["cells"]:
        a = np.array(c["accuracies"])
        assert a.size == 8 and c["seed"] == 11 and c["queries"] == 3
        # each accuracy is a fraction of ways·queries predictions
        assert np.allclose(a * c["ways"] * 3, np.round(a * c["ways"] * 3), atol=1e-4)
        ci = 1.96 * a.std(ddof=1) / np.sqrt(a.size)
        assert c["mean"] == pytest.approx(a.mean()) and c["ci95"] == pytest.approx(ci)
        assert f"{a.mean() * 100:.2f} ± {ci * 100:.2f}" in md
        assert any(r.startswith(f"protonet,glyphs,test,{c['ways']},{c['shots']},3,8,11,") for r in csv_rows)
    assert res["transductive_bn"] is False and res["fine_tunes"] is False
    assert res["checkpoint"].startswith("best")


def test_same_seed_same_episodes_and_paired_compare(trained, capsys):
    _, (a, b) = trained
    ra, rb = (json.loads((r / "results.json").read_text()) for r in (a, b))
    for ca, cb in zip(ra["cells"], rb["cells"]):
        assert ca["fingerprint"] == cb["fingerprint"]  # the same test episodes for both runs
    capsys.readouterr()
    assert main(["compare", str(a), str(b), "--json"]) == 0
    comp = json.loads(capsys.readouterr().out)
    for cell, ca, cb in zip(comp["cells"], ra["cells"], rb["cells"]):
        d = np.array(ca["accuracies"]) - np.array(cb["accuracies"])
        assert cell["diff"] == pytest.approx(d.mean())
        assert cell["ci95"] == pytest.approx(1.96 * d.std(ddof=1) / np.sqrt(d.size))
        assert cell["significant"] == bool(abs(d.mean()) > 1.96 * d.std(ddof=1) / np.sqrt(d.size))


def test_eval_grid_options_and_compare_refuses_other_episodes(trained, tmp_path, capsys):
    import shutil

    _, (a, b) = trained
    c = tmp_path / "copy"
    shutil.copytree(b, c)
    capsys.readouterr()
    assert main(["eval", str(c), "--ways", "5", "--shots", "1", "--episodes", "6", "--seed", "99",
                 "--queries", "3", "--checkpoint", "last", "--quiet"]) == 0
    out = capsys.readouterr().out
    res = json.loads((c / "results.json").read_text())
    assert len(res["cells"]) == 1 and len(res["cells"][0]["accuracies"]) == 6
    assert res["cells"][0]["seed"] == 99 and res["checkpoint"] == "last (step 6)"
    assert f"{res['cells'][0]['mean'] * 100:.2f}" in out
    assert main(["compare", str(a), str(c)]) == 2
    assert "different episodes" in capsys.readouterr().err


def test_invalid_grids_are_refused_before_training(glyphs_root, tmp_path, capsys, write_config):
    cfg = write_config(tmp_path / "c.toml", glyphs_root)
    run = tmp_path / "r"
    assert main(["train", str(cfg), "--out", str(run), "--set", "eval.ways=[5, 30]"]) == 2
    err = capsys.readouterr().err
    assert "30-way tasks need 30 classes but split glyphs/test has 25" in err
    assert not (run / "checkpoints").exists()
    assert main(["train", str(cfg), "--out", str(run), "--force", "--set", "eval.shots=[18]",
                 "--set", "eval.queries=5"]) == 2
    err = capsys.readouterr().err
    assert "18 shots + 5 queries = 23 images per class" in err and "has only 20" in err
    assert main(["train", str(cfg), "--out", str(run), "--force", "--set", "train.ways=41"]) == 2
    assert "41-way tasks need 41 classes but split glyphs/train has 40" in capsys.readouterr().err


def test_resume_gives_the_weights_of_an_uninterrupted_run(glyphs_root, tmp_path, write_config):
    from fewshot.api import train

    cfg = write_config(tmp_path / "c.toml", glyphs_root, episodes=7, checkpoint_every=2)
    full = train(cfg, out=tmp_path / "full", evaluate=False)
    part = train(cfg, out=tmp_path / "part", evaluate=False, train__episodes=3)
    assert part.step == 3
    resumed = train(None, out=tmp_path / "part", resume=True, evaluate=False, train__episodes=7)
    assert resumed.step == full.step == 7
    _assert_same_state(_weights(tmp_path / "full")[1], _weights(tmp_path / "part")[1])
    # the metrics of the resumed run continue those of the first part
    steps = [r["step"] for r in resumed.metrics("train")]
    assert steps == list(range(1, 8))


@pytest.mark.slow
def test_sigint_writes_checkpoint_exits_130_and_resumes(glyphs_root, tmp_path, write_config):
    cfg = write_config(tmp_path / "c.toml", glyphs_root, episodes=100000, checkpoint_every=0,
                       val_every=0)
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "fewshot", "train", str(cfg), "--out", str(run)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "SIGINT: stopped after step" in err and f"--resume {run}" in err
    step, _ = _weights(run)
    assert step >= 2
    assert json.loads((run / "run.json").read_text())["complete"] is False
    assert not list((run / "checkpoints").glob(".*tmp*"))
    # continue to step+2 and compare with an uninterrupted run of step+2 steps
    from fewshot.api import train

    total = step + 2
    train(None, out=run, resume=True, evaluate=False, train__episodes=total)
    train(cfg, out=tmp_path / "ref", evaluate=False, train__episodes=total)
    _assert_same_state(_weights(run)[1], _weights(tmp_path / "ref")[1])


def _poison_protonet_from_step(step: int, monkeypatch) -> None:
    """ProtoNet's reported loss turns NaN from training step ``step`` on."""
    from fewshot.learners import get_learner

    cls = get_learner("protonet")
    real = cls.train_step

    def poisoned(self, batch):
        out = real(self, batch)
        if self.steps_done >= step:
            out = dict(out, loss=out["loss"] * float("nan"))
        return out

    monkeypatch.setattr(cls, "train_step", poisoned)


def test_nonfinite_loss_stops_with_step_and_last_metrics(glyphs_root, tmp_path, monkeypatch, capsys, write_config):
    _poison_protonet_from_step(4, monkeypatch)
    cfg = write_config(tmp_path / "c.toml", glyphs_root, episodes=10)
    assert main(["train", str(cfg), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "non-finite loss (nan) at step 4" in err and "last finite metrics: step=3" in err


def test_deferred_nonfinite_check_names_the_first_bad_step(glyphs_root, tmp_path, monkeypatch, capsys,
                                                          write_config):
    """As on a GPU: no per-step check; the device-side record of the first non-finite step is
    read at the log window (step 6), and no checkpoint is written from the poisoned weights."""
    from fewshot import trainer

    _poison_protonet_from_step(4, monkeypatch)
    monkeypatch.setattr(trainer, "loss_checked_at_once", lambda device: False)
    cfg = write_config(tmp_path / "c.toml", glyphs_root, episodes=10, log_every=3, checkpoint_every=5,
                       val_every=0)
    assert main(["train", str(cfg), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "non-finite loss at step 4;" in err and "last finite metrics: step=3" in err
    assert not (tmp_path / "r" / "checkpoints" / "last.pt").exists()


def test_first_nonfinite_keeps_the_earliest_step():
    from fewshot.training_progress import FirstNonFinite

    watch = FirstNonFinite()
    assert watch.step() is None
    for step, value in [(1, 0.5), (2, float("inf")), (3, 1.0), (4, float("nan"))]:
        watch.observe(torch.tensor(value), step)
    assert watch.step() == 2


def test_embed_draws_a_projection(trained, tmp_path, capsys):
    _, (run, _) = trained
    out = tmp_path / "e.png"
    assert main(["embed", str(run), "--ways", "5", "--shots", "2", "--queries", "3", "--out", str(out),
                 "--method", "pca"]) == 0
    assert "written" in capsys.readouterr().out
    from PIL import Image

    with Image.open(out) as im:
        assert im.size[0] > 200 and im.size[1] > 200


def test_pca_projection_matches_numpy_svd():
    from fewshot.plots import project_2d

    rng = np.random.default_rng(0)
    z = rng.normal(size=(40, 6)) * np.array([5.0, 2.0, 0.5, 0.1, 0.1, 0.1])
    y, method = project_2d(z, method="pca")
    assert method == "pca"
    zc = z - z.mean(0)
    _, _, vt = np.linalg.svd(zc, full_matrices=False)
    ref = zc @ vt[:2].T
    for k in range(2):  # equal up to the sign of each axis
        sgn = np.sign(np.dot(y[:, k], ref[:, k]))
        assert np.allclose(sgn * y[:, k], ref[:, k], atol=1e-3)


def test_api_train_and_evaluate(glyphs_root, tmp_path, write_config):
    from fewshot.api import evaluate, train

    cfg = write_config(tmp_path / "c.toml", glyphs_root, episodes=2)
    run = train(cfg, out=tmp_path / "r", evaluate=False)
    grid = evaluate(run, ways=[5], shots=[1], queries=3, episodes=5)
    assert [c.key for c in grid.cells] == [(5, 1)] and grid.cells[0].episodes == 5
    again = evaluate(str(tmp_path / "r"), ways=[5], shots=[1], queries=3, episodes=5)
    assert again.cells[0].accuracies == grid.cells[0].accuracies  # fixed episodes, same weights


def test_data_info_and_verify_cli(glyphs_root, capsys):
    assert main(["data", "info", "glyphs", "--root", str(glyphs_root)]) == 0
    out = capsys.readouterr().out
    assert "  train  40 classes, 800 images (20 per class), 28x28x1" in out
    assert "  test   25 classes, 500 images (20 per class)" in out
    assert main(["data", "verify", "glyphs", "--root", str(glyphs_root), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["ok"] is True and res["splits"]["val"]["classes"] == 20
    assert main(["data", "info", "glyphz", "--root", str(glyphs_root)]) == 2
    assert "unknown dataset 'glyphz'. Did you mean 'glyphs'?" in capsys.readouterr().err


def test_any_way_and_variable_episodes_train(glyphs_root, tmp_path, write_config):
    from fewshot.api import train

    cfg = write_config(tmp_path / "c.toml", glyphs_root, episodes=2, ways=[3, 5], shots=[1, 2],
                       val_ways=4, val_shots=1)
    run = train(cfg, out=tmp_path / "any", evaluate=False)
    assert [r["step"] for r in run.metrics("val")] == [2]
    run = train(cfg, out=tmp_path / "var", evaluate=False, train__variable=True, train__episodes=1,
                train__meta_batch=1)
    assert run.step == 1 and np.isfinite(run.metrics("train")[0]["loss"])


def test_supervised_training_milestones_and_mid_epoch_resume(glyphs_root, tmp_path, monkeypatch):
    """Standard (supervised) training: lr milestones per epoch, top-1 evaluation over every
    image, and a resume from inside an epoch that ends with the uninterrupted weights."""
    from fewshot.api import train
    from fewshot.config import dump_toml
    from fewshot.learners import get_learner
    from fewshot.trainer import Interrupted

    cfg = tmp_path / "sup.toml"
    cfg.write_text(dump_toml({
        "data": {"dataset": "glyphs", "root": str(glyphs_root), "train_split": "test",
                 "val_split": "test", "test_split": "test"},
        "learner": {"name": "standard", "backbone": "conv4", "backbone_options": {"hidden": 8}},
        "train": {"epochs": 2, "batch_size": 100, "lr_milestones": [1], "lr_gamma": 0.5,
                  "log_every": 1, "val_every": 1, "checkpoint_every": 0, "quiet": True,
                  "device": "cpu", "threads": 1},
        "eval": {"checkpoint": "last"}}))
    full = train(cfg, out=tmp_path / "full")
    rows = full.metrics("train")
    assert len(rows) == 10 and [r["step"] for r in rows] == list(range(1, 11))  # 500 images / 100
    lr0 = rows[0]["lr"]
    assert all(r["lr"] == lr0 for r in rows[:5]) and all(r["lr"] == 0.5 * lr0 for r in rows[5:])
    cell = full.results.cells[0]
    assert (cell.ways, cell.shots, cell.episodes) == (25, 0, 500)
    assert set(cell.accuracies) <= {0.0, 1.0}

    cls = get_learner("standard")
    real = cls.train_step

    def interrupt_at_7(self, batch):
        out = real(self, batch)
        if self.steps_done == 7:
            os.kill(os.getpid(), signal.SIGINT)  # lands in the trainer's handler
        return out

    monkeypatch.setattr(cls, "train_step", interrupt_at_7)
    with pytest.raises(Interrupted) as e:
        train(cfg, out=tmp_path / "part")
    assert e.value.step == 7 and e.value.exit_code == 130
    monkeypatch.setattr(cls, "train_step", real)
    train(None, out=tmp_path / "part", resume=True, evaluate=False)
    _assert_same_state(_weights(tmp_path / "full")[1], _weights(tmp_path / "part")[1])
