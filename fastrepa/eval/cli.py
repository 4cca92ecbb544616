"""``python -m fastrepa.eval samples.npz --ref REF`` -> FID, sFID, IS, precision, recall.
``python -m fastrepa.eval make-ref FOLDER --out REF.npz`` -> the reference statistics of a folder of images.

REF is an ADM reference .npz or a folder of PNG/JPEG images (see reference.py).

The sequence is ADM's evaluator: reference activations and statistics (from the file's mu/sigma when
present), sample activations and statistics, then IS (split size 5000), FID, sFID and precision/
recall (k=3) of the samples against the reference images. Inputs are validated before the network
is loaded, so a bad file fails in a second.

`evaluate(acts, ref, ...)` is the part after the sample activations; generate.py calls it with the
features it computed while sampling, so both paths score with the same code.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from fastrepa.distributed import resolve_device
from fastrepa.io import atomic_open, write_json

from .features import Activations, compute_activations
from .inception import PREPROCESS_MODES, features_id, file_sha256, find_weights, load_inception
from .metrics import frechet_distance, inception_score, precision_recall
from .reference import POOL_KEY, POOL_SHA_KEY, STAT_KEYS, EvalInputError, NpzImages, ReferenceFile, ReferenceStats

IS_SPLIT_SIZE = 5000  # ADM
PR_NEIGHBOURS = 3     # ADM
METRIC_KEYS = ("fid", "sfid", "inception_score", "precision", "recall")


def _common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--inception", default=None,
                   help="path of pt_inception-2015-12-05-6726825d.pth (default: torch hub cache)")
    p.add_argument("--inception-preprocess", choices=PREPROCESS_MODES, default=PREPROCESS_MODES[0],
                   help="resize to 299 and normalise as ADM's TF evaluator (tf: TF1 legacy bilinear, "
                        "(x - 128) / 128; default) or as pytorch-fid (half-pixel bilinear, x / 127.5 - 1)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-cache", action="store_true",
                   help="do not read or write the reference statistics cache")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastrepa.eval",
        description="ADM metrics (FID, sFID, IS, precision, recall) of a samples .npz against an "
                    "ADM reference batch or a folder of real images, with the pytorch-fid port of the FID "
                    "Inception. `python -m fastrepa.eval make-ref --help`: write a folder's reference "
                    "statistics to an .npz.")
    p.add_argument("samples", help="samples .npz with arr_0 uint8 [N,H,W,3]")
    p.add_argument("--ref", required=True,
                   help="reference .npz (arr_0 images and/or mu, sigma[, mu_s, sigma_s]), or a folder of "
                        "PNG/JPEG images (recursive, sorted)")
    p.add_argument("--ref-center-crop", action="store_true",
                   help="with a --ref folder: ADM center crop its images to the samples' resolution")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--fd-method", choices=("sqrtm", "eigh"), default="sqrtm",
                   help="Fréchet distance matrix square root: sqrtm (ADM, default) or eigh (same "
                        "value for PSD covariances, far faster when they are rank-deficient)")
    return _common_args(p)


def build_make_ref_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastrepa.eval make-ref",
        description="Write the reference statistics of a folder of real images (or of an .npz's arr_0) as "
                    "an ADM-format .npz: mu, sigma, mu_s, sigma_s, and the pool features with the Inception's "
                    f"sha256 ('{POOL_KEY}', '{POOL_SHA_KEY}') for precision/recall. Pass it as --ref.")
    p.add_argument("ref", help="folder of PNG/JPEG images (recursive, sorted), or an .npz with arr_0")
    p.add_argument("--out", required=True, help="the reference .npz to write")
    p.add_argument("--center-crop", type=int, default=None, metavar="SIZE",
                   help="ADM center crop the folder's images to SIZE x SIZE (the samples' resolution)")
    return _common_args(p)


def _device(args) -> str:
    if args.batch_size < 1:
        raise EvalInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        return str(resolve_device(args.device, "--device"))
    except ValueError as e:
        raise EvalInputError(str(e)) from None


def _progress(label: str, total: int, quiet: bool):
    state = {"done": 0, "t0": time.time()}

    def step(n):
        state["done"] += n
        if not quiet:
            rate = state["done"] / max(time.time() - state["t0"], 1e-9)
            print(f"\r{label}: {state['done']}/{total} images ({rate:.0f} img/s)", end="",
                  file=sys.stderr, flush=True)
            if state["done"] >= total:
                print(file=sys.stderr)
    return step


def _check_num_samples(n: int, samples) -> None:
    if n < 2:
        raise EvalInputError(f"{samples}: {n} sample; FID needs at least 2 (a covariance)")


def score(acts: Activations, ref_stats: ReferenceStats, fd_method: str = "sqrtm",
          device: str = "cpu") -> dict:
    """{fid, sfid, inception_score, precision, recall, notes} of sample activations against reference
    statistics, as ADM's evaluator (IS split 5000, precision/recall with k=3 when the reference has
    pool features). What the reference cannot give (sFID without spatial statistics, precision/recall
    without pool features or with k or fewer images a side) is None, and a note says why."""
    fid = frechet_distance(acts.pool_stats.mu, acts.pool_stats.sigma, ref_stats.mu, ref_stats.sigma,
                           method=fd_method)
    sfid = None if ref_stats.mu_s is None else frechet_distance(
        acts.spatial_stats.mu, acts.spatial_stats.sigma, ref_stats.mu_s, ref_stats.sigma_s, method=fd_method)
    isc = inception_score(acts.logits, split_size=IS_SPLIT_SIZE, from_logits=True)
    notes = list(ref_stats.notes)
    precision = recall = None
    if ref_stats.pool is not None and min(acts.n, len(ref_stats.pool)) > PR_NEIGHBOURS:
        precision, recall = precision_recall(ref_stats.pool, acts.pool, k=PR_NEIGHBOURS, device=device)
    elif ref_stats.pool is not None:
        notes.append(f"precision/recall (k={PR_NEIGHBOURS} nearest neighbours) need more than {PR_NEIGHBOURS} "
                     f"images a side; have {acts.n} samples and {len(ref_stats.pool)} reference images")
    if acts.n < 2048:
        notes.append(f"only {acts.n} samples: the 2048-d covariance is rank-deficient and "
                     "FID is biased upward; ADM reports 50000 samples")
    return {"fid": fid, "sfid": sfid, "inception_score": isc, "precision": precision,
            "recall": recall, "notes": notes}


def evaluate(acts: Activations, ref: ReferenceFile, model, weights, *, samples, sample_shape,
             weights_sha256: Optional[str] = None, batch_size: int = 100, device: str = "cpu",
             fd_method: str = "sqrtm", use_cache: bool = True, quiet: bool = False,
             sample_features: str = "computed from the samples file", t0: Optional[float] = None) -> dict:
    """The report of sample activations `acts` (however they were computed: `compute_activations` of
    an .npz, or gathered from generate.py's shards) against the reference `ref`: metrics, settings
    and notes. The reference statistics come from the file, its cache or the network `model`."""
    t0 = time.time() if t0 is None else t0
    _check_num_samples(acts.n, samples)
    sha = weights_sha256 or file_sha256(weights)
    preprocess = model.preprocess_mode
    ref_n = len(ref.images) if ref.images is not None else 0
    ref_stats = ref.stats(model, features_id(sha, preprocess), batch_size, use_cache=use_cache,
                          progress=_progress("reference", ref_n, quiet))
    metrics = score(acts, ref_stats, fd_method=fd_method, device=device)
    notes = metrics.pop("notes")
    report = {
        **metrics,
        "settings": {
            "samples": str(Path(samples).resolve()), "num_samples": acts.n,
            "sample_shape": list(sample_shape), "sample_features": sample_features,
            "reference": str(Path(ref.path).resolve()), "num_reference_images": ref_stats.num_images,
            "reference_stats_source": ref_stats.source,
            "inception_weights": str(Path(weights).resolve()), "inception_sha256": sha,
            "inception_preprocess": preprocess, "batch_size": batch_size, "device": device, "fd_method": fd_method,
            "is_split_size": IS_SPLIT_SIZE, "pr_neighbours": PR_NEIGHBOURS,
            "network": "pytorch-fid FID Inception-v3 port (not ADM's TF graph: float32 round-off apart; "
                       f"{preprocess} preprocessing)",
            "torch": torch.__version__, "seconds": round(time.time() - t0, 2),
        },
        "notes": notes,
    }
    if not quiet:
        for k in METRIC_KEYS:
            v = report[k]
            print(f"{k}: {'n/a' if v is None else f'{v:.4f}'}")
    return report


def main(argv: Optional[Sequence[str]] = None, quiet: bool = False) -> dict:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv[:1] == ["make-ref"]:
        return make_ref(argv[1:], quiet=quiet)
    args = build_parser().parse_args(argv)
    device = _device(args)
    samples = NpzImages(args.samples, role="samples")
    _check_num_samples(len(samples), args.samples)
    crop = None
    if args.ref_center_crop:
        h, w = samples.shape[1:3]
        if h != w:
            raise EvalInputError(f"--ref-center-crop: the samples {args.samples} are {w}x{h}; the ADM center "
                                 "crop makes squares")
        crop = h
    ref = ReferenceFile(args.ref, center_crop=crop)
    weights = find_weights(args.inception)
    t0 = time.time()
    sha = file_sha256(weights)
    model = load_inception(weights, device=device, preprocess=args.inception_preprocess)

    acts = compute_activations(model, samples.iter_batches(args.batch_size),
                               _progress("samples", len(samples), quiet))
    report = evaluate(acts, ref, model, weights, samples=args.samples, sample_shape=samples.shape[1:],
                      weights_sha256=sha, batch_size=args.batch_size, device=device,
                      fd_method=args.fd_method, use_cache=not args.no_cache, quiet=quiet, t0=t0)
    if args.out:
        out = Path(args.out)
        write_json(out, report, indent=2)
        if not quiet:
            print(f"wrote {out}")
    return report


def make_ref(argv: Sequence[str], quiet: bool = False) -> dict:
    """``make-ref REF --out OUT.npz``: the statistics and pool features of REF's images, written as an
    ADM-format reference .npz (no arr_0; its inception_sha256 holds the features id: the weights' sha256
    and the preprocessing); returns {out, num_images, inception_sha256, inception_preprocess, source}."""
    args = build_make_ref_parser().parse_args(argv)
    device = _device(args)
    ref = ReferenceFile(args.ref, center_crop=args.center_crop)
    if ref.images is None:
        raise EvalInputError(f"{args.ref}: make-ref needs images (a folder, or an .npz with 'arr_0')")
    weights = find_weights(args.inception)
    sha = file_sha256(weights)
    model = load_inception(weights, device=device, preprocess=args.inception_preprocess)
    feats_id = features_id(sha, args.inception_preprocess)
    stats = ref.stats(model, feats_id, args.batch_size, use_cache=not args.no_cache,
                      progress=_progress("reference", len(ref.images), quiet))
    arrays = {**{k: getattr(stats, k) for k in STAT_KEYS}, POOL_KEY: stats.pool, POOL_SHA_KEY: np.array(feats_id)}
    out = Path(args.out)
    with atomic_open(out, "wb") as f:
        np.savez(f, **arrays)
    if not quiet:
        print(f"wrote {out}: the statistics of {stats.num_images} images of {args.ref}")
    return {"out": str(out), "num_images": stats.num_images, "inception_sha256": sha,
            "inception_preprocess": args.inception_preprocess, "source": stats.source}


def cli(argv: Optional[Sequence[str]] = None) -> None:
    try:
        main(argv)
    except (EvalInputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
