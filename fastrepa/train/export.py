"""Export a training checkpoint (a DCP `step-N` directory) without training: one process, no GPU.

    python -m fastrepa.train.export exps/run                    # the newest complete checkpoint of a run
    python -m fastrepa.train.export exps/run --step 200000      # a given step
    python -m fastrepa.train.export exps/run/checkpoints/step-000200000 --pt out.pt --safetensors ema.safetensors

Writes the official REPA `.pt` ({model, ema, opt, args, steps}, plain tensors: loads with the official
`torch.load(...)['ema']` and with generate.py) and the EMA-only safetensors with the run's config as JSON
in its metadata. Defaults: beside the checkpoints, named as the end of training names them
(`0200000.pt`, `ema-0200000.safetensors`). Sharded checkpoints of any number of ranks are gathered.
"""
from __future__ import annotations

import argparse
import os
import sys

from fastrepa.train import dcp


def resolve(path: str, step: int | None) -> dcp.StepCheckpoint:
    """The checkpoint that `path` names: a step directory, a checkpoints folder or
    an experiment folder (then its checkpoints/), the newest complete one unless `step` is given."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise dcp.CheckpointError(f"{path}: no such directory (expected an experiment folder, its checkpoints/ "
                                f"folder or a step-N checkpoint directory)")
    if os.path.exists(os.path.join(path, dcp.MARKER)) or os.path.basename(path).startswith("step-"):
        why = dcp.check_complete(path)
        if why is not None:
            raise dcp.CheckpointError(f"{path} is not a complete checkpoint ({why})")
        found_step = int(dcp.read_extra(path).get("step", -1))
        if step is not None and found_step != step:
            raise dcp.CheckpointError(f"{path} is the checkpoint of step {found_step}, not --step {step}")
        return dcp.StepCheckpoint(found_step, path)
    root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    if step is not None:
        return dcp.StepCheckpoint(step, dcp.find(root, step))
    found = dcp.latest(root)
    if found is None:
        raise dcp.CheckpointError(f"{root} holds no complete checkpoint (step-N directories with a "
                                f"{dcp.MARKER} marker)")
    return found


def export(path: str, step: int | None = None, pt: str | None = None, safetensors: str | None = None,
           what: str = "both") -> dict:
    step, src = resolve(path, step)
    out_dir = os.path.dirname(src)
    written = {"step": step, "checkpoint": src}
    if what in ("both", "pt"):
        written["pt"] = dcp.export_official_pt(src, pt or os.path.join(out_dir, f"{step:07d}.pt"))
    if what in ("both", "safetensors"):
        written["safetensors"] = dcp.export_ema_safetensors(
            src, safetensors or os.path.join(out_dir, f"ema-{step:07d}.safetensors"))
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastrepa.train.export", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="experiment folder, its checkpoints/ folder, or a step-N checkpoint directory")
    p.add_argument("--step", type=int, default=None, help="the step to export (default: the newest complete)")
    p.add_argument("--pt", default=None, help="output .pt file (default: CHECKPOINTS/<step:07d>.pt)")
    p.add_argument("--safetensors", default=None,
                   help="output EMA safetensors (default: CHECKPOINTS/ema-<step:07d>.safetensors)")
    p.add_argument("--only", choices=("both", "pt", "safetensors"), default="both", help="what to write")
    args = p.parse_args(argv)
    try:
        written = export(args.path, args.step, args.pt, args.safetensors, args.only)
    except dcp.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for k in ("pt", "safetensors"):
        if k in written:
            print(f"wrote {written[k]} (step {written['step']}, from {written['checkpoint']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
