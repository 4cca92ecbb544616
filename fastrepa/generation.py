"""Sampling from a checkpoint: build the model the checkpoint describes, draw per-index noise and labels,
run a sampler, decode, and write PNGs and the ADM-style .npz (arr_0 uint8 [N, H, W, 3]).

Sample i's initial noise and class label come from a generator seeded by (seed, i), so a sample does
not depend on the batch it falls in.
"""
import os
import re

import numpy as np
import torch
from PIL import Image

from fastrepa.checkpoint import load_checkpoint_file, load_weights, normalize_keys, select_weights
from fastrepa.models import OVERRIDES, build_model
from fastrepa.sampling import euler_maruyama_sampler, euler_sampler
from fastrepa.train.rng import step_seed
from fastrepa.vae import decode_to_uint8

MODES = ("ode", "sde")


def projector_dims(state_dict: dict) -> tuple[list[int], int | None]:
    """(z_dims, projector_dim) read off the `projectors.K.*` weights, so no --projector-embed-dims is needed."""
    outs, hidden = {}, None
    for k, v in state_dict.items():
        m = re.fullmatch(r"projectors\.(\d+)\.4\.weight", k)
        if m:
            outs[int(m.group(1))] = v.shape[0]
        if re.fullmatch(r"projectors\.\d+\.0\.weight", k):
            hidden = v.shape[0]
    return [outs[i] for i in sorted(outs)], hidden


def model_from_checkpoint(path: str, weights: str = "ema", overrides: dict | None = None):
    """(model in eval mode, checkpoint args as a dict). `overrides` (model option -> value) win over the
    checkpoint's args; z_dims and projector_dim come from the weights themselves."""
    ckpt = load_checkpoint_file(path)
    args = dict(ckpt.get("args") or {})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    name = overrides.pop("model", None) or args.get("model") or "SiT-XL/2"
    # The attention backend and the fused-op implementation are this machine's choice (overrides), not
    # the training run's.
    kw = {k: args[k] for k in OVERRIDES if k not in ("attn_backend", "kernels") and args.get(k) is not None}
    if "input_size" not in kw and args.get("resolution"):
        kw["input_size"] = int(args["resolution"]) // 8
    kw.update(overrides)
    sd = normalize_keys(select_weights(ckpt, weights, source=path), kw.get("encoder_depth", 8))
    z_dims, hidden = projector_dims(sd)
    kw["z_dims"] = z_dims
    if hidden is not None:
        kw["projector_dim"] = hidden
    model = build_model(name, **kw)
    load_weights(model, sd, source=f"{path} [{weights}]")
    return model.eval(), args


def noise_and_labels(indices, shape, num_classes: int, seed: int, device):
    """Initial noise [n, *shape] and labels [n] of the given sample indices, each from its own generator."""
    zs, ys = [], []
    for i in indices:
        g = torch.Generator().manual_seed(step_seed(seed, 0, int(i)))
        zs.append(torch.randn(shape, generator=g))
        ys.append(int(torch.randint(0, num_classes, (1,), generator=g)))
    return torch.stack(zs).to(device), torch.tensor(ys, device=device)


@torch.no_grad()
def generate(model, vae, *, num_samples: int, batch_size: int, mode: str = "ode", num_steps: int = 50,
             cfg_scale: float = 1.5, guidance_low: float = 0.0, guidance_high: float = 1.0, heun: bool = False,
             path_type: str = "linear", seed: int = 0, latents_scale: float = 0.18215, latents_bias: float = 0.0,
             device=None, progress=None):
    """Yield (first index, uint8 images [n, H, W, 3]) batch by batch for indices 0..num_samples-1."""
    if mode not in MODES:
        raise ValueError(f"--mode={mode!r}: expected one of {MODES}")
    device = device or next(model.parameters()).device
    size, ch = model.x_embedder.grid_size * model.patch_size, model.in_channels
    dtype = next(model.parameters()).dtype
    for start in range(0, num_samples, batch_size):
        idx = range(start, min(start + batch_size, num_samples))
        z, y = noise_and_labels(idx, (ch, size, size), model.num_classes, seed, device)
        kwargs = dict(num_steps=num_steps, cfg_scale=cfg_scale, guidance_low=guidance_low,
                      guidance_high=guidance_high, path_type=path_type, null_class=model.num_classes)
        if mode == "ode":
            x = euler_sampler(model.velocity, z.to(dtype), y, heun=heun, **kwargs)
        else:
            g = torch.Generator().manual_seed(step_seed(seed, 1, start))
            x = euler_maruyama_sampler(model.velocity, z.to(dtype), y, generator=g, **kwargs)
        images = decode_to_uint8(vae, x.float(), latents_scale, latents_bias)
        if progress is not None:
            progress.update(len(idx))
        yield start, images


def write_pngs(images: torch.Tensor, start: int, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for j, img in enumerate(images.numpy()):
        Image.fromarray(img).save(os.path.join(folder, f"{start + j:06d}.png"))


def write_npz(images: np.ndarray, path: str) -> None:
    """The ADM evaluator's input: arr_0 uint8 [N, H, W, 3]; written atomically."""
    tmp = path + ".tmp.npz"
    np.savez(tmp, arr_0=images)
    os.replace(tmp, path)
