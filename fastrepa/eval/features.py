"""Run the FID Inception over batches of images and keep what the metrics need."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch

from .inception import FIDInceptionV3, extract_features
from .metrics import RunningStats


@dataclass
class Activations:
    pool: np.ndarray             # [N, 2048] float32: precision / recall
    logits: np.ndarray           # [N, 1008] float32: Inception Score
    pool_stats: RunningStats     # FID
    spatial_stats: RunningStats  # sFID

    @property
    def n(self) -> int:
        return len(self.pool)


@torch.no_grad()
def compute_activations(model: FIDInceptionV3, batches: Iterable[np.ndarray],
                        progress: Optional[callable] = None) -> Activations:
    """Features of every image in ``batches`` (uint8 numpy arrays [B,H,W,3] or [B,3,H,W]).

    Pool features and logits are kept (needed whole by precision/recall and IS); the spatial
    features only feed streaming float64 statistics.
    """
    pools, logits = [], []
    pool_stats, spatial_stats = RunningStats(), RunningStats()
    for batch in batches:
        out = extract_features(model, torch.from_numpy(np.array(batch, copy=True)))
        pools.append(out.pool.numpy())
        logits.append(out.logits.numpy())
        pool_stats.update(out.pool)
        spatial_stats.update(out.spatial)
        if progress is not None:
            progress(len(batch))
    if not pools:
        raise ValueError("no images to compute activations of")
    return Activations(pool=np.concatenate(pools), logits=np.concatenate(logits),
                       pool_stats=pool_stats, spatial_stats=spatial_stats)
