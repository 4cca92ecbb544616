"""Read ADM-format sample and reference batches (.npz), with clear errors.

Formats (as ADM's evaluator reads them):
* samples: ``arr_0`` uint8 [N, H, W, 3] (what generate.py writes).
* reference batch (e.g. VIRTUAL_imagenet256_labeled.npz): ``arr_0`` uint8 [N, H, W, 3] real images,
  optionally with precomputed statistics ``mu`` [2048], ``sigma`` [2048, 2048] (pool_3) and
  ``mu_s`` [2023], ``sigma_s`` [2023, 2023] (spatial). ADM uses the file's statistics when ``mu`` is
  present, and always runs the reference images for precision/recall.

Images are streamed from the zip member batch by batch (a 50K x 256 x 256 x 3 batch is 9.8 GB), like
ADM's StreamingNpzArrayReader. When the reference has images but no statistics, we compute them
and cache them, with the reference pool features, next to the file as
``<name>.<weights-sha256[:12]>.fastrepa-stats.npz``; the cache records the weights' full sha256 and
the reference file's size and mtime and is recomputed when any of them differ.
"""
from __future__ import annotations

import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np

from .features import compute_activations
from .inception import POOL_DIM, SPATIAL_DIM

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
IMAGES_KEY = "arr_0"
CACHE_SUFFIX = ".fastrepa-stats.npz"
CACHE_VERSION = 1


class EvalInputError(ValueError):
    """A samples/reference file is missing, unreadable, or not in the expected format."""


