"""Fused ops of fastrepa, imported as `fastrepa.kernels`.

Each op lives in its own module as three things side by side (docs/design.md, "The fused-op rule"),
in this order in every file: `<op>_reference` (plain PyTorch, the definition of its semantics), the
Triton forward/backward kernels, their launch helpers and torch.library custom ops with autograd, and
the public `<op>(..., impl="auto")` that the model calls. `impl` is "triton", "torch" or "auto"
(Triton on CUDA, the reference elsewhere); see `_dispatch.py`.
"""
from ._dispatch import IMPLS, check_impl, use_triton
from .adaln import (
    gated_residual,
    gated_residual_layernorm_modulate,
    gated_residual_layernorm_modulate_reference,
    gated_residual_reference,
    layernorm_modulate,
    layernorm_modulate_reference,
)
from .align_loss import alignment_loss, alignment_loss_reference
from .projector import bias_silu, bias_silu_reference, projector, projector_reference
from .qk_norm_rope import qk_norm_rope, qk_norm_rope_reference

__all__ = [
    "IMPLS",
    "alignment_loss",
    "alignment_loss_reference",
    "bias_silu",
    "bias_silu_reference",
    "check_impl",
    "gated_residual",
    "gated_residual_layernorm_modulate",
    "gated_residual_layernorm_modulate_reference",
    "gated_residual_reference",
    "layernorm_modulate",
    "layernorm_modulate_reference",
    "projector",
    "projector_reference",
    "qk_norm_rope",
    "qk_norm_rope_reference",
    "use_triton",
]
