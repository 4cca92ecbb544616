"""Fused ops of fastrepa, imported as `fastrepa.kernels`.

Each op lives in its own module as `<op>_reference` (plain PyTorch, the definition of its semantics)
and the public `<op>` that the model calls. The public functions run the reference today; the Triton
forward/backward kernels join them op by op (see DESIGN.md, "The fused-op rule"), so the model never
changes when they do.
"""
from .adaln import (
    gated_residual,
    gated_residual_reference,
    gated_residual_layernorm_modulate,
    gated_residual_layernorm_modulate_reference,
    layernorm_modulate,
    layernorm_modulate_reference,
)
from .align_loss import alignment_loss, alignment_loss_reference
from .projector import projector, projector_reference
from .qk_norm import qk_norm_split, qk_norm_split_reference

__all__ = [
    "alignment_loss",
    "alignment_loss_reference",
    "gated_residual",
    "gated_residual_reference",
    "gated_residual_layernorm_modulate",
    "gated_residual_layernorm_modulate_reference",
    "layernorm_modulate",
    "layernorm_modulate_reference",
    "projector",
    "projector_reference",
    "qk_norm_split",
    "qk_norm_split_reference",
]
