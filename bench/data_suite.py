"""Data suite: loader throughput (images/s) over the dataset layouts, measured in the same run.

A synthetic dataset is written to a temporary folder: N photo-like RGB images (smooth colour fields, soft
blobs, fine texture, sensor noise; not real photos, so JPEG sizes are indicative only) at the resolution,
in the official layout (uncompressed PNG, as prepare.py writes it; float32 moments [8, res/8, res/8];
labels), then packed twice with fastrepa.data.pack: raw uint8 and JPEG (q95, 4:4:4).

Rows (same batch size B, same worker count W, same sampler, same run):
- torch / official / png:   DataLoader(REPAFolderDataset), W worker processes, PIL PNG decode;
- torch / packed / raw:     DataLoader(PackedDataset), memory-mapped uint8, no decode;
- torch / packed / jpeg:    DataLoader(PackedDataset), PIL (libjpeg-turbo) decode;
- dali-cpu / packed / raw and jpeg:  fastrepa.data.dali.DALILoader, device "cpu", W DALI threads;
- dali-gpu / packed / raw and jpeg:  the same on CUDA, JPEG by the "mixed" (nvJPEG / hardware) decoder
  (CUDA only; skipped with a reason on the CPU). DALI rows are skipped when DALI is not installed.
On CUDA every row ends with the batch on the GPU (torch rows: pin_memory + non_blocking copy), so rows
compare what the training step receives.

Method: one loader per row runs `warmup` epochs untimed (worker start-up, pipeline build: reported as
first_batch_s), then `repeats` timed epochs of N // B batches each; images/s = B x batches / epoch time,
median over the repeats (min and max kept). Every row checks that it read the sampler's batches (the
labels of every timed batch against the dataset's labels at the sampler's indices) and the count of
images it was asked for. The files were just written, so they are in the page cache: this measures
decode and copy, not disk reads (bytes/img says what a cold read would cost).
"""
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import torch

from common import BenchUsageError, measure_row, num

CPU_BATCH_SIZES, CUDA_BATCH_SIZES, QUICK_BATCH_SIZES = [64], [64], [16]
FULL = {"resolution": 256, "num_images": 1024}
QUICK = {"resolution": 64, "num_images": 64}
JPEG_QUALITY = 95


class Row:
    def __init__(self, loader, layout, image_format, device):
        self.loader, self.layout, self.image_format, self.device = loader, layout, image_format, device

    @property
    def name(self):
        return f"{self.loader}/{self.layout}/{self.image_format}"


ROWS = [Row("torch", "official", "png", "cpu"), Row("torch", "packed", "raw", "cpu"),
        Row("torch", "packed", "jpeg", "cpu"), Row("dali-cpu", "packed", "raw", "cpu"),
        Row("dali-cpu", "packed", "jpeg", "cpu"), Row("dali-gpu", "packed", "raw", "cuda"),
        Row("dali-gpu", "packed", "jpeg", "cuda")]


# -------------------------------------------------------------------------------------- the data

def photo_like(rng, res):
    """uint8 [res, res, 3]: a colour gradient, soft blobs, fine texture and noise (JPEG-compressible).
    Every term is separable (outer products of 1-D profiles), so a 256x256 image costs a few ms."""
    t = (np.arange(res, dtype=np.float32) + 0.5) / res
    img = (rng.uniform(40, 200, 3).astype(np.float32) + np.multiply.outer(t, rng.uniform(-60, 60, 3))[:, None]
           + np.multiply.outer(t, rng.uniform(-60, 60, 3))[None]).astype(np.float32)
    for _ in range(6):  # soft blobs
        cx, cy, s = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        gy, gx = np.exp(-(t - cy) ** 2 / (2 * s * s)), np.exp(-(t - cx) ** 2 / (2 * s * s))
        img += np.outer(gy, gx)[..., None] * rng.uniform(-90, 90, 3).astype(np.float32)
    for _ in range(3):  # texture: sin(a + b) = sin a cos b + cos a sin b
        (fx, fy), phase, amp = rng.uniform(5, 40, 2), rng.uniform(0, 6.3), rng.uniform(2, 10)
        a, b = 2 * np.pi * fy * t + phase, 2 * np.pi * fx * t
        img += (amp * (np.outer(np.sin(a), np.cos(b)) + np.outer(np.cos(a), np.sin(b))))[..., None].astype(np.float32)
    img += rng.standard_normal(img.shape, dtype=np.float32) * 3
    return np.clip(img, 0, 255).astype(np.uint8)


