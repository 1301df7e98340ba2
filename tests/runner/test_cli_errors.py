"""Every CLI error: one line on stderr, exit status 2; --debug shows the traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fewshot.cli import main

REPO = Path(__file__).resolve().parents[2]


def _one_line_error(capsys, argv, fragment):
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fewshot: error: ")
    assert fragment in lines[0], lines[0]
    return lines[0]


def test_usage_errors(capsys):
    _one_line_error(capsys, ["trian"], "invalid choice: 'trian'")
    _one_line_error(capsys, ["eval", "x", "--ways", "5,a"], "comma-separated integers")
    _one_line_error(capsys, ["train"], "give CONFIG.toml")


def test_config_errors(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[learner]\nname = "protonet"\n[train]\nepisodes = 3\n')
    _one_line_error(capsys, ["train", str(tmp_path / "nope.toml")], "nope.toml not found")
    _one_line_error(capsys, ["train", str(cfg), "--set", "train.episodes=lots"],
                    "'train.episodes' in ")
    _one_line_error(capsys, ["train", str(cfg), "--set", "learner.name=protonett"],
                    "Did you mean 'protonet'?")
    _one_line_error(capsys, ["config", str(cfg), "--set", "train.epsiodes=5"],
                    "Did you mean 'episodes'?")


def test_missing_dataset_names_prepare_command(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\ndataset = "glyphs"\nroot = "{tmp_path / "empty"}"\n[train]\nepisodes = 3\n')
    line = _one_line_error(capsys, ["train", str(cfg), "--out", str(tmp_path / "run"), "--quiet"],
                           "fewshot data prepare glyphs")
    assert "empty" in line


def test_existing_run_dir_is_not_overwritten(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[train]\nepisodes = 3\n')
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("keep me")
    _one_line_error(capsys, ["train", str(cfg), "--out", str(run)], "already exists; pass --force")
    assert (run / "config.toml").read_text() == "keep me"
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    _one_line_error(capsys, ["train", str(cfg), "--out", str(other), "--force"],
                    "does not look like a run directory")
    assert (other / "thesis.tex").read_text() == "precious"


def test_run_dir_errors(capsys, tmp_path):
    _one_line_error(capsys, ["eval", str(tmp_path)], "is not a fewshot run directory")
    _one_line_error(capsys, ["train", "--resume", str(tmp_path)], "cannot resume")
    _one_line_error(capsys, ["compare", str(tmp_path), str(tmp_path)], "results.json not found")
    _one_line_error(capsys, ["bench", str(tmp_path / "spec.toml")], "bench spec")
    spec = tmp_path / "spec.toml"
    spec.write_text('[[learners]]\nname = "protonett"\n')
    _one_line_error(capsys, ["bench", str(spec)], "unknown learner 'protonett'")
    spec.write_text('[[learners]]\nname = "protonet"\n')
    _one_line_error(capsys, ["bench", str(spec), "--quick"], "has no [quick] table")


@pytest.mark.slow
def test_subprocess_exit_status_and_debug(tmp_path):
    cmd = [sys.executable, "-m", "fewshot", "train", str(tmp_path / "nope.toml")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "nope.toml not found" in out.stderr
    out = subprocess.run([sys.executable, "-m", "fewshot", "--debug"] + cmd[3:], capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == 2
    assert "Traceback (most recent call last)" in out.stderr and "ConfigError" in out.stderr


def _damaged_copy(glyphs_root, tmp_path, damage):
    """A copy of the session's glyphs data root with ``damage(h5py.File)`` done to train.h5."""
    import shutil

    import h5py

    root = tmp_path / "data"
    shutil.copytree(glyphs_root, root)
    with h5py.File(root / "glyphs" / "train.h5", "r+") as f:
        damage(f)
    return root


def _rename_num_classes(f):
    """A flipped byte in the attribute's name: the value is there under a name no one reads."""
    f.attrs["num_classes".replace("e", "f")] = f.attrs["num_classes"]
    del f.attrs["num_classes"]


def test_data_verify_on_a_store_with_a_damaged_attribute_name_is_one_line(capsys, tmp_path,
                                                                          glyphs_root):
    root = _damaged_copy(glyphs_root, tmp_path, _rename_num_classes)
    line = _one_line_error(capsys, ["data", "verify", "glyphs", "--root", str(root)],
                           "delete it and re-run `fewshot data prepare glyphs`")
    assert line.startswith(f"fewshot: error: {root / 'glyphs' / 'train.h5'}: damaged store (KeyError: ")
    assert "num_classes" in line


def test_data_verify_on_class_offsets_that_disagree_with_the_labels_says_what_to_do(
        capsys, tmp_path, glyphs_root):
    def shift(f):
        f["class_offsets"][1] += 1

    root = _damaged_copy(glyphs_root, tmp_path, shift)
    line = _one_line_error(capsys, ["data", "verify", "glyphs", "--root", str(root)],
                           "stored class_offsets disagree with the labels")
    assert line.endswith("; delete it and re-run `fewshot data prepare glyphs`")
