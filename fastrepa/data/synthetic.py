"""The embedded demo dataset: class-conditional 32x32 shapes, written in the official REPA layout.

Ten classes (circle, square, triangle, plus, ring, horizontal / vertical / diagonal stripes,
checkerboard, two dots) with random colours, sizes and positions, generated deterministically from a
seed. The "latents" are the pixels themselves (an identity VAE: moments = [image / 127.5 - 1, 0]), so
the demo trains in pixel space with no weights to download.

    python -m fastrepa.data.synthetic --out runs/demo/data --num-images 2000
"""
import argparse
import json
import os

import numpy as np
from PIL import Image

CLASSES = ("circle", "square", "triangle", "plus", "ring", "h-stripes", "v-stripes", "d-stripes",
           "checker", "two-dots")


def draw(label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One uint8 [size, size, 3] image of class `label`."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    bg = rng.uniform(0, 60, 3)
    fg = rng.uniform(120, 255, 3)
    cx, cy = rng.uniform(0.35, 0.65, 2) * size
    r = rng.uniform(0.2, 0.32) * size
    period = rng.uniform(5, 9)
    name = CLASSES[label]
    if name == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2
    elif name == "square":
        mask = (abs(xx - cx) < r * 0.85) & (abs(yy - cy) < r * 0.85)
    elif name == "triangle":
        mask = (yy < cy + r * 0.8) & (yy - (cy - r) > 2 * abs(xx - cx))
    elif name == "plus":
        w = r * 0.35
        mask = ((abs(xx - cx) < w) & (abs(yy - cy) < r)) | ((abs(yy - cy) < w) & (abs(xx - cx) < r))
    elif name == "ring":
        d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        mask = (d < r) & (d > r * 0.55)
    elif name == "h-stripes":
        mask = np.sin(2 * np.pi * yy / period + rng.uniform(0, 6.3)) > 0
    elif name == "v-stripes":
        mask = np.sin(2 * np.pi * xx / period + rng.uniform(0, 6.3)) > 0
    elif name == "d-stripes":
        mask = np.sin(2 * np.pi * (xx + yy) / (1.4 * period) + rng.uniform(0, 6.3)) > 0
    elif name == "checker":
        cell = int(rng.integers(4, 8))
        mask = ((xx // cell + yy // cell) % 2) == 0
    else:  # two dots
        dx = r * 0.9
        mask = ((xx - cx + dx) ** 2 + (yy - cy) ** 2 < (r * 0.45) ** 2) | \
               ((xx - cx - dx) ** 2 + (yy - cy) ** 2 < (r * 0.45) ** 2)
    img = np.where(mask[..., None], fg, bg)
    img = img + rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_dataset(out: str, num_images: int = 2000, seed: int = 0, size: int = 32) -> str:
    """Write `num_images` images (labels cycle over the classes) in the REPA layout; returns `out`.

    Layout: out/images/00000/img00000000.png, out/vae-sd/00000/img-mean-std-00000000.npy (float32
    [6, size, size] = [mean | std]) and dataset.json ({"labels": [[fname, label], ...]}) in both folders,
    keyed by the path relative to that folder, as the official dataset tools write it. An existing,
    complete dataset with the same settings is kept as it is.
    """
    marker = os.path.join(out, "synthetic.json")
    settings = {"num_images": num_images, "seed": seed, "size": size, "classes": list(CLASSES)}
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == settings:
                return out
    img_labels, feat_labels = [], []
    for i in range(num_images):
        label = i % len(CLASSES)
        rng = np.random.default_rng([seed, i])
        img = draw(label, rng, size)
        shard = f"{i // 1000:05d}"
        img_name = f"{shard}/img{i:08d}.png"
        feat_name = f"{shard}/img-mean-std-{i:08d}.npy"
        os.makedirs(os.path.join(out, "images", shard), exist_ok=True)
        os.makedirs(os.path.join(out, "vae-sd", shard), exist_ok=True)
        Image.fromarray(img).save(os.path.join(out, "images", img_name))
        mean = img.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
        np.save(os.path.join(out, "vae-sd", feat_name), np.concatenate([mean, np.zeros_like(mean)]))
        img_labels.append([img_name, label])
        feat_labels.append([feat_name, label])
    for sub, labels in (("images", img_labels), ("vae-sd", feat_labels)):
        with open(os.path.join(out, sub, "dataset.json"), "w") as f:
            json.dump({"labels": labels}, f)
    with open(marker, "w") as f:
        json.dump(settings, f)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (REPA layout)")
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.num_images < 1:
        p.error(f"--num-images={args.num_images}: expected a positive integer")
    write_dataset(args.out, args.num_images, args.seed)
    print(f"wrote {args.num_images} images to {args.out}")


if __name__ == "__main__":
    main()
