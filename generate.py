"""Sample from a checkpoint and write PNGs plus the ADM-style .npz. Flags follow the official REPA generate.py.

    python generate.py --ckpt runs/demo/checkpoints/0001000.pt --num-fid-samples 100 --mode sde --num-steps 250
"""
import argparse
import os
import sys

import numpy as np


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint .pt in the official REPA layout")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights to sample from")
    p.add_argument("--sample-dir", default="samples", help="output folder")
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True)
    # Model options: default to what the checkpoint's args say.
    p.add_argument("--model", default=None)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--encoder-depth", type=int, default=None)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--fused-attn", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--kernels", choices=("auto", "triton", "torch"), default="auto",
                   help="fused ops: Triton kernels on CUDA (auto, triton) or the PyTorch reference (torch)")
    p.add_argument("--rope", action=argparse.BooleanOptionalAction, default=None,
                   help="2D RoPE on q/k (default: the checkpoint's)")
    p.add_argument("--projector-embed-dims", default=None,
                   help="accepted for compatibility; the projector sizes are read from the checkpoint")
    p.add_argument("--legacy", action=argparse.BooleanOptionalAction, default=False,
                   help="accepted for compatibility; the legacy layout is detected from the keys")
    p.add_argument("--vae", default=None,
                   help="latent decoder (default: the checkpoint's; official checkpoints: ema, the SD-VAE)")
    p.add_argument("--per-proc-batch-size", type=int, default=32)
    p.add_argument("--num-fid-samples", type=int, default=50_000)
    p.add_argument("--mode", choices=("ode", "sde"), default="ode")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--path-type", choices=("linear", "cosine"), default=None)
    p.add_argument("--num-steps", type=int, default=50)
    p.add_argument("--heun", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--guidance-low", type=float, default=0.0)
    p.add_argument("--guidance-high", type=float, default=1.0)
    p.add_argument("--png", action=argparse.BooleanOptionalAction, default=True, help="also write PNG files")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    for name, ok, want in (("per-proc-batch-size", a.per_proc_batch_size >= 1, "a positive integer"),
                           ("num-fid-samples", a.num_fid_samples >= 1, "a positive integer"),
                           ("num-steps", a.num_steps >= (2 if a.mode == "sde" else 1),
                            "at least 2 for --mode sde, 1 for ode"),
                           ("cfg-scale", a.cfg_scale >= 1.0, "a number >= 1 (1 disables guidance)"),
                           ("guidance-low", 0 <= a.guidance_low <= a.guidance_high <= 1,
                            "0 <= --guidance-low <= --guidance-high <= 1")):
        if not ok:
            parser.error(f"--{name}: expected {want}")
    if not os.path.isfile(a.ckpt):
        parser.error(f"--ckpt {a.ckpt}: no such file")

    import torch
    from tqdm import tqdm

    from fastrepa.generation import generate, model_from_checkpoint, write_npz, write_pngs
    from fastrepa.vae import load_vae

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = a.tf32
    overrides = {"model": a.model, "num_classes": a.num_classes, "encoder_depth": a.encoder_depth,
                 "qk_norm": a.qk_norm, "rope": a.rope, "kernels": a.kernels, "input_size": a.resolution // 8 if a.resolution else None}
    if a.fused_attn is not None:
        overrides["attn_backend"] = "sdpa" if a.fused_attn else "math"
    model, args = model_from_checkpoint(a.ckpt, a.weights, overrides)
    model.to(device)
    try:
        vae = load_vae(a.vae or args.get("vae") or "ema").to(device)
    except NotImplementedError as e:
        parser.error(f"--vae: {e}")
    path_type = a.path_type or args.get("path_type") or "linear"

    ckpt_name = os.path.splitext(os.path.basename(a.ckpt))[0]
    model_name = (a.model or args.get("model") or "SiT").replace("/", "-")
    folder = os.path.join(a.sample_dir, f"{model_name}-{ckpt_name}-cfg-{a.cfg_scale}-seed-{a.global_seed}-{a.mode}")
    bar = tqdm(total=a.num_fid_samples, desc="sampling", unit="img", disable=None)
    chunks = []
    for start, images in generate(model, vae, num_samples=a.num_fid_samples, batch_size=a.per_proc_batch_size,
                                  mode=a.mode, num_steps=a.num_steps, cfg_scale=a.cfg_scale,
                                  guidance_low=a.guidance_low, guidance_high=a.guidance_high, heun=a.heun,
                                  path_type=path_type, seed=a.global_seed,
                                  latents_scale=args.get("latents_scale", 0.18215),
                                  latents_bias=args.get("latents_bias", 0.0), device=device, progress=bar):
        chunks.append(images.numpy())
        if a.png:
            write_pngs(images, start, folder)
    bar.close()
    os.makedirs(a.sample_dir, exist_ok=True)
    write_npz(np.concatenate(chunks), folder + ".npz")
    print(f"wrote {a.num_fid_samples} samples to {folder}.npz" + (f" and {folder}/" if a.png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
