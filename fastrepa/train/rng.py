"""Per-step random generators: every draw of step s on rank r comes from a generator seeded by (seed, r, s)."""
import numpy as np
import torch


def step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """A CPU generator; draws are made on the CPU and moved, so they are identical on every device."""
    return torch.Generator().manual_seed(step_seed(seed, rank, step))
