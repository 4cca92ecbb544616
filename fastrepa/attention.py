"""One attention call for every model, with a choice of backend.

q, k, v are [B, H, T, hd] (the layout `fastrepa.kernels.qk_norm_rope` produces); the result is
[B, T, H*hd], ready for the output projection. Backends:
- "sdpa" (default): torch scaled_dot_product_attention, which picks flash / cuDNN / efficient kernels
  on CUDA and a fused CPU kernel elsewhere;
- "math": the explicit softmax(q k^T / sqrt(hd)) v in fp32, the reference;
- "flash_attn": the flash-attn package (CUDA, fp16/bf16 only);
- "xformers": xformers memory_efficient_attention (CUDA).
`attention_logits` gives the scores themselves, for methods that align attention maps (HASTE).
"""
import importlib
import math

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "math", "flash_attn", "xformers")


OPTIONAL = {"flash_attn": ("flash_attn", "flash"), "xformers": ("xformers.ops", "xformers")}


def check_backend(backend: str) -> None:
    """Raise a clear error when `backend` is unknown or cannot run on this machine."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    if backend in OPTIONAL:
        module, extra = OPTIONAL[backend]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise RuntimeError(f"attention backend {backend!r} needs the {extra} extra "
                               f"(pip install -e .[{extra}]) and a CUDA GPU") from e
        if not torch.cuda.is_available():
            raise RuntimeError(f"attention backend {backend!r} needs a CUDA GPU")


def attention_math(q, k, v):
    """The reference: fp32 softmax attention, [B, H, T, hd] -> [B, H, T, hd] in q's dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    attn = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    return torch.einsum("bhqk,bhkd->bhqd", attn.softmax(dim=-1), v.float()).to(q.dtype)


def attention_logits(q, k, heads: int | None = None):
    """The pre-softmax attention scores (q * hd^-0.5) k^T [B, h, T, T] of the first `heads` heads (all when
    None), in q's dtype: what HASTE aligns (its model and its DINOv2 compute them so, beside the fused
    attention, which never materialises them)."""
    if heads is not None:
        q, k = q[:, :heads], k[:, :heads]
    return (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)


def attention(q, k, v, backend: str = "sdpa"):
    """Non-causal multi-head attention without dropout: q, k, v [B, H, T, hd] -> [B, T, H*hd]."""
    B, H, T, hd = q.shape
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v)
    elif backend == "math":
        out = attention_math(q, k, v)
    elif backend == "flash_attn":
        from flash_attn import flash_attn_func
        # flash-attn wants [B, T, H, hd]; the transpose is a view with unit stride on hd.
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).reshape(B, T, H * hd)
    elif backend == "xformers":
        import xformers.ops as xops
        return xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).reshape(B, T, H * hd)
    else:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    return out.transpose(1, 2).reshape(B, T, H * hd)
