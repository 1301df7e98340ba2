"""Evaluation on an N-way K-shot grid of fixed, seeded episodes.

For every cell (N, K) the same ``n`` episodes are drawn by
``fewshot.data.episodes.fixed_episodes(store, N, K, Q, n, seed)``: the same seed gives the
same episodes for every learner, so two learners are compared on exactly the same tasks
(:func:`fewshot.report.compare` pairs them). Each episode's accuracy is the fraction of its
N·Q query images whose arg-max logit is the true label; a cell reports the mean over the
episodes with the 95% interval 1.96·s/√n, s the sample standard deviation (ddof = 1).

Grids are checked against the split before any work (:func:`check_grid`): N above the
number of classes of the split, or K + Q above the images of its smallest class, is
refused with a message naming the counts.

Distributed evaluation: rank r of W evaluates episodes r, r+W, r+2W, ... and the
per-episode accuracies are gathered back into episode order (:func:`gather_accuracies`),
so the table is identical to a single process's. Without torch.distributed, (rank, world)
is (0, 1).

A run (:func:`evaluate_run`): episodic learners on the grid above; supervised learners by
top-1 and top-k accuracy over every image of the split (:func:`evaluate_supervised`); on
another dataset than the training one (cross-domain), its images converted to the run's
image shape (:mod:`fewshot.data.conform`).
Imports: run, report, config, data, learners, distributed, plots, errors (never the trainer
or the API).
"""
from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from fewshot import distributed
from fewshot.data.conform import conform_store, describe_conversion
from fewshot.data.episodes import fixed_episodes
from fewshot.data.store import open_split
from fewshot.data.supervised import SupervisedAdapter
from fewshot.errors import ConfigError
from fewshot.inner_loop import resolve_task_batching, task_shapes
from fewshot.learners.common import episode_tensors
from fewshot.learners.standard import topk_correct
from fewshot.report import CellResult, GridResult, mean_ci, write_results
from fewshot.run import Run, resolve_device
from fewshot.transductive import check_inference
from fewshot.transductive import predict as transductive_predict

__all__ = ["check_grid", "grid_cells", "episode_fingerprint", "shard_indices",
           "gather_accuracies", "evaluate_episodes", "evaluate_grid", "bn_probe",
           "evaluate_run", "run_image_shape", "evaluate_supervised", "supervised_topk_correct",
           "validation_accuracy", "validation_accuracy_supervised"]


def grid_cells(ways: Sequence[int], shots: Sequence[int]) -> List[Tuple[int, int]]:
    return [(int(w), int(s)) for w in ways for s in shots]


def check_grid(store, ways: Sequence[int], shots: Sequence[int], queries: int,
               what: str = "evaluation grid") -> None:
    """Refuse a grid the split cannot supply (before any training or evaluation).

    Raises :class:`ConfigError` when a ways value exceeds the split's classes or when
    shots + queries exceeds the images of the split's smallest class.
    """
    n_classes = int(store.num_classes)
    counts = np.asarray(store.class_counts())
    name = f"{getattr(store, 'dataset', '?')}/{getattr(store, 'split', '?')}"
    for w in ways:
        if w < 2:
            raise ConfigError(f"{what}: {w}-way tasks are meaningless; give ways >= 2")
        if w > n_classes:
            raise ConfigError(f"{what}: {w}-way tasks need {w} classes but split {name} has "
                              f"{n_classes}; lower --ways / eval.ways")
    smallest = int(counts.min()) if counts.size else 0
    for s in shots:
        if s < 1:
            raise ConfigError(f"{what}: shots must be >= 1, got {s}")
        if s + queries > smallest:
            c = int(counts.argmin())
            cname = store.class_names[c] if hasattr(store, "class_names") else str(c)
            raise ConfigError(f"{what}: {s} shots + {queries} queries = {s + queries} images per "
                              f"class, but class '{cname}' of split {name} has only {smallest}; "
                              f"lower --shots or --queries")


