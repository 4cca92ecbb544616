"""Rank-0 outputs of a run: metrics.jsonl (resume-consistent), report.json / report.md, and --dry-run.

A metrics row: step, images, the objective's named terms (REPA: loss, the denoising loss as official REPA
logs it, and proj_loss; SRA: loss and align_loss; DDPM backbones add mse and vb), grad_norm, lr,
images_per_s, mfu (model FLOPs utilisation: trained images/s x FLOPs per image / the peak of all devices;
null where the peak is unknown), peak_mem_gib (CUDA: the most memory allocated so far on rank 0's device;
CPU: rank 0's peak resident set), skipped (steps of the window dropped as non-finite, --on-nonfinite skip).
Averages are over the window's finite steps. A window is the steps since the last logged one; its sums
go into every checkpoint (`window_state`), so a run resumed between two logged steps logs the same
averages as the uninterrupted run, whatever --log-every is.
"""
from __future__ import annotations

import json
import os
import resource
import time

import torch


def peak_memory_gib(device: torch.device | None) -> float:
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLog:
    """Windowed metrics, one JSON line per logged step. On resume from step S the lines of steps > S (written
    by a run that died after its last checkpoint) are dropped, so the file reads like one uninterrupted run."""

    def __init__(self, path: str, resume_step: int = 0, flops_per_image: float | None = None,
                 peak_flops: float | None = None, device: torch.device | None = None, window: dict | None = None,
                 terms=("loss", "proj_loss")):
        self.path, self.flops_per_image, self.peak_flops, self.device = path, flops_per_image, peak_flops, device
        self.terms = tuple(terms)
        self.sums = (*self.terms, "grad_norm", "n", "skipped")
        rows = []
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except ValueError:  # a line cut short by a crash
                        continue
                    if row.get("step", 0) <= resume_step:
                        rows.append(line if line.endswith("\n") else line + "\n")
            with open(path, "w") as f:
                f.writelines(rows)
        self.file = open(path, "a")
        self.history: list[dict] = []
        self._new_window()
        for key in self.sums:  # the open window of the run this one resumes
            self.window[key] = (window or {}).get(key, self.window[key])

    def _new_window(self):
        # images: trained by this process since the window began (for images/s; not restored on resume)
        self.window = {**{k: 0.0 for k in self.terms}, "grad_norm": 0.0, "n": 0, "t": time.time(), "images": 0,
                       "skipped": 0}

    def window_state(self) -> dict:
        """The open window's sums as plain numbers (a host sync: call it when checkpointing)."""
        return {k: float(self.window[k]) if k not in ("n", "skipped") else int(self.window[k]) for k in self.sums}

    def add(self, step, batch, terms: dict, grad_norm, lr, write: bool, finite: bool = True):
        """Accumulate one step's terms (tensors stay on the device); returns the row when `write`."""
        w = self.window
        if finite:
            for name in self.terms:
                w[name] += terms[name].detach()
            w["grad_norm"] += grad_norm.detach()
            w["n"] += 1
        else:
            w["skipped"] += 1
        w["images"] += batch
        if not write:
            return None
        dt = time.time() - w["t"]
        n = w["n"]
        images_per_s = w["images"] / max(dt, 1e-9)
        mfu = (images_per_s * self.flops_per_image / self.peak_flops
               if self.flops_per_image and self.peak_flops else None)
        row = {"step": step, "images": step * batch, **{k: float(w[k]) / n if n else None for k in self.terms},
               "grad_norm": float(w["grad_norm"]) / n if n else None, "lr": lr, "images_per_s": images_per_s,
               "mfu": None if mfu is None else float(f"{mfu:.4g}"), "peak_mem_gib": round(peak_memory_gib(self.device), 3),
               "skipped": w["skipped"]}
        self.history.append(row)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self._new_window()
        return row

    def summary(self) -> dict:
        """first_<term> and last_<term> of the logged rows with values, for each term."""
        h = [r for r in self.history if r[self.terms[0]] is not None]
        out = {}
        for k in self.terms:
            out[f"first_{k}"], out[f"last_{k}"] = (h[0][k], h[-1][k]) if h else (None, None)
        return out

    def close(self):
        self.file.close()


def write_report(report: dict, exp_dir: str) -> None:
    with open(os.path.join(exp_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = ["# fastrepa training report", ""] + [f"- {k}: {v}" for k, v in report.items()]
    with open(os.path.join(exp_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def dry_run(cfg) -> dict:
    """The resolved config and the parameter / FLOP counts, printed; nothing is read or written."""
    from fastrepa.config import to_flat
    from fastrepa.train.flops import counts
    out = {"dry_run": True, "world_size": int(os.environ.get("WORLD_SIZE", "1")), **counts(cfg)}
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: once, not once per rank
        print(json.dumps({"config": to_flat(cfg), **out}, indent=1), flush=True)
    return out


def metrics_line(row: dict) -> str:
    """A metrics row as one line of text for stdout / logs."""
    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)
    fixed = {"step", "images", "grad_norm", "lr", "images_per_s", "mfu", "peak_mem_gib", "skipped"}
    terms = "".join(f"{k} {num(v, '.4f')} | " for k, v in row.items() if k not in fixed)
    return (f"step {row['step']} | images {row['images']} | {terms}grad_norm {num(row['grad_norm'], '.3f')} | "
            f"lr {row['lr']:.3g} | {row['images_per_s']:.1f} img/s | mfu {num(row['mfu'], '.3f')} | "
            f"peak_mem {row['peak_mem_gib']:.2f} GiB" + (f" | skipped {row['skipped']}" if row["skipped"] else ""))
