"""Read ADM-format sample and reference batches (.npz) and reference folders of images, with clear errors.

Formats (as ADM's evaluator reads them):
* samples: ``arr_0`` uint8 [N, H, W, 3] (what generate.py writes).
* reference batch (e.g. VIRTUAL_imagenet256_labeled.npz): ``arr_0`` uint8 [N, H, W, 3] real images,
  optionally with precomputed statistics ``mu`` [2048], ``sigma`` [2048, 2048] (pool_3) and
  ``mu_s`` [2023], ``sigma_s`` [2023, 2023] (spatial). ADM uses the file's statistics when ``mu`` is
  present, and always runs the reference images for precision/recall. Ours also reads a file with
  ``mu``/``sigma`` only (no sFID unless it has images to compute ``mu_s``/``sigma_s`` from), and the
  ``pool`` features + ``inception_sha256`` that ``python -m fastrepa.eval make-ref`` stores (precision/
  recall without images, for the same Inception weights and preprocessing: it holds their features id,
  `fastrepa.eval.inception.features_id`).
* reference folder: PNG/JPEG files found recursively, in sorted order of their relative paths, as RGB;
  optionally ADM-center-cropped (fastrepa.data.center_crop) to a square size.

Images are streamed from the zip member batch by batch (a 50K x 256 x 256 x 3 batch is 9.8 GB), like
ADM's StreamingNpzArrayReader. When the reference has images, we run them (for precision/recall and any
statistics the file lacks) once and cache the statistics and pool features next to it as
``<name>.<weights-sha256[:12]>[+tf][.cropS].fastrepa-stats.npz``; the cache records the features id (the
weights' full sha256 and the Inception preprocessing) and the reference's size and mtime (a folder: a digest
of its file list with sizes and mtimes) and is recomputed when any of them differ.
"""
from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np

from fastrepa.io import atomic_open

from .features import compute_activations
from .inception import POOL_DIM, SPATIAL_DIM, short_features_id

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
STAT_PAIRS = (("mu", "sigma"), ("mu_s", "sigma_s"))  # FID, sFID
IMAGES_KEY = "arr_0"
POOL_KEY, POOL_SHA_KEY = "pool", "inception_sha256"  # make-ref's pool features and the features id that made them
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
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


class FolderImages:
    """The images of a folder (IMAGE_EXTS, recursively, sorted by relative path) as uint8 [B, H, W, 3] RGB
    batches; with `center_crop`, each is ADM-center-cropped to that square size first (else all must
    have one size)."""

    def __init__(self, path, center_crop: Optional[int] = None, role: str = "reference"):
        self.path, self.center_crop, self.role = Path(path), center_crop, role
        if not self.path.is_dir():
            raise EvalInputError(f"{self.path}: not a folder")
        if center_crop is not None and center_crop < 1:
            raise EvalInputError(f"{self.path}: center crop size must be >= 1, got {center_crop}")
        self.files = sorted((p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()),
                            key=lambda p: p.relative_to(self.path).as_posix())
        if not self.files:
            raise EvalInputError(f"{self.path}: {role} folder holds no images ({', '.join(IMAGE_EXTS)}, "
                                 "searched recursively)")

    def __len__(self) -> int:
        return len(self.files)

    def fingerprint(self) -> str:
        """sha256 of the file list with each file's size and mtime: changes when any image does."""
        h = hashlib.sha256()
        for p in self.files:
            st = p.stat()
            h.update(f"{p.relative_to(self.path).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def _load(self, path: Path) -> np.ndarray:
        from PIL import Image

        from fastrepa.data.center_crop import center_crop_arr
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                return center_crop_arr(im, self.center_crop) if self.center_crop else np.asarray(im)
        except OSError as e:
            raise EvalInputError(f"{path}: cannot read this {self.role} image ({e})") from None

    def iter_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        first = None
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
            for i in range(0, len(self.files), batch_size):
                files = self.files[i:i + batch_size]
                images = list(pool.map(self._load, files))
                for path, im in zip(files, images):
                    first = first or (self.files[0], im.shape)
                    if im.shape != first[1]:
                        raise EvalInputError(
                            f"{path}: image is {im.shape[1]}x{im.shape[0]}, {first[0]} is "
                            f"{first[1][1]}x{first[1][0]}: the images of a {self.role} folder must have one size "
                            "(ADM-center-crop them: --ref-center-crop, or make-ref --center-crop SIZE)")
                yield np.stack(images)


@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: Optional[np.ndarray]     # None: no spatial statistics (no sFID)
    sigma_s: Optional[np.ndarray]
    pool: Optional[np.ndarray]     # reference pool features for precision/recall; None without them
    num_images: Optional[int]
    source: str                    # "file", "computed", "cache:<path>", or how they combine
    notes: List[str] = field(default_factory=list)  # what is missing, and why


def _check_stats(path, stats: dict) -> None:
    want = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM),
            "mu_s": (SPATIAL_DIM,), "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}
    for k, v in stats.items():
        if v.shape != want[k]:
            raise EvalInputError(f"{path}: '{k}' has shape {v.shape}, expected {want[k]}")
        if not np.issubdtype(v.dtype, np.floating):
            raise EvalInputError(f"{path}: '{k}' has dtype {v.dtype}, expected floating point")
        if not np.isfinite(v).all():
            raise EvalInputError(f"{path}: '{k}' contains non-finite values")


