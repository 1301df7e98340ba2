"""fewshot: episodic few-shot meta-learning on PyTorch."""
__version__ = "0.1.0"
