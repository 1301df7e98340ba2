"""Cross-domain evaluation (issue 16 item 3) and multi-source training (item 4) of whole runs:
a glyphs-trained run evaluated on an RGB store of another size (and on real Omniglot when
../shared/data has it) equals the same learner evaluated by hand on independently converted
episodes; the results record both datasets; compare refuses different evaluation datasets;
a multi-source run resumes to the uninterrupted run's weights; the one-line errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot.cli import main
from fewshot.config import load_config
from fewshot.data.episodes import fixed_episodes
from fewshot.data.prefetch import tensors_in
from fewshot.data.sources import glyphs
from fewshot.data.store import ImageStore, write_store
from fewshot.errors import ConfigError, DataError, FewShotError
from fewshot.evaluation import evaluate_run
from fewshot.report import compare_runs, load_results
from fewshot.run import Run, open_run
from fewshot.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
SMALL1 = REPO.parent / "shared" / "data" / "omniglot" / "images_background_small1.zip"
#: the "colour" dataset: 20x20 RGB glyphs of one ink colour per class
COLOUR_SPLITS = (("train", 12), ("val", 8), ("test", 10))


@pytest.fixture(scope="module")
def xroot(glyphs_root, tmp_path_factory) -> Path:
    """A data root with the session's glyphs (linked) and a generated 'colour' dataset."""
    root = tmp_path_factory.mktemp("xdata")
    (root / "glyphs").symlink_to(glyphs_root / "glyphs", target_is_directory=True)
    total = sum(k for _, k in COLOUR_SPLITS)
    grey, labels = glyphs.generate_glyphs(total, 10, seed=3, size=20)
    ink = np.random.default_rng(3).integers(60, 256, (total, 3))
    rgb = (grey.astype(np.float64) * ink[labels][:, None, None, :] / 255).round().astype(np.uint8)
    first = 0
    for split, k in COLOUR_SPLITS:
        rows = (labels >= first) & (labels < first + k)
        write_store(root / "colour" / f"{split}.h5", rgb[rows], labels[rows] - first,
                    [f"colour{c}" for c in range(first, first + k)], dataset="colour",
                    split=split, source="test fixture")
        first += k
    return root


@pytest.fixture(scope="module")
def glyph_run(xroot, write_config, tmp_path_factory) -> Path:
    """A protonet run trained on glyphs (6 episodes), not yet evaluated."""
    d = tmp_path_factory.mktemp("runs")
    cfg = write_config(d / "c.toml", xroot)
    Trainer(cfg, d / "glyph_run").run(evaluate=False)
    return d / "glyph_run"


def _copy(run: Path, tmp_path: Path, name: str) -> Path:
    shutil.copytree(run, tmp_path / name)
    return tmp_path / name


def _hand_accuracies(learner, store, ways, shots, queries, n, seed):
    """Per-episode accuracy of ``learner.predict`` on fixed episodes, by a plain loop."""
    learner.eval()
    out = []
    for ep in fixed_episodes(store, ways, shots, queries, n, seed):
        out.append(float((learner.predict(ep).argmax(-1) == ep.query_y).double().mean()))
    return out


def _pil_store(path: Path, size: int, mode: str) -> ImageStore:
    """The store at ``path`` converted image by image with PIL (mode first, then Lanczos), its
    statistics checked against numpy's."""
    raw = ImageStore.open(path, in_memory=True)
    src = "RGB" if raw.image_shape[2] == 3 else "L"
    conv = np.stack([np.asarray(Image.fromarray(im if src == "RGB" else im[..., 0], src)
                                .convert(mode).resize((size, size), Image.LANCZOS))
                     for im in raw.images]).reshape(len(raw), size, size, -1)
    store = ImageStore.from_arrays(conv, raw.labels, raw.class_names, dataset=raw.dataset,
                                   split=raw.split)
    x = conv.astype(np.float64) / 255
    assert store.mean == pytest.approx(tuple(x.mean((0, 1, 2))), abs=1e-12)
    assert store.std == pytest.approx(tuple(x.std((0, 1, 2))), abs=1e-12)
    return store


