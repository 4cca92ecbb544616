"""Representation encoders: frozen modules that map raw uint8 images [B, 3, H, W] to patch tokens [B, T, C].

`load_encoder(enc_type, path=None, resolution=256)` is the entry point. Today it knows the embedded
`patch-pixels` encoder (used by the demo and the tests: no weights, no downloads). The pretrained
REPA encoders (dinov2-vit-*, dinov1, mocov3, clip, mae, jepa) need their official weight files and
join with the data issue; asking for one now is an error that says so.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

PRETRAINED = ("dinov2-vit-s", "dinov2-vit-b", "dinov2-vit-l", "dinov2-vit-g", "dinov2-vit-s-reg",
              "dinov2-vit-b-reg", "dinov2-vit-l-reg", "dinov2-vit-g-reg", "dinov1-vit-b", "mocov3-vit-s",
              "mocov3-vit-b", "mocov3-vit-l", "clip-vit-L", "mae-vit-l", "jepa-vit-h")
EMBEDDED = ("patch-pixels",)


class PatchPixelEncoder(nn.Module):
    """Parameter-free encoder: each token is the mean-centred pixels of one patch of the clean image.

    The image is scaled to [-1, 1] and cut into a grid x grid array of patches (row-major, the model's
    token order); each token is the patch's 3*p*p pixel values minus their mean, so the alignment
    target is the local structure of the clean image. It is a stand-in with REPA's interface for the
    demo and tests, not a learned representation.
    """

    def __init__(self, resolution: int, grid: int):
        super().__init__()
        if resolution % grid:
            raise ValueError(f"patch-pixels encoder: resolution {resolution} is not divisible by the token grid {grid}")
        self.patch = resolution // grid
        self.grid = grid
        self.resolution = resolution
        self.embed_dim = 3 * self.patch * self.patch

    @torch.no_grad()
    def forward(self, images):
        if images.shape[-1] != self.resolution or images.shape[-2] != self.resolution:
            raise ValueError(f"patch-pixels encoder expects {self.resolution}x{self.resolution} images, "
                             f"got {tuple(images.shape[-2:])}")
        x = images.float() / 127.5 - 1
        tokens = F.unfold(x, kernel_size=self.patch, stride=self.patch).transpose(1, 2)
        return tokens - tokens.mean(dim=-1, keepdim=True)


def load_encoder(enc_type: str, path=None, resolution: int = 256, grid: int | None = None) -> nn.Module:
    """A frozen encoder in eval mode; `grid` is the model's token grid (default resolution // 16)."""
    grid = grid if grid is not None else resolution // 16
    if enc_type == "patch-pixels":
        enc = PatchPixelEncoder(resolution, grid)
    elif enc_type in PRETRAINED:
        raise NotImplementedError(
            f"encoder {enc_type!r} needs its pretrained weights and is not built into this version yet; "
            f"available now: {', '.join(EMBEDDED)} (or --enc-type none)")
    else:
        raise ValueError(f"unknown encoder {enc_type!r}; known: {', '.join(EMBEDDED + PRETRAINED)}")
    enc.eval().requires_grad_(False)
    return enc
