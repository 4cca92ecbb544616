"""Latent <-> image conversion.

`identity` is the pixel-space "VAE" of the embedded demo: latents are images in [-1, 1]. SD-VAE
(diffusers AutoencoderKL from local files) joins with the data issue. Decoding to uint8 follows the
official protocol: (x + 1) / 2, clamp(255 x, 0, 255), then truncation (not rounding).
"""
import numpy as np
import torch
from PIL import Image


class IdentityVAE(torch.nn.Module):
    """Latents are the images themselves, scaled to [-1, 1]."""

    def encode(self, images):
        return images

    def decode(self, latents):
        return latents


def load_vae(name: str) -> torch.nn.Module:
    if name == "identity":
        return IdentityVAE()
    raise NotImplementedError(f"VAE {name!r} (the SD-VAE decoder) is not available in this version yet; "
                              f"available: identity")


def decode_to_uint8(vae, latents, latents_scale: float, latents_bias: float) -> torch.Tensor:
    """Latents [N, C, h, w] -> uint8 images [N, H, W, 3] on the CPU, as the official generate.py."""
    x = vae.decode((latents - latents_bias) / latents_scale)
    if x.shape[1] != 3:
        raise ValueError(f"the {type(vae).__name__} decoder gave {x.shape[1]}-channel images, expected RGB: "
                         f"the model's latents ({latents.shape[1]} channels) do not fit this VAE (--vae)")
    x = (x.float() + 1) / 2
    return torch.clamp(255.0 * x, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)


def save_grid(images: torch.Tensor, path: str, nrow: int | None = None, pad: int = 2) -> None:
    """uint8 [N, H, W, 3] -> one PNG grid with `nrow` images per row."""
    n, h, w, c = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images.numpy()):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    Image.fromarray(grid).save(path)