def plans_fingerprint(plans: Iterable, store=None) -> str:
    """Digest of episode plans (store rows and labels of every support and query image) and
    of the store's checksum: equal digests mean the same images in the same roles, on any
    device (no floating point involved)."""
    h = hashlib.sha256(str(getattr(store, "checksum", "") or "").encode())
    for p in plans:
        for t in (p.classes, p.support_rows, p.support_y, p.query_rows, p.query_y):
            h.update(torch.as_tensor(t).detach().cpu().to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def episode_fingerprint(episodes: Iterable) -> str:
    """Digest of episodes' class ids, labels and pixel sums (equal episodes, equal digest);
    used when the episodes carry no plans (see :func:`plans_fingerprint`)."""
    h = hashlib.sha256()
    for ep in episodes:
        for t in (ep.classes, ep.support_y, ep.query_y):
            h.update(t.detach().cpu().to(torch.int64).numpy().tobytes())
        sums = torch.stack([ep.support_x.detach().double().sum(), ep.query_x.detach().double().sum()])
        h.update(np.round(sums.cpu().numpy(), 3).tobytes())
    return h.hexdigest()[:16]


def shard_indices(n: int, rank: int = 0, world: int = 1) -> List[int]:
    """Indices of the episodes rank ``rank`` of ``world`` evaluates: rank, rank+world, ..."""
    if not (0 <= rank < world):
        raise ConfigError(f"rank {rank} outside 0..{world - 1}")
    return list(range(rank, n, world))


def gather_accuracies(local: Sequence[float], n: int, rank: int = 0, world: int = 1,
                      all_gather: Optional[Callable[[Any], List[Any]]] = None) -> List[float]:
    """Per-episode accuracies of all ranks back in episode order.

    ``local`` holds rank ``rank``'s accuracies of episodes ``shard_indices(n, rank, world)``.
    ``all_gather(obj) -> [obj of rank 0, ..., obj of rank world-1]`` defaults to
    ``torch.distributed.all_gather_object`` when more than one rank runs.
    """
    if world == 1:
        return [float(a) for a in local]
    if all_gather is None:
        all_gather = distributed.all_gather_object
    parts = all_gather([float(a) for a in local])
    acc = [float("nan")] * n
    for r, part in enumerate(parts):
        for i, a in zip(shard_indices(n, r, world), part):
            acc[i] = a
    return acc


@contextlib.contextmanager
def bn_probe():
    """Record whether any batch norm during the block used batch (transductive) statistics.

    Wraps ``torch.nn.functional.batch_norm`` (which BatchNorm modules, also ``higher``'s
    patched copies, call): a call with ``training=True`` or without running statistics
    normalises with the statistics of the batch itself, i.e. of the query set at test.
    Yields a dict whose ``"transductive"`` entry is set.
    """
    seen = {"transductive": False, "calls": 0}
    original = F.batch_norm

    def probe(input, running_mean, running_var, weight=None, bias=None, training=False,
              momentum=0.1, eps=1e-5):
        seen["calls"] += 1
        if training or running_mean is None:
            seen["transductive"] = True
        return original(input, running_mean, running_var, weight, bias, training, momentum, eps)

    F.batch_norm = probe
    try:
        yield seen
    finally:
        F.batch_norm = original


def unsupported_reason(learner, ways: int) -> Optional[str]:
    """Why ``learner`` cannot classify ``ways``-way episodes, or None when it can.

    A learner may define ``supports_ways(ways) -> bool``; otherwise a learner whose config
    has an integer ``ways`` (a fixed N-way head, e.g. MAML) supports only that N.
    """
    fn = getattr(learner, "supports_ways", None)
    if callable(fn):
        return None if fn(ways) else f"{getattr(learner, 'name', '?')} cannot run {ways}-way episodes"
    fixed = getattr(getattr(learner, "config", None), "ways", None)
    if isinstance(fixed, int) and not isinstance(fixed, bool) and fixed != ways:
        return f"{fixed}-way head (trained for N={fixed}); train with train.ways={ways} for this cell"
    return None


def _predict(learner, episode, inference: str = "inductive") -> torch.Tensor:
    """``learner.predict(episode)``, or the transductive ``inference`` on the learner's features
    (:mod:`fewshot.transductive`); the logits' shape is checked."""
    logits = (learner.predict(episode) if inference == "inductive"
              else transductive_predict(learner, episode, inference))
    if logits.dim() != 2 or logits.shape != (episode.query_y.numel(), episode.ways):
        raise ConfigError(f"learner '{getattr(learner, 'name', '?')}' returned logits of shape "
                          f"{tuple(logits.shape)} for a {episode.ways}-way episode with "
                          f"{episode.query_y.numel()} queries; expected "
                          f"({episode.query_y.numel()}, {episode.ways})")
    return logits


#: most test episodes fine-tuned at once by a learner's ``predict_batch`` (memory grows with it)
EVAL_TASK_CHUNK = 32


def _batching_option(learner) -> str:
    """The learner's ``task_batching`` when it has ``predict_batch``, else "off"."""
    if not callable(getattr(learner, "predict_batch", None)):
        return "off"
    return getattr(getattr(learner, "config", None), "task_batching", "off")


def _predict_chunk(learner, eps: List, inference: str = "inductive") -> List[torch.Tensor]:
    """Per-episode logits of ``eps``: one ``predict_batch`` call when the learner's
    task_batching resolves to on for these (equal-shaped) episodes, else one by one
    (always one by one under transductive ``inference``)."""
    tasks = [episode_tensors(e) for e in eps]
    shapes = task_shapes(tasks)
    option = _batching_option(learner) if inference == "inductive" else "off"
    if (len(eps) < 2 or option == "off" or any(sh != shapes[0] for sh in shapes)
            or not resolve_task_batching(option, tasks, learner.device,
                                         f"learner '{getattr(learner, 'name', '?')}'")):
        return [_predict(learner, e, inference) for e in eps]
    logits = learner.predict_batch(eps)
    ep = eps[0]
    if logits.shape != (len(eps), ep.query_y.numel(), ep.ways):
        raise ConfigError(f"learner '{getattr(learner, 'name', '?')}' predict_batch returned "
                          f"logits of shape {tuple(logits.shape)} for {len(eps)} {ep.ways}-way "
                          f"episodes with {ep.query_y.numel()} queries")
    return list(logits.unbind(0))


def evaluate_episodes(learner, episodes, indices: Sequence[int], device="cpu",
                      progress: Optional[Callable[[int], None]] = None,
                      chunk: int = EVAL_TASK_CHUNK,
                      inference: str = "inductive") -> Tuple[List[float], bool]:
    """Accuracies of ``learner.predict`` on ``episodes[i]`` for i in ``indices``.

    Returns (accuracies, transductive_bn). The learner is put in eval mode for the call
    and returned to its previous mode. Predictions never see the query labels. A learner
    with ``predict_batch`` whose ``task_batching`` resolves to on fine-tunes up to ``chunk``
    equal-shaped episodes at once (the same logits per episode as ``predict``, to
    rounding); the first episode always runs through ``predict`` so that
    :func:`bn_probe` sees which BatchNorm statistics the learner uses. ``inference`` other
    than "inductive" classifies each episode's queries transductively
    (:func:`fewshot.transductive.predict`).
    """
    was_training = learner.training
    learner.eval()
    acc: List[float] = []
    order = list(indices)
    try:
        with bn_probe() as seen:
            pending = []
            start = 0
            while start < len(order):
                size = 1 if start == 0 or _batching_option(learner) == "off" else max(1, chunk)
                eps = [episodes[i].to(device) for i in order[start:start + size]]
                for ep, logits in zip(eps, _predict_chunk(learner, eps, inference)):
                    pending.append((logits.detach().argmax(-1) == ep.query_y).float().mean())
                    if progress is not None:
                        progress(1)
                if len(pending) >= 32:  # sync in chunks, not per episode
                    acc.extend(torch.stack(pending).cpu().tolist())
                    pending = []
                start += size
            if pending:
                acc.extend(torch.stack(pending).cpu().tolist())
    finally:
        learner.train(was_training)
    return acc, bool(seen["transductive"])


def evaluate_grid(learner, store, *, ways: Sequence[int], shots: Sequence[int], queries: int = 15,
                  episodes: int = 600, seed: int = 2024, device="cpu", rank: int = 0, world: int = 1,
                  quiet: bool = True, dataset: Optional[str] = None, split: Optional[str] = None,
                  checkpoint: str = "", step: int = 0, all_gather=None,
                  inference: str = "inductive") -> GridResult:
    """Evaluate ``learner`` on every (ways, shots) cell of fixed episodes of ``store``.

    Each cell uses ``fixed_episodes(store, ways, shots, queries, episodes, seed)``.
    ``rank``/``world`` shard the episodes (see :func:`gather_accuracies`). ``inference``:
    "inductive" (``learner.predict``), "bd-cspn" or "tim" (:mod:`fewshot.transductive`; the
    result is flagged transductive).
    """
    check_inference(inference, getattr(learner, "name", type(learner).__name__), learner)
    check_grid(store, ways, shots, queries)
    cells = grid_cells(ways, shots)
    bar = None
    if not quiet and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cells) * len(shard_indices(episodes, rank, world)), unit="ep",
                   desc="eval", dynamic_ncols=True, leave=False,
                   disable=None)  # None: no bar when stderr is not a terminal
    results, transductive, skipped = [], False, {}
    try:
        for w, s in cells:
            reason = unsupported_reason(learner, w)
            if reason is not None:
                skipped[f"{w}x{s}"] = reason
                if bar is not None:
                    bar.update(len(shard_indices(episodes, rank, world)))
                continue
            t0 = time.perf_counter()
            eps = fixed_episodes(store, w, s, queries, episodes, seed, device=device)
            local, trans = evaluate_episodes(learner, eps, shard_indices(episodes, rank, world),
                                             device=device, progress=bar.update if bar else None,
                                             inference=inference)
            acc = gather_accuracies(local, episodes, rank, world, all_gather=all_gather)
            transductive = transductive or trans
            plans = getattr(eps, "plans", None)
            fp = (plans_fingerprint(plans, store) if plans is not None
                  else episode_fingerprint(eps[i] for i in range(min(episodes, 20))))
            results.append(CellResult(ways=w, shots=s, queries=queries, seed=seed, accuracies=acc,
                                      fingerprint=fp, seconds=round(time.perf_counter() - t0, 3)))
            if bar is not None:
                bar.set_postfix_str(f"{w}w{s}s {results[-1].mean * 100:.1f}%")
    finally:
        if bar is not None:
            bar.close()
    return GridResult(learner=getattr(learner, "name", type(learner).__name__),
                      dataset=dataset or getattr(store, "dataset", ""),
                      split=split or getattr(store, "split", ""), cells=results,
                      checkpoint=checkpoint, step=step, transductive_bn=transductive,
                      fine_tunes=bool(getattr(learner, "fine_tunes_at_test", False)),
                      inference=inference, extra={"skipped": skipped} if skipped else {})


