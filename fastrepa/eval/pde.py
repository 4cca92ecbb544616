"""Forecast and score a FourierFlow checkpoint on its held-back trajectories:

    python -m fastrepa.eval.pde --ckpt exps/NAME/checkpoints/0040000.pt --out exps/NAME/eval
    python -m fastrepa.eval.pde --ckpt exps/NAME                 (the newest exported .pt of the run)

The checkpoint (a `.pt` exported by train.py --method fourierflow) records the PDE file, its reduction, the
train/test split and the normaliser fitted on the train trajectories (`ckpt["data"]`), so the test
trajectories are exactly those training never saw. From each, the first --num-frames frames condition a
rollout of --rollout windows (fastrepa.eval.pde_forecast: Euler, --num-steps, the EMA weights unless
--weights model); the persistence baseline is scored beside it. Writes OUT/report.json (metrics per variable
and rollout frame, normalised and physical units, nRMSE model / persistence), OUT/fields.png (truth |
prediction | error per variable, first test trajectory, last frame) and OUT/error_curve.png. Exit status 2
with a message naming the flag or file on bad input, before any forecast.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import torch

from fastrepa.data.pde import PDEDataError, evaluation_data
from fastrepa.io import atomic_open


def find_checkpoint(path: str) -> str:
    """`path` itself (a .pt file), or the newest exported .pt under an experiment folder's checkpoints/."""
    if os.path.isfile(path):
        return path
    found = sorted(glob.glob(os.path.join(path, "checkpoints", "*.pt")) + glob.glob(os.path.join(path, "*.pt")))
    if not found:
        raise FileNotFoundError(f"--ckpt {path}: not a .pt file, and no exported .pt under {path}/checkpoints "
                                "(train.py exports one at the end of training; python -m fastrepa.train.export "
                                "writes one from a checkpoint directory)")
    return found[-1]


def run(a) -> dict:
    from fastrepa.eval.pde_forecast import evaluate, plot_error_curve, plot_fields
    from fastrepa.generation import model_from_checkpoint
    from fastrepa.official_ckpt import load_checkpoint_file

    path = find_checkpoint(a.ckpt)
    ckpt = load_checkpoint_file(path)
    if not isinstance(ckpt, dict) or "data" not in ckpt:
        raise PDEDataError(f"--ckpt {path} records no PDE data (split and normaliser); expected a .pt exported "
                           "by train.py --method fourierflow")
    data, split, norm = evaluation_data(ckpt["data"], a.data)
    frames = int(ckpt["data"]["frames"])
    trajectories = split.test if a.max_windows is None else split.test[:a.max_windows]
    batch = a.batch_size or min(16, len(trajectories))
    if batch > len(trajectories):
        raise PDEDataError(f"the test split of {data.path} holds {len(trajectories)} trajectories, fewer than one "
                           f"--batch-size of {batch}: lower --batch-size, or train with a larger --test-fraction")
    need = frames + a.rollout * frames
    if data.num_steps < need:
        raise PDEDataError(f"{data.path}: {data.num_steps} time steps; --rollout {a.rollout} x {frames} frames after "
                           f"{frames} condition frames needs {need}")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, _ = model_from_checkpoint(path, a.weights, ckpt=ckpt)
    model = model.to(device)
    report, pred, true = evaluate(model, data, trajectories, norm, cond=frames, target=frames, k=a.rollout,
                                  num_steps=a.num_steps, seed=a.seed, batch_size=batch, device=device)
    out = a.out or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "eval")
    os.makedirs(out, exist_ok=True)
    report.update(checkpoint=os.path.abspath(path), weights=a.weights, data=os.path.abspath(data.path),
                  split_seed=split.seed, test_trajectories=len(split.test))
    report["fields_png"] = plot_fields(pred, true, os.path.join(out, "fields.png"))
    report["error_curve_png"] = plot_error_curve(report, os.path.join(out, "error_curve.png"))
    with atomic_open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    report["report_json"] = os.path.join(out, "report.json")
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastrepa.eval.pde", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="an exported .pt of a fourierflow run, or the run's folder")
    p.add_argument("--data", default=None, help="the PDE file (default: the one the checkpoint records)")
    p.add_argument("--weights", default="ema", choices=("ema", "model"), help="EMA (default) or raw weights")
    p.add_argument("--num-steps", type=int, default=3, help="Euler steps per window (FourierFlow: 3)")
    p.add_argument("--rollout", type=int, default=1, help="windows forecast autoregressively")
    p.add_argument("--batch-size", type=int, default=None, help="trajectories per forward (default: up to 16)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N test trajectories")
    p.add_argument("--seed", type=int, default=0, help="seed of the forecast noise")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="output folder (default: the run's eval/)")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    for flag, v in (("--num-steps", a.num_steps), ("--rollout", a.rollout), ("--batch-size", a.batch_size or 1),
                    ("--max-windows", a.max_windows or 1)):
        if v < 1:
            print(f"error: {flag}={v}: expected a positive integer", file=sys.stderr)
            return 2
    try:
        report = run(a)
    except (PDEDataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m, b = report["normalised"]["model"], report["normalised"]["persistence"]
    for name in report["nrmse_vs_persistence"]:
        print(f"{name:>9}: nRMSE {m[name]['nrmse']:.4f} (persistence {b[name]['nrmse']:.4f}, "
              f"ratio {report['nrmse_vs_persistence'][name]:.3f})")
    print(f"report: {report['report_json']}\nplots: {report['fields_png']}, {report['error_curve_png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "find_checkpoint", "main", "run"]
