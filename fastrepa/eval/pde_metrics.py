"""PDEBench's forecast metrics, per variable, for fields [B, T, C, X, Y] (B windows, T forecast frames, C
variables on an X x Y periodic grid); every metric is computed per (window, frame, variable) over space and
then averaged over windows and frames (`per_step` keeps the frame axis: the error against rollout step).

- rmse:     sqrt(mean_space (pred - true)^2)
- nrmse:    ||pred - true||_2 / ||true||_2 over space
- max_err:  max_space |pred - true| (the max, not the mean, over windows and frames)
- brmse:    the RMSE over the boundary cells (first and last row and column)
- csv:      |mean_space pred - mean_space true|: the error in the conserved quantity (the box mean; PDEBench's
            "conserved value" error)
- fourier:  the error's spectrum E = fft2(pred - true) / (X Y) binned by the integer radial wavenumber
            floor(sqrt(kx^2 + ky^2)), RMSE per band sqrt(sum_{k in band} |E_k|^2), bands low [0, 4),
            mid [4, 12) and high [12, N/2) with N = min(X, Y) (PDEBench's iLow 4, iHigh 12; modes past N/2,
            the grid's corners, fall in no band). By Parseval the bands' squares add up to rmse^2 less
            those corner modes. PDEBench (and FourierFlow's copy) sums |dF|^2 over the quadrant
            0 <= i, j < N/2 only and averages over the bins of a band; ours counts every mode once, both
            signs of each frequency, so the bands are RMSEs: the two are not comparable number for number.
FourierFlow reports these in normalised units; `summarize` takes whichever units it is given (the caller
denormalises for physical units).
"""
from __future__ import annotations

import torch

BANDS = {"low": (0, 4), "mid": (4, 12), "high": (12, None)}
METRICS = ("rmse", "nrmse", "max_err", "brmse", "csv", "fourier_low", "fourier_mid", "fourier_high")


def _check(pred, true):
    if pred.shape != true.shape or pred.dim() != 5:
        raise ValueError(f"pred {tuple(pred.shape)} and true {tuple(true.shape)} must both be [B, T, C, X, Y]")


def band_index(x: int, y: int, device=None) -> torch.Tensor:
    """[X, Y] integer radial wavenumber floor(sqrt(kx^2 + ky^2)) of torch.fft.fft2's mode layout."""
    kx = torch.fft.fftfreq(x, d=1.0 / x, device=device).abs()
    ky = torch.fft.fftfreq(y, d=1.0 / y, device=device).abs()
    return torch.sqrt(kx[:, None] ** 2 + ky[None, :] ** 2).floor().long()


def field_metrics(pred: torch.Tensor, true: torch.Tensor) -> dict[str, torch.Tensor]:
    """{metric: [B, T, C]} in float64 (max_err too: reduce it with max)."""
    _check(pred, true)
    pred, true = pred.double(), true.double()
    err = pred - true
    X, Y = err.shape[-2:]
    out = {"rmse": err.square().mean(dim=(-2, -1)).sqrt()}
    norm_true = true.square().sum(dim=(-2, -1)).sqrt()
    out["nrmse"] = err.square().sum(dim=(-2, -1)).sqrt() / norm_true.clamp_min(torch.finfo(torch.float64).tiny)
    out["max_err"] = err.abs().amax(dim=(-2, -1))
    edge = torch.zeros(X, Y, dtype=torch.bool, device=err.device)
    edge[0], edge[-1], edge[:, 0], edge[:, -1] = True, True, True, True
    out["brmse"] = err[..., edge].square().mean(dim=-1).sqrt()
    out["csv"] = (pred.mean(dim=(-2, -1)) - true.mean(dim=(-2, -1))).abs()
    power = torch.fft.fft2(err).abs().square() / (X * Y) ** 2
    k = band_index(X, Y, err.device)
    top = min(X, Y) // 2
    for name, (lo, hi) in BANDS.items():
        mask = (k >= lo) & (k < (top if hi is None else min(hi, top)))
        out[f"fourier_{name}"] = power[..., mask].sum(dim=-1).sqrt()
    return out


def summarize(pred: torch.Tensor, true: torch.Tensor, names) -> dict:
    """{variable name: {metric: float}} averaged over windows and frames (max_err: the max), plus
    "per_step": {variable: [nRMSE of frame t, averaged over windows]} for the error-vs-rollout-step plot."""
    m = field_metrics(pred, true)
    names = list(names)
    if len(names) != pred.shape[2]:
        raise ValueError(f"{len(names)} variable names for {pred.shape[2]} channels")
    out = {}
    for c, name in enumerate(names):
        out[name] = {key: float(v[:, :, c].amax() if key == "max_err" else v[:, :, c].mean()) for key, v in m.items()}
    out["per_step"] = {name: m["nrmse"][:, :, c].mean(dim=0).tolist() for c, name in enumerate(names)}
    return out


__all__ = ["BANDS", "METRICS", "band_index", "field_metrics", "summarize"]