# ------------------------------------------------------------- evaluation of a run
def evaluate_run(run: Run, *, ways: Optional[Sequence[int]] = None, shots: Optional[Sequence[int]] = None,
                 queries: Optional[int] = None, episodes: Optional[int] = None,
                 split: Optional[str] = None, seed: Optional[int] = None,
                 checkpoint: Optional[str] = None, device=None, quiet: bool = True,
                 learner=None, write: bool = True, rank: int = 0, world: int = 1,
                 dataset: Optional[str] = None,
                 inference: Optional[str] = None) -> GridResult:
    """Evaluate a run's weights on the grid (arguments default to the run's [eval] table).

    ``dataset`` (default ``eval.dataset``, else the run's first training dataset) may name
    another prepared dataset (cross-domain): its images are brought to the run's image shape
    by :func:`fewshot.data.conform.conform_store` (PIL mode conversion, RGB -> L by ITU-R
    601-2 luma or L -> RGB by repetition, then Lanczos) and normalised, as every evaluated
    split is, by the split's own per-channel mean/std, recomputed after the conversion. The
    results record both datasets (``dataset``, ``train_dataset``) and the conversion.

    ``learner`` given (the trainer's, at the end of training) is used as is only when
    ``checkpoint`` is "last"; otherwise the chosen checkpoint is loaded. Results go to
    ``results.{json,csv,md}`` and ``plots/grid.png`` in the run directory when ``write``.
    """
    cfg, e = run.config, run.config.eval
    ways = list(ways) if ways is not None else list(e.ways)
    shots = list(shots) if shots is not None else list(e.shots)
    queries = queries if queries is not None else e.queries
    episodes = episodes if episodes is not None else e.episodes
    split = split or cfg.eval_split()
    seed = e.seed if seed is None else seed
    checkpoint = checkpoint or e.checkpoint
    inference = inference or e.inference
    check_inference(inference, cfg.learner.name)
    if checkpoint not in ("best", "last"):
        raise ConfigError(f"--checkpoint must be best or last, got {checkpoint!r}")
    dev = resolve_device(str(device) if device is not None else cfg.train.device)
    kind = run.state.get("input_kind", "episodes")
    dataset, store, conversion = _evaluation_store(run, dataset or cfg.eval_dataset(), split)
    try:
        if kind != "supervised":
            check_grid(store, ways, shots, queries, what=f"eval grid on split '{split}'")
        if learner is None or checkpoint != "last":
            learner, step, which = run.load_learner(checkpoint, device=dev)
        else:
            step, which = run.step, "last"
        label = f"{which} (step {step})"
        if kind == "supervised":
            grid = evaluate_supervised(learner, store, cfg, dev, split, label, step)
        else:
            grid = evaluate_grid(learner, store, ways=ways, shots=shots, queries=queries,
                                 episodes=episodes, seed=seed, device=dev, quiet=quiet,
                                 dataset=dataset, split=split, checkpoint=label, step=step,
                                 rank=rank, world=world, inference=inference)
    finally:
        store.close()
    grid.run_dir, grid.learner = str(run.run_dir), cfg.learner.name
    grid.train_dataset = "+".join(cfg.data.sources)
    if conversion != "none":
        grid.extra["conversion"] = conversion
    if write and rank == 0:
        _write_grid(grid, run.run_dir)
    run.results = grid
    return grid


