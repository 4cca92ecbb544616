"""The encoder-feature cache of --method fourierflow: FourierFlow's frozen ViViT costs about 4x the student's
forward every step (its tokens of the clean target frames never change), so a prepare step runs it once
over every train window and training reads the tokens instead (`--feature-cache DIR`; the encoder is then
not loaded at all).

    python -m fastrepa.data.pde features FILE.h5 --enc-path MAE.pt --out DIR \\
        [--pde-reduce 4 --num-frames 4 --test-fraction 0.1 --seed 0 --dtype bf16|fp32]

DIR holds `features.npy` [windows, frames, tokens, width] in the train windows' order (PDETrainWindows:
trajectory x start over the train split) and `manifest.json` (format, dtype, shape, the encoder file's
size and sha256 and the sizes it declares, and the data record of `PDETrainWindows.state_dict()`: reduction,
frames, grid, split, normaliser). bf16 is stored as its raw 16 bits (numpy has no bfloat16) and read back as
torch.bfloat16; the encoder runs under bf16 autocast for `--dtype bf16` (as training's --mixed-precision
bf16 runs it) and in fp32 otherwise. The folder is written as DIR.partial and renamed when complete, so
a DIR is never half written; an existing DIR is never overwritten.

Training checks the manifest against its own data (another --seed, --test-fraction, --pde-reduce or
--num-frames is refused, naming the flags) and, when --enc-path is given too, against the encoder file's
sha256.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import torch
import torch.nn as nn

from fastrepa.io import fsync_dir, write_json

FORMAT = "fastrepa-pde-features/1"
FEATURES, MANIFEST = "features.npy", "manifest.json"
DTYPES = ("bf16", "fp32")


class FeatureCacheError(ValueError):
    pass


def _encoder_record(encoder, path: str) -> dict:
    from fastrepa.data.packed import sha256_file
    return {"enc_type": getattr(encoder, "enc_type", type(encoder).__name__), "path": os.path.abspath(path),
            "bytes": os.path.getsize(path), "sha256": sha256_file(path), "frames": encoder.frames,
            "channels": encoder.channels, "num_tokens": encoder.num_tokens, "embed_dim": encoder.embed_dim}


def check_new_folder(out: str) -> None:
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise FeatureCacheError(f"--out {out} already exists and is not empty: give another --out (an existing "
                                "cache is never overwritten)")


def write_feature_cache(out: str, windows, encoder, enc_path: str, *, dtype: str = "bf16", batch_size: int = 16,
                        device: str | torch.device = "cpu", log=print) -> dict:
    """Run `encoder` (frozen, on `device`) over every window of `windows` (a PDETrainWindows) and write the
    cache folder `out`; returns its manifest."""
    if dtype not in DTYPES:
        raise FeatureCacheError(f"--dtype {dtype!r}: expected one of {DTYPES}")
    if batch_size < 1:
        raise FeatureCacheError(f"--batch-size {batch_size}: expected a positive integer")
    check_new_folder(out)
    device = torch.device(device)
    target = windows[0]["target"]
    want = (encoder.frames, encoder.channels)
    if tuple(target.shape[:2]) != want:
        raise FeatureCacheError(f"the windows have {tuple(target.shape[:2])} [frames, variables] but the encoder "
                                f"{enc_path} takes {want}: set --num-frames {encoder.frames}")
    encoder = encoder.to(device).eval()
    with torch.no_grad():
        probe = encoder(target[None].to(device))  # also checks the grid against the encoder's patches
    n = len(windows)
    shape = (n, *probe.shape[1:])
    record = _encoder_record(encoder, enc_path)
    partial = out.rstrip("/") + ".partial"
    if os.path.exists(partial):  # an earlier prepare that did not finish: nothing in it was published
        shutil.rmtree(partial)
    os.makedirs(partial)
    arr = np.lib.format.open_memmap(os.path.join(partial, FEATURES), mode="w+",
                                    dtype=np.uint16 if dtype == "bf16" else np.float32, shape=shape)
    t0 = time.time()
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else torch.autocast(device.type,
                                                                                                   enabled=False)
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            x = torch.stack([windows[k]["target"] for k in range(lo, hi)]).to(device)
            with amp:
                z = encoder(x)
            if dtype == "bf16":
                arr[lo:hi] = z.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
            else:
                arr[lo:hi] = z.float().cpu().numpy()
    arr.flush()
    del arr
    seconds = time.time() - t0
    manifest = {"format": FORMAT, "dtype": dtype, "shape": list(shape), "encoder": record,
                "data": windows.state_dict(), "seconds": round(seconds, 3)}
    with open(os.path.join(partial, FEATURES), "rb") as f:
        os.fsync(f.fileno())
    write_json(os.path.join(partial, MANIFEST), manifest)
    if os.path.isdir(out):
        os.rmdir(out)  # empty (checked above)
    os.replace(partial, out)
    fsync_dir(os.path.dirname(os.path.abspath(out)))
    log(f"wrote {out}: {n} windows x {list(shape[1:])} ({dtype}) in {seconds:.1f} s "
        f"({n / max(seconds, 1e-9):.1f} windows/s)")
    return manifest


class CachedEncoder(nn.Module):
    """The trainer's stand-in for an encoder whose features come from the cache: it declares the sizes the
    objective checks against the model and costs no FLOPs; the features ride in the batch as "features"."""
    cached = True

    def __init__(self, record: dict, where: str):
        super().__init__()
        self.enc_type = f"{record['enc_type']} (cached in {where})"
        self.frames, self.channels = int(record["frames"]), int(record["channels"])
        self.num_tokens, self.embed_dim = int(record["num_tokens"]), int(record["embed_dim"])

    def forward_flops(self) -> int:
        return 0

    def forward(self, fields):
        raise RuntimeError(f"{self.enc_type}: the features are read from the cache (batch['features']), not computed")


class FeatureCache:
    """A cache folder opened for reading: `cache[k]` is window k's features as a torch tensor (bf16 or
    fp32). The memory map opens on first use, so a DataLoader worker maps the file itself."""

    def __init__(self, path: str, manifest: dict):
        self.path, self.manifest = path, manifest
        self._arr = None

    @classmethod
    def open(cls, path: str) -> "FeatureCache":
        mpath = os.path.join(path, MANIFEST)
        if not os.path.isfile(mpath):
            hint = " (a prepare that did not finish left only .partial)" if os.path.isdir(path + ".partial") else ""
            raise FeatureCacheError(f"--feature-cache {path}: no {MANIFEST}{hint}; write the cache with "
                                    "python -m fastrepa.data.pde features")
        with open(mpath) as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT:
            raise FeatureCacheError(f"--feature-cache {mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        fpath = os.path.join(path, FEATURES)
        try:
            arr = np.load(fpath, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise FeatureCacheError(f"--feature-cache {fpath}: unreadable ({e})") from e
        want = (np.uint16 if manifest["dtype"] == "bf16" else np.float32, tuple(manifest["shape"]))
        if (arr.dtype, arr.shape) != want:
            raise FeatureCacheError(f"--feature-cache {fpath}: {arr.dtype} {arr.shape}, but {MANIFEST} says "
                                    f"{np.dtype(want[0])} {want[1]} (a truncated or replaced file: rebuild the cache)")
        return cls(path, manifest)

    def __len__(self):
        return int(self.manifest["shape"][0])

    def __getitem__(self, k: int) -> torch.Tensor:
        if self._arr is None:
            self._arr = np.load(os.path.join(self.path, FEATURES), mmap_mode="r")
        row = np.array(self._arr[int(k)])
        if self.manifest["dtype"] == "bf16":
            return torch.from_numpy(row.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(row)

    def __getstate__(self):  # DataLoader workers: no memory map in the pickle
        return {**self.__dict__, "_arr": None}

    def check(self, windows, enc_path: str | None = None) -> None:
        """Refuse a cache written for other data (split, normaliser, reduction, frames, grid) or, with
        `enc_path`, another encoder file."""
        windows.check_state(self.manifest["data"], f"--feature-cache {self.path}", action="use",
                            fix="write the cache again with the training flags")
        if len(self) != len(windows):
            raise FeatureCacheError(f"--feature-cache {self.path} holds {len(self)} windows, the train split of "
                                    f"--data-dir has {len(windows)}: write the cache again with the training flags")
        if enc_path:
            from fastrepa.data.packed import sha256_file
            rec = self.manifest["encoder"]
            if os.path.getsize(enc_path) != rec["bytes"] or sha256_file(enc_path) != rec["sha256"]:
                raise FeatureCacheError(f"--feature-cache {self.path} was written with the encoder {rec['path']} "
                                        f"(sha256 {rec['sha256'][:12]}...), not --enc-path {enc_path}; drop "
                                        "--enc-path or write the cache again")

    def encoder(self) -> CachedEncoder:
        return CachedEncoder(self.manifest["encoder"], self.path)


def prepare_main(a) -> int:
    """`python -m fastrepa.data.pde features` (parsed by fastrepa.data.pde.main)."""
    from fastrepa.data.pde import PDETrainWindows
    from fastrepa.distributed import resolve_device
    from fastrepa.encoders.vivit import load_vivit
    check_new_folder(a.out)  # before any heavy work
    windows = PDETrainWindows.open(a.path, reduce=a.pde_reduce, frames=a.num_frames,
                                   test_fraction=a.test_fraction, seed=a.seed)
    encoder = load_vivit(a.enc_path)
    write_feature_cache(a.out, windows, encoder, a.enc_path, dtype=a.dtype, batch_size=a.batch_size,
                        device=resolve_device(a.device))
    return 0


__all__ = ["CachedEncoder", "FeatureCache", "FeatureCacheError", "write_feature_cache", "prepare_main"]
