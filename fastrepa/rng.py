"""Seeded random streams, shared by training and sampling (docs/design.md, "The randomness rule").

- `step_seed(seed, stream, index)`: a 63-bit seed for item `index` of stream `stream`;
  `index_generator(s)`: CPU generators from it (generation.py's per-sample streams: the initial noise and
  label, the SDE noise), independent of which batch or process an item falls in.
- Training: each sample of the global batch has its own generator, seeded by (seed, step, index in the
  global batch), so a sample's draws depend neither on how many processes share the batch nor on gradient
  accumulation: a 2-process FSDP2 run equals the 1-process run, and a run resumes on any process count.
"""
import numpy as np
import torch


def step_seed(seed: int, stream: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(1, np.uint64)[0] >> 1)


def index_generator(seed: int, stream: int, index: int) -> torch.Generator:
    """A CPU generator seeded by step_seed(seed, stream, index): stream `stream` of item `index`."""
    return torch.Generator().manual_seed(step_seed(seed, stream, int(index)))


def index_generators(seed: int, stream: int, indices) -> list[torch.Generator]:
    """[index_generator(seed, stream, i) for i in indices]: one generator per row of a batch."""
    return [index_generator(seed, stream, i) for i in indices]


_SAMPLE_TAG = 0x5A3  # keeps the training streams apart from the step_seed(seed, stream, index) streams


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The generator of sample `index` (0-based, in the global batch) of training step `step`."""
    state = np.random.SeedSequence([seed, _SAMPLE_TAG, step, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> 1))


def draw_step(seed: int, step: int, first: int, n: int, draw_one) -> dict:
    """The random draws of samples first..first+n-1 of `step`, on the CPU: `draw_one(generator)` (the
    objective's `draw`: a dict of tensors, drawn in a fixed order) from each sample's own generator,
    stacked into {name: tensor [n, ...]}."""
    per_sample = [draw_one(sample_generator(seed, step, i)) for i in range(first, first + n)]
    return {k: torch.stack([d[k] for d in per_sample]) for k in per_sample[0]}
