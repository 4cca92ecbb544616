"""Seeded random streams: `step_seed(seed, stream, step)`, `index_generator(seed, stream, index)`
(generate.py's per-sample streams: initial noise and label, SDE noise) and the trainer's per-sample
generators.

In training each sample of the global batch has its own generator, seeded by (seed, step, index in the
global batch), so the draws of a sample do not depend on how many processes share the batch or on
gradient accumulation. That is what
lets a 2-process FSDP2 run equal the 1-process run, and a run resume on a different number of processes.
"""
import numpy as np
import torch

from fastrepa.objectives.base import stack_draws


def step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def index_generator(seed: int, stream: int, index: int) -> torch.Generator:
    """A CPU generator seeded by step_seed(seed, stream, index): stream `stream` of item `index` (e.g. a
    sample index of generate.py), independent of which batch or process the item falls in."""
    return torch.Generator().manual_seed(step_seed(seed, stream, int(index)))


def index_generators(seed: int, stream: int, indices) -> list[torch.Generator]:
    """[index_generator(seed, stream, i) for i in indices]: one generator per row of a batch."""
    return [index_generator(seed, stream, i) for i in indices]


_SAMPLE_TAG = 0x5A3  # keeps the per-sample streams apart from step_seed(seed, rank, step) streams


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The generator of sample `index` (0-based, in the global batch) of step `step`."""
    state = np.random.SeedSequence([seed, _SAMPLE_TAG, step, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> 1))


def draw_step(seed: int, step: int, first: int, n: int, draw_one) -> dict:
    """The random draws of samples first..first+n-1 of `step`, on the CPU: `draw_one(generator)` (the
    objective's `draw`: a dict of tensors, drawn in a fixed order) from each sample's own generator,
    stacked into {name: tensor [n, ...]}."""
    return stack_draws([draw_one(sample_generator(seed, step, i)) for i in range(first, first + n)])
