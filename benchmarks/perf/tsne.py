"""t-SNE for ``fewshot embed``: scikit-learn's ``TSNE`` against openTSNE, in one run.

    python benchmarks/perf/tsne.py [--quick] [--json PATH]

Both embed the same (n, 64) float32 embeddings (``n`` = 2000; ``--quick``: 500), drawn as 10
well-separated Gaussian clusters (what a trained encoder gives an episode's classes), with the
same settings: 2 components, perplexity 30, PCA initialisation, Barnes-Hut gradients
(openTSNE: ``negative_gradient_method="bh"``; its default FFT method is timed too), one
thread each (``n_jobs=1`` and a threadpoolctl limit of 1, which is what bounds
scikit-learn's OpenMP gradient threads; the machine is shared), seed 0. Timings are medians over repeats,
interleaved round-robin after one warm-up. Also reported per method: the 1-nearest-neighbour
accuracy of the 2-D points against the cluster labels (both should be ~1.0: the comparison is
of speed at equal quality). Ratios: ``sklearn_over_opentsne_bh`` and
``sklearn_over_opentsne_fft`` (seconds / seconds; > 1 means openTSNE is faster).
"""
from __future__ import annotations

import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (command, interleaved_times, load_average, machine, median,  # noqa: E402
                     parser, write_json)

import numpy as np  # noqa: E402


def clusters(n: int, d: int = 64, k: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 6.0, (k, d))
    y = np.arange(n) % k
    return (centres[y] + rng.normal(0, 1.0, (n, d))).astype(np.float32), y


def nn1_accuracy(p: np.ndarray, y: np.ndarray) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy of 2-D points ``p`` against labels ``y``."""
    d = ((p[:, None, :] - p[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return float((y[d.argmin(1)] == y).mean())


def main() -> None:
    args = parser(__doc__, "500 points instead of 2000", "write the result here").parse_args()
    import openTSNE
    import sklearn
    from sklearn.manifold import TSNE

    n = 500 if args.quick else 2000
    x, y = clusters(n)
    out = {}

    def sk():
        out["sklearn"] = TSNE(2, perplexity=30.0, init="pca", random_state=0, n_jobs=1,
                              method="barnes_hut").fit_transform(x)

    def ot(method):
        def run():
            out[f"opentsne_{method}"] = np.asarray(openTSNE.TSNE(
                2, perplexity=30.0, initialization="pca", random_state=0, n_jobs=1,
                negative_gradient_method=method).fit(x))
        return run

    repeats = 3 if args.quick else 5
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # sklearn's Barnes-Hut gradient threads by OpenMP, not n_jobs
        times = interleaved_times({"sklearn": sk, "opentsne_bh": ot("bh"),
                                   "opentsne_fft": ot("fft")}, warmup=1, repeats=repeats)
    metrics = {f"{k}_s": round(median(v), 3) for k, v in times.items()}
    metrics.update({f"{k}_nn1_acc": round(nn1_accuracy(v, y), 4) for k, v in out.items()})
    metrics["n"], metrics["dim"] = n, int(x.shape[1])
    ratios = {"sklearn_over_opentsne_bh": round(metrics["sklearn_s"] / metrics["opentsne_bh_s"], 3),
              "sklearn_over_opentsne_fft": round(metrics["sklearn_s"] / metrics["opentsne_fft_s"], 3)}
    mach = machine(None, f"python {platform.python_version()}",
                   f"scikit-learn {sklearn.__version__}", f"openTSNE {openTSNE.__version__}",
                   load_average(), with_torch=False)
    print(mach)
    for k, v in {**metrics, **ratios}.items():
        print(f"  {k:28s} {v}")
    if args.json:
        write_json(args.json, "tsne", machine=mach, command=command("tsne.py"), metrics=metrics,
                   ratios=ratios)


if __name__ == "__main__":
    main()
