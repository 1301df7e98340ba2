"""The run directory across versions, the public API names, progress output in logs, and the
package's import graph (issue 10; issue 12 item 8)."""
from __future__ import annotations

import ast
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

LEGACY = Path(__file__).resolve().parent / "legacy_run"
PACKAGE = Path(__file__).resolve().parents[2] / "fewshot"


def _legacy_copy(tmp_path: Path, root: Path) -> Path:
    """The committed run (4 fomaml steps, written by the code before issue 10) pointed at
    this session's glyphs data (data.root does not enter the config hash)."""
    run = tmp_path / "legacy"
    shutil.copytree(LEGACY, run)
    cfg = run / "config.toml"
    cfg.write_text(re.sub(r'^root = ".*"$', f'root = "{root}"', cfg.read_text(), flags=re.M))
    return run


def test_checkpoint_written_before_the_refactor_resumes_to_the_old_numbers(glyphs_root, tmp_path):
    """Resuming the old last.pt for 4 more steps reproduces, row for row, the metrics the old
    code logged for an uninterrupted 8-step run of the same config (CPU, one thread)."""
    from fewshot.run import open_run
    from fewshot.trainer import Trainer

    run_dir = _legacy_copy(tmp_path, glyphs_root)
    learner, step, which = open_run(run_dir).load_learner("best")
    assert (step, which, learner.name) == (2, "best", "fomaml")
    run = Trainer(None, run_dir, resume=True, overrides=["train.episodes=8"]).run(evaluate=False)
    assert run.step == 8 and run.state["complete"]
    expected = json.loads((LEGACY / "uninterrupted_metrics.json").read_text())
    got = [{k: v for k, v in r.items() if k not in ("steps_per_s", "items_per_s")}
           for r in run.metrics()]
    assert [(r["split"], r["step"]) for r in got] == [(r["split"], r["step"]) for r in expected]
    for g, e in zip(got, expected):
        assert g.keys() == e.keys()
        for k in e:
            want = e[k] if isinstance(e[k], str) else pytest.approx(e[k], rel=1e-6, abs=1e-7)
            assert g[k] == want, (e["split"], e["step"], k)


def test_package_level_train_and_evaluate_work_every_time(glyphs_root, tmp_path, write_config):
    """``fewshot.train`` / ``fewshot.evaluate`` stay the API functions whatever submodules
    were imported before (no module of the same name shadows them)."""
    import fewshot
    import fewshot.evaluation  # noqa: F401  (the modules a caller might import first)
    import fewshot.trainer  # noqa: F401

    cfg = write_config(tmp_path / "c.toml", glyphs_root, episodes=2, val_every=0,
                       checkpoint_every=0)
    runs = [fewshot.train(cfg, out=tmp_path / f"r{i}", evaluate=False) for i in range(2)]
    assert [r.step for r in runs] == [2, 2]
    grids = [fewshot.evaluate(runs[0], ways=[5], shots=[1], episodes=4, write=False)
             for _ in range(2)]
    assert grids[0].cells[0].accuracies == grids[1].cells[0].accuracies
    assert len(grids[0].cells[0].accuracies) == 4
    assert callable(fewshot.train) and callable(fewshot.evaluate)


class _Pipe(io.StringIO):
    def isatty(self):
        return False


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_one_plain_line_per_log_window_when_stderr_is_not_a_terminal(
        glyphs_root, tmp_path, write_config, monkeypatch):
    from fewshot.trainer import Trainer

    cfg = write_config(tmp_path / "c.toml", glyphs_root, episodes=6, log_every=2, quiet=False,
                       val_every=0, checkpoint_every=0)
    err = _Pipe()
    monkeypatch.setattr(sys, "stderr", err)
    Trainer(cfg, tmp_path / "pipe").run(evaluate=False)
    text = err.getvalue()
    assert "\r" not in text
    lines = [ln for ln in text.splitlines() if ln.startswith("train protonet:")]
    assert [re.search(r"step (\d+)/6", ln).group(1) for ln in lines] == ["2", "4", "6"]
    assert all(re.search(r"loss=\d+\.\d{4} acc=\d\.\d{4} .* steps/s .* ep/s$", ln) for ln in lines)

    tty = _Terminal()  # on a terminal: the live bar (carriage returns), no plain lines
    monkeypatch.setattr(sys, "stderr", tty)
    Trainer(cfg, tmp_path / "tty").run(evaluate=False)
    assert "\r" in tty.getvalue() and not re.search(r"^train protonet: step", tty.getvalue(), re.M)


def _module_imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [a.name for a in node.names]


def test_import_graph_points_down():
    """No module inside the package imports the API facade; learners import no sibling
    learner except to subclass it; run.py and evaluation.py never import the trainer."""
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "fewshot.api" not in "".join(m for m, _ in _module_imports(path)), path
        assert not re.search(r"^\s+from fewshot\.api import", text, re.M), path
    learners = {p.stem for p in (PACKAGE / "learners").glob("*.py")} - {
        "__init__", "base", "registry", "common"}
    subclassed = {("mltp", "standard"): "SupervisedLearner", ("anil", "maml"): "MAML",
                  ("boil", "maml"): "MAML", ("maml_pp", "maml"): "MAML",
                  ("baseline", "transfer"): "Transfer", ("simpleshot", "transfer"): "Transfer",
                  ("meta_baseline", "transfer"): "Transfer"}
    for name in learners:
        for module, names in _module_imports(PACKAGE / "learners" / f"{name}.py"):
            other = module.rsplit(".", 1)[-1]
            if module.startswith("fewshot.learners.") and other in learners:
                assert subclassed.get((name, other)) in names, (name, module, names)
    for name in ("run", "evaluation"):
        mods = [m for m, _ in _module_imports(PACKAGE / f"{name}.py")]
        assert not any(m in ("fewshot.trainer", "fewshot.api") for m in mods), (name, mods)
    # transductive inference sits beside the learners: it uses their interface, nothing above
    mods = {m for m, _ in _module_imports(PACKAGE / "transductive.py") if m.startswith("fewshot")}
    assert mods <= {"fewshot.errors", "fewshot.learners.base", "fewshot.learners.common",
                    "fewshot.learners.registry"}, mods


def test_import_fewshot_stays_light():
    """``import fewshot`` loads neither torch nor any submodule."""
    code = "import sys, fewshot; print(sorted(m for m in sys.modules if m.startswith(('torch', 'fewshot.'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=PACKAGE.parent, check=True).stdout.strip()
    assert out == "[]"
