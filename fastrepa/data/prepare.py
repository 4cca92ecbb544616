"""Prepare an ImageFolder tree (or a zip of one) as the official REPA dataset layout.

    python -m fastrepa.data.prepare --source ILSVRC/Data/CLS-LOC/train --dest data/imagenet256 \\
        --resolution 256 [--vae mse|ema|DIR] [--batch-size 64] [--shard-size 1000] [--skip-bad]
    torchrun --nproc-per-node 8 -m fastrepa.data.prepare ...      # shards split over the ranks

What it writes (what REPA's preprocessing/dataset_tools.py `convert --transform=center-crop-dhariwal`
followed by `encode` writes, so REPA's CustomDataset and fastrepa.data.REPAFolderDataset read it):
    DEST/images/00000/img00000000.png            ADM center crop to RESxRES, uncompressed PNG (level 0)
    DEST/images/dataset.json                     {"labels": [["00000/img00000000.png", label], ...]}
    DEST/vae-sd/00000/img-mean-std-00000000.npy  float32 cat[mean, std] [2C, RES/8, RES/8] (fp32 encoder)
    DEST/vae-sd/dataset.json                     {"labels": [["00000/img-mean-std-00000000.npy", label], ...]}
    DEST/prepare.json                            report: counts, classes, skipped files and why
    DEST/.prepare/                               the run's settings and one marker per finished shard
Image i of the sorted list of source files (sorted relative paths, as dataset_tools.py) gets index i
(1000 per folder); labels are the sorted class-folder names -> 0..K-1 (as torchvision's ImageFolder).
A file skipped with --skip-bad leaves a gap in the numbering (images and latents still pair up).

Resumable: the images are processed in shards of --shard-size; a shard is finished when its marker
.prepare/shard-NNNNN.json exists, written last and atomically (every output file is written to a
temporary name and renamed). A rerun with the same settings skips finished shards without touching
them and redoes the others; the dataset.json files and prepare.json are written once every shard is
finished. Under torchrun, rank r does shards r, r + world, ...; a rank that finds every shard finished
writes them (two ranks finishing at once write the same files, each through its own temporary name).

Then, for the fastest loading (a few memory-mapped files instead of two small files per sample):
    python -m fastrepa.data.pack DEST DEST-packed --image-format raw|jpeg     # then --data-dir DEST-packed
"""
import argparse
import hashlib
import json
import os
import re
import sys
import time
import zipfile

import numpy as np
import torch
from PIL import Image

from fastrepa.data.center_crop import center_crop_arr
from fastrepa.distributed import resolve_device
from fastrepa.io import atomic_open, write_json

STATE_DIR = ".prepare"
PER_FOLDER = 1000
FORMAT = 1


class PrepareError(ValueError):
    """Bad input or settings for the preparation; the message names the file, folder or flag."""


def image_name(i: int) -> str:
    return f"{i // PER_FOLDER:05d}/img{i:08d}.png"


def feature_name(i: int) -> str:
    return f"{i // PER_FOLDER:05d}/img-mean-std-{i:08d}.npy"


def _image_exts() -> set[str]:
    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


def _hidden(rel: str) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in rel.split("/"))


