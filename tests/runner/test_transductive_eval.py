"""``[eval] inference`` end to end: a trained run evaluated inductively and with BD-CSPN on the
same fixed episodes; the transductive grid is flagged in results.{json,md} (issue 15 item 6)."""
import json

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bd_cspn_evaluation_is_flagged_and_uses_the_same_episodes(glyphs_root, tmp_path, write_config):
    import fewshot
    from fewshot.evaluation import evaluate_run

    cfg = write_config(tmp_path / "c.toml", glyphs_root, episodes=4, val_every=0,
                       checkpoint_every=0)
    run = fewshot.train(cfg, out=tmp_path / "r", evaluate=False)
    plain = evaluate_run(run, ways=[5], shots=[1], episodes=6, checkpoint="last", write=False)
    trans = evaluate_run(run, ways=[5], shots=[1], episodes=6, checkpoint="last",
                         inference="bd-cspn")
    assert plain.inference == "inductive" and trans.inference == "bd-cspn"
    assert plain.cells[0].fingerprint == trans.cells[0].fingerprint  # the same episodes
    assert plain.cells[0].accuracies != trans.cells[0].accuracies
    saved = json.loads((run.run_dir / "results.json").read_text())
    assert saved["inference"] == "bd-cspn"
    assert "inference: transductive (bd-cspn" in (run.run_dir / "results.md").read_text()


def test_tim_with_maml_is_refused_before_training(glyphs_root, tmp_path, write_config):
    from fewshot.config import load_config
    from fewshot.errors import ConfigError

    cfg = write_config(tmp_path / "c.toml", glyphs_root, learner="maml")
    text = cfg.read_text().replace("[eval]\n", "[eval]\ninference = \"tim\"\n", 1)
    cfg.write_text(text)
    with pytest.raises(ConfigError, match="inference = 'tim' needs a learner with features"):
        load_config(cfg)


def test_cli_eval_with_tim_on_maml_is_one_line_exit_2(glyphs_root, tmp_path, write_config, capsys):
    import fewshot
    from fewshot.cli import main

    cfg = write_config(tmp_path / "c.toml", glyphs_root, learner="maml", episodes=1,
                       val_every=0, checkpoint_every=0)
    run = fewshot.train(cfg, out=tmp_path / "r", evaluate=False)
    capsys.readouterr()
    assert main(["eval", str(run.run_dir), "--inference", "tim", "--episodes", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "inference = 'tim'" in err and "learner 'maml'" in err