def test_eval_on_an_rgb_store_of_another_size_equals_hand_evaluation(glyph_run, xroot, tmp_path):
    run_dir = _copy(glyph_run, tmp_path, "run")
    grid = evaluate_run(open_run(run_dir), dataset="colour", ways=[5], shots=[1, 2], episodes=6)
    assert (grid.dataset, grid.split, grid.train_dataset) == ("colour", "test", "glyphs")
    assert grid.extra["conversion"] == "RGB->L (ITU-R 601-2 luma), 20x20->28x28 Lanczos"
    saved = json.loads((run_dir / "results.json").read_text())
    assert (saved["dataset"], saved["train_dataset"]) == ("colour", "glyphs")
    assert ("trained on glyphs, evaluated on colour (image conversion: RGB->L (ITU-R 601-2 luma), "
            "20x20->28x28 Lanczos)") in (run_dir / "results.md").read_text()
    assert (run_dir / "results.csv").read_text().splitlines()[1].endswith(",glyphs")
    learner, _, _ = open_run(run_dir).load_learner("best")
    store = _pil_store(xroot / "colour" / "test.h5", 28, "L")
    for shots in (1, 2):
        want = _hand_accuracies(learner, store, 5, shots, 3, 6, 11)
        assert grid.cell(5, shots).accuracies == pytest.approx(want, abs=1e-6)  # float32 means


def test_eval_on_real_omniglot_through_the_cli(glyph_run, xroot, tmp_path, capsys):
    if not SMALL1.is_file():
        pytest.skip(f"real Omniglot data not available ({SMALL1} missing)")
    from fewshot.data.sources import omniglot

    root = tmp_path / "root"
    shutil.copytree(xroot, root, symlinks=True)
    omniglot.convert(SMALL1, root / "omniglot", image_size=105)
    run_dir = _copy(glyph_run, tmp_path, "run")
    cfg = (run_dir / "config.toml").read_text().replace(str(xroot), str(root))
    (run_dir / "config.toml").write_text(cfg)
    assert main(["eval", str(run_dir), "--dataset", "omniglot", "--split", "background_small1",
                 "--ways", "5,20", "--shots", "1", "--episodes", "10", "--quiet"]) == 0
    assert "trained on glyphs, evaluated on omniglot" in capsys.readouterr().out
    grid = load_results(run_dir)
    assert (grid.dataset, grid.split, grid.train_dataset) == ("omniglot", "background_small1",
                                                              "glyphs")
    assert grid.extra["conversion"] == "105x105->28x28 Lanczos"
    learner, _, _ = open_run(run_dir).load_learner("best")
    store = _pil_store(root / "omniglot" / "background_small1.h5", 28, "L")
    for ways in (5, 20):
        want = _hand_accuracies(learner, store, ways, 1, 3, 10, 11)
        assert grid.cell(ways, 1).accuracies == pytest.approx(want, abs=1e-6)  # float32 means
        assert grid.cell(ways, 1).mean > 1.0 / ways  # glyph features transfer to characters


