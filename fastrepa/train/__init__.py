"""Training: the loop, EMA, per-step generators."""
from fastrepa.train.loop import NonFiniteError, train

__all__ = ["NonFiniteError", "train"]
