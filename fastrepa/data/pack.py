"""Convert an official-layout REPA folder (or another pack) into the packed layout (fastrepa.data.packed).

    python -m fastrepa.data.pack SRC DST [--image-format raw|jpeg] [--jpeg-quality 95] [--chunk 1024]
                                 [--workers 4] [--verify]

SRC is what fastrepa.data.open_dataset opens: an official folder (images/, vae-sd/, vae-sd/dataset.json,
as python -m fastrepa.data.prepare writes it) or a packed folder (to change the image format). Sample i
of DST is sample i of SRC. With --image-format jpeg a source image that already is an RGB JPEG file is
stored byte for byte; any other image is encoded with PIL at --jpeg-quality with 4:4:4 chroma (no
subsampling), so the pack's pixels are those of that JPEG, not of the source PNG.

Crash safety and resume: the data files are written under DST/.pack/ (temporary names) in chunks of
--chunk samples; after each chunk the files are flushed and DST/.pack/state.json (written atomically)
records how many samples are done. A rerun with the same SRC and settings continues from there. When
every sample is written the files are hashed (sha256), renamed into DST, and manifest.json is written
last, atomically: a DST without manifest.json is never mistaken for a complete pack.
"""
import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
from PIL import Image

from fastrepa.data.folder import REPAFolderDataset
from fastrepa.io import write_json
from fastrepa.data.packed import (FILES, FORMAT_NAME, FORMAT_VERSION, IMAGE_FORMATS, MANIFEST, PackedDataset,
                                  sha256_file)

STATE_DIR = ".pack"


class PackError(ValueError):
    """Bad input or settings for packing; the message names the file, folder or flag."""


def _source_name(ds, i: int) -> str:
    if isinstance(ds, REPAFolderDataset):
        return os.path.join(ds.images_dir, ds.image_fnames[i])
    return ds.describe(i, "image")


def _source_digest(ds) -> str:
    """What identifies the source's content listing (names and labels; checksums for a pack)."""
    h = hashlib.sha256()
    if isinstance(ds, REPAFolderDataset):
        for a, b, y in zip(ds.image_fnames, ds.feature_fnames, ds.labels.tolist()):
            h.update(f"{a}\t{b}\t{y}\n".encode())
    else:
        h.update(json.dumps(ds.manifest["files"], sort_keys=True).encode())
    return h.hexdigest()