class ReferenceFile:
    """A validated reference: an ADM .npz (statistics, images, or both) or a folder of images
    (`center_crop`: ADM-center-crop them to that size)."""

    def __init__(self, path, center_crop: Optional[int] = None):
        self.path, self.center_crop = Path(path), center_crop
        self.file_stats, self.file_pool, self.file_pool_sha = {}, None, None
        if self.path.is_dir():
            self.images = FolderImages(self.path, center_crop)
        else:
            self._read_npz()
        self.has_stats = bool(self.file_stats)
        if self.images is not None and "mu" not in self.file_stats and len(self.images) < 2:
            raise EvalInputError(f"{self.path}: {len(self.images)} reference image; FID statistics need at "
                                 "least 2")

    def _read_npz(self) -> None:
        if self.center_crop is not None:
            raise EvalInputError(f"{self.path}: the center crop applies to a folder of images, not to an .npz")
        keys = npz_keys(self.path)
        for pair in STAT_PAIRS:
            have = [k for k in pair if k in keys]
            if len(have) == 1:
                raise EvalInputError(f"{self.path}: reference has '{have[0]}' without "
                                     f"'{[k for k in pair if k != have[0]][0]}'; statistics come in pairs {pair}")
        self.images = NpzImages(self.path, role="reference") if IMAGES_KEY in keys else None
        if "mu" not in keys and self.images is None:
            raise EvalInputError(
                f"{self.path}: reference has neither FID statistics ('mu', 'sigma'; 'mu_s', 'sigma_s' for sFID) "
                f"nor images '{IMAGES_KEY}' (keys found: {keys})")
        with np.load(self.path) as z:
            self.file_stats = {k: z[k] for k in STAT_KEYS if k in keys}
            if POOL_KEY in keys and POOL_SHA_KEY in keys:
                self.file_pool, self.file_pool_sha = z[POOL_KEY], str(z[POOL_SHA_KEY])
        _check_stats(self.path, self.file_stats)
        if self.file_pool is not None and (self.file_pool.ndim != 2 or self.file_pool.shape[1] != POOL_DIM):
            raise EvalInputError(f"{self.path}: '{POOL_KEY}' has shape {self.file_pool.shape}, expected "
                                 f"[N, {POOL_DIM}]")

    def cache_path(self, features_id: str) -> Path:
        crop = f".crop{self.center_crop}" if self.center_crop else ""
        return self.path.with_name(f"{self.path.name}.{short_features_id(features_id)}{crop}{CACHE_SUFFIX}")

    def _cache_meta(self, features_id: str) -> dict:
        if isinstance(self.images, FolderImages):
            ref = {"ref_files_sha256": self.images.fingerprint(), "center_crop": self.center_crop or 0}
        else:
            st = self.path.stat()
            ref = {"ref_size": st.st_size, "ref_mtime_ns": st.st_mtime_ns}
        # "weights_sha256": the key of earlier versions, whose caches (pytorch-fid: the bare sha256) stay valid
        return {"version": CACHE_VERSION, "weights_sha256": features_id, **ref, "num_images": len(self.images)}

    def _load_cache(self, features_id: str, meta: dict) -> Optional[dict]:
        cp = self.cache_path(features_id)
        if not cp.is_file():
            return None
        try:
            with np.load(cp) as z:
                data = {k: z[k] for k in z.files}
        except Exception as e:  # noqa: BLE001 - a bad cache is recomputed, never fatal
            warnings.warn(f"ignoring unreadable stats cache {cp}: {e}")
            return None
        for k, v in meta.items():
            if k not in data or data[k].item() != v:
                return None
        return data

    def _save_cache(self, features_id: str, data: dict, meta: dict) -> None:
        cp = self.cache_path(features_id)
        try:
            with atomic_open(cp, "wb") as f:
                np.savez(f, **data, **{k: np.asarray(v) for k, v in meta.items()})
        except OSError as e:
            warnings.warn(f"could not write stats cache {cp}: {e}")

    def _file_only(self, features_id: Optional[str]) -> ReferenceStats:
        s, notes, pool = self.file_stats, [], None
        if self.file_pool is not None and self.file_pool_sha == features_id:
            pool = self.file_pool
        elif self.file_pool is not None:
            notes.append(f"precision/recall: the reference's pool features were made by the Inception "
                         f"{short_features_id(self.file_pool_sha)} (weights sha256[:12][+preprocessing]), not "
                         f"these ({short_features_id(features_id or '?')})")
        else:
            notes.append("precision/recall need reference images (arr_0) or pool features; the reference has "
                         "only statistics")
        if "mu_s" not in s:
            notes.append(f"sFID unavailable: {self.path} has no spatial statistics (mu_s, sigma_s) and no "
                         f"images ({IMAGES_KEY}) to compute them from")
        return ReferenceStats(s["mu"], s["sigma"], s.get("mu_s"), s.get("sigma_s"), pool=pool,
                              num_images=None if pool is None else len(pool), source="file", notes=notes)

    def stats(self, model=None, features_id: Optional[str] = None, batch_size: int = 100,
              use_cache: bool = True, progress=None) -> ReferenceStats:
        """Statistics (the file's where it has them; the rest from the cache, else computed from the
        images by `model`) and reference pool features. `features_id` names `model`'s features
        (`fastrepa.eval.inception.features_id`): caches and stored pool features of another are not used."""
        if self.images is None:
            return self._file_only(features_id)
        cache = use_cache and bool(features_id)
        meta = self._cache_meta(features_id) if cache else None
        data = self._load_cache(features_id, meta) if cache else None
        source = f"cache:{self.cache_path(features_id)}" if data is not None else "computed"
        if data is None:
            if model is None:
                raise ValueError(f"{self.path}: computing reference features needs the Inception")
            acts = compute_activations(model, self.images.iter_batches(batch_size), progress)
            data = {"mu": acts.pool_stats.mu, "sigma": acts.pool_stats.sigma,
                    "mu_s": acts.spatial_stats.mu, "sigma_s": acts.spatial_stats.sigma,
                    "pool": acts.pool}
            if cache:
                self._save_cache(features_id, data, meta)
        s = {**data, **self.file_stats}  # the file's statistics win, as in ADM
        if len(self.file_stats) == len(STAT_KEYS):
            source = f"file (pool features for precision/recall: {source})"
        elif self.file_stats:
            source = f"file ({', '.join(self.file_stats)}) and {source} (the rest, and the pool features)"
        return ReferenceStats(s["mu"], s["sigma"], s["mu_s"], s["sigma_s"], pool=data["pool"],
                              num_images=len(self.images), source=source)