def run_image_shape(run: Run) -> Optional[Tuple[int, int, int]]:
    """(H, W, C) of the images the run's learner was trained on (run.json), or None for a run
    that never started; runs written before ``image_shape`` was recorded give
    (image_size, image_size, in_channels)."""
    shape = run.state.get("image_shape")
    if shape:
        return tuple(int(v) for v in shape)
    d = run.state.get("data_shape")
    return (int(d["image_size"]), int(d["image_size"]), int(d["in_channels"])) if d else None


def _evaluation_store(run: Run, dataset: str, split: str):
    """(``dataset``, its split ``split`` in the run's image shape, the conversion applied);
    a supervised learner is refused another dataset (it classifies its training classes)."""
    cfg = run.config
    if run.state.get("input_kind") == "supervised" and dataset not in cfg.data.sources:
        raise ConfigError(f"--dataset {dataset}: supervised learner '{cfg.learner.name}' "
                          f"classifies the classes of {cfg.data.dataset}; cross-domain evaluation "
                          f"needs an episodic learner")
    store = open_split(dataset, split, cfg.data.root, cfg.data.in_memory)
    shape = run_image_shape(run)
    if shape is None or tuple(store.image_shape) == shape:
        return dataset, store, "none"
    conversion = describe_conversion(store.image_shape, shape)
    return dataset, conform_store(store, shape), conversion


