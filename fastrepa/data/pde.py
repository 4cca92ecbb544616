"""PDE forecasting data (FourierFlow on PDEBench 2D compressible Navier-Stokes): the HDF5 files, a synthetic
solver that writes the same format, the train/test split, per-channel normalisation and the windows.

Format (PDEBench CNS, as FourierFlow's loader reads it): float32 datasets `density`, `pressure`, `Vx`, `Vy`
of shape [N, T, X, Y] (N trajectories, T time steps), plus `x-coordinate` [X], `y-coordinate` [Y] and
`t-coordinate` (PDEBench writes T + 1 values; unread upstream, unread here). `PDEData.open(path, reduce)`
checks every variable is there with one shape (naming the file and the dataset) and loads the fields
spatially subsampled by `reduce` (512 -> 128 with 4, as upstream's `[::4, ::4]`) as [N, T, 4, X/r, Y/r],
channels in VARIABLES order.

Deliberate differences from the released loader (family-and-fourierflow.md):
- the split is one seeded permutation of the trajectories, recorded (`Split.state_dict`) and reused by
  evaluation, so no test trajectory is ever trained on (upstream seeds its train and test datasets
  separately, so their 90/10 permutations differ and test windows leak into training);
- the normalisation (per channel mean and std over the train trajectories, all times and positions) is
  fitted on the train split only and stored with the checkpoint (`Normalizer.state_dict`);
- a training item is one window (`cond` condition frames, then `target` frames) of one train trajectory;
  the window index space is trajectory x start, so fastrepa's StepSampler permutes every window of the
  split each epoch (upstream draws one random start per trajectory visit from the global RNG): a pure
  function of (seed, step), so training resumes exactly on any process count.

`python -m fastrepa.data.pde synth OUT.h5` writes a small file in this format from a real solver (the 2D
shallow-water equations, finite volumes with Rusanov fluxes, periodic box; density = the depth h, pressure
the hydrostatic 1/2 g h^2, Vx/Vy the velocities), so the demo and the tests need no download.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

VARIABLES = ("density", "pressure", "Vx", "Vy")
COORDINATES = ("x-coordinate", "y-coordinate")
GRAVITY = 1.0


class PDEDataError(ValueError):
    """A PDE file or option that cannot be used; the message names the file, dataset or flag."""


# ---------------------------------------------------------------------------------------- the solver

def _fluxes(U, axis):
    """Physical flux of the shallow-water state U [N, 3, X, Y] = (h, hu, hv) along `axis` (2: x, 3: y), and
    the fastest signal speed |velocity| + sqrt(g h) per cell."""
    h, hu, hv = U[:, 0], U[:, 1], U[:, 2]
    u, v = hu / h, hv / h
    p = 0.5 * GRAVITY * h * h
    if axis == 2:
        F = np.stack([hu, hu * u + p, hu * v], axis=1)
        speed = np.abs(u) + np.sqrt(GRAVITY * h)
    else:
        F = np.stack([hv, hv * u, hv * v + p], axis=1)
        speed = np.abs(v) + np.sqrt(GRAVITY * h)
    return F, speed


def _step(U, dt, dx):
    """One forward-Euler finite-volume step with Rusanov (local Lax-Friedrichs) fluxes, periodic in x and y.
    Conservative: the sum of each of h, hu, hv over the box is unchanged (up to rounding)."""
    out = U.copy()
    for axis in (2, 3):
        F, speed = _fluxes(U, axis)
        R = np.roll(U, -1, axis=axis)
        FR, speedR = _fluxes(R, axis)
        a = np.maximum(speed, speedR)[:, None]
        flux = 0.5 * (F + FR) - 0.5 * a * (R - U)  # at the face between cell i and i + 1
        out -= dt / dx * (flux - np.roll(flux, 1, axis=axis))
    return out


def _initial_state(rng, n, size, bumps=4):
    """Depth 1 plus random periodic Gaussian bumps; a small random smooth velocity field."""
    x = (np.arange(size) + 0.5) / size
    X, Y = np.meshgrid(x, x, indexing="ij")
    h = np.ones((n, size, size))
    for i in range(n):
        for _ in range(bumps):
            cx, cy = rng.random(2)
            dx = (X - cx + 0.5) % 1.0 - 0.5
            dy = (Y - cy + 0.5) % 1.0 - 0.5
            width = rng.uniform(0.05, 0.12)
            h[i] += rng.uniform(0.1, 0.4) * np.exp(-(dx * dx + dy * dy) / (2 * width * width))
    modes = rng.normal(size=(n, 2, 2)) * 0.05
    u = modes[:, 0, 0, None, None] * np.sin(2 * np.pi * Y) + modes[:, 0, 1, None, None] * np.cos(2 * np.pi * X)
    v = modes[:, 1, 0, None, None] * np.sin(2 * np.pi * X) + modes[:, 1, 1, None, None] * np.cos(2 * np.pi * Y)
    return np.stack([h, h * u, h * v], axis=1)


def simulate(num: int, steps: int, size: int, seed: int = 0, dt_out: float = 0.02, cfl: float = 0.4) -> dict:
    """`num` trajectories of `steps` frames on a size x size periodic grid: {variable: float32 [N, T, X, Y]}
    and the coordinates. Frame 0 is the initial state; frames are dt_out apart (adaptive CFL substeps)."""
    if num < 1 or steps < 1 or size < 4:
        raise PDEDataError(f"synth: num={num}, steps={steps}, size={size}: expected num, steps >= 1 and size >= 4")
    rng = np.random.default_rng(seed)
    U = _initial_state(rng, num, size)
    dx = 1.0 / size
    frames = [U]
    for _ in range(steps - 1):
        left = dt_out
        while left > 1e-12:
            _, sx = _fluxes(U, 2)
            _, sy = _fluxes(U, 3)
            dt = min(left, cfl * dx / (2 * max(sx.max(), sy.max())))
            U = _step(U, dt, dx)
            left -= dt
        frames.append(U)
    S = np.stack(frames, axis=1)  # [N, T, 3, X, Y]
    h, u, v = S[:, :, 0], S[:, :, 1] / S[:, :, 0], S[:, :, 2] / S[:, :, 0]
    fields = {"density": h, "pressure": 0.5 * GRAVITY * h * h, "Vx": u, "Vy": v}
    out = {k: a.astype(np.float32) for k, a in fields.items()}
    centres = ((np.arange(size) + 0.5) / size).astype(np.float32)
    out.update({"x-coordinate": centres, "y-coordinate": centres,
                "t-coordinate": (np.arange(steps + 1) * dt_out).astype(np.float32)})
    return out


def write_pde_file(path: str, arrays: dict) -> str:
    """Write `arrays` ({dataset name: array}) as an HDF5 file at `path`, published atomically."""
    import h5py

    from fastrepa.io import atomic_path
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for name, a in arrays.items():
                f.create_dataset(name, data=a)
    return path


# ---------------------------------------------------------------------------------------- reading

class PDEData:
    """The fields of one PDEBench-format file: `fields` float32 tensor [N, T, 4, X, Y] (VARIABLES order),
    spatially subsampled by `reduce`."""

    def __init__(self, fields: torch.Tensor, path: str, reduce: int):
        self.fields, self.path, self.reduce = fields, path, reduce

    @property
    def num_trajectories(self) -> int:
        return self.fields.shape[0]

    @property
    def num_steps(self) -> int:
        return self.fields.shape[1]

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.fields.shape[-2:])

    @classmethod
    def open(cls, path: str, reduce: int = 1, patch: int = 1) -> "PDEData":
        """Check and load `path`; the subsampled size must be divisible by `patch` (the model's)."""
        try:
            import h5py
        except ImportError as e:  # pragma: no cover - the pde extra
            raise PDEDataError("reading PDE files needs h5py (pip install -e .[pde])") from e
        if reduce < 1:
            raise PDEDataError(f"--reduce={reduce}: expected a positive integer")
        if not os.path.isfile(path):
            raise PDEDataError(f"{path}: no such PDE file")
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise PDEDataError(f"{path}: not a readable HDF5 file ({e}); a truncated or partial download?") from None
        with f:
            missing = [v for v in VARIABLES if v not in f]
            if missing:
                raise PDEDataError(f"{path}: missing dataset(s) {missing}; a PDEBench CNS file has "
                                   f"{list(VARIABLES)} (found {sorted(f.keys())})")
            shapes = {v: f[v].shape for v in VARIABLES}
            first = shapes[VARIABLES[0]]
            for v, s in shapes.items():
                if len(s) != 4:
                    raise PDEDataError(f"{path}: dataset {v!r} has shape {s}; expected [N, T, X, Y]")
                if s != first:
                    raise PDEDataError(f"{path}: dataset {v!r} has shape {s} but {VARIABLES[0]!r} has {first}; "
                                       "every variable must have the same [N, T, X, Y]")
            n, t, x, y = first
            for axis, size in (("X", x), ("Y", y)):
                if size % reduce or (size // reduce) % patch:
                    raise PDEDataError(f"{path}: spatial size {axis}={size} is not divisible by the reduction "
                                       f"{reduce} and then the patch {patch} ({size} / {reduce} = {size / reduce:g})")
            try:
                arrays = [np.asarray(f[v][:, :, ::reduce, ::reduce], dtype=np.float32) for v in VARIABLES]
            except OSError as e:
                raise PDEDataError(f"{path}: reading the fields failed ({e}); a truncated file?") from None
        fields = torch.from_numpy(np.stack(arrays, axis=2))
        if not torch.isfinite(fields).all():
            raise PDEDataError(f"{path}: the fields hold non-finite values")
        return cls(fields, path, reduce)


# ---------------------------------------------------------------------------------------- split, norm

class Split:
    """A seeded permutation of the trajectories into train and test (test: the first round(n * fraction))."""

    def __init__(self, train, test, seed: int, num: int):
        self.train, self.test, self.seed, self.num = list(map(int, train)), list(map(int, test)), seed, num

    @classmethod
    def make(cls, num: int, test_fraction: float = 0.1, seed: int = 0, min_test: int = 1) -> "Split":
        if not 0 < test_fraction < 1:
            raise PDEDataError(f"--test-fraction={test_fraction}: expected a number in (0, 1)")
        n_test = max(min_test, int(round(num * test_fraction)))
        if n_test >= num:
            raise PDEDataError(f"{num} trajectories cannot give {n_test} test and at least one train trajectory")
        perm = np.random.default_rng([seed, 0x5D17]).permutation(num)
        return cls(sorted(perm[n_test:]), sorted(perm[:n_test]), seed, num)

    def state_dict(self) -> dict:
        return {"train": self.train, "test": self.test, "seed": self.seed, "num": self.num}

    @classmethod
    def from_state_dict(cls, state: dict, num: int | None = None) -> "Split":
        if num is not None and int(state["num"]) != num:
            raise PDEDataError(f"the recorded split covers {state['num']} trajectories but the file has {num}")
        return cls(state["train"], state["test"], int(state["seed"]), int(state["num"]))


class Normalizer:
    """Per-channel Gaussian normalisation: (x - mean) / std over the channel axis (-3 of [..., C, X, Y])."""

    def __init__(self, mean, std):
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)

    @classmethod
    def fit(cls, fields: torch.Tensor, train) -> "Normalizer":
        """Mean and (population) std per channel over the `train` trajectories of fields [N, T, C, X, Y]
        (float64 sums)."""
        x = fields[list(train)].double().transpose(0, 2).flatten(1)  # [C, everything else]
        std = x.std(dim=1, unbiased=False)
        if (std == 0).any():
            raise PDEDataError(f"channel(s) {[VARIABLES[i] for i in (std == 0).nonzero().flatten().tolist()]} are "
                               "constant over the train split: nothing to normalise by")
        return cls(x.mean(dim=1).float(), std.float())

    def _view(self, x):
        shape = [1] * x.dim()
        shape[-3] = -1
        return self.mean.to(x.device).view(shape), self.std.to(x.device).view(shape)

    def normalize(self, x):
        mean, std = self._view(x)
        return (x - mean) / std

    def denormalize(self, x):
        mean, std = self._view(x)
        return x * std + mean

    def state_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Normalizer":
        return cls(state["mean"], state["std"])


# ---------------------------------------------------------------------------------------- windows

class PDEWindows(torch.utils.data.Dataset):
    """Every window of the given trajectories: item k = (trajectory trajs[k // S], start k % S), S = T - cond -
    target + 1 starts; returns {"cond": [cond, C, X, Y], "target": [target, C, X, Y]} normalised, plus
    "trajectory" and "start". Feed it a fastrepa.data.loader.StepSampler for a seeded, resumable order."""

    def __init__(self, data: PDEData, trajectories, normalizer: Normalizer, cond: int = 4, target: int = 4):
        if cond < 1 or target < 1:
            raise PDEDataError(f"cond={cond}, target={target}: expected at least one frame each")
        if data.num_steps < cond + target:
            raise PDEDataError(f"{data.path}: {data.num_steps} time steps are too few for {cond} condition + "
                               f"{target} target frames")
        self.data, self.trajs, self.norm = data, list(trajectories), normalizer
        self.cond, self.target = cond, target
        self.starts = data.num_steps - cond - target + 1

    def __len__(self):
        return len(self.trajs) * self.starts

    def window(self, k: int) -> tuple[int, int]:
        return self.trajs[k // self.starts], k % self.starts

    def __getitem__(self, k):
        traj, start = self.window(int(k))
        frames = self.norm.normalize(self.data.fields[traj, start:start + self.cond + self.target])
        return {"cond": frames[:self.cond], "target": frames[self.cond:], "trajectory": traj, "start": start}


class PDETrainWindows(PDEWindows):
    """The train split's windows of one PDE file as the trainer reads them, carrying what evaluation must
    reuse: the split and the normaliser (fitted on the train trajectories only). `state_dict()` is that record
    (plain JSON: it goes into the checkpoint's train state and the exported .pt); `check_state(saved)` refuses
    a resume whose file, reduction, frames, split or normaliser differ."""

    def __init__(self, data: PDEData, split: Split, normalizer: Normalizer, frames: int):
        super().__init__(data, split.train, normalizer, cond=frames, target=frames)
        self.split = split
        self.features = None

    def use_features(self, cache, enc_path: str | None = None) -> None:
        """Read each window's encoder tokens from `cache` (fastrepa.data.pde_features.FeatureCache, checked
        against this data and, with `enc_path`, the encoder file) as item["features"]."""
        cache.check(self, enc_path)
        self.features = cache

    def __getitem__(self, k):
        item = super().__getitem__(k)
        if self.features is not None:
            item["features"] = self.features[int(k)]
        return item

    @classmethod
    def open(cls, path: str, *, reduce: int = 1, patch: int = 1, frames: int = 4, test_fraction: float = 0.1,
             seed: int = 0) -> "PDETrainWindows":
        data = PDEData.open(path, reduce, patch)
        split = Split.make(data.num_trajectories, test_fraction, seed)
        return cls(data, split, Normalizer.fit(data.fields, split.train), frames)

    def state_dict(self) -> dict:
        return {"kind": "pde", "path": os.path.abspath(self.data.path), "reduce": self.data.reduce,
                "frames": self.cond, "size": list(self.data.size), "num_steps": self.data.num_steps,
                "variables": list(VARIABLES), "split": self.split.state_dict(), "normalizer": self.norm.state_dict()}

    def check_state(self, saved: dict, where: str, action: str = "resume",
                    fix: str = "train on the same file and flags, or start a new --exp-name") -> None:
        now = self.state_dict()
        for key in ("reduce", "frames", "size", "num_steps", "split", "normalizer"):
            if key in saved and saved[key] != now[key]:
                raise PDEDataError(f"cannot {action} {where}: its PDE data {key} is {_short(saved[key])}, but "
                                   f"--data-dir {self.data.path} (with --pde-reduce, --num-frames, --test-fraction, "
                                   f"--seed) gives {_short(now[key])}; {fix}")


def _short(v, n: int = 120) -> str:
    s = repr(v)
    return s if len(s) <= n else s[:n] + "..."


def evaluation_data(state: dict, path: str | None = None) -> tuple[PDEData, Split, Normalizer]:
    """The PDE file (`path`, default the recorded one), split and normaliser a checkpoint's data record
    (`PDETrainWindows.state_dict()`) names; the file must still have the recorded size and trajectories."""
    if not state or state.get("kind") != "pde":
        raise PDEDataError("the checkpoint records no PDE data (split and normaliser): not a --method "
                           "fourierflow checkpoint of this trainer")
    path = path or state["path"]
    data = PDEData.open(path, int(state["reduce"]))
    if list(data.size) != list(state["size"]):
        raise PDEDataError(f"{path}: fields of {list(data.size)} after --pde-reduce {state['reduce']}, but the "
                           f"checkpoint was trained on {state['size']}")
    split = Split.from_state_dict(state["split"], data.num_trajectories)
    return data, split, Normalizer.from_state_dict(state["normalizer"])


# ---------------------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastrepa.data.pde",
                                description="PDE data: write a synthetic PDEBench-format file, or check one")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="solve the 2D shallow-water equations and write a PDEBench CNS-format file")
    s.add_argument("out")
    s.add_argument("--num", type=int, default=32, help="trajectories")
    s.add_argument("--steps", type=int, default=21, help="time steps per trajectory (PDEBench CNS: 21)")
    s.add_argument("--size", type=int, default=64, help="grid points per side")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dt", type=float, default=0.02, help="time between frames")
    c = sub.add_parser("check", help="open a file as training would and print its shape")
    c.add_argument("path")
    c.add_argument("--reduce", type=int, default=1)
    c.add_argument("--patch", type=int, default=1)
    f = sub.add_parser("features", help="run the frozen MAE ViViT once over every train window and cache its "
                                        "tokens for training (--feature-cache); flags as training's")
    f.add_argument("path", help="the PDE file training reads (--data-dir)")
    f.add_argument("--enc-path", required=True, help="FourierFlow's MAE ViViT checkpoint (model_state_dict['encoder.*'])")
    f.add_argument("--out", required=True, help="the cache folder to write (must not exist)")
    f.add_argument("--pde-reduce", type=int, default=1)
    f.add_argument("--num-frames", type=int, default=4)
    f.add_argument("--test-fraction", type=float, default=0.1)
    f.add_argument("--seed", type=int, default=0, help="training's --seed (it draws the split)")
    f.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"),
                   help="bf16: the encoder under bf16 autocast, stored in 16 bits (as --mixed-precision bf16 runs "
                        "it); fp32: full precision")
    f.add_argument("--batch-size", type=int, default=16, help="windows per encoder forward")
    f.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    a = p.parse_args(argv)
    try:
        if a.cmd == "features":
            from fastrepa.data.pde_features import prepare_main
            return prepare_main(a)
        if a.cmd == "synth":
            write_pde_file(a.out, simulate(a.num, a.steps, a.size, a.seed, a.dt))
            print(f"wrote {a.out}: {a.num} trajectories x {a.steps} steps on {a.size}x{a.size}")
        else:
            d = PDEData.open(a.path, a.reduce, a.patch)
            print(f"{a.path}: {d.num_trajectories} trajectories x {d.num_steps} steps, {list(VARIABLES)} on "
                  f"{d.size[0]}x{d.size[1]} (reduce {a.reduce})")
    except (ValueError, FileNotFoundError) as e:  # PDEDataError, FeatureCacheError, the encoder's weight errors
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["COORDINATES", "Normalizer", "PDEData", "PDEDataError", "PDETrainWindows", "PDEWindows", "Split",
           "evaluation_data", "VARIABLES", "main",
           "simulate", "write_pde_file"]
