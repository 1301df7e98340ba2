"""Tooling for the MLTP specs (Deng & Zhang, ICPR 2020): supervised stores and result reports.

MLTP is ordinary supervised classification: the test images belong to the training classes.
The few-shot stores (class-disjoint splits) do not fit, so the reduced specs read two
supervised datasets this script writes (with the data layer's converters and StoreWriter):

    python benchmarks/mltp_tools.py prepare omniglot_sup --from ../shared/data/omniglot/images_background.zip \
        [--classes 200] [--train-drawers 15] [--root DIR]
        Omniglot background characters (964, or the first --classes in sorted order) as one
        classification problem: drawers 1..15 of each character -> split "train",
        drawers 16..20 -> split "test" (28x28, ink bright, as the omniglot converter decodes).
    python benchmarks/mltp_tools.py prepare glyphs_sup [--classes 100] [--train-per-class 20]
        [--test-per-class 10] [--root DIR]
        The built-in glyphs generator, each class's drawings split into "train" and "test".
    python benchmarks/mltp_tools.py report RUNS_DIR --out benchmarks/results/mltp_NAME [--command "..."]
        For a finished `fewshot bench` of an MLTP spec: final test top-1 and top-5 per learner
        (mean ± std over seeds, from the last checkpoints), the difference to the first learner
        against the seed-to-seed spread, and the per-epoch test-accuracy curves (mean ± std
        over seeds, from metrics.jsonl's val rows; the specs validate on the test split every
        epoch, as the paper's figures plot test accuracy, and never select on it:
        eval.checkpoint = "last"). Writes NAME.md, NAME.json and NAME_curves.png atomically.

Stores go to ``<root>/<dataset>/<split>.h5`` (root: --root, $FEWSHOT_DATA or ./datasets).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fewshot.errors import DataError, FewShotError  # noqa: E402

_DRAWER = re.compile(r"_(\d+)\.png$")


# ------------------------------------------------------------------------------ stores
def prepare_omniglot_sup(from_path, root=None, *, classes=None, train_drawers=15,
                         image_size=28, dataset="omniglot_sup"):
    """Write ``train`` (drawers 1..train_drawers) and ``test`` (the rest) stores; returns paths."""
    from fewshot.data.sources import Decoder, FileTree
    from fewshot.data.store import StoreWriter, store_path

    src = Path(from_path)
    if not src.exists():
        raise DataError(f"{src}: not found; give images_background.zip (or its extracted folder) "
                        f"of the official Omniglot release")
    with FileTree(src) as tree:
        files = tree.files((".png",))
        groups = {}
        for rel in files:
            parts = rel.split("/")
            m = _DRAWER.search(parts[-1])
            if len(parts) < 3 or not parts[-2].startswith("character") or not m:
                raise DataError(f"{tree.name(rel)}: not <Alphabet>/characterNN/IIII_DD.png; use "
                                f"the official Omniglot layout")
            groups.setdefault((parts[-3], parts[-2]), []).append((int(m.group(1)), rel))
        keys = sorted(groups)
        if classes is not None:
            if not 2 <= classes <= len(keys):
                raise DataError(f"--classes must lie in 2..{len(keys)}, got {classes}")
            keys = keys[:classes]
        for k in keys:
            drawers = sorted(d for d, _ in groups[k])
            if len(drawers) <= train_drawers:
                raise DataError(f"{src}: character {k[0]}/{k[1]} has {len(drawers)} drawings; "
                                f"need more than --train-drawers={train_drawers}")
        items = [(tree.name(rel), tree.read(rel)) for k in keys for _, rel in sorted(groups[k])]
    with Decoder((image_size, image_size), mode="L", invert=True) as dec:
        images = dec.decode(items)
    names = [f"{a}/{c}" for a, c in keys]
    rows, i = {"train": [], "test": []}, 0
    for label, k in enumerate(keys):
        n = len(groups[k])
        for r in range(n):
            rows["train" if r < train_drawers else "test"].append((i + r, label))
        i += n
    paths = []
    for split, rr in rows.items():
        path = store_path(dataset, split, root)
        idx = np.array([r for r, _ in rr])
        labels = np.array([lab for _, lab in rr], dtype=np.int64)
        drawers = (f"1..{train_drawers}" if split == "train" else f"{train_drawers + 1}..")
        with StoreWriter(path, names, dataset=dataset, split=split,
                         source=f"{src.name}, drawers {drawers} of each character",
                         num_images=len(idx)) as w:
            for c in range(len(names)):
                sel = idx[labels == c]
                w.add(images[sel], np.full(len(sel), c, dtype=np.int64))
        paths.append(path)
    return paths


def prepare_glyphs_sup(root=None, *, classes=100, train_per_class=20, test_per_class=10, seed=0,
                       dataset="glyphs_sup"):
    """Glyph classes with disjoint train/test drawings of the same classes; returns paths."""
    from fewshot.data.sources.glyphs import class_names, generate_glyphs
    from fewshot.data.store import store_path, write_store

    per = train_per_class + test_per_class
    images, labels = generate_glyphs(classes, per, seed=seed)
    within = np.arange(len(labels)) % per
    names = class_names(classes)
    paths = []
    for split, mask in (("train", within < train_per_class), ("test", within >= train_per_class)):
        paths.append(write_store(store_path(dataset, split, root), images[mask], labels[mask], names,
                                 dataset=dataset, split=split,
                                 source=f"generated by fewshot glyphs (seed={seed}), "
                                        f"{'first' if split == 'train' else 'last'} drawings"))
    return paths


# ------------------------------------------------------------------------------ report
def _runs(runs_dir: Path):
    """{label_dir: [run_dir, ...]} of a bench output folder (OUT/<label>/seed<k>)."""
    out = {}
    for d in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        seeds = sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("seed")
                       and ((p / "config.toml").is_file() or (p / "result.json").is_file()))
        if seeds:
            out[d.name] = seeds
    if not out:
        raise DataError(f"{runs_dir}: no runs (<label>/seed<k>/config.toml); give the --out "
                        f"folder of `fewshot bench`")
    return out


def _labels(runs_dir: Path):
    """Display labels and order from bench.json when present."""
    p = runs_dir / "bench.json"
    if p.is_file():
        try:
            data = json.loads(p.read_text())
            learners = data.get("learners") or []
            return [x.get("label", x.get("name")) if isinstance(x, dict) else str(x) for x in learners]
        except ValueError:
            return []
    return []


def evaluate_topk(run_dir: Path, ks=(1, 5), batch_size=256):
    """Top-k accuracies of a run's last weights on its test split (every image, no augmentation)."""
    import torch

    from fewshot.data.store import open_split
    from fewshot.learners.standard import topk_correct
    from fewshot.run import open_run

    run = open_run(run_dir)
    learner, step, _ = run.load_learner("last")
    cfg = run.config
    store = open_split(cfg.data.dataset, cfg.eval_split(), cfg.data.root, cfg.data.in_memory)
    try:
        from fewshot.data.supervised import SupervisedAdapter

        hits = {k: 0 for k in ks}
        n = 0
        with torch.no_grad():
            # the training preset fixes the test-time normalisation (per-image on CIFAR)
            for x, y in SupervisedAdapter.eval_batches(store, batch_size, augment=cfg.data.augment):
                got = topk_correct(learner.predict_batch(x), y, ks)
                for k in ks:
                    hits[k] += int(got[k])
                n += len(y)
    finally:
        store.close()
    return {k: hits[k] / n for k in ks}, step


