"""The ``fewshot`` command (also ``python -m fewshot``).

    fewshot data prepare|info|verify|download NAME [--from PATH] [--root DIR]
    fewshot data prepare folder NAME --from DIR           (your own images: DIR/<class>/...)
    fewshot data prepare csv NAME --from FILE.csv [--images DIR]   (path,label[,split] rows)
    fewshot learners [NAME]
    fewshot config [CONFIG.toml] [--set k=v ...] [--explain]
    fewshot train CONFIG.toml [--set key=value ...] [--out RUN_DIR] [--device D] [--seed N]
                  [--force] [--quiet] [--no-eval]
    fewshot train --resume RUN_DIR [--set train.episodes=N]
    fewshot eval RUN_DIR [--ways 5,20] [--shots 1,5] [--queries 15] [--episodes 600]
                 [--split test] [--dataset NAME] [--seed N] [--checkpoint best|last]
    fewshot bench SPEC.toml [--quick] [--out DIR] [--force]
    fewshot compare RUN_A RUN_B
    fewshot embed RUN_DIR [--ways 5] [--shots 5] [--episode 0] [--method tsne|pca]

Every :class:`~fewshot.errors.FewShotError` is printed as one line on stderr and the exit
status is 2; ``--debug`` (before the command) shows the traceback instead. An interrupted
``train`` (Ctrl-C / SIGTERM) writes its checkpoint and exits with 130 / 143.

Each command imports what it runs inside its function, so that ``fewshot --help`` and
``fewshot data info`` start without loading torch and every learner.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import List, Optional, Sequence

from fewshot.errors import ConfigError, FewShotError

EXIT_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line, status 2) instead of printing usage."""

    def error(self, message):
        raise ConfigError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _int_list(text: str) -> List[int]:
    try:
        vals = [int(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return vals


def _kv(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), v.strip()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fewshot", description="Episodic few-shot meta-learning on PyTorch.")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    sub.required = True
    _add_data_parser(sub)

    ls = sub.add_parser("learners", help="registered learners, papers and hyper-parameters")
    ls.add_argument("name", nargs="?", help="show one learner's options in full")

    c = sub.add_parser("config", help="show a resolved config or document every key")
    c.add_argument("config", nargs="?", help="CONFIG.toml")
    c.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    c.add_argument("--explain", action="store_true", help="document every config key")
    _add_train_parser(sub)

    e = sub.add_parser("eval", help="evaluate a run on an N-way K-shot grid of fixed episodes")
    e.add_argument("run_dir")
    e.add_argument("--ways", type=_int_list, help="e.g. 5,20 (default: the run's eval.ways)")
    e.add_argument("--shots", type=_int_list, help="e.g. 1,5 (default: the run's eval.shots)")
    e.add_argument("--queries", type=int, help="queries per class (default 15)")
    e.add_argument("--episodes", type=int, help="episodes per cell (default 600)")
    e.add_argument("--split", help="split to evaluate (default: the run's test split)")
    e.add_argument("--dataset", help="evaluate on another prepared dataset (cross-domain; images "
                                     "converted to the run's size and channels; default: the "
                                     "run's eval.dataset, else its training dataset)")
    e.add_argument("--seed", type=int, help="seed of the episodes (default: the run's eval.seed)")
    e.add_argument("--checkpoint", choices=["best", "last"], help="weights to evaluate")
    e.add_argument("--inference", help="inductive, bd-cspn or tim (transductive, metric learners "
                                       "only; default: the run's eval.inference)")
    e.add_argument("--device", help="auto, cpu, cuda")
    e.add_argument("--quiet", action="store_true")
    _add_bench_parser(sub)

    cp = sub.add_parser("compare", help="paired per-cell differences of two evaluated runs")
    cp.add_argument("run_a")
    cp.add_argument("run_b")
    cp.add_argument("--json", action="store_true", help="print JSON instead of a table")

    em = sub.add_parser("embed", help="2-D projection of support/query embeddings of test episodes")
    em.add_argument("run_dir")
    em.add_argument("--ways", type=int, default=5)
    em.add_argument("--shots", type=int, default=5)
    em.add_argument("--queries", type=int, default=15)
    em.add_argument("--episode", type=int, default=0, help="which fixed test episode")
    em.add_argument("--split", help="split (default: the run's test split)")
    em.add_argument("--method", choices=["tsne", "pca"], default="tsne",
                    help="2-D projection: t-SNE (default, seeded) or PCA")
    em.add_argument("--checkpoint", choices=["best", "last"], default="best")
    em.add_argument("--out", help="PNG path (default RUN_DIR/plots/embedding.png)")
    return p


def _add_data_parser(sub) -> None:
    """``fewshot data prepare|info|verify|download``."""
    d = sub.add_parser("data", help="prepare, inspect, verify or download datasets")
    dsub = d.add_subparsers(dest="data_command", parser_class=_Parser, metavar="ACTION")
    dsub.required = True
    for name, hlp in (("prepare", "convert a dataset into HDF5 stores"),
                      ("info", "classes, images per class, image size and splits"),
                      ("verify", "check shapes, dtypes, labels, counts and checksums"),
                      ("download", "download with the maintained downloaders, then convert")):
        a = dsub.add_parser(name, help=hlp)
        a.add_argument("name", help="dataset name (glyphs, omniglot, mini-imagenet, ...)" +
                       ("; or folder / csv, then the NAME of your own dataset"
                        if name == "prepare" else ""))
        a.add_argument("--root", help="data root (default $FEWSHOT_DATA or ./datasets)")
        if name in ("info", "verify"):
            a.add_argument("--json", action="store_true", help="print the full JSON")
        if name == "prepare":
            a.add_argument("target", nargs="?", metavar="NAME",
                           help="after folder / csv: the name of the new dataset")
            a.add_argument("--from", dest="from_path", help="folder or file the user has")
            a.add_argument("--images", help="prepare csv: folder the CSV's image paths are "
                                            "relative to (default: the CSV's folder)")
            a.add_argument("--opt", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                           help="converter option (repeatable), e.g. --opt split=vinyals")


def _add_train_parser(sub) -> None:
    """``fewshot train``."""
    t = sub.add_parser("train", help="train a learner from a TOML config")
    t.add_argument("config", nargs="?", help="CONFIG.toml")
    t.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.episodes=500 (repeatable)")
    t.add_argument("--out", help="run directory (default runs/<config name>)")
    t.add_argument("--device", help="auto, cpu, cuda or cuda:N (= --set train.device=...)")
    t.add_argument("--seed", type=int, help="training seed (= --set train.seed=N)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    t.add_argument("--force", action="store_true", help="replace an existing run directory")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.add_argument("--no-eval", action="store_true", help="skip the [eval] grid after training")


def _add_bench_parser(sub) -> None:
    """``fewshot bench``."""
    b = sub.add_parser("bench", help="several learners x seeds on the same episodes, one report")
    b.add_argument("spec", help="SPEC.toml (e.g. benchmarks/quickstart.toml)")
    b.add_argument("--quick", action="store_true", help="the spec's short CPU version")
    b.add_argument("--out", help="output directory (default: the spec's out)")
    b.add_argument("--force", action="store_true", help="retrain runs that exist")
    b.add_argument("--device", help="auto, cpu, cuda")
    b.add_argument("--quiet", action="store_true")


# ----------------------------------------------------------------------------- commands
def _cmd_data(args) -> int:
    from fewshot.data import prepare as P

    if args.data_command == "prepare":
        return _prepare(P, args)
    if args.data_command == "download":
        out = P.download(args.name, root=args.root)
        for path in out or []:
            print(path)
        return 0
    fn = P.info if args.data_command == "info" else P.verify
    res = fn(args.name, root=args.root)
    if args.json:
        print(json.dumps(res, indent=1, default=str))
        return 0
    print(_format_data(args.data_command, res))
    return 0


def _prepare(P, args) -> int:
    """``data prepare NAME`` (a built-in dataset) or ``data prepare folder|csv NAME``."""
    opts = dict(args.opt)
    if args.name not in ("folder", "csv"):
        if args.target is not None or args.images is not None:
            extra = args.target if args.target is not None else "--images"
            raise ConfigError(f"fewshot data prepare {args.name}: unexpected {extra!r} (a second "
                              "NAME and --images are for `prepare folder|csv NAME`)")
        for path in P.prepare(args.name, from_path=args.from_path, root=args.root, **opts):
            print(path)
        return 0
    if args.images is not None:
        opts["images"] = args.images
    res = P.prepare_custom(args.name, args.target, args.from_path, root=args.root, **opts)
    for path in res.paths:
        print(path)
    if res.skipped:
        print(f"fewshot: skipped {len(res.skipped)} unreadable image(s) (on_error=skip), first: "
              f"{' '.join(res.skipped[0].split())}", file=sys.stderr)
    if res.unused:
        print(f"fewshot: {len(res.unused)} class(es) are in no split list and were left out, "
              f"e.g. '{res.unused[0]}'", file=sys.stderr)
    return 0


def _format_data(command: str, res: dict) -> str:
    """Human-readable ``data info`` / ``data verify`` summary, one line per split."""
    lines = [f"{res.get('dataset')} under {res.get('root')}"]
    if command == "verify":
        lines[0] += ": " + ("OK" if res.get("ok") else "PROBLEMS")
    for split, v in res.get("splits", {}).items():
        shape = "x".join(str(x) for x in v.get("image_shape", []))
        lo, hi = v.get("per_class_min"), v.get("per_class_max")
        per = f"{lo}" if lo == hi else f"{lo}-{hi}"
        line = f"  {split:<6} {v.get('classes')} classes, {v.get('images')} images ({per} per class), {shape}"
        if command == "verify":
            ref = v.get("matches_reference")
            line += ", checksum ok" + ("" if ref is None else
                                       (", matches published sizes" if ref else ", DIFFERS from published sizes"))
        elif v.get("checksum"):
            line += f", {str(v['checksum'])[:19]}"
        lines.append(line)
    if command == "info" and res.get("classes") is not None:
        lines.append(f"  total  {res['classes']} classes")
    return "\n".join(lines)


def _doc_lines(cls) -> dict:
    """Per-field comments of a Config dataclass (``name: type = value  # doc``)."""
    import inspect
    import re

    docs = {}
    for klass in reversed(cls.__mro__):
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+)\s*:[^=\n]*=[^#\n]*#\s*(.+)$", src, re.M):
            docs[m.group(1)] = m.group(2).strip()
    return docs


def _test_time(cls, transductive: bool) -> str:
    """One phrase for ``fewshot learners``: what the learner does with a test episode."""
    what = ("fine-tunes on the support set" if cls.fine_tunes_at_test
            else "classifies the queries as trained (no fine-tuning)")
    if cls.input_kind == "supervised":
        what = "a plain classifier (top-k over the classes it was trained on)"
    return what + ("; [eval] inference = bd-cspn / tim on its features" if transductive else "")


def _cmd_learners(args) -> int:
    from dataclasses import MISSING, fields

    from fewshot.learners import get_learner, list_learners
    from fewshot.transductive import supports

    if args.name:
        cls = get_learner(args.name)
        print(f"{args.name}: {cls.description}")
        print(f"  paper: {cls.paper}")
        print(f"  trains on: {cls.input_kind}; fine-tunes at test: "
              f"{'yes' if cls.fine_tunes_at_test else 'no'}; autocast: "
              f"{'yes' if cls.supports_autocast else 'no'}; [eval] inference: "
              f"{'inductive, bd-cspn, tim' if supports(cls) else 'inductive'}")
        docs = _doc_lines(cls.Config)
        print("  options ([learner] keys; defaults):")
        for f in fields(cls.Config):
            default = f.default if f.default is not MISSING else (
                f.default_factory() if f.default_factory is not MISSING else "required")
            doc = docs.get(f.name, "")
            print(f"    {f.name} = {default!r}" + (f"    # {doc}" if doc else ""))
        if cls.Config.__doc__:
            print("  " + "\n  ".join(cls.Config.__doc__.strip().splitlines()))
        return 0
    learners = list_learners()
    if not learners:
        print("no learners registered")
        return 0
    width = max(len(n) for n in learners)
    for name, cls in learners.items():
        from dataclasses import asdict

        try:
            defaults = asdict(cls.Config())
        except TypeError:
            defaults = {}
        print(f"{name:<{width}}  {cls.description}")
        print(f"{'':<{width}}  paper: {cls.paper}")
        print(f"{'':<{width}}  test time: {_test_time(cls, supports(cls))}")
        print(f"{'':<{width}}  input: {cls.input_kind}; defaults: "
              + ", ".join(f"{k}={v!r}" for k, v in defaults.items()))
    return 0


def _cmd_config(args) -> int:
    from fewshot.config import dump_toml, explain, load_config

    if args.explain or not args.config:
        print(explain())
        return 0
    cfg = load_config(args.config, args.overrides)
    print(dump_toml(cfg.to_dict()), end="")
    return 0


def _launched_by_torchrun() -> bool:
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def _cmd_train(args) -> int:
    if _launched_by_torchrun():  # torchrun --nproc_per_node=N -m fewshot train ...
        from fewshot import distributed

        distributed.init_from_env(device=_train_device(args))
        try:
            return _train(args)
        finally:
            distributed.shutdown()
    return _train(args)


def _train_device(args) -> str:
    """The device a torchrun rank trains on (picks the backend: gloo for CPU, nccl for CUDA):
    --device, else the config's train.device (with --set overrides), else auto."""
    if args.device:
        return args.device
    from fewshot.config import load_config

    source = args.config or (str(Path(args.resume) / "config.toml") if args.resume else None)
    if source is None:
        return "auto"
    return load_config(source, list(args.overrides)).train.device


def _train(args) -> int:
    from fewshot.trainer import Trainer

    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"train.device={json.dumps(args.device)}")
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    if args.quiet:
        overrides.append("train.quiet=true")
    argv = ["fewshot"] + list(args._argv)
    if args.resume:
        if args.config:
            raise ConfigError("give either CONFIG.toml or --resume RUN_DIR, not both (a resumed run "
                              "uses the config.toml saved in its directory)")
        if args.seed is not None:
            raise ConfigError("--seed cannot change on --resume; the run keeps its seed")
        trainer = Trainer(None, args.resume, overrides=overrides, resume=True, argv=argv)
    else:
        if not args.config:
            raise ConfigError("fewshot train: give CONFIG.toml (examples in configs/) or --resume RUN_DIR")
        trainer = Trainer(args.config, args.out, overrides=overrides, force=args.force, argv=argv)
    run = trainer.run(evaluate=not args.no_eval)
    if not trainer.is_writer:
        return 0
    print(f"run directory: {run.run_dir}")
    if run.best_val is not None:
        print(f"best validation accuracy {run.best_val * 100:.2f}% at step {run.state.get('best_step')}")
    if run.results is not None:
        print(run.results.table(), end="")
    return 0


def _cmd_eval(args) -> int:
    from fewshot.evaluation import evaluate_run
    from fewshot.run import open_run

    run = open_run(args.run_dir)
    grid = evaluate_run(run, ways=args.ways, shots=args.shots, queries=args.queries,
                        episodes=args.episodes, split=args.split, seed=args.seed,
                        checkpoint=args.checkpoint, device=args.device, quiet=args.quiet,
                        dataset=args.dataset,
                        inference=args.inference)
    print(grid.table(), end="")
    print(f"written: {Path(args.run_dir) / 'results.json'}, results.csv, results.md")
    return 0


def _cmd_bench(args) -> int:
    from fewshot.bench import run_bench

    res = run_bench(args.spec, quick=args.quick, out=args.out, force=args.force, device=args.device,
                    quiet=args.quiet)
    print()
    print(res.markdown(), end="")
    print(f"written: {res.out / 'bench.md'}, bench.json, bench.csv, plots/bench.png")
    return 0


def _cmd_compare(args) -> int:
    from fewshot.report import compare_runs

    comp = compare_runs(args.run_a, args.run_b)
    if args.json:
        print(json.dumps(comp.to_dict(), indent=1))
    else:
        print(comp.table(), end="")
    return 0


def _cmd_embed(args) -> int:
    from fewshot.embedding import embed

    path, method = embed(args.run_dir, ways=args.ways, shots=args.shots, queries=args.queries,
                         episode=args.episode, split=args.split, method=args.method,
                         checkpoint=args.checkpoint, out=args.out)
    print(f"written: {path} ({method.upper()})")
    return 0


COMMANDS = {"data": _cmd_data, "learners": _cmd_learners, "config": _cmd_config,
            "train": _cmd_train, "eval": _cmd_eval, "bench": _cmd_bench,
            "compare": _cmd_compare, "embed": _cmd_embed}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 error, 130/143 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        if not argv or argv in (["-h"], ["--help"]):
            build_parser().print_help()
            return 0
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help of a subcommand
            return int(e.code or 0)
        args._argv = argv
        return COMMANDS[args.command](args)
    except FewShotError as e:
        from fewshot.trainer import Interrupted

        if isinstance(e, Interrupted):
            print(f"fewshot: {e}", file=sys.stderr)
            return e.exit_code
        if debug:
            traceback.print_exc()
        else:
            msg = " ".join(str(e).split())  # one line
            print(f"fewshot: error: {msg}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("fewshot: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