def _write_grid(grid: GridResult, run_dir) -> None:
    """results.{json,csv,md} and, when matplotlib is installed, plots/grid.png."""
    write_results(grid, run_dir)
    try:
        from fewshot.plots import plot_grid  # matplotlib is optional

        plot_grid(grid, Path(run_dir) / "plots" / "grid.png")
    except ImportError:
        pass


def evaluate_supervised(learner, store, cfg, device, split, label, step) -> GridResult:
    """Top-1 and top-k accuracy (k = min(5, classes)) over every image of ``split`` as one cell
    (ways = classes, shots 0): per-image top-1 0/1 correctness in ``accuracies``, per-image
    top-k in ``metrics["top-k"]``; each summarised as mean ± 1.96·std/√n over images."""
    train = open_split(cfg.data.dataset, cfg.data.train_split, cfg.data.root, in_memory=False)
    try:
        same = train.class_names == store.class_names
        stats = (train.mean, train.std)  # test images normalised by the training set's statistics
    finally:
        train.close()
    if not same:
        raise ConfigError(f"supervised learner '{cfg.learner.name}' classifies the classes of split "
                          f"'{cfg.data.train_split}'; split '{split}' holds other classes: evaluate "
                          f"on a split of the same classes (e.g. --split test of a CIFAR store)")
    k = min(5, int(store.num_classes))
    correct = supervised_topk_correct(learner, store, cfg.train.batch_size, device, cfg.data.augment,
                                      stats=stats, ks=(1, k))
    cell = CellResult(ways=int(store.num_classes), shots=0, queries=0, seed=0, accuracies=correct[1],
                      fingerprint=f"{getattr(store, 'checksum', '') or ''}"[:16],
                      metrics={f"top-{k}": correct[k]} if k > 1 else {})
    return GridResult(learner=cfg.learner.name, dataset=cfg.data.dataset, split=split, cells=[cell],
                      checkpoint=label, step=step, transductive_bn=False,
                      fine_tunes=bool(getattr(learner, "fine_tunes_at_test", False)),
                      extra={"kind": f"supervised top-1 and top-{k} accuracy over all images"})


