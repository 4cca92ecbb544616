"""Forecasting with a PDE flow model and scoring it (FourierFlow's eval.py and all_eval_step.py, as facts):

- `forecast`: the Euler ODE of the velocity model from noise at t = 1 to t = 0 on linspace(1, 0, n + 1)
  (`num_steps` n; upstream 3), given the condition frames; each window's noise from its own generator;
- `rollout`: k windows autoregressively, each forecast becoming the next condition (upstream reuses one
  noise for every window; ours draws each window's from (seed, window index, rollout step));
- `persistence`: the baseline that repeats the last condition frame;
- `evaluate`: both over held-back windows, scored by fastrepa.eval.pde_metrics in normalised and physical
  units (per variable, per rollout step), as a JSON-ready report;
- `plot_fields` / `plot_error_curve`: PNGs of prediction vs truth per variable and of nRMSE vs rollout step
  (drawn with PIL: no plotting package needed).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from fastrepa.data.pde import VARIABLES
from fastrepa.eval.pde_metrics import summarize
from fastrepa.rng import index_generator

STREAM_FORECAST = 4  # step_seed(seed, STREAM_FORECAST, window * 1000 + rollout step)


@torch.no_grad()
def forecast(model, cond, num_steps: int = 3, noise=None):
    """Target frames [B, F, C, H, W] for condition frames `cond` (same shape) by `num_steps` Euler steps of
    dx/dt = model(x, t, cond) from x(1) = `noise` (default: standard normal) to t = 0; in float32."""
    if num_steps < 1:
        raise ValueError(f"--num-steps={num_steps}: expected >= 1")
    x = torch.randn_like(cond) if noise is None else noise.to(cond)
    ts = torch.linspace(1.0, 0.0, num_steps + 1).tolist()
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        t = torch.full((x.shape[0],), t_cur, device=x.device, dtype=x.dtype)
        v = model(x, t, cond, return_zs=False)
        x = x + (t_next - t_cur) * v
    return x


def window_noise(shape, seed: int, windows, step: int, device=None):
    """[len(windows), *shape] standard normal, row i from generator (seed, STREAM_FORECAST, window i, step)."""
    rows = [torch.randn(shape, generator=index_generator(seed, STREAM_FORECAST, int(w) * 1000 + step))
            for w in windows]
    return torch.stack(rows).to(device)


@torch.no_grad()
def rollout(model, cond, k: int, num_steps: int = 3, seed: int = 0, windows=None):
    """[B, k * F, C, H, W]: k forecasts, each conditioned on the previous one (the first on `cond`)."""
    windows = list(range(cond.shape[0])) if windows is None else list(windows)
    out, c = [], cond
    for step in range(k):
        c = forecast(model, c, num_steps, window_noise(cond.shape[1:], seed, windows, step, cond.device))
        out.append(c)
    return torch.cat(out, dim=1)


def persistence(cond, frames: int):
    """The last condition frame repeated `frames` times: [B, frames, C, H, W]."""
    return cond[:, -1:].expand(-1, frames, *cond.shape[2:])


def evaluate(model, data, trajectories, normalizer, *, cond: int = 4, target: int = 4, k: int = 1,
             num_steps: int = 3, seed: int = 0, batch_size: int = 8, device=None) -> dict:
    """Forecast (rollout of k windows) from the first `cond` frames of each trajectory in `trajectories`, and
    the persistence baseline, against the true frames; metrics in normalised and physical units."""
    need = cond + k * target
    if data.num_steps < need:
        raise ValueError(f"{data.path}: {data.num_steps} time steps; a rollout of {k} x {target} frames after "
                         f"{cond} condition frames needs {need}")
    trajectories = list(trajectories)
    if not trajectories:
        raise ValueError("no test trajectories to evaluate")
    device = device or next(model.parameters()).device
    preds, trues, conds = [], [], []
    for s in range(0, len(trajectories), batch_size):
        idx = trajectories[s:s + batch_size]
        fields = normalizer.normalize(data.fields[idx, :need]).to(device)
        c = fields[:, :cond]
        preds.append(rollout(model, c, k, num_steps, seed, windows=idx).cpu())
        trues.append(fields[:, cond:].cpu())
        conds.append(c.cpu())
    pred, true, c = torch.cat(preds), torch.cat(trues), torch.cat(conds)
    base = persistence(c, k * target)
    names = list(VARIABLES[:pred.shape[2]])
    report = {"num_windows": len(trajectories), "rollout": k, "target_frames": target, "num_steps": num_steps,
              "seed": seed, "trajectories": trajectories,
              "normalised": {"model": summarize(pred, true, names), "persistence": summarize(base, true, names)},
              "physical": {"model": summarize(normalizer.denormalize(pred), normalizer.denormalize(true), names),
                           "persistence": summarize(normalizer.denormalize(base), normalizer.denormalize(true),
                                                    names)}}
    report["nrmse_vs_persistence"] = {
        n: report["normalised"]["model"][n]["nrmse"] / max(report["normalised"]["persistence"][n]["nrmse"], 1e-12)
        for n in names}
    return report, pred, true


def _colormap(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """A blue-white-red map of a [H, W] field on [lo, hi] as uint8 RGB."""
    u = np.clip((a - lo) / max(hi - lo, 1e-12), 0, 1)
    r = np.clip(2 * u, 0, 1)
    b = np.clip(2 * (1 - u), 0, 1)
    g = 1 - np.abs(2 * u - 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def plot_fields(pred, true, path: str, window: int = 0, frame: int = -1, scale: int = 2) -> str:
    """PNG: one row per variable, columns truth | prediction | |error| of one window's frame."""
    rows = []
    for c in range(pred.shape[2]):
        t, p = true[window, frame, c].float().numpy(), pred[window, frame, c].float().numpy()
        lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
        e = np.abs(p - t)
        rows.append(np.concatenate([_colormap(t, lo, hi), _colormap(p, lo, hi), _colormap(e, 0, float(e.max()))], 1))
    img = np.concatenate(rows, 0)
    Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST).save(path)
    return path


def plot_error_curve(report: dict, path: str, size=(480, 320)) -> str:
    """PNG: normalised nRMSE vs rollout frame, one line per variable (model solid, persistence dotted)."""
    W, H = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    model, base = report["normalised"]["model"]["per_step"], report["normalised"]["persistence"]["per_step"]
    curves = [(n, model[n], base[n]) for n in model]
    top = max(max(max(m), max(b)) for _, m, b in curves) or 1.0
    pad = 40
    d.line([(pad, pad), (pad, H - pad), (W - pad, H - pad)], fill="black")
    colors = ["#c0392b", "#2980b9", "#27ae60", "#8e44ad"]
    for i, (name, m, b) in enumerate(curves):
        n = len(m)
        xs = [pad + (W - 2 * pad) * j / max(n - 1, 1) for j in range(n)]
        for ys, dotted in ((m, False), (b, True)):
            pts = [(x, H - pad - (H - 2 * pad) * y / top) for x, y in zip(xs, ys)]
            if dotted:
                for p in pts:
                    d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colors[i % 4])
            elif len(pts) > 1:
                d.line(pts, fill=colors[i % 4], width=2)
        d.text((W - pad - 90, pad + 12 * i), name, fill=colors[i % 4])
    d.text((pad, 8), f"nRMSE vs rollout frame (max {top:.3g}); dots: persistence", fill="black")
    img.save(path)
    return path


__all__ = ["evaluate", "forecast", "persistence", "plot_error_curve", "plot_fields", "rollout", "window_noise"]
