"""Split of the fused qkv projection into per-head q, k, v with optional QK-norm.

Semantics (timm Attention as used by the official SiT): qkv [B, T, 3*H*hd] holds [q | k | v] with
heads contiguous inside each; q and k are optionally normalised over head_dim by a LayerNorm with
affine (keys `attn.q_norm` / `attn.k_norm`, eps 1e-5) or an RMSNorm. Output q, k, v are [B, H, T, hd],
the layout of scaled_dot_product_attention.
"""
import torch
import torch.nn.functional as F

NORMS = ("layernorm", "rmsnorm")


def _norm(x, weight, bias, eps, kind):
    if kind == "layernorm":
        return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), None if bias is None else bias.float(), eps)
    if kind == "rmsnorm":
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return y * weight.float() if weight is not None else y
    raise ValueError(f"qk norm kind {kind!r} is not one of {NORMS}")


def qk_norm_split_reference(qkv, num_heads: int, q_weight=None, q_bias=None, k_weight=None, k_bias=None,
                            eps: float = 1e-5, norm: str | None = None):
    """qkv [B, T, 3*H*hd] -> q, k, v [B, H, T, hd]; `norm` None (no QK-norm), 'layernorm' or 'rmsnorm'."""
    B, T, C3 = qkv.shape
    hd = C3 // (3 * num_heads)
    q, k, v = qkv.view(B, T, 3, num_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    if norm is not None:
        q = _norm(q, q_weight, q_bias, eps, norm).to(qkv.dtype)
        k = _norm(k, k_weight, k_bias, eps, norm).to(qkv.dtype)
    return q, k, v


def qk_norm_split(qkv, num_heads: int, q_weight=None, q_bias=None, k_weight=None, k_bias=None,
                  eps: float = 1e-5, norm: str | None = None):
    return qk_norm_split_reference(qkv, num_heads, q_weight, q_bias, k_weight, k_bias, eps, norm)