class Source:
    """A sorted list of image files with labels from their class folder: a directory or a zip."""

    def __init__(self, path: str):
        self.path = path
        self.is_zip = os.path.isfile(path)
        if self.is_zip and not zipfile.is_zipfile(path):
            raise PrepareError(f"--source {path}: a file, but not a zip archive (expected an ImageFolder "
                               f"directory or a zip of one)")
        if not self.is_zip and not os.path.isdir(path):
            raise PrepareError(f"--source {path}: no such directory or zip file")
        self._zip = None
        self.prefix = ""
        rels, dirs = self._list_zip() if self.is_zip else self._list_dir()
        exts = _image_exts()
        images = sorted(r for r in rels if os.path.splitext(r)[1].lower() in exts)
        if self.is_zip:  # a zip of the tree itself, or of a folder holding it (train.zip -> train/<class>/...)
            tops = {r.split("/")[0] for r in images}
            if len(tops) == 1 and all(r.count("/") >= 2 for r in images):
                self.prefix = tops.pop() + "/"
                images = [r[len(self.prefix):] for r in images]
                dirs = {d[len(self.prefix):] for d in dirs if d.startswith(self.prefix)} - {""}
        top_level = [r for r in images if "/" not in r]
        if top_level:
            raise PrepareError(f"--source {path}: image {self.display_rel(top_level[0])} is not inside a class "
                               f"folder (expected SOURCE/<class>/<image>; labels come from the class folders)")
        self.classes = sorted({r.split("/")[0] for r in images} | {d.split("/")[0] for d in dirs})
        if not self.classes:
            raise PrepareError(f"--source {path}: no class folders with images found (expected SOURCE/<class>/"
                               f"<image> with extensions such as .jpg, .jpeg, .png)")
        counts = dict.fromkeys(self.classes, 0)
        for r in images:
            counts[r.split("/")[0]] += 1
        empty = [c for c, n in counts.items() if n == 0]
        if empty:
            raise PrepareError(f"--source {path}: class folder {self.display_rel(empty[0])} has no images"
                               + (f" (nor {len(empty) - 1} more: {', '.join(empty[1:4])}...)" if len(empty) > 1 else "")
                               + "; remove it or add its images (an empty class would shift every later label)")
        label_of = {c: k for k, c in enumerate(self.classes)}
        self.files = images
        self.labels = [label_of[r.split("/")[0]] for r in images]

    def _list_dir(self):
        rels, dirs = [], set()
        for entry in sorted(os.listdir(self.path)):
            full = os.path.join(self.path, entry)
            if entry.startswith("."):
                continue
            if os.path.isdir(full):
                dirs.add(entry)
                for dirpath, dirnames, names in os.walk(full, followlinks=True):
                    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                    rel_dir = os.path.relpath(dirpath, self.path).replace(os.sep, "/")
                    rels += [f"{rel_dir}/{n}" for n in names if not n.startswith(".")]
            else:
                rels.append(entry)
        return rels, dirs

    def _list_zip(self):
        with zipfile.ZipFile(self.path) as z:
            names = [n for n in z.namelist() if not _hidden(n.rstrip("/"))]
        dirs = {n.rstrip("/") for n in names if n.endswith("/")}
        return [n for n in names if not n.endswith("/")], dirs

    def display_rel(self, rel: str) -> str:
        if self.is_zip:
            return f"{self.path}:{self.prefix}{rel}"
        return os.path.join(self.path, rel)

    def display(self, i: int) -> str:
        return self.display_rel(self.files[i])

    def open_image(self, i: int) -> Image.Image:
        """The RGB image of file i, fully decoded (a truncated or corrupt file raises here)."""
        if self.is_zip:
            if self._zip is None:  # one handle per process (DataLoader workers fork after listing)
                self._zip = zipfile.ZipFile(self.path)
            with self._zip.open(self.prefix + self.files[i]) as f, Image.open(f) as im:
                return im.convert("RGB")  # decodes the whole file: a truncated or corrupt one raises here
        with Image.open(os.path.join(self.path, self.files[i])) as im:
            return im.convert("RGB")

    def listing_digest(self) -> str:
        h = hashlib.sha256()
        for r, y in zip(self.files, self.labels):
            h.update(f"{r}\t{y}\n".encode())
        return h.hexdigest()

    def __getstate__(self):
        return dict(self.__dict__, _zip=None)



class _ShardReader(torch.utils.data.Dataset):
    """Item k of the shard: decode + center crop + write the PNG (in the worker). Errors come back as
    text so the main process decides (stop, or skip with --skip-bad)."""

    def __init__(self, source: Source, indices, resolution: int, images_dir: str, png_level: int):
        self.source, self.indices, self.resolution = source, list(indices), resolution
        self.images_dir, self.png_level = images_dir, png_level

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i = self.indices[k]
        try:
            arr = center_crop_arr(self.source.open_image(i), self.resolution)
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
            return i, None, f"{type(e).__name__}: {e}"
        path = os.path.join(self.images_dir, image_name(i))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_open(path, "wb") as f:
            Image.fromarray(arr).save(f, format="png", compress_level=self.png_level, optimize=False)
        return i, arr, None


def _collate(batch):
    return batch


def _dist_env(rank, world_size):
    if rank is None:
        rank = int(os.environ.get("RANK", 0))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world_size:
        raise PrepareError(f"rank {rank} is outside a world of {world_size} processes")
    return rank, world_size


