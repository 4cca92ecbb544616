import math
import os

import pytest
import torch

# Triton kernels run in the CPU interpreter when there is no GPU. This must be set before any
# kernel module is imported (triton.jit reads it at decoration time), hence here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastrepa.models import build_model  # noqa: E402

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4,
            num_classes=10, z_dims=[16, 24], encoder_depth=2, projector_dim=32)


@pytest.fixture
def tiny_kwargs():
    return dict(TINY)


def tiny_model(**kw):
    """A small SiT with non-zero adaLN and final layers, so every path carries signal."""
    torch.manual_seed(0)
    model = build_model("SiT-S/2", **{**TINY, **kw})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer" in name:
                p.normal_(0, 0.05)
    return model


def hand_interpolant(t, path):
    """(alpha, sigma, d_alpha, d_sigma) written out plainly, independent of fastrepa.objectives."""
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    a, s = torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)
    return a, s, -math.pi / 2 * s, math.pi / 2 * a


def make_tiny_vae(path: str, seed: int = 0):
    """A tiny randomly initialised diffusers AutoencoderKL saved to `path` (save_pretrained); returns it."""
    import diffusers

    torch.manual_seed(seed)
    ae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                 up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                 layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32)
    ae.save_pretrained(path)
    return ae.eval()