def _curve(run_dir: Path, steps_per_epoch):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    val = [(r["step"], r["acc"]) for r in rows if r.get("split") == "val"]
    return [(s / steps_per_epoch, a) for s, a in val]


def _mean_std(xs):
    xs = [float(x) for x in xs]
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, s


def _atomic(path: Path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def report(runs_dir, out, command=""):
    """Tables and curves for a finished bench of an MLTP spec (see the module docstring)."""
    runs_dir, out = Path(runs_dir), Path(out)
    from fewshot.bench import _slug as bench_slug

    groups = _runs(runs_dir)
    results = {name: [_summary(rd) for rd in groups[name]] for name in groups}
    order = [bench_slug(lab) for lab in _labels(runs_dir)]
    names = sorted(groups, key=lambda n: (order.index(n) if n in order else len(order),
                                          results[n][0]["network"],
                                          results[n][0]["learner"] != "standard", n))
    nets = {name: results[name][0]["network"] for name in names}
    baseline = {}
    for name in names:  # Δ against standard training of the same network (else the first row)
        same = [n for n in names if nets[n] == nets[name] and results[n][0]["learner"] == "standard"]
        baseline[name] = same[0] if same else names[0]
    rows = []
    for name in names:
        t1 = _mean_std([r["top1"] for r in results[name]])
        t5 = _mean_std([r["top5"] for r in results[name]])
        secs = _mean_std([r["train_seconds"] or 0.0 for r in results[name]])
        diff = None
        base = baseline[name]
        if name != base:
            mine = {r["seed"]: r["top1"] for r in results[name]}
            theirs = {r["seed"]: r["top1"] for r in results[base]}
            d = [mine[k] - theirs[k] for k in sorted(mine) if k in theirs]
            diff = _mean_std(d) if d else None
        rows.append({"label": name, "learner": results[name][0]["learner"], "network": nets[name],
                     "seeds": len(results[name]), "baseline": base,
                     "top1_mean": t1[0], "top1_std": t1[1], "top5_mean": t5[0], "top5_std": t5[1],
                     "diff_top1_vs_baseline_mean": diff[0] if diff else None,
                     "diff_top1_vs_baseline_std": diff[1] if diff else None,
                     "train_seconds_mean": secs[0],
                     "per_seed": [{k: r[k] for k in ("seed", "top1", "top5", "step")}
                                  for r in results[name]]})
    stem = out.name
    lines = [f"# {stem}", "", f"Runs: `{runs_dir}`", ""]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    lines += ["Final test accuracy of the last weights (%), mean ± std over seeds; Δ top-1 = "
              "paired per-seed difference to standard training of the same network (mean ± std "
              "over seeds; compare it with the std columns, the seed-to-seed spread).", "",
              "| learner | seeds | top-1 | top-5 | Δ top-1 | train s/run |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        d = ("" if r["diff_top1_vs_baseline_mean"] is None else
             f"{100 * r['diff_top1_vs_baseline_mean']:+.2f} ± {100 * r['diff_top1_vs_baseline_std']:.2f}")
        lines.append(f"| {r['label']} | {r['seeds']} | {100 * r['top1_mean']:.2f} ± "
                     f"{100 * r['top1_std']:.2f} | {100 * r['top5_mean']:.2f} ± "
                     f"{100 * r['top5_std']:.2f} | {d} | {r['train_seconds_mean']:.0f} |")
    _atomic(out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    _atomic(out.with_suffix(".json"), (json.dumps({"runs": str(runs_dir), "command": command,
                                                   "rows": rows}, indent=1) + "\n").encode())
    _plot_curves(results, names, out.with_name(stem + "_curves.png"))
    return rows


def _network(options) -> str:
    return f"{options.get('backbone')} {json.dumps(options.get('backbone_options', {}), sort_keys=True)}"


def _summary(rd: Path):
    """Final top-1/top-5, curve and cost of one run (a `fewshot bench` run or a `run` result)."""
    if (rd / "result.json").is_file():
        r = json.loads((rd / "result.json").read_text())
        return {"seed": rd.name, "top1": r["top1"], "top5": r["top5"], "step": r["steps"],
                "curve": [tuple(x) for x in r["curve"]], "learner": r["learner"],
                "network": _network(r["options"]), "train_seconds": r["train_seconds"]}
    from fewshot.config import load_config

    state = json.loads((rd / "run.json").read_text())
    if not state.get("complete"):
        raise DataError(f"{rd}: the run is not finished; complete the bench first")
    cfg = load_config(rd / "config.toml")
    acc, step = evaluate_topk(rd)
    spe = max(1, int(state["total_steps"]) // max(1, int(cfg.train.epochs)))
    return {"seed": rd.name, "top1": acc[1], "top5": acc[5], "step": step, "curve": _curve(rd, spe),
            "learner": state.get("learner"), "network": _network(cfg.learner.options),
            "train_seconds": state.get("train_seconds")}


def _normalised(store, mean, std):
    import torch

    x = torch.from_numpy(np.asarray(store.images[:])).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x - m) / s, torch.from_numpy(np.asarray(store.labels)).long()


def run_direct(spec_path, out_dir, quick=False, only=None):
    """Train every learner x seed of a spec with a plain loop over the learners' train_step.

    A second, independent driver (it made the ``*_loop`` replicates): each seed draws
    the same shuffled minibatches for every learner (torch.Generator seeded with (seed,
    epoch)), splits each into its two halves, applies the spec's lr milestones at epoch
    starts as the trainer does, and records test top-1 after every epoch and top-1/top-5 of
    the last weights. No augmentation (the reduced specs use none); images are normalised by
    the training store's per-channel mean/std. The learner is built by the trainer's own
    ``build_learner`` after ``seed_everything(seed)``, as in ``fewshot train``.
    """
    import time

    import torch

    from fewshot.bench import _slug as bench_slug
    from fewshot.bench import load_spec
    from fewshot.atomic import atomic_write_text
    from fewshot.config import config_from_dict
    from fewshot.data.store import open_split
    from fewshot.errors import ConfigError
    from fewshot.learners.standard import topk_correct
    from fewshot.run import build_learner, seed_everything

    from fewshot.data.supervised import TaskPairBatch
    spec = load_spec(spec_path, quick=quick)
    out_dir = Path(out_dir)
    for e in spec.learners:
        if only and e.label not in only:
            continue
        for seed in spec.seeds:
            cfg = config_from_dict(spec.run_config(e, seed), where=f"{spec_path} ({e.label})")
            t, d = cfg.train, cfg.data
            if d.augment:
                raise ConfigError(f"{spec_path}: the direct loop applies no augmentation; use "
                                  f"`fewshot bench` for data.augment = {d.augment!r}")
            rd = out_dir / bench_slug(e.label) / f"seed{seed}"
            if (rd / "result.json").is_file():
                continue
            if t.threads:
                torch.set_num_threads(t.threads)
            train = open_split(d.dataset, d.train_split, d.root, in_memory=True)
            test = open_split(d.dataset, cfg.eval_split(), d.root, in_memory=True)
            xtr, ytr = _normalised(train, train.mean, train.std)
            xte, yte = _normalised(test, train.mean, train.std)
            seed_everything(seed)
            h, w, c = train.image_shape
            learner = build_learner(cfg, in_channels=c, image_size=h, num_classes=train.num_classes)
            learner.train()
            bs = t.batch_size
            if bs % 2:
                raise ConfigError(f"{spec_path}: train.batch_size = {bs} must be even (two halves)")
            per_epoch = len(ytr) // bs
            bases = [g["lr"] for g in learner.optimizers["meta"].param_groups]
            curve, steps, t0 = [], 0, time.perf_counter()

            def test_acc(ks=(1, 5)):
                hits = {k: 0 for k in ks}
                for i in range(0, len(yte), 500):
                    got = topk_correct(learner.predict_batch(xte[i:i + 500]), yte[i:i + 500], ks)
                    for k in ks:
                        hits[k] += int(got[k])
                return {k: hits[k] / len(yte) for k in ks}

            for epoch in range(t.epochs):
                k = sum(1 for m in t.lr_milestones if epoch >= m)
                for g, b0 in zip(learner.optimizers["meta"].param_groups, bases):
                    g["lr"] = b0 * t.lr_gamma ** k
                gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                perm = torch.randperm(len(ytr), generator=gen)
                for i in range(per_epoch):
                    idx = perm[i * bs:(i + 1) * bs]
                    x, y = xtr[idx], ytr[idx]
                    learner.train_step(TaskPairBatch(x[:bs // 2], y[:bs // 2], x[bs // 2:], y[bs // 2:]))
                    steps += 1
                curve.append((epoch + 1, test_acc((1,))[1]))
                print(f"{e.label} seed {seed} epoch {epoch + 1}: test top-1 {100 * curve[-1][1]:.2f}",
                      flush=True)
            secs = time.perf_counter() - t0
            final = test_acc()
            alphas = ({n: float(a.detach()) for n, a in learner.step_sizes().items()}
                      if hasattr(learner, "step_sizes") else {})
            result = {"learner": cfg.learner.name, "label": e.label, "seed": seed,
                      "options": cfg.learner.options, "dataset": d.dataset, "epochs": t.epochs,
                      "batch_size": bs, "steps": steps, "top1": final[1], "top5": final[5],
                      "curve": curve, "train_seconds": round(secs, 2), "final_alpha": alphas,
                      "driver": "benchmarks/mltp_tools.py run (plain loop over train_step)"}
            rd.mkdir(parents=True, exist_ok=True)
            atomic_write_text(rd / "result.json", json.dumps(result, indent=1) + "\n")
            train.close()
            test.close()


def _plot_curves(results, names, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in names:
        curves = [r["curve"] for r in results[name]]
        n = min(len(c) for c in curves)
        if n == 0:
            continue
        xs = [curves[0][i][0] for i in range(n)]
        acc = np.array([[c[i][1] for i in range(n)] for c in curves]) * 100
        m, s = acc.mean(0), acc.std(0, ddof=1) if len(curves) > 1 else np.zeros(n)
        ax.plot(xs, m, marker="o", ms=3, label=name)
        ax.fill_between(xs, m - s, m + s, alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("test accuracy per epoch (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write a supervised store (omniglot_sup or glyphs_sup)")
    p.add_argument("dataset", choices=["omniglot_sup", "glyphs_sup"])
    p.add_argument("--from", dest="from_path", help="omniglot: images_background.zip")
    p.add_argument("--root", help="data root (default $FEWSHOT_DATA or ./datasets)")
    p.add_argument("--classes", type=int, help="number of classes (omniglot: first N characters)")
    p.add_argument("--train-drawers", type=int, default=15)
    p.add_argument("--train-per-class", type=int, default=20)
    p.add_argument("--test-per-class", type=int, default=10)
    d = sub.add_parser("run", help="train a spec's learners with a plain loop (no trainer)")
    d.add_argument("spec")
    d.add_argument("--out", required=True, help="runs folder (OUT/<label>/seed<k>/result.json)")
    d.add_argument("--quick", action="store_true")
    d.add_argument("--only", action="append", help="train only this label (repeatable)")
    r = sub.add_parser("report", help="tables and curves of a finished MLTP bench")
    r.add_argument("runs_dir")
    r.add_argument("--out", required=True, help="output stem, e.g. benchmarks/results/mltp_omniglot")
    r.add_argument("--command", default="", help="the command that made the runs (recorded)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "prepare":
            if args.dataset == "omniglot_sup":
                if not args.from_path:
                    raise DataError("prepare omniglot_sup needs --from images_background.zip")
                paths = prepare_omniglot_sup(args.from_path, args.root, classes=args.classes,
                                             train_drawers=args.train_drawers)
            else:
                paths = prepare_glyphs_sup(args.root, classes=args.classes or 100,
                                           train_per_class=args.train_per_class,
                                           test_per_class=args.test_per_class)
            for path in paths:
                print(path)
        elif args.cmd == "run":
            run_direct(args.spec, args.out, quick=args.quick, only=args.only)
        else:
            for row in report(args.runs_dir, args.out, args.command):
                print(f"{row['label']:28s} top-1 {100 * row['top1_mean']:.2f} ± {100 * row['top1_std']:.2f}"
                      f"  top-5 {100 * row['top5_mean']:.2f} ± {100 * row['top5_std']:.2f}")
    except FewShotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
