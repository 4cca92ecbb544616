"""The REPA alignment loss of one encoder: negative cosine per token over the feature dimension.

Semantics (official REPA loss.py): both sides L2-normalised over the last dim (F.normalize, eps 1e-12),
-(z . z_tilde) per token, mean over tokens: one value per sample. Always computed in fp32, even when
the inputs are bf16.
"""
import torch.nn.functional as F


def alignment_loss_reference(z, z_tilde):
    """z (encoder features) and z_tilde (projector output), both [B, T, C] -> [B]."""
    z = F.normalize(z.float(), dim=-1)
    z_tilde = F.normalize(z_tilde.float(), dim=-1)
    return -(z * z_tilde).sum(dim=-1).mean(dim=-1)


def alignment_loss(z, z_tilde):
    return alignment_loss_reference(z, z_tilde)