def supervised_topk_correct(learner, store, batch_size: int, device, augment=None, stats=None,
                            ks: Sequence[int] = (1, 5)) -> Dict[int, List[float]]:
    """Per-image top-k correctness, k in ``ks``: 1.0 where the label is among the k largest
    logits of ``learner.predict_batch`` (k capped at the number of classes, so top-5 of a
    3-class problem is 1 everywhere), for every image of ``store``, normalised as the training
    preset ``augment`` does at test time, with the training set's ``stats`` = (mean, std)
    where the preset uses dataset statistics. Per image, each k's value is
    :func:`~fewshot.learners.standard.topk_correct` of that image's row."""
    ks = tuple(int(k) for k in ks)
    was = learner.training
    learner.eval()
    out: Dict[int, List[float]] = {k: [] for k in ks}
    try:
        with torch.no_grad():
            for x, y in SupervisedAdapter.eval_batches(store, batch_size, device=device,
                                                       augment=augment, stats=stats):
                logits = learner.predict_batch(x.to(device)).float().cpu()
                y = y.cpu()
                for i in range(logits.shape[0]):
                    hits = topk_correct(logits[i:i + 1], y[i:i + 1], ks)
                    for k in ks:
                        out[k].append(float(hits[k]))
    finally:
        learner.train(was)
    return out


def validation_accuracy(learner, val_eps, n: int, *, device, rank: int = 0,
                        world: int = 1) -> Tuple[float, float]:
    """(mean, 95% CI) of the accuracy on the ``n`` fixed validation episodes ``val_eps``,
    sharded over ranks and gathered back (every rank gets the same numbers)."""
    local, _ = evaluate_episodes(learner, val_eps, shard_indices(n, rank, world), device=device)
    m, _, ci = mean_ci(gather_accuracies(local, n, rank, world))
    return m, ci


def validation_accuracy_supervised(learner, val_store, train_store, batch_size: int, device,
                                   augment=None) -> Optional[Tuple[float, float]]:
    """(mean, 95% CI) top-1 accuracy over every image of ``val_store``; None when the val split
    holds other classes than the training split (a classifier knows only its own classes)."""
    if val_store.class_names != train_store.class_names:
        return None
    correct = supervised_topk_correct(learner, val_store, batch_size, device, augment,
                                      stats=(train_store.mean, train_store.std), ks=(1,))[1]
    m, _, ci = mean_ci(correct)
    return m, ci