def npz_keys(path) -> List[str]:
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{path}: file not found")
    try:
        with zipfile.ZipFile(path) as z:
            return [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    except zipfile.BadZipFile as e:
        raise EvalInputError(f"{path}: not an .npz file ({e})") from e


def _read_header(f) -> Tuple[tuple, bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return np.lib.format._read_array_header(f, version)  # (3, 0)


class NpzImages:
    """A validated uint8 [N, H, W, 3] image array inside an .npz, read in batches."""

    def __init__(self, path, key: str = IMAGES_KEY, role: str = "samples"):
        self.path, self.key, self.role = Path(path), key, role
        keys = npz_keys(self.path)
        if key not in keys:
            raise EvalInputError(
                f"{self.path}: {role} file has no '{key}' array (keys found: {keys}); expected "
                f"'{key}' uint8 [N, H, W, 3]")
        with zipfile.ZipFile(self.path) as z, z.open(key + ".npy") as f:
            try:
                shape, fortran, dtype = _read_header(f)
            except ValueError as e:
                raise EvalInputError(f"{self.path}: cannot read '{key}' header ({e})") from e
        if dtype != np.uint8:
            raise EvalInputError(
                f"{self.path}: '{key}' has dtype {dtype}, expected uint8 images in [0, 255] "
                f"(convert with np.clip(x, 0, 255).astype(np.uint8))")
        if len(shape) != 4 or shape[-1] != 3 or shape[0] == 0:
            raise EvalInputError(
                f"{self.path}: '{key}' has shape {tuple(shape)}, expected [N, H, W, 3] with N > 0")
        self.shape, self.dtype, self.fortran = tuple(shape), dtype, fortran

    def __len__(self) -> int:
        return self.shape[0]

    def iter_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.fortran:  # rare; cannot stream
            arr = np.load(self.path)[self.key]
            for i in range(0, len(arr), batch_size):
                yield arr[i:i + batch_size]
            return
        per_image = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as z, z.open(self.key + ".npy") as f:
            _read_header(f)
            for i in range(0, len(self), batch_size):
                bs = min(batch_size, len(self) - i)
                want = bs * per_image
                data = f.read(want)
                if len(data) != want:
                    raise EvalInputError(
                        f"{self.path}: '{self.key}' is truncated (image {i + len(data) // per_image}"
                        f" of {len(self)})")
                yield np.frombuffer(data, dtype=np.uint8).reshape(bs, *self.shape[1:])


@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray
    pool: Optional[np.ndarray]  # reference pool features for precision/recall; None without images
    num_images: Optional[int]
    source: str                 # "file", "computed" or "cache:<path>"


def _check_stats(path, stats: dict) -> None:
    want = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM),
            "mu_s": (SPATIAL_DIM,), "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}
    for k, shape in want.items():
        v = stats[k]
        if v.shape != shape:
            raise EvalInputError(f"{path}: '{k}' has shape {v.shape}, expected {shape}")
        if not np.issubdtype(v.dtype, np.floating):
            raise EvalInputError(f"{path}: '{k}' has dtype {v.dtype}, expected floating point")
        if not np.isfinite(v).all():
            raise EvalInputError(f"{path}: '{k}' contains non-finite values")


class ReferenceFile:
    """A validated ADM reference batch: statistics, images, or both."""

    def __init__(self, path):
        self.path = Path(path)
        keys = npz_keys(self.path)
        present = [k for k in STAT_KEYS if k in keys]
        if present and len(present) < len(STAT_KEYS):
            missing = [k for k in STAT_KEYS if k not in keys]
            raise EvalInputError(
                f"{self.path}: reference has {present} but is missing {missing}; a reference with "
                f"statistics needs all of {list(STAT_KEYS)}")
        self.has_stats = bool(present)
        self.images = NpzImages(self.path, role="reference") if IMAGES_KEY in keys else None
        if not self.has_stats and self.images is None:
            raise EvalInputError(
                f"{self.path}: reference has neither FID statistics {list(STAT_KEYS)} nor images "
                f"'{IMAGES_KEY}' (keys found: {keys})")
        if self.has_stats:
            with np.load(self.path) as z:
                self.file_stats = {k: z[k] for k in STAT_KEYS}
            _check_stats(self.path, self.file_stats)

    def cache_path(self, weights_sha256: str) -> Path:
        return self.path.with_name(f"{self.path.name}.{weights_sha256[:12]}{CACHE_SUFFIX}")

    def _cache_meta(self, weights_sha256: str) -> dict:
        st = self.path.stat()
        return {"version": CACHE_VERSION, "weights_sha256": weights_sha256,
                "ref_size": st.st_size, "ref_mtime_ns": st.st_mtime_ns,
                "num_images": len(self.images)}

    def _load_cache(self, weights_sha256: str) -> Optional[dict]:
        cp = self.cache_path(weights_sha256)
        if not cp.is_file():
            return None
        try:
            with np.load(cp) as z:
                data = {k: z[k] for k in z.files}
        except Exception as e:  # noqa: BLE001 - a bad cache is recomputed, never fatal
            warnings.warn(f"ignoring unreadable stats cache {cp}: {e}")
            return None
        meta = self._cache_meta(weights_sha256)
        for k, v in meta.items():
            if k not in data or data[k].item() != v:
                return None
        return data

    def _save_cache(self, weights_sha256: str, data: dict) -> None:
        cp = self.cache_path(weights_sha256)
        tmp = cp.with_name(cp.name + f".tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **data, **{k: np.asarray(v) for k, v in
                                        self._cache_meta(weights_sha256).items()})
            os.replace(tmp, cp)
        except OSError as e:
            warnings.warn(f"could not write stats cache {cp}: {e}")
            tmp.unlink(missing_ok=True)

    def stats(self, model=None, weights_sha256: Optional[str] = None, batch_size: int = 100,
              use_cache: bool = True, progress=None) -> ReferenceStats:
        """Statistics (from the file, else the cache, else computed) and reference pool features."""
        if self.images is None:
            s = self.file_stats
            return ReferenceStats(s["mu"], s["sigma"], s["mu_s"], s["sigma_s"], pool=None,
                                  num_images=None, source="file")
        data = self._load_cache(weights_sha256) if (use_cache and weights_sha256) else None
        source = f"cache:{self.cache_path(weights_sha256)}" if data is not None else "computed"
        if data is None:
            if model is None:
                raise ValueError(f"{self.path}: computing reference features needs the Inception")
            acts = compute_activations(model, self.images.iter_batches(batch_size), progress)
            data = {"mu": acts.pool_stats.mu, "sigma": acts.pool_stats.sigma,
                    "mu_s": acts.spatial_stats.mu, "sigma_s": acts.spatial_stats.sigma,
                    "pool": acts.pool}
            if use_cache and weights_sha256:
                self._save_cache(weights_sha256, data)
        s = self.file_stats if self.has_stats else data
        if self.has_stats:
            source = f"file (pool features for precision/recall: {source})"
        return ReferenceStats(s["mu"], s["sigma"], s["mu_s"], s["sigma_s"], pool=data["pool"],
                              num_images=len(self.images), source=source)