def _check_settings(dest: str, settings: dict) -> None:
    state = os.path.join(dest, STATE_DIR)
    cfg_path = os.path.join(state, "config.json")
    if os.path.isdir(dest) and not os.path.isfile(cfg_path):
        other = [e for e in os.listdir(dest) if e != STATE_DIR]
        if other:
            raise PrepareError(f"--dest {dest} is not empty ({other[0]}, ...) and holds no earlier preparation "
                               f"({STATE_DIR}/config.json): give an empty or new folder")
    os.makedirs(state, exist_ok=True)
    if not os.path.isfile(cfg_path):
        write_json(cfg_path, settings)
        return
    with open(cfg_path) as f:
        old = json.load(f)
    diff = [k for k in settings if old.get(k) != settings[k]]
    if diff:
        k = diff[0]
        raise PrepareError(f"--dest {dest} holds a preparation with other settings ({k}: {old.get(k)!r} there, "
                           f"{settings[k]!r} now{'; the source files changed' if k == 'listing_sha256' else ''}): "
                           f"rerun with the same settings to resume, or give a new --dest")


# the temporaries of the per-sample files (shard work) only; dataset.json temporaries are never touched
_SHARD_TEMP = re.compile(r"img(-mean-std-)?\d+\.(png|npy)\.tmp.*")


def _marker(dest: str, shard: int) -> str:
    return os.path.join(dest, STATE_DIR, f"shard-{shard:05d}.json")


def prepare(source: str, dest: str, resolution: int = 256, vae="mse", batch_size: int = 64,
            shard_size: int = 1000, skip_bad: bool = False, workers: int = 4, device=None,
            rank: int | None = None, world_size: int | None = None, png_compress_level: int = 0,
            progress: bool | None = None) -> dict | None:
    """Prepare `source` into `dest` (see the module docstring). Returns the report (also DEST/prepare.json)
    once every shard is finished, else None (other ranks still working)."""
    for flag, v in (("resolution", resolution), ("batch-size", batch_size), ("shard-size", shard_size)):
        if not isinstance(v, int) or v < 1:
            raise PrepareError(f"--{flag}={v}: expected a positive integer")
    if resolution % 8:
        raise PrepareError(f"--resolution={resolution}: expected a multiple of 8 (the SD-VAE downsamples by 8)")
    rank, world_size = _dist_env(rank, world_size)
    t0 = time.time()
    src = Source(source)
    n = len(src.files)
    num_shards = (n + shard_size - 1) // shard_size
    vae_name = vae if isinstance(vae, str) else getattr(vae, "name", type(vae).__name__)
    settings = {"format": FORMAT, "source": os.path.abspath(source), "resolution": resolution, "vae": vae_name,
                "shard_size": shard_size, "num_images": n, "classes": src.classes,
                "listing_sha256": src.listing_digest()}
    _check_settings(dest, settings)
    images_dir, features_dir = os.path.join(dest, "images"), os.path.join(dest, "vae-sd")

    mine = [s for s in range(rank, num_shards, world_size)]
    pending = [s for s in mine if not os.path.isfile(_marker(dest, s))]
    if pending:
        device = resolve_device(device, "prepare device", index=int(os.environ.get("LOCAL_RANK", 0)))
        if isinstance(vae, str):
            from fastrepa.vae import load_vae
            vae = load_vae(vae, batch_size=batch_size)
        vae = vae.to(device)
        f = getattr(vae, "downsample", 1)
        if resolution % f:
            raise PrepareError(f"--resolution={resolution} is not a multiple of the VAE's downsampling factor {f}")
        from tqdm import tqdm
        todo = sum(min(shard_size, n - s * shard_size) for s in pending)
        bar = tqdm(total=todo, desc=f"prepare{f' rank {rank}' if world_size > 1 else ''}", unit="img",
                   disable=None if progress is None else not progress)
        try:
            for s in pending:
                _run_shard(src, s, shard_size, resolution, vae, device, batch_size, skip_bad, workers,
                           images_dir, features_dir, png_compress_level, dest, bar)
        finally:
            bar.close()
    return _finalize(src, dest, num_shards, settings, time.time() - t0, rank)


def _run_shard(src, s, shard_size, resolution, vae, device, batch_size, skip_bad, workers, images_dir,
               features_dir, png_level, dest, bar):
    indices = range(s * shard_size, min((s + 1) * shard_size, len(src.files)))
    reader = _ShardReader(src, indices, resolution, images_dir, png_level)
    loader = torch.utils.data.DataLoader(reader, batch_size=batch_size, num_workers=workers,
                                         collate_fn=_collate)
    done, skipped = [], []
    for batch in loader:
        good = []
        for i, arr, err in batch:
            if err is None:
                good.append((i, arr))
            elif skip_bad:
                skipped.append({"index": i, "file": src.display(i), "error": err})
            else:
                raise PrepareError(f"cannot read image {src.display(i)}: {err}. Fix or remove the file, or pass "
                                   f"--skip-bad to skip such files (they are listed in prepare.json); finished "
                                   f"shards are kept and a rerun resumes")
        if good:
            x = torch.from_numpy(np.stack([a for _, a in good])).permute(0, 3, 1, 2).to(device)
            moments = vae.encode_moments(x).cpu().numpy().astype(np.float32)
            for (i, _), m in zip(good, moments):
                path = os.path.join(features_dir, feature_name(i))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with atomic_open(path, "wb") as f:
                    np.save(f, m)
                done.append(i)
        bar.update(len(batch))
    write_json(_marker(dest, s), {"shard": s, "indices": done, "skipped": skipped})


