"""fewshot: episodic few-shot meta-learning on PyTorch.

``fewshot.train(config)`` and ``fewshot.evaluate(run, ways=[5], shots=[1, 5])`` are the
short Python API (see :mod:`fewshot.api`); they are imported on first use so that
``import fewshot`` stays light (no torch). No submodule is named ``train`` or ``evaluate``
(the loop is :mod:`fewshot.trainer`, evaluation :mod:`fewshot.evaluation`), so importing a
submodule never shadows these functions.
"""
__version__ = "0.1.0"
__all__ = ["train", "evaluate", "compare", "__version__"]


def __getattr__(name):
    if name in ("train", "evaluate", "compare"):
        from fewshot import api  # here, not at the top: keeps `import fewshot` light

        return getattr(api, name)
    raise AttributeError(f"module 'fewshot' has no attribute {name!r}")