def write_official(root, n, res, seed=0):
    """The official layout (as prepare.py writes it), with random float32 moments [8, res/8, res/8]."""
    import json

    from PIL import Image

    from fastrepa.data.prepare import feature_name, image_name

    labels = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        for sub, name in (("images", image_name(i)), ("vae-sd", feature_name(i))):
            os.makedirs(os.path.dirname(os.path.join(root, sub, name)), exist_ok=True)
        Image.fromarray(photo_like(rng, res)).save(os.path.join(root, "images", image_name(i)), format="png",
                                                   compress_level=0)
        np.save(os.path.join(root, "vae-sd", feature_name(i)),
                rng.standard_normal((8, res // 8, res // 8), dtype=np.float32))
        labels.append(i % 1000)
    for sub, name in (("images", image_name), ("vae-sd", feature_name)):
        with open(os.path.join(root, sub, "dataset.json"), "w") as f:
            json.dump({"labels": [[name(i), y] for i, y in enumerate(labels)]}, f)
    return root


def build_data(base, n, res):
    """{layout/format: path} and the seconds each took."""
    from fastrepa.data.pack import pack

    paths, seconds = {}, {}
    t0 = time.perf_counter()
    paths["official/png"] = write_official(os.path.join(base, "official"), n, res)
    seconds["official/png"] = time.perf_counter() - t0
    for fmt in ("raw", "jpeg"):
        t0 = time.perf_counter()
        paths[f"packed/{fmt}"] = os.path.join(base, fmt)
        pack(paths["official/png"], paths[f"packed/{fmt}"], fmt, jpeg_quality=JPEG_QUALITY,
             workers=min(4, os.cpu_count() or 1), progress=False)
        seconds[f"packed/{fmt}"] = time.perf_counter() - t0
    return paths, seconds


def image_bytes(path, layout):
    """Bytes on disk of the images (not the moments) of a dataset folder."""
    if layout == "official":
        root = os.path.join(path, "images")
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs
                   if f.endswith(".png"))
    from fastrepa.data.packed import PackedDataset
    m = PackedDataset(path).manifest
    return sum(m["files"][r]["bytes"] for r in ("images", "image_offsets") if r in m["files"])


# ------------------------------------------------------------------------------------- measuring

def skip_reason(row, device):
    if row.device == "cuda" and device.type != "cuda":
        return "needs CUDA: the DALI mixed (GPU) decoder"
    if row.loader.startswith("dali"):
        from fastrepa.data.dali import dali_available
        if not dali_available():
            return "NVIDIA DALI is not installed (pip install fastrepa[dali])"
    return None


def make_loader(row, dataset, sampler, workers, device):
    from fastrepa.data import build_loader

    if row.loader == "torch":
        return build_loader(dataset, sampler, num_workers=workers, pin_memory=device.type == "cuda")
    return build_loader(dataset, sampler, num_workers=workers, backend="dali", device=row.device)


def measure(row, dataset, B, workers, epochs_warmup, repeats, device, seed=0):
    """One row: warm-up epochs, then `repeats` timed epochs; images/s median, order and count checks."""
    from fastrepa.data import StepSampler

    steps = len(dataset) // B
    sampler = StepSampler(len(dataset), B, seed, num_steps=(epochs_warmup + repeats) * steps)
    loader = make_loader(row, dataset, sampler, workers, device)
    cuda = device.type == "cuda"

    def consume(batch):
        if cuda:
            batch = {k: t.to(device, non_blocking=True) for k, t in batch.items()}
        return batch

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    it = iter(loader)
    step = 0
    first_s = None
    order_ok, got_images, times = True, 0, []
    try:
        for _ in range(epochs_warmup * steps):
            consume(next(it))
            step += 1
            if first_s is None:
                sync()
                first_s = time.perf_counter() - t0
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            labels = []
            for _ in range(steps):
                batch = consume(next(it))
                images, y = batch["image"], batch["label"]
                labels.append(y)
                got_images += images.shape[0]
            sync()
            times.append(time.perf_counter() - t)
            for k, y in enumerate(labels):
                want = dataset.labels[sampler.batch(step + k)]
                order_ok &= y.cpu().tolist() == want.tolist()
            step += steps
        shape = list(images.shape)
    finally:
        del it
        if hasattr(loader, "close"):
            loader.close()
    rates = [steps * B / t for t in times]
    return {"images_per_s": statistics.median(rates), "images_per_s_min": min(rates),
            "images_per_s_max": max(rates), "epoch_s": statistics.median(times), "first_batch_s": first_s,
            "steps_per_epoch": steps, "timed_steps": steps * repeats, "images_asked": steps * repeats * B,
            "images_read": got_images, "order_ok": bool(order_ok), "batch_shape": shape}


HEADERS = ["loader", "layout", "format", "decode on", "B", "workers", "img/s", "min", "max", "x torch/official",
           "first batch s", "bytes/img", "images", "note"]


def table_rows(rows):
    out = []
    for r in rows:
        note = "" if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        out.append([r["loader"], r["layout"], r["image_format"], r["decode_on"], r["B"], r["workers"],
                    num(r.get("images_per_s")), num(r.get("images_per_s_min")), num(r.get("images_per_s_max")),
                    "" if r.get("speedup_vs_torch_official") is None else f"{r['speedup_vs_torch_official']:.2f}",
                    "" if r.get("first_batch_s") is None else f"{r['first_batch_s']:.2f}",
                    r.get("bytes_per_image"), r.get("images_read"), note])
    return out


def plan(args, ctx):
    on_cuda = ctx.device.type == "cuda"
    sizes = dict(QUICK if ctx.quick else FULL)
    batches = args.batch_sizes or (QUICK_BATCH_SIZES if ctx.quick else (CUDA_BATCH_SIZES if on_cuda else
                                                                         CPU_BATCH_SIZES))
    too_big = [b for b in batches if b > sizes["num_images"]]
    if too_big:
        raise BenchUsageError(f"--batch-sizes {too_big}: the data suite's dataset holds {sizes['num_images']} images "
                              f"({'--quick' if ctx.quick else 'full'}); use batch sizes up to that")
    workers = getattr(args, "workers", None) or min(8, os.cpu_count() or 1)
    repeats = args.repeats or 3
    return sizes, batches, workers, repeats


def run(args, ctx):
    """The data suite; returns its result dict for run.py to write."""
    from fastrepa.data import open_dataset

    sizes, batches, workers, repeats = plan(args, ctx)
    warmup = 1
    n, res = sizes["num_images"], sizes["resolution"]
    base = tempfile.mkdtemp(prefix="fastrepa-data-bench-")
    rows = []
    try:
        paths, build_s = build_data(base, n, res)
        datasets = {key: open_dataset(p) for key, p in paths.items()}
        nbytes = {key: image_bytes(p, key.split("/")[0]) for key, p in paths.items()}
        for B in batches:
            for spec in ROWS:
                key = f"{spec.layout}/{spec.image_format}"
                decode_on = {"png": "cpu (PIL)", "raw": "none"}.get(spec.image_format) or (
                    "cpu (PIL)" if spec.loader == "torch" else
                    "cpu (DALI)" if spec.device == "cpu" else "gpu (DALI mixed)")
                row = {"loader": spec.loader, "layout": spec.layout, "image_format": spec.image_format,
                       "decode_on": decode_on, "device": spec.device, "B": B, "workers": workers,
                       "num_images": n, "resolution": res, "bytes_per_image": round(nbytes[key] / n),
                       "status": None, "reason": None, "images_per_s": None}
                def checked(spec=spec, key=key, B=B):
                    got = measure(spec, datasets[key], B, workers, warmup, repeats, ctx.device)
                    if not (got["order_ok"] and got["images_read"] == got["images_asked"]):
                        got.update(status="error", reason="read other batches than the sampler's (order or count)")
                    return got
                measure_row(rows, row, skip_reason(spec, ctx.device), checked, f"[data] {spec.name} B={B}",
                            lambda r: f"{r['images_per_s']:.1f} img/s")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    ok = {(r["B"], r["loader"], r["image_format"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        base_row = ok.get((r["B"], "torch", "png"))
        r["speedup_vs_torch_official"] = (r["images_per_s"] / base_row["images_per_s"]
                                          if base_row and r["status"] == "ok" else None)
    notes = [f"Synthetic photo-like images, {n} at {res}x{res}; official = PNG level 0 (as prepare.py), packed "
             f"raw = uint8 memory map, packed jpeg = q{JPEG_QUALITY} 4:4:4; moments float32 [8, {res // 8}, "
             f"{res // 8}]. Files in the page cache: decode + copy, not disk. Build: "
             + ", ".join(f"{k} {v:.1f} s" for k, v in build_s.items()) + "."]
    notes += format_verdicts(ok, batches)
    reduced = ctx.quick or res != FULL["resolution"]
    return {
        "reduced": reduced,
        "reduced_reason": (f"--quick: {n} images at {res}x{res}, a smoke test of the bench, not performance numbers"
                           if ctx.quick else None),
        "batch_sizes": batches, "workers": workers, "num_images": n, "resolution": res,
        "jpeg_quality": JPEG_QUALITY, "repeats": repeats, "warmup": warmup,
        "timer": (f"time.perf_counter around each timed epoch ({n} // B batches), median of {repeats} epochs after "
                  f"{warmup} warm-up epoch" + ("; CUDA synchronised, batches copied to the GPU" if
                                                ctx.device.type == "cuda" else "")),
        "notes": notes, "rows": rows, "table": {"headers": HEADERS, "rows": table_rows(rows)},
    }


def format_verdicts(ok, batches):
    """The JPEG vs raw conclusion per loader, from this run's rows."""
    notes = []
    for B in batches:
        for loader in ("torch", "dali-cpu", "dali-gpu"):
            raw, jpeg = ok.get((B, loader, "raw")), ok.get((B, loader, "jpeg"))
            if not (raw and jpeg):
                continue
            faster, ratio = ("raw uint8", raw["images_per_s"] / jpeg["images_per_s"]) \
                if raw["images_per_s"] >= jpeg["images_per_s"] else ("JPEG", jpeg["images_per_s"] / raw["images_per_s"])
            size = raw["bytes_per_image"] / jpeg["bytes_per_image"]
            notes.append(f"{loader}, B={B}: {faster} is faster on this machine ({ratio:.2f}x: raw "
                         f"{num(raw['images_per_s'])} vs JPEG {num(jpeg['images_per_s'])} img/s); raw is {size:.1f}x "
                         f"the bytes ({raw['bytes_per_image']} vs {jpeg['bytes_per_image']} B/img): uncached, raw "
                         f"needs {num(raw['images_per_s'] * raw['bytes_per_image'] / 1e6)} MB/s of disk reads at "
                         f"its measured rate.")
    return notes