def _finalize(src, dest, num_shards, settings, seconds, rank) -> dict | None:
    markers = [_marker(dest, s) for s in range(num_shards)]
    missing = [m for m in markers if not os.path.isfile(m)]
    if missing:
        print(f"rank {rank}: my shards are done; {len(missing)} shard(s) of other ranks are not yet; the last rank "
              f"to finish writes dataset.json", file=sys.stderr)
        return None
    indices, skipped = [], []
    for m in markers:
        with open(m) as f:
            d = json.load(f)
        indices += d["indices"]
        skipped += d["skipped"]
    indices.sort()
    # Shard temporaries left by a killed run: every shard is finished, so no process writes them now.
    # Several ranks may finalise at once (each saw every marker): the dataset.json / prepare.json they
    # write are identical and go through their own temporaries, which this cleanup leaves alone.
    for sub in ("images", "vae-sd"):
        for dirpath, _, names in os.walk(os.path.join(dest, sub)):
            for name in names:
                if _SHARD_TEMP.fullmatch(name):
                    try:
                        os.remove(os.path.join(dirpath, name))
                    except FileNotFoundError:  # another finalising rank removed it first
                        pass
    for sub, name in (("images", image_name), ("vae-sd", feature_name)):
        os.makedirs(os.path.join(dest, sub), exist_ok=True)
        write_json(os.path.join(dest, sub, "dataset.json"),
                     {"labels": [[name(i), src.labels[i]] for i in indices]})
    report = {"source": settings["source"], "dest": os.path.abspath(dest), "resolution": settings["resolution"],
              "vae": settings["vae"], "num_source_images": len(src.files), "num_written": len(indices),
              "num_skipped": len(skipped), "skipped": skipped, "num_classes": len(src.classes),
              "classes": src.classes, "shards": num_shards, "shard_size": settings["shard_size"],
              "seconds_last_run": round(seconds, 3)}
    write_json(os.path.join(dest, "prepare.json"), report)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastrepa.data.prepare", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--source", required=True, help="ImageFolder directory (SOURCE/<class>/<image>) or a zip of one")
    p.add_argument("--dest", required=True, help="output folder (REPA layout); a rerun resumes it")
    p.add_argument("--resolution", type=int, default=256, help="output size (square), a multiple of 8")
    p.add_argument("--vae", default="mse", help="mse (REPA's encoder: stabilityai/sd-vae-ft-mse), ema, a local "
                   "AutoencoderKL directory, or identity (pixel-space moments [x, 0])")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE batch")
    p.add_argument("--shard-size", type=int, default=1000, help="images per resumable shard")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images and list them in prepare.json")
    p.add_argument("--workers", type=int, default=4, help="image decode/crop/PNG worker processes (0: none)")
    p.add_argument("--device", default=None, help="torch device for the VAE (default cuda:LOCAL_RANK or cpu)")
    p.add_argument("--png-compress-level", type=int, default=0, choices=range(10), metavar="0..9",
                   help="PNG zlib level; 0 (uncompressed) as REPA's dataset_tools.py")
    a = p.parse_args(argv)
    if a.workers < 0:
        p.error(f"--workers={a.workers}: expected 0 or more")
    from fastrepa.vae import VAENotFoundError
    try:
        report = prepare(a.source, a.dest, a.resolution, a.vae, a.batch_size, a.shard_size, a.skip_bad,
                         a.workers, a.device, png_compress_level=a.png_compress_level)
    except (PrepareError, VAENotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if report is not None:
        print(f"wrote {report['num_written']} images of {report['num_classes']} classes to {a.dest}"
              + (f"; skipped {report['num_skipped']} unreadable file(s), listed in prepare.json"
                 if report["num_skipped"] else ""))
        dest = a.dest.rstrip("/\\") or a.dest
        print(f"train on it with --data-dir {a.dest}, or pack it for faster loading: python -m fastrepa.data.pack "
              f"{a.dest} {dest}-packed --image-format raw (exact pixels) or jpeg (~4-8x smaller), then "
              f"--data-dir {dest}-packed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
