"""Run a reduced L2G / meta-transfer spec with a minimal built-in episode sampler.

    python benchmarks/papers_reduced.py benchmarks/l2g_glyphs.toml [--quick] [--out DIR]

The same specs run with ``fewshot bench``; this driver exists so the reduced results can be
produced from the stores alone (``fewshot data prepare glyphs``; it prepares glyphs itself when
they are missing). It reads the spec with :func:`fewshot.bench.load_spec`, and for every
learner x seed: draws training tasks from the training split (classes without replacement;
ways/shots lists = any-way/any-shot, drawn per episode; for ``pairs`` learners T_i and T_j on
disjoint classes, T_j shaped by ``train.pair``), trains ``train.episodes`` outer steps of
``train.meta_batch`` tasks, keeps the weights with the best validation accuracy when
``train.val_every`` > 0 (else the last ones), and evaluates on fixed test episodes (the same
for every learner: ``eval.seed``). It writes ``OUT/results.md`` and ``OUT/results.json`` with
mean ± 95% CI (1.96·std/√n over episodes) per cell.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewshot.bench import load_spec  # noqa: E402
from fewshot.config import config_from_dict  # noqa: E402
from fewshot.data.episodes import Episode  # noqa: E402
from fewshot.data.store import open_split, store_path  # noqa: E402
from fewshot.learners import get_learner  # noqa: E402
from fewshot.report import mean_ci  # noqa: E402


class Tasks:
    """Episodes from an in-memory store: images /255, normalised by the store's mean/std."""

    def __init__(self, store, seed):
        x = torch.from_numpy(np.asarray(store.images)).permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(store.mean).view(1, -1, 1, 1)
        std = torch.tensor(store.std).view(1, -1, 1, 1)
        self.x = (x - mean) / std
        self.offsets = torch.from_numpy(np.asarray(store.class_offsets))
        self.num_classes = store.num_classes
        self.g = torch.Generator().manual_seed(seed)

    def _pick(self, v):
        if isinstance(v, list):
            return int(v[torch.randint(len(v), (1,), generator=self.g)])
        return int(v)

    def task(self, classes, shots, queries):
        sx, sy, qx, qy = [], [], [], []
        for label, c in enumerate(classes.tolist()):
            lo, hi = int(self.offsets[c]), int(self.offsets[c + 1])
            rows = lo + torch.randperm(hi - lo, generator=self.g)[:shots + queries]
            sx.append(self.x[rows[:shots]]), qx.append(self.x[rows[shots:]])
            sy += [label] * shots
            qy += [label] * queries
        sy, qy = torch.tensor(sy), torch.tensor(qy)
        return Episode(torch.cat(sx), sy, torch.cat(qx), qy, classes.clone(),
                       base_support_y=classes[sy], base_query_y=classes[qy])

    def episode(self, ways, shots, queries):
        w = self._pick(ways)
        return self.task(torch.randperm(self.num_classes, generator=self.g)[:w], self._pick(shots), queries)

    def pair(self, first, second):
        wi, wj = self._pick(first["ways"]), self._pick(second["ways"])
        classes = torch.randperm(self.num_classes, generator=self.g)[:wi + wj]
        return (self.task(classes[:wi], self._pick(first["shots"]), first["queries"]),
                self.task(classes[wi:], self._pick(second["shots"]), second["queries"]))


def accuracy(learner, episodes):
    learner.eval()
    accs = [float((learner.predict(e).argmax(1) == e.query_y).float().mean()) for e in episodes]
    learner.train()
    return accs


