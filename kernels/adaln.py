"""adaLN modulation around the SiT block's LayerNorms.

Semantics (official SiT): LayerNorm without affine, eps 1e-6, then `modulate(h) = h * (1 + scale) +
shift` with shift/scale [B, D] broadcast over the T tokens; the residual update is `x + gate * y`.

Design envelope (for the Triton kernels to come): x [B, T, D] with D up to 2048, shift/scale/gate
[B, D]; statistics in fp32 whatever the input dtype, output in the input dtype.
"""
import torch
import torch.nn.functional as F


def layernorm_modulate_reference(x, shift, scale, eps: float = 1e-6):
    """LN(x) * (1 + scale) + shift, LN over the last dim without affine; fp32 inside."""
    h = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    h = h * (1 + scale.float().unsqueeze(1)) + shift.float().unsqueeze(1)
    return h.to(x.dtype)


def gated_residual_reference(x, gate, y):
    """x + gate * y, gate [B, D] broadcast over tokens."""
    return x + gate.unsqueeze(1) * y


def gated_residual_layernorm_modulate_reference(x, gate, y, shift, scale, eps: float = 1e-6):
    """The boundary between attention and MLP: x' = x + gate * y, h = modulate(LN(x')); returns (x', h)."""
    x = gated_residual_reference(x, gate, y)
    return x, layernorm_modulate_reference(x, shift, scale, eps)


def layernorm_modulate(x, shift, scale, eps: float = 1e-6):
    return layernorm_modulate_reference(x, shift, scale, eps)


def gated_residual(x, gate, y):
    return gated_residual_reference(x, gate, y)


def gated_residual_layernorm_modulate(x, gate, y, shift, scale, eps: float = 1e-6):
    return gated_residual_layernorm_modulate_reference(x, gate, y, shift, scale, eps)
