"""FID / sFID, Inception Score and improved precision/recall, computed as ADM's evaluator does.

Reference: openai/guided-diffusion evaluations/evaluator.py (``FIDStatistics.frechet_distance``,
``Evaluator.compute_inception_score``, ``ManifoldEstimator``).

Differences from ADM, all deliberate:
* ``RunningStats`` accumulates sums in float64 batch by batch (ADM holds every activation and calls
  np.mean / np.cov); the result equals np.cov to float64 round-off.
* Pairwise distances for precision/recall are computed in float32 (float64 on request) with torch.
  ADM computes them in float16 first and falls back to float32 only if a value overflows; fp16
  squared distances of 2048-d pool features carry ~1e-3 relative error, so a handful of samples that
  sit exactly on a k-NN radius may fall on the other side. Expect agreement to ~1e-3, not bit-exact.
* ``inception_score`` treats 0 * log 0 as 0 (ADM's softmax never emits an exact 0, so this only
  matters for hand-made inputs).
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import numpy as np
import torch
from scipy import linalg


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr(sqrtm(sigma1 @ sigma2)).

    ``method="sqrtm"`` (default) is ADM / pytorch-fid exactly: scipy.linalg.sqrtm of the product; if
    it is not finite, retry with ``eps`` added to both diagonals; a complex result whose diagonal has
    imaginary parts above 1e-3 is an error, otherwise the real part is kept.
    ``method="eigh"`` computes the same trace as sum(sqrt(eig(S1^1/2 S2 S1^1/2))) with symmetric
    eigensolvers: equal for PSD inputs up to round-off, and much faster for rank-deficient
    covariances (scipy's sqrtm takes ~50 s on a rank-3 2048x2048 product on CPU).
    """
    if method not in ("sqrtm", "eigh"):
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different shapes: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"covariances must both be {(mu1.shape[0],) * 2}, "
                         f"got {sigma1.shape} and {sigma2.shape}")
    diff = mu1 - mu2
    if method == "eigh":
        w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
        root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        ev = np.linalg.eigvalsh(root1 @ ((sigma2 + sigma2.T) / 2) @ root1)
        tr_covmean = np.sqrt(np.clip(ev, 0, None)).sum()
        return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"Fréchet distance: singular product; adding {eps} to the diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: sqrtm has imaginary component "
                             f"{np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


class RunningStats:
    """Streaming mean and covariance of feature rows, in float64.

    Equal to ``np.mean(x, 0)`` and ``np.cov(x, rowvar=False)`` of all rows at once. Sums are taken
    about a shift (the first batch's mean) so that large common offsets do not cancel badly.
    """

    def __init__(self, dim: Optional[int] = None):
        self.dim = dim
        self.n = 0
        self._shift = None
        self._sum = None
        self._outer = None

    def update(self, features) -> "RunningStats":
        x = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else features
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {x.shape}")
        if self.dim is None:
            self.dim = x.shape[1]
        if x.shape[1] != self.dim:
            raise ValueError(f"features have dimension {x.shape[1]}, expected {self.dim}")
        if len(x) == 0:
            return self
        if self._shift is None:
            self._shift = x.mean(0)
            self._sum = np.zeros(self.dim)
            self._outer = np.zeros((self.dim, self.dim))
        xc = x - self._shift
        self._sum += xc.sum(0)
        self._outer += xc.T @ xc
        self.n += len(x)
        return self

    @property
    def mu(self) -> np.ndarray:
        if self.n == 0:
            raise ValueError("RunningStats: no features seen")
        return self._shift + self._sum / self.n

    @property
    def sigma(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"RunningStats: covariance needs at least 2 rows, have {self.n}")
        m = self._sum / self.n
        return (self._outer - self.n * np.outer(m, m)) / (self.n - 1)


def inception_score(x, split_size: int = 5000, from_logits: Optional[bool] = None) -> float:
    """Inception Score as ADM computes it.

    ``x`` is [N, C] logits or class probabilities (``from_logits=None`` guesses: rows that are
    non-negative and sum to 1 are probabilities). Rows are cut into consecutive chunks of
    ``split_size`` (ADM: 5000); each chunk scores exp(mean_i KL(p_i || mean_j p_j)); the result is
    the mean over chunks.
    """
    p = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    p = p.astype(np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"inception_score expects [N, C] with N > 0, got shape {p.shape}")
    if from_logits is None:
        from_logits = not (np.all(p >= 0) and np.allclose(p.sum(1), 1.0, atol=1e-4))
    if from_logits:
        p = p - p.max(1, keepdims=True)
        p = np.exp(p)
        p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        marginal = part.mean(0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def _as_tensor(x, device, dtype):
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(device=device, dtype=dtype)


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [len(a), len(b)], clamped at 0 (ADM's formulation)."""
    d = (a * a).sum(1, keepdim=True) - 2 * a @ b.t() + (b * b).sum(1)[None]
    return d.clamp_min_(0)


def manifold_radii(features, k: int = 3, chunk: int = 10000, device="cpu",
                   dtype=torch.float32) -> torch.Tensor:
    """Squared distance of each row to its k-th nearest neighbour in ``features`` (self excluded).

    Computed in [chunk x chunk] blocks with a running top-(k+1), so 50K x 50K never materialises.
    The point itself is neighbour 0 (distance 0), as in ADM's ``np.partition(..., k)[:, k]``.
    """
    f = _as_tensor(features, device, dtype)
    n = len(f)
    if n <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} feature rows, got {n}")
    radii = torch.empty(n, dtype=dtype, device=device)
    for r0 in range(0, n, chunk):
        rows = f[r0:r0 + chunk]
        best = None
        for c0 in range(0, n, chunk):
            d = _sq_dists(rows, f[c0:c0 + chunk])
            if best is not None:
                d = torch.cat([best, d], 1)
            best = torch.topk(d, min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii[r0:r0 + chunk] = best[:, k]
    return radii


def inside_manifold(ref, ref_radii, query, chunk: int = 10000, device="cpu",
                    dtype=torch.float32) -> torch.Tensor:
    """Bool [len(query)]: query row j is inside if ||q_j - ref_i||^2 <= ref_radii_i for some i."""
    r = _as_tensor(ref, device, dtype)
    rad = _as_tensor(ref_radii, device, dtype)
    q = _as_tensor(query, device, dtype)
    out = torch.zeros(len(q), dtype=torch.bool, device=device)
    for q0 in range(0, len(q), chunk):
        qs = q[q0:q0 + chunk]
        hit = torch.zeros(len(qs), dtype=torch.bool, device=device)
        for r0 in range(0, len(r), chunk):
            d = _sq_dists(qs, r[r0:r0 + chunk])
            hit |= (d <= rad[r0:r0 + chunk][None]).any(1)
        out[q0:q0 + chunk] = hit
    return out


def precision_recall(real_feats, fake_feats, k: int = 3, chunk: int = 10000, device="cpu",
                     dtype=torch.float32) -> Tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) as ADM's ManifoldEstimator.

    precision = fraction of fake rows inside the real manifold; recall = fraction of real rows
    inside the fake manifold. A manifold is the union of balls around each of its points with
    radius = distance to that point's k-th nearest neighbour (k=3 in ADM).
    """
    real_radii = manifold_radii(real_feats, k, chunk, device, dtype)
    fake_radii = manifold_radii(fake_feats, k, chunk, device, dtype)
    precision = inside_manifold(real_feats, real_radii, fake_feats, chunk, device, dtype)
    recall = inside_manifold(fake_feats, fake_radii, real_feats, chunk, device, dtype)
    return float(precision.double().mean()), float(recall.double().mean())
