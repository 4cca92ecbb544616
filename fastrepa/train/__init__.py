"""Training: the loop, parallel wrapping, EMA, per-sample generators, DCP checkpoints, preemption."""
from fastrepa.train.loop import NonFiniteError, train

__all__ = ["NonFiniteError", "train"]