def _rgb_jpeg(ds, i: int):
    """The source's own JPEG bytes for sample i when it is an RGB JPEG file, else None."""
    if isinstance(ds, PackedDataset):
        return ds.jpeg_bytes(i).tobytes() if ds.image_format == "jpeg" else None
    name = ds.image_fnames[i]
    if not name.lower().endswith((".jpg", ".jpeg")):
        return None
    with open(os.path.join(ds.images_dir, name), "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as im:
        return data if im.format == "JPEG" and im.mode == "RGB" else None


def encode_jpeg(hwc: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(hwc).save(buf, format="jpeg", quality=quality, subsampling=0)
    return buf.getvalue()


class _Reader(torch.utils.data.Dataset):
    """Sample i of the source, ready to write: (i, image HWC uint8 or JPEG bytes, moments, error)."""

    def __init__(self, ds, image_format: str, quality: int):
        self.ds, self.image_format, self.quality = ds, image_format, quality

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        try:
            hwc = np.ascontiguousarray(self.ds.load_image(i).transpose(1, 2, 0))
            moments = np.ascontiguousarray(self.ds.load_moments(i))
            if self.image_format == "raw":
                return i, hwc, moments, None, None
            data = _rgb_jpeg(self.ds, i)
            copied = data is not None
            return i, hwc.shape, moments, data if copied else encode_jpeg(hwc, self.quality), copied
        except Exception as e:  # noqa: BLE001 - reported with the file name by the main process
            return i, None, None, f"{type(e).__name__}: {e}", "error"


def _collate(batch):
    return batch


def _check_dst(dst: str, settings: dict):
    """The saved state to resume from, {} for a fresh start, or None when DST is already complete."""
    state_path = os.path.join(dst, STATE_DIR, "state.json")
    if os.path.isfile(os.path.join(dst, MANIFEST)):
        with open(os.path.join(dst, MANIFEST)) as f:
            old = json.load(f).get("pack_settings")
        if old == settings:
            return None
        raise PackError(f"{dst} already holds a complete pack with other settings or another source: give a new "
                        f"DST (or delete {dst})")
    if os.path.isfile(state_path):
        with open(state_path) as f:
            state = json.load(f)
        if state.get("settings") == settings:
            return state
        diff = next(k for k in settings if state.get("settings", {}).get(k) != settings[k])
        raise PackError(f"{dst} holds an unfinished pack with other settings ({diff}: "
                        f"{state.get('settings', {}).get(diff)!r} there, {settings[diff]!r} now): rerun with the same "
                        f"settings to resume, or give a new DST")
    if os.path.isdir(dst) and [e for e in os.listdir(dst) if e != STATE_DIR]:
        raise PackError(f"{dst} is not empty and holds no pack: give an empty or new folder")
    return {}


def pack(src: str, dst: str, image_format: str = "raw", jpeg_quality: int = 95, chunk: int = 1024,
         workers: int = 0, verify: bool = False, progress: bool | None = None) -> dict:
    """Pack the dataset at `src` into `dst` (see the module docstring); returns the manifest."""
    from fastrepa.data.loader import open_dataset

    if image_format not in IMAGE_FORMATS:
        raise PackError(f"--image-format={image_format!r}: expected one of {', '.join(IMAGE_FORMATS)}")
    if not 1 <= jpeg_quality <= 100:
        raise PackError(f"--jpeg-quality={jpeg_quality}: expected 1..100")
    if chunk < 1 or workers < 0:
        raise PackError(f"--chunk={chunk} / --workers={workers}: expected chunk >= 1 and workers >= 0")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise PackError(f"SRC and DST are the same folder {src}")
    t0 = time.time()
    ds = open_dataset(src)
    n = len(ds)
    image0, moments0 = ds.load_image(0), ds.load_moments(0)
    if image0.dtype != np.uint8 or image0.ndim != 3 or image0.shape[0] != 3:
        raise PackError(f"image {_source_name(ds, 0)} is {image0.dtype} {list(image0.shape)}; expected uint8 RGB "
                        f"[3, H, W]")
    image_shape, moments_shape, moments_dtype = list(image0.shape), list(moments0.shape), moments0.dtype
    settings = {"source": os.path.abspath(src), "source_digest": _source_digest(ds), "count": n,
                "image_format": image_format, "jpeg_quality": jpeg_quality if image_format == "jpeg" else None}
    state = _check_dst(dst, settings)
    if state is None:
        with open(os.path.join(dst, MANIFEST)) as f:
            return json.load(f)
    state_dir = os.path.join(dst, STATE_DIR)
    os.makedirs(state_dir, exist_ok=True)
    names = FILES[image_format]
    tmp = {role: os.path.join(state_dir, name + ".partial") for role, name in names.items()}
    final = {role: os.path.join(dst, name) for role, name in names.items()}
    if not state:
        state = {"settings": settings, "done": 0, "jpeg_bytes": 0, "jpeg_copied": 0}
        write_json(os.path.join(state_dir, "state.json"), state)
        for path in tmp.values():  # leftovers of a run killed before its first state file
            if os.path.exists(path):
                os.remove(path)
    if state["done"] < n:
        _write_samples(ds, src, state, tmp, image_format, jpeg_quality, image_shape, moments_shape, moments_dtype,
                       chunk, workers, progress, os.path.join(state_dir, "state.json"))
    files = {}
    for role, name in names.items():  # a run killed while renaming has moved some files already
        path = tmp[role] if os.path.exists(tmp[role]) else final[role]
        entry = {"path": name, "bytes": os.path.getsize(path), "sha256": sha256_file(path)}
        if name.endswith(".npy"):
            arr = np.load(path, mmap_mode="r")
            entry.update(dtype=str(arr.dtype), shape=list(arr.shape))
            del arr
        files[role] = entry
    for role in names:
        if os.path.exists(tmp[role]):
            os.replace(tmp[role], final[role])
    copied, H, W = state["jpeg_copied"], image_shape[1], image_shape[2]
    labels = np.load(os.path.join(dst, names["labels"]))
    manifest = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "count": n, "image_format": image_format,
        "image_shape": image_shape, "resolution": H if H == W else None, "image_layout": "HWC uint8 RGB",
        "moments_shape": moments_shape, "moments_dtype": str(moments_dtype), "labels_dtype": "int64",
        "num_classes": int(labels.max()) + 1,
        "jpeg": ({"quality": jpeg_quality, "subsampling": "4:4:4 (for encoded images)", "copied_verbatim": copied,
                  "encoded": n - copied} if image_format == "jpeg" else None),
        "files": files, "pack_settings": settings, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds_last_run": round(time.time() - t0, 3),
    }
    write_json(os.path.join(dst, MANIFEST), manifest)
    shutil.rmtree(state_dir, ignore_errors=True)
    if verify:
        PackedDataset(dst, verify=True)
    return manifest


def _write_samples(ds, src, state, tmp, image_format, quality, image_shape, moments_shape, moments_dtype, chunk,
                   workers, progress, state_path):
    """Write samples state["done"]..N-1 into the temporary files, committing state after every chunk."""
    n, fresh = len(ds), state["done"] == 0
    mode, fmt = ("w+" if fresh else "r+"), np.lib.format
    H, W = image_shape[1], image_shape[2]
    arrays = {"moments": fmt.open_memmap(tmp["moments"], mode, moments_dtype, (n, *moments_shape)),
              "labels": fmt.open_memmap(tmp["labels"], mode, np.int64, (n,))}
    blob = None
    if image_format == "raw":
        arrays["images"] = fmt.open_memmap(tmp["images"], mode, np.uint8, (n, H, W, 3))
    else:
        arrays["image_offsets"] = fmt.open_memmap(tmp["image_offsets"], mode, np.int64, (n + 1,))
        arrays["image_offsets"][0] = 0
        blob = open(tmp["images"], "w+b" if fresh else "r+b")
        blob.truncate(state["jpeg_bytes"])  # drop what a killed run wrote past its last committed chunk
        blob.seek(0, os.SEEK_END)
    from tqdm import tqdm
    bar = tqdm(total=n, initial=state["done"], desc="pack", unit="img",
               disable=None if progress is None else not progress)
    reader = _Reader(ds, image_format, quality)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(reader, range(state["done"], n)),
                                         batch_size=chunk, num_workers=workers, collate_fn=_collate)
    try:
        for batch in loader:
            for i, img, moments, data, how in batch:
                if how == "error":
                    raise PackError(f"cannot read sample {i} ({_source_name(ds, i)}): {data}")
                hwc = img.shape if image_format == "raw" else img
                if [hwc[2], hwc[0], hwc[1]] != image_shape:
                    raise PackError(f"image {_source_name(ds, i)} is {[hwc[2], hwc[0], hwc[1]]}, expected "
                                    f"{image_shape} like the first image: a pack holds images of one size")
                if list(moments.shape) != moments_shape or moments.dtype != moments_dtype:
                    raise PackError(f"latents of sample {i} are {moments.dtype} {list(moments.shape)}, expected "
                                    f"{moments_dtype} {moments_shape} like sample 0 (in {src})")
                arrays["moments"][i] = moments
                arrays["labels"][i] = ds.labels[i]
                if image_format == "raw":
                    arrays["images"][i] = img
                else:
                    blob.write(data)
                    arrays["image_offsets"][i + 1] = blob.tell()
                    state["jpeg_copied"] += bool(how)
            for a in arrays.values():
                a.flush()
            if blob is not None:
                blob.flush()
                os.fsync(blob.fileno())
                state["jpeg_bytes"] = blob.tell()
            state["done"] = batch[-1][0] + 1
            write_json(state_path, state)
            bar.update(len(batch))
    finally:
        bar.close()
        if blob is not None:
            blob.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastrepa.data.pack", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("src", help="official REPA folder (images/, vae-sd/) or a packed folder")
    p.add_argument("dst", help="output folder (packed layout); a rerun resumes it")
    p.add_argument("--image-format", default="raw", choices=IMAGE_FORMATS,
                   help="raw: uint8 [N, H, W, 3], exact; jpeg: JPEG bytes + offsets, ~4-8x smaller (default raw)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="quality of encoded JPEGs (default 95, 4:4:4)")
    p.add_argument("--chunk", type=int, default=1024, help="samples per resumable chunk (default 1024)")
    p.add_argument("--workers", type=int, default=4, help="reader/encoder processes (0: none; default 4)")
    p.add_argument("--verify", action="store_true", help="reopen the pack and check every sha256 at the end")
    a = p.parse_args(argv)
    try:
        m = pack(a.src, a.dst, a.image_format, a.jpeg_quality, a.chunk, a.workers, a.verify)
    except (PackError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(f["bytes"] for f in m["files"].values())
    print(f"packed {m['count']} samples ({m['image_format']} images {m['image_shape']}, moments "
          f"{m['moments_dtype']} {m['moments_shape']}) into {a.dst}: {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
