"""Run the FID Inception over batches of images and keep what the metrics need.

Two ways in, one result (`Activations`):
* `compute_activations(model, batches)`: run the network over uint8 image batches (``python -m
  fastrepa.eval`` on an .npz);
* `FeatureAccumulator`: add per-batch features computed elsewhere, in index order (generate.py computes
  `image_features` of every shard while sampling and gathers them at the end).
Both feed the same accumulator, so the same images give the same statistics either way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch

from .inception import NUM_CLASSES, POOL_DIM, SPATIAL_DIM, FIDInceptionV3, extract_features
from .metrics import RunningStats

# name -> feature width of the per-image features a scorer needs (pool: FID, P/R; spatial: sFID; logits: IS)
FEATURE_DIMS = {"pool": POOL_DIM, "spatial": SPATIAL_DIM, "logits": NUM_CLASSES}
FEATURE_KEYS = tuple(FEATURE_DIMS)


@dataclass
class Activations:
    pool: np.ndarray             # [N, 2048] float32: precision / recall
    logits: np.ndarray           # [N, 1008] float32: Inception Score
    pool_stats: RunningStats     # FID
    spatial_stats: RunningStats  # sFID

    @property
    def n(self) -> int:
        return len(self.pool)


def check_features(features: dict, n: int, source: str) -> dict:
    """float32 numpy {pool, spatial, logits} with n rows each, or ValueError naming `source`."""
    out = {}
    for k, dim in FEATURE_DIMS.items():
        if k not in features:
            raise ValueError(f"{source}: no '{k}' features (expected {list(FEATURE_KEYS)})")
        v = features[k]
        v = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        if v.shape != (n, dim) or not np.issubdtype(v.dtype, np.floating):
            raise ValueError(f"{source}: '{k}' features are {v.dtype} {v.shape}, expected float [{n}, {dim}]")
        out[k] = v.astype(np.float32, copy=False)
    return out


class FeatureAccumulator:
    """Per-image features added batch by batch, in order -> `Activations`.

    Pool features and logits are kept (precision/recall and IS need them whole); the spatial
    features only feed streaming float64 statistics.
    """

    def __init__(self):
        self._pools, self._logits = [], []
        self.pool_stats, self.spatial_stats = RunningStats(), RunningStats()

    def __len__(self) -> int:
        return self.pool_stats.n

    def add(self, pool, spatial, logits, source: str = "features") -> None:
        n = len(pool)
        f = check_features({"pool": pool, "spatial": spatial, "logits": logits}, n, source)
        self._pools.append(f["pool"])
        self._logits.append(f["logits"])
        self.pool_stats.update(f["pool"])
        self.spatial_stats.update(f["spatial"])

    def result(self) -> Activations:
        if not self._pools:
            raise ValueError("no images to compute activations of")
        return Activations(pool=np.concatenate(self._pools), logits=np.concatenate(self._logits),
                           pool_stats=self.pool_stats, spatial_stats=self.spatial_stats)


def _as_uint8_tensor(batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    return torch.from_numpy(np.array(batch, copy=True))  # a private, writable copy (npz reads are views)


@torch.no_grad()
def compute_activations(model: FIDInceptionV3, batches: Iterable[np.ndarray],
                        progress: Optional[callable] = None) -> Activations:
    """Features of every image in ``batches`` (uint8 numpy arrays or tensors, [B,H,W,3] or [B,3,H,W])."""
    acc = FeatureAccumulator()
    for batch in batches:
        out = extract_features(model, _as_uint8_tensor(batch))
        acc.add(out.pool, out.spatial, out.logits)
        if progress is not None:
            progress(len(batch))
    return acc.result()


@torch.no_grad()
def image_features(model: FIDInceptionV3, images, batch_size: int = 100) -> dict:
    """{pool [N, 2048], spatial [N, 2023], logits [N, 1008]} float32 numpy features of uint8 images
    [N,H,W,3] (numpy or tensor), through the network in chunks of `batch_size`: the per-image values
    `compute_activations` accumulates for the same images (same preprocessing, `extract_features`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    parts = {k: [] for k in FEATURE_KEYS}
    for i in range(0, len(images), batch_size):
        out = extract_features(model, _as_uint8_tensor(images[i:i + batch_size]))
        for k in FEATURE_KEYS:
            parts[k].append(getattr(out, k).numpy())
    if not parts["pool"]:
        raise ValueError("no images to compute features of")
    return {k: np.concatenate(v) for k, v in parts.items()}