def test_compare_refuses_runs_evaluated_on_different_datasets(glyph_run, tmp_path, capsys):
    a, b = _copy(glyph_run, tmp_path, "a"), _copy(glyph_run, tmp_path, "b")
    evaluate_run(open_run(a), ways=[5], shots=[1], episodes=4)
    assert "train_dataset" not in (a / "results.csv").read_text()  # in-domain: former layout
    assert json.loads((a / "results.json").read_text())["train_dataset"] == "glyphs"
    evaluate_run(open_run(b), ways=[5], shots=[1], episodes=4, dataset="colour")
    with pytest.raises(FewShotError, match=r"evaluated on glyphs/test \(trained on glyphs\), "
                                           r".* on colour/test \(trained on glyphs\); evaluate "
                                           r"both on the same dataset"):
        compare_runs(a, b)
    assert main(["compare", str(a), str(b)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "colour/test" in err[0]


def test_eval_dataset_in_the_config_is_evaluated_after_training(xroot, write_config, tmp_path):
    cfg = write_config(tmp_path / "c.toml", xroot, episodes=2, val_every=0)
    text = cfg.read_text().replace("[eval]\n", '[eval]\ndataset = "colour"\n')
    cfg.write_text(text.replace("ways = [5, 20]", "ways = [5]"))
    run = Trainer(cfg, tmp_path / "run").run()
    assert (run.results.dataset, run.results.train_dataset) == ("colour", "glyphs")
    assert load_results(tmp_path / "run").dataset == "colour"


def test_cross_domain_errors(glyph_run, xroot):
    with pytest.raises(ConfigError, match="'eval.dataset' is empty"):
        load_config({"eval": {"dataset": " "}})
    with pytest.raises(DataError, match="dataset 'nope' is not prepared"):
        evaluate_run(open_run(glyph_run), dataset="nope", write=False)
    cfg = load_config({"data": {"dataset": "glyphs", "root": str(xroot)},
                       "learner": {"name": "standard"}})
    run = Run(glyph_run, cfg, {"input_kind": "supervised"})
    with pytest.raises(ConfigError, match="--dataset colour: supervised learner 'standard' "
                                          "classifies the classes of glyphs"):
        evaluate_run(run, dataset="colour", write=False)


# ------------------------------------------------------------------ multi-source training
def _multi_config(path, root, write_config, **train):
    cfg = write_config(path, root, **train)
    cfg.write_text(cfg.read_text().replace('dataset = "glyphs"',
                                           'dataset = ["glyphs", "colour"]\n'
                                           'source_sampling = "size"'))
    return cfg


def test_multi_source_run_resumes_to_the_uninterrupted_weights(xroot, write_config, tmp_path):
    """6 steps at once = 3 steps, stop, resume to 6: the same per-step losses and weights;
    every training episode is 28x28x1 (colour's 20x20 RGB converted) and the learner knows
    the classes of both sources (40 + 12)."""
    cfg = _multi_config(tmp_path / "c.toml", xroot, write_config, episodes=6, val_every=3,
                        checkpoint_every=3)
    full = Trainer(cfg, tmp_path / "full").run(evaluate=False)
    part = Trainer(cfg, tmp_path / "part", overrides=["train.episodes=3"])
    part.run(evaluate=False)
    assert repr(part.sampler).startswith("MultiSourceSampler([glyphs p=0.769, colour p=0.231]")
    shapes = {tuple(part.sampler.episode(i).support_x.shape[1:]) for i in range(30)}
    assert shapes == {(1, 28, 28)}
    assert {part.sampler.source_at(i) for i in range(30)} == {0, 1}
    resumed = Trainer(None, tmp_path / "part", resume=True,
                      overrides=["train.episodes=6"]).run(evaluate=False)
    assert full.state["data_shape"] == {"in_channels": 1, "image_size": 28, "num_classes": 52}
    loss = lambda run: [(r["step"], r["loss"]) for r in run.metrics("train")]  # noqa: E731
    assert loss(resumed) == loss(full) and len(loss(full)) == 6
    assert [r["acc"] for r in resumed.metrics("val")] == [r["acc"] for r in full.metrics("val")]
    wa = list(tensors_in(full.load_learner("last")[0].state_dict()))
    wb = list(tensors_in(resumed.load_learner("last")[0].state_dict()))
    assert len(wa) == len(wb) > 0 and all(torch.equal(a, b) for a, b in zip(wa, wb))


def test_multi_source_config_and_data_errors(xroot, write_config, tmp_path):
    base = {"data": {"dataset": ["glyphs", "colour"], "root": str(xroot)}}
    with pytest.raises(ConfigError, match="lists 'glyphs' twice"):
        load_config({"data": {"dataset": ["glyphs", "glyphs"]}})
    with pytest.raises(ConfigError, match="non-empty list of datasets"):
        load_config({"data": {"dataset": []}})
    with pytest.raises(ConfigError, match="'data.source_sampling' must be 'uniform' or 'size'"):
        load_config({"data": {"dataset": ["glyphs", "colour"], "source_sampling": "images"}})
    with pytest.raises(ConfigError, match="learner 'l2g\\+protonet' trains on pairs batches"):
        load_config({**base, "learner": {"name": "l2g+protonet"}})
    with pytest.raises(ConfigError, match="learner 'standard' trains on supervised batches"):
        load_config({**base, "learner": {"name": "standard"}})
    cfg = _multi_config(tmp_path / "c.toml", xroot, write_config)
    with pytest.raises(DataError, match=r"source 'nope' is not prepared under .* \(prepared: "
                                        r"colour, glyphs\)"):
        Trainer(cfg, tmp_path / "r0", overrides=['data.dataset=["glyphs", "nope"]']).run()
    with pytest.raises(DataError, match="source 'colour': split 'train' has 12 classes, fewer "
                                        "than the 15 ways of train.ways"):
        Trainer(cfg, tmp_path / "r1", overrides=["train.ways=15"]).run()
    with pytest.raises(DataError, match="source 'colour': split 'val' has 8 classes, fewer than "
                                        "the 10 ways of validation"):
        Trainer(cfg, tmp_path / "r2", overrides=["train.val_ways=10"]).run()


def test_runs_without_a_recorded_image_shape_use_their_data_shape(glyph_run):
    """run.json of runs trained before ``image_shape`` was recorded: (size, size, channels)."""
    from fewshot.evaluation import run_image_shape

    run = open_run(glyph_run)
    assert run_image_shape(run) == (28, 28, 1)
    state = {k: v for k, v in run.state.items() if k != "image_shape"}
    state["data_shape"] = {"in_channels": 3, "image_size": 20, "num_classes": 4}
    assert run_image_shape(Run(glyph_run, run.config, state)) == (20, 20, 3)
    assert run_image_shape(Run(glyph_run, run.config, {})) is None