def run(cfg, seed, stores, log):
    t, e = cfg.train, cfg.eval
    cls = get_learner(cfg.learner.name)
    torch.manual_seed(seed)
    train = stores[cfg.data.train_split]
    learner = cls(cls.Config(**cfg.learner.options), in_channels=train.image_shape[2],
                  image_size=train.image_shape[0], num_classes=train.num_classes)
    tasks = Tasks(train, seed)
    first = {"ways": t.ways, "shots": t.shots, "queries": t.queries}
    second = {k: t.pair.get(k, first[k]) for k in first}
    val_tasks = Tasks(stores[cfg.data.val_split], 12345)
    val_ways = t.val_ways or (t.ways[0] if isinstance(t.ways, list) else t.ways)
    val_shots = t.val_shots or (t.shots[0] if isinstance(t.shots, list) else t.shots)
    val = [val_tasks.episode(val_ways, val_shots, t.queries) for _ in range(t.val_episodes)]
    best, best_state = -1.0, None
    t0 = time.time()
    for step in range(1, t.episodes + 1):
        if cls.input_kind == "pairs":
            batch = [tasks.pair(first, second) for _ in range(t.meta_batch)]
        else:
            batch = [tasks.episode(t.ways, t.shots, t.queries) for _ in range(t.meta_batch)]
        out = learner.train_step(batch)
        if t.val_every and (step % t.val_every == 0 or step == t.episodes):
            acc = float(np.mean(accuracy(learner, val)))
            log(f"  step {step} loss {float(out['loss']):.3f} val {acc:.3f} ({time.time() - t0:.0f}s)")
            if acc > best:
                best, best_state = acc, copy.deepcopy(learner.state_dict())
    train_s = time.time() - t0
    if best_state is not None and e.checkpoint == "best":
        learner.load_state_dict(best_state)
    test_store = stores[e.split or cfg.data.test_split]
    cells = {}
    for w in e.ways:
        for s in e.shots:
            test = Tasks(test_store, e.seed + 1000 * w + s)
            eps = [test.episode(w, s, e.queries) for _ in range(e.episodes)]
            cells[f"{w}-way {s}-shot"] = mean_ci(accuracy(learner, eps))
    return cells, train_s, time.time() - t0 - train_s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", type=Path)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    spec = load_spec(args.spec, quick=args.quick)
    out = args.out or Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(spec.base.get("train", {}).get("threads", 0)) or torch.get_num_threads())
    cfg0 = config_from_dict(spec.run_config(spec.learners[0], spec.seeds[0]))
    d = cfg0.data
    if not store_path(d.dataset, d.train_split, d.root).exists() and d.dataset == "glyphs":
        from fewshot.data.prepare import prepare

        prepare("glyphs", root=d.root)
    splits = {d.train_split, d.val_split, cfg0.eval.split or d.test_split}
    stores = {s: open_split(d.dataset, s, d.root, in_memory=True) for s in splits}
    log_file = open(out / "log.txt", "a")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    results = {}
    for entry in spec.learners:
        for seed in spec.seeds:
            cfg = config_from_dict(spec.run_config(entry, seed))
            log(f"{entry.label} seed {seed}")
            cells, train_s, eval_s = run(cfg, seed, stores, log)
            results.setdefault(entry.label, {})[seed] = {"cells": cells, "train_s": train_s,
                                                         "eval_s": eval_s}
            log(f"  {entry.label}: " + ", ".join(f"{k} {100 * v[0]:.1f}±{100 * v[2]:.1f}"
                                                 for k, v in cells.items())
                + f"  (train {train_s:.0f}s, eval {eval_s:.0f}s)")
    cells = list(next(iter(next(iter(results.values())).values()))["cells"])
    cmd = "python benchmarks/papers_reduced.py " + str(args.spec) + (" --quick" if args.quick else "")
    lines = [f"## {spec.name}" + (" (quick)" if args.quick else ""), "", f"Command: `{cmd}`", "",
             "| learner | " + " | ".join(cells) + " | train s |",
             "|---|" + "---|" * (len(cells) + 1)]
    for label, per_seed in results.items():
        for seed, r in per_seed.items():
            name = label if len(spec.seeds) == 1 else f"{label} (seed {seed})"
            lines.append(f"| {name} | " + " | ".join(f"{100 * r['cells'][c][0]:.1f} ± {100 * r['cells'][c][2]:.1f}"
                                                    for c in cells) + f" | {r['train_s']:.0f} |")
    for name, text in (("results.md", "\n".join(lines) + "\n"),
                       ("results.json", json.dumps({"spec": str(args.spec), "command": cmd,
                                                    "results": results}, indent=1))):
        fd, tmp = tempfile.mkstemp(dir=out, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, out / name)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
