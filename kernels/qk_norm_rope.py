"""Split of the fused qkv projection into per-head q, k, v, with optional QK-norm and 2D axial RoPE.

Semantics (timm Attention as used by the official SiT, plus an optional rotary embedding):
- qkv [B, T, 3*H*hd] holds [q | k | v] with heads contiguous inside each
  (`qkv.reshape(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)`); the outputs q, k, v are [B, H, T, hd], the
  layout of scaled_dot_product_attention.
- QK-norm (`norm`): None, "layernorm" (LayerNorm over head_dim with optional affine weight/bias [hd],
  eps 1e-5 by default: timm's `attn.q_norm` / `attn.k_norm`) or "rmsnorm"
  (`x * rsqrt(mean(x^2) + eps) * weight`, weight optional, no bias). q and k have their own parameters.
- RoPE (`rope_grid`): None or (grid_h, grid_w); applied to q and k after the norm. v is only re-laid out.

RoPE convention (2D axial):
- head_dim must be divisible by 4; m = head_dim // 4;
- the T tokens form a row-major grid (grid_h, grid_w) with grid_h * grid_w == T; token t has row
  r = t // grid_w and column c = t % grid_w;
- inv_freq_i = base ** (-i / m) for i in 0..m-1 (base = `rope_base`, default 10000.0);
- dims [0, 2m) rotate by the angles r * inv_freq, dims [2m, 4m) by c * inv_freq;
- `rope_pairs` says which two dims of a half form the pair (a, b) rotated by angle_i:
      out_a = x_a * cos - x_b * sin,   out_b = x_b * cos + x_a * sin
  "half" (ours, rotate-half): (i, i + m) within each half, i < m;
  "interleaved" (EVA-02's VisionRotaryEmbeddingFast, which ERW's --use_rope uses): (2i, 2i + 1)
  within each half, i < m;
- angles, cos and sin are computed in fp32 (fp64 when the reference runs on fp64 inputs).

Implementations, in this order below (docs/design.md, "The fused-op rule"):
- `qk_norm_rope_reference`: plain PyTorch, the definition (fp32 inside, outputs in qkv.dtype). Where
  nothing is computed (v always, q/k without norm and RoPE) it returns views of qkv, as timm does.
- the Triton kernels below, registered as torch.library custom ops `fastrepa::qk_norm_rope_fwd` /
  `fastrepa::qk_norm_rope_bwd` (their outputs are fresh contiguous tensors). With neither norm nor
  RoPE the op is a pure re-layout, so the Triton path returns the reference (views) instead of
  launching a copy kernel.
- `qk_norm_rope`: the public op; Triton on CUDA (or with impl="triton"), the reference otherwise.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._dispatch import HAS_TRITON, block_size, num_warps_for, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl


NORMS = ("layernorm", "rmsnorm")
ROPE_PAIRS = ("half", "interleaved")


# --------------------------------------------------------------------------------------------------
# 1. Reference: plain PyTorch, the definition of the semantics.
# --------------------------------------------------------------------------------------------------

def _check(qkv, num_heads, norm, rope_grid, rope_pairs="half"):
    """Validate the arguments; returns (B, T, head_dim)."""
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be [B, T, 3*H*head_dim], got shape {tuple(qkv.shape)}")
    B, T, C3 = qkv.shape
    if num_heads < 1 or C3 % (3 * num_heads) != 0:
        raise ValueError(f"qkv last dim {C3} is not 3 * num_heads * head_dim with num_heads={num_heads}")
    hd = C3 // (3 * num_heads)
    if norm is not None and norm not in NORMS:
        raise ValueError(f"qk norm kind {norm!r} is not one of {NORMS} (or None)")
    if rope_pairs not in ROPE_PAIRS:
        raise ValueError(f"rope_pairs {rope_pairs!r} is not one of {ROPE_PAIRS}")
    if rope_grid is not None:
        if hd % 4 != 0:
            raise ValueError(f"2D RoPE needs head_dim divisible by 4, got head_dim={hd}")
        if len(rope_grid) != 2:
            raise ValueError(f"rope_grid must be (grid_h, grid_w), got {rope_grid!r}")
        gh, gw = int(rope_grid[0]), int(rope_grid[1])
        if gh < 1 or gw < 1 or gh * gw != T:
            raise ValueError(f"rope_grid {gh}x{gw} = {gh * gw} tokens does not match T={T}")
    return B, T, hd


def rope_angles(grid_h: int, grid_w: int, head_dim: int, base: float = 10000.0, device=None,
                dtype=torch.float32, pairs: str = "half"):
    """cos, sin [grid_h*grid_w, head_dim] of the 2D axial RoPE (convention in the module docstring)."""
    m = head_dim // 4
    inv_freq = base ** (-torch.arange(m, dtype=dtype, device=device) / m)
    t = torch.arange(grid_h * grid_w, device=device)
    r = (t // grid_w).to(dtype)[:, None] * inv_freq  # [T, m]
    c = (t % grid_w).to(dtype)[:, None] * inv_freq
    if pairs == "interleaved":  # dims 2i and 2i+1 of each half share an angle
        ang = torch.cat([r.repeat_interleave(2, -1), c.repeat_interleave(2, -1)], dim=-1)
    else:  # dims i and i+m of each half share an angle
        ang = torch.cat([r, r, c, c], dim=-1)
    return ang.cos(), ang.sin()


def _rotate_pairs(x, pairs: str = "half"):
    """(x_a, x_b) -> (-x_b, x_a) for every pair (a, b) of `pairs` within each half of the head dim."""
    m = x.shape[-1] // 4
    if pairs == "interleaved":
        x = x.unflatten(-1, (2, m, 2))
        return torch.stack([-x[..., 1], x[..., 0]], dim=-1).flatten(-3)
    x = x.unflatten(-1, (2, 2, m))
    return torch.stack([-x[..., 1, :], x[..., 0, :]], dim=-2).flatten(-3)


def _norm(x, weight, bias, eps, kind):
    """x already in the compute dtype; parameters are cast to it."""
    if kind == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), None if weight is None else weight.to(x.dtype),
                            None if bias is None else bias.to(x.dtype), eps)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * weight.to(x.dtype) if weight is not None else y


def qk_norm_rope_reference(qkv, num_heads: int, q_weight=None, q_bias=None, k_weight=None, k_bias=None,
                           eps: float = 1e-5, norm: Optional[str] = None, rope_grid=None,
                           rope_base: float = 10000.0, rope_pairs: str = "half"):
    """qkv [B, T, 3*H*hd] -> q, k, v [B, H, T, hd]: QK-norm (None/'layernorm'/'rmsnorm'), then RoPE.

    fp32 inside (fp64 for fp64 inputs, which makes it the test oracle); outputs in qkv.dtype.
    """
    B, T, hd = _check(qkv, num_heads, norm, rope_grid, rope_pairs)
    q, k, v = qkv.reshape(B, T, 3, num_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    if norm is None and rope_grid is None:
        return q, k, v
    acc = torch.promote_types(qkv.dtype, torch.float32)
    if rope_grid is not None:
        cos, sin = rope_angles(int(rope_grid[0]), int(rope_grid[1]), hd, rope_base, qkv.device, acc, rope_pairs)

    def one(x, weight, bias):
        x = x.to(acc)
        if norm is not None:
            x = _norm(x, weight, bias, eps, norm)
        if rope_grid is not None:
            x = x * cos + _rotate_pairs(x, rope_pairs) * sin
        return x.to(qkv.dtype)

    return one(q, q_weight, q_bias), one(k, k_weight, k_bias), v


# --------------------------------------------------------------------------------------------------
# 2. Triton kernels.
# --------------------------------------------------------------------------------------------------

# Design envelope: head_dim up to 256 (any value; RoPE needs head_dim % 4 == 0), any H and B, any T
# (grid (B*H, T tiles): the 65535 limit of grid axis 1 allows T up to 65535 * BLOCK_T >= 524k tokens).
# One program handles a tile [BLOCK_T tokens, BLOCK_D lanes] of one (batch, head): it reads the q, k
# and v rows of those tokens from qkv once and writes them to q, k, v [B, H, T, hd] (contiguous).
# BLOCK_D = next_pow2(head_dim) lanes; loads and stores are masked to d < head_dim, so for head_dim 72
# only lanes are padded (128), never memory traffic. BLOCK_T * BLOCK_D ~ 2048 elements per tile.
# Statistics and rotations are fp32 whatever the input dtype. The RoPE partner x_{j+-m} is a second
# (gathered, same cache lines) load of the row; cos/sin are computed in-kernel from the token index.
# Forward saves per-row mean/rstd (fp32, [2 (q, k), 2 (mean, rstd), B*H*T]) for the backward.
# Backward: one kernel writes dqkv [B, T, 3*H*hd] (inverse rotation of dq/dk, then the norm backward
# recomputing x_hat from qkv and the saved stats; dv copied) and per-program fp32 partial sums of
# dweight/dbias ([4, programs, hd]), which torch sums (no atomics, deterministic).

if HAS_TRITON:  # the kernels exist only where triton does; the references work everywhere
    @triton.jit
    def _rope_tables(t, d, HD, GRID_W, log2_base, INTERLEAVED: tl.constexpr):
        """cos and signed sin [BLOCK_T, BLOCK_D] (fp32) and the partner lane of each lane."""
        m = HD // 4
        dd = d % (2 * m)
        if INTERLEAVED:  # pairs (2i, 2i + 1) of each half, angle i
            first = (d % 2) == 0
            partner = tl.where(first, d + 1, d - 1)
            freq_i = dd // 2
        else:  # pairs (i, i + m) of each half, angle i
            first = dd < m
            partner = tl.where(first, d + m, d - m)
            freq_i = d % m
        sign = tl.where(first, -1.0, 1.0)
        inv_freq = tl.exp2(freq_i.to(tl.float32) * (-log2_base / m.to(tl.float32)))
        row = (t // GRID_W).to(tl.float32)
        col = (t % GRID_W).to(tl.float32)
        pos = tl.where((d < 2 * m)[None, :], row[:, None], col[:, None])
        ang = pos * inv_freq[None, :]
        return tl.cos(ang), tl.sin(ang) * sign[None, :], partner

    @triton.jit
    def _fwd_tile(X, in_off, in_p_off, OUT, out_off, W, Bias, MEAN, RSTD, stat_off,
                  d, partner, mask, tmask, dmask, cos, sin, HD, eps,
                  HAS_NORM: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                  HAS_ROPE: tl.constexpr):
        x = tl.load(X + in_off, mask=mask, other=0.0).to(tl.float32)
        if HAS_NORM:
            if RMS:
                rstd = tl.rsqrt(tl.sum(x * x, 1) / HD + eps)
                y = x * rstd[:, None]
            else:
                mean = tl.sum(x, 1) / HD
                xc = tl.where(mask, x - mean[:, None], 0.0)
                rstd = tl.rsqrt(tl.sum(xc * xc, 1) / HD + eps)
                y = xc * rstd[:, None]
                tl.store(MEAN + stat_off, mean, mask=tmask)
            tl.store(RSTD + stat_off, rstd, mask=tmask)
            if HAS_W:
                y = y * tl.load(W + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
            if HAS_B:
                y = y + tl.load(Bias + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        else:
            y = x
        if HAS_ROPE:
            xp = tl.load(X + in_p_off, mask=mask, other=0.0).to(tl.float32)
            if HAS_NORM:
                if RMS:
                    yp = xp * rstd[:, None]
                else:
                    yp = (xp - mean[:, None]) * rstd[:, None]
                if HAS_W:
                    yp = yp * tl.load(W + partner, mask=dmask, other=0.0).to(tl.float32)[None, :]
                if HAS_B:
                    yp = yp + tl.load(Bias + partner, mask=dmask, other=0.0).to(tl.float32)[None, :]
            else:
                yp = xp
            y = y * cos + yp * sin
        tl.store(OUT + out_off, y.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _tile_offsets(bh, pid_t, T, H, HD, GRID_W, log2_base, HAS_ROPE: tl.constexpr,
                      INTERLEAVED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """The tile of program (bh, pid_t): tokens t, head dims d, masks, C, the rows of q of (b, t, h)
        inside qkv and of (b, h, t) inside q/k/v, their [BLOCK_T, BLOCK_D] offsets, the stats offsets,
        and the RoPE cos / sin / partner dims (0, 0 and d without RoPE)."""
        b = bh // H
        h = bh - b * H
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_D)
        tmask = t < T
        dmask = d < HD
        mask = tmask[:, None] & dmask[None, :]
        C = H * HD
        in_row = (b.to(tl.int64) * T + t) * (3 * C) + h * HD
        out_row = (bh.to(tl.int64) * T + t) * HD
        in_off = in_row[:, None] + d[None, :]
        out_off = out_row[:, None] + d[None, :]
        stat_off = bh.to(tl.int64) * T + t
        if HAS_ROPE:
            cos, sin, partner = _rope_tables(t, d, HD, GRID_W, log2_base, INTERLEAVED)
        else:
            cos = 0.0
            sin = 0.0
            partner = d
        return t, d, tmask, dmask, mask, C, in_row, out_row, in_off, out_off, stat_off, cos, sin, partner

    @triton.jit
    def _qk_norm_rope_fwd_kernel(
            QKV, Q, K, V, QW, QB, KW, KB, STATS,
            T, H, HD, ROWS, GRID_W, eps, log2_base,
            HAS_NORM: tl.constexpr, RMS: tl.constexpr, HAS_QW: tl.constexpr, HAS_QB: tl.constexpr,
            HAS_KW: tl.constexpr, HAS_KB: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
            BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        bh = tl.program_id(0)  # batch * head on axis 0 (no 65535 limit), token tiles on axis 1
        pid_t = tl.program_id(1)
        t, d, tmask, dmask, mask, C, in_row, out_row, in_off, out_off, stat_off, cos, sin, partner = \
            _tile_offsets(bh, pid_t, T, H, HD, GRID_W, log2_base, HAS_ROPE, INTERLEAVED, BLOCK_T, BLOCK_D)
        in_p_off = in_row[:, None] + partner[None, :]

        v = tl.load(QKV + in_off + 2 * C, mask=mask, other=0.0)
        tl.store(V + out_off, v, mask=mask)
        _fwd_tile(QKV, in_off, in_p_off, Q, out_off, QW, QB, STATS, STATS + ROWS, stat_off,
                  d, partner, mask, tmask, dmask, cos, sin, HD, eps,
                  HAS_NORM, RMS, HAS_QW, HAS_QB, HAS_ROPE)
        _fwd_tile(QKV + C, in_off, in_p_off, K, out_off, KW, KB, STATS + 2 * ROWS, STATS + 3 * ROWS,
                  stat_off, d, partner, mask, tmask, dmask, cos, sin, HD, eps,
                  HAS_NORM, RMS, HAS_KW, HAS_KB, HAS_ROPE)

    @triton.jit
    def _bwd_tile(X, in_off, DX, G, g_off, g_p_off, W, MEAN, RSTD, stat_off, DW, DB,
                  d, mask, tmask, dmask, cos, sin, HD,
                  HAS_NORM: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                  HAS_ROPE: tl.constexpr):
        g = tl.load(G + g_off, mask=mask, other=0.0).to(tl.float32)
        if HAS_ROPE:  # transpose of the rotation = rotation by -angle (sin is already signed)
            gp = tl.load(G + g_p_off, mask=mask, other=0.0).to(tl.float32)
            dy = g * cos - gp * sin
        else:
            dy = g
        if HAS_NORM:
            x = tl.load(X + in_off, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + stat_off, mask=tmask, other=0.0)
            if RMS:
                xhat = x * rstd[:, None]
            else:
                mean = tl.load(MEAN + stat_off, mask=tmask, other=0.0)
                xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            if HAS_W:
                dxhat = dy * tl.load(W + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
            else:
                dxhat = dy
            c2 = tl.sum(dxhat * xhat, 1) / HD
            if RMS:
                dx = (dxhat - xhat * c2[:, None]) * rstd[:, None]
            else:
                c1 = tl.sum(dxhat, 1) / HD
                dx = (dxhat - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
            if HAS_W:
                tl.store(DW + d, tl.sum(dy * xhat, 0), mask=dmask)
            if HAS_B:
                tl.store(DB + d, tl.sum(dy, 0), mask=dmask)
        else:
            dx = dy
        tl.store(DX + in_off, dx.to(DX.dtype.element_ty), mask=mask)

    @triton.jit
    def _qk_norm_rope_bwd_kernel(
            DQ, DK, DV, QKV, DQKV, QW, KW, STATS, PART,
            T, H, HD, ROWS, NPROG, GRID_W, log2_base,
            HAS_NORM: tl.constexpr, RMS: tl.constexpr, HAS_QW: tl.constexpr, HAS_QB: tl.constexpr,
            HAS_KW: tl.constexpr, HAS_KB: tl.constexpr, HAS_ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
            BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        bh = tl.program_id(0)  # batch * head on axis 0 (no 65535 limit), token tiles on axis 1
        pid_t = tl.program_id(1)
        t, d, tmask, dmask, mask, C, in_row, out_row, in_off, g_off, stat_off, cos, sin, partner = \
            _tile_offsets(bh, pid_t, T, H, HD, GRID_W, log2_base, HAS_ROPE, INTERLEAVED, BLOCK_T, BLOCK_D)
        g_p_off = out_row[:, None] + partner[None, :]
        # partial sums of this program: PART[i, prog, :] for i = q weight, q bias, k weight, k bias
        prog = bh.to(tl.int64) * tl.num_programs(1) + pid_t
        part = PART + prog * HD

        dv = tl.load(DV + g_off, mask=mask, other=0.0)
        tl.store(DQKV + in_off + 2 * C, dv.to(DQKV.dtype.element_ty), mask=mask)
        _bwd_tile(QKV, in_off, DQKV, DQ, g_off, g_p_off, QW, STATS, STATS + ROWS, stat_off,
                  part, part + NPROG * HD, d, mask, tmask, dmask, cos, sin, HD,
                  HAS_NORM, RMS, HAS_QW, HAS_QB, HAS_ROPE)
        _bwd_tile(QKV + C, in_off, DQKV + C, DK, g_off, g_p_off, KW, STATS + 2 * ROWS,
                  STATS + 3 * ROWS, stat_off, part + 2 * NPROG * HD, part + 3 * NPROG * HD,
                  d, mask, tmask, dmask, cos, sin, HD,
                  HAS_NORM, RMS, HAS_KW, HAS_KB, HAS_ROPE)


# --------------------------------------------------------------------------------------------------
# 3. Launch helpers, the torch.library custom ops (forward, backward) and autograd.
# --------------------------------------------------------------------------------------------------

def _tiles(T: int, hd: int):
    block_d = block_size(hd, 16)
    block_t = min(block_size(T, 2), max(2, 2048 // block_d))
    return block_t, block_d, num_warps_for(block_t * block_d)


@torch.library.custom_op("fastrepa::qk_norm_rope_fwd", mutates_args=())
def _fwd(qkv: torch.Tensor, q_weight: Optional[torch.Tensor], q_bias: Optional[torch.Tensor],
         k_weight: Optional[torch.Tensor], k_bias: Optional[torch.Tensor], num_heads: int, eps: float,
         has_norm: bool, rmsnorm: bool, has_rope: bool, grid_w: int, rope_base: float, interleaved: bool
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, T, hd] contiguous and stats [2, 2, B*H*T] fp32 (empty without a norm)."""
    qkv = qkv.contiguous()
    B, T, C3 = qkv.shape
    H = num_heads
    hd = C3 // (3 * H)
    q = qkv.new_empty(B, H, T, hd)
    k = qkv.new_empty(B, H, T, hd)
    v = qkv.new_empty(B, H, T, hd)
    rows = B * H * T
    stats = qkv.new_empty((2, 2, rows) if has_norm else (0,), dtype=torch.float32)
    if q.numel() == 0:
        return q, k, v, stats
    q_weight, q_bias, k_weight, k_bias = (None if p is None else p.contiguous()
                                          for p in (q_weight, q_bias, k_weight, k_bias))
    block_t, block_d, warps = _tiles(T, hd)
    grid = (B * H, triton.cdiv(T, block_t))
    _qk_norm_rope_fwd_kernel[grid](
        qkv, q, k, v,
        qkv if q_weight is None else q_weight, qkv if q_bias is None else q_bias,
        qkv if k_weight is None else k_weight, qkv if k_bias is None else k_bias,
        stats if has_norm else q,
        T, H, hd, rows, max(grid_w, 1), eps, math.log2(rope_base),
        HAS_NORM=has_norm, RMS=rmsnorm, HAS_QW=q_weight is not None, HAS_QB=q_bias is not None,
        HAS_KW=k_weight is not None, HAS_KB=k_bias is not None, HAS_ROPE=has_rope, INTERLEAVED=interleaved,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps)
    return q, k, v, stats


@_fwd.register_fake
def _(qkv, q_weight, q_bias, k_weight, k_bias, num_heads, eps, has_norm, rmsnorm, has_rope, grid_w,
      rope_base, interleaved):
    B, T, C3 = qkv.shape
    hd = C3 // (3 * num_heads)
    out = [qkv.new_empty(B, num_heads, T, hd) for _ in range(3)]
    stats = qkv.new_empty((2, 2, B * num_heads * T) if has_norm else (0,), dtype=torch.float32)
    return out[0], out[1], out[2], stats


@torch.library.custom_op("fastrepa::qk_norm_rope_bwd", mutates_args=())
def _bwd(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, qkv: torch.Tensor,
         q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor], stats: torch.Tensor,
         has_norm: bool, rmsnorm: bool, has_qb: bool, has_kb: bool, has_rope: bool, grid_w: int,
         rope_base: float, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """dqkv [B, T, 3*H*hd] in qkv.dtype and dparams [4, hd] fp32 (d q_weight, q_bias, k_weight, k_bias;
    zero rows for absent parameters). `qkv` may be an empty placeholder (dtype only) without a norm."""
    dq, dk, dv = dq.contiguous(), dk.contiguous(), dv.contiguous()
    B, H, T, hd = dq.shape
    dqkv = torch.empty(B, T, 3 * H * hd, dtype=qkv.dtype, device=dq.device)
    block_t, block_d, warps = _tiles(T, hd)
    grid = (B * H, triton.cdiv(T, block_t))
    nprog = grid[0] * grid[1] if has_norm else 0
    part = torch.zeros(4, nprog, hd, dtype=torch.float32, device=dq.device)
    if dqkv.numel() == 0:
        return dqkv, part.sum(1)
    q_weight, k_weight = (None if p is None else p.contiguous() for p in (q_weight, k_weight))
    _qk_norm_rope_bwd_kernel[grid](
        dq, dk, dv, qkv.contiguous() if has_norm else dqkv, dqkv,
        dqkv if q_weight is None else q_weight, dqkv if k_weight is None else k_weight,
        stats if has_norm else dqkv, part if has_norm else dqkv,
        T, H, hd, B * H * T, nprog, max(grid_w, 1), math.log2(rope_base),
        HAS_NORM=has_norm, RMS=rmsnorm, HAS_QW=q_weight is not None, HAS_QB=has_qb,
        HAS_KW=k_weight is not None, HAS_KB=has_kb, HAS_ROPE=has_rope, INTERLEAVED=interleaved,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps)
    return dqkv, part.sum(1)


@_bwd.register_fake
def _(dq, dk, dv, qkv, q_weight, k_weight, stats, has_norm, rmsnorm, has_qb, has_kb, has_rope, grid_w,
      rope_base, interleaved):
    B, H, T, hd = dq.shape
    return (dq.new_empty(B, T, 3 * H * hd, dtype=qkv.dtype),
            dq.new_empty(4, hd, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    (qkv, q_weight, q_bias, k_weight, k_bias, num_heads, eps, has_norm, rmsnorm, has_rope, grid_w,
     rope_base, interleaved) = inputs
    # without a norm the backward needs only qkv's dtype: keep an empty placeholder, not the activation
    ctx.save_for_backward(qkv if has_norm else qkv.new_empty(0), q_weight, k_weight, output[3])
    ctx.flags = dict(has_norm=has_norm, rmsnorm=rmsnorm, has_qb=q_bias is not None,
                     has_kb=k_bias is not None, has_rope=has_rope, grid_w=grid_w, rope_base=rope_base,
                     interleaved=interleaved)
    ctx.param_dtypes = [None if p is None else p.dtype for p in (q_weight, q_bias, k_weight, k_bias)]
    ctx.out_shape = output[0].shape
    ctx.out_dtype = output[0].dtype


def _backward(ctx, dq, dk, dv, _dstats):
    qkv, q_weight, k_weight, stats = ctx.saved_tensors
    grads = []
    for g in (dq, dk, dv):  # unused outputs arrive as None; sums arrive expanded (stride 0)
        grads.append(torch.zeros(ctx.out_shape, dtype=ctx.out_dtype, device=stats.device)
                     if g is None else g.contiguous())
    dqkv, dparams = torch.ops.fastrepa.qk_norm_rope_bwd(*grads, qkv, q_weight, k_weight, stats,
                                                         **ctx.flags)
    dp = [None if dt is None or not ctx.needs_input_grad[1 + i] else dparams[i].to(dt)
          for i, dt in enumerate(ctx.param_dtypes)]
    return (dqkv if ctx.needs_input_grad[0] else None, *dp,
            None, None, None, None, None, None, None, None)


_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# 4. The public op.
# --------------------------------------------------------------------------------------------------

def qk_norm_rope(qkv, num_heads: int, q_weight=None, q_bias=None, k_weight=None, k_bias=None,
                 eps: float = 1e-5, norm: Optional[str] = None, rope_grid=None, rope_base: float = 10000.0,
                 rope_pairs: str = "half", impl: str = "auto"):
    """qkv [B, T, 3*H*hd] -> q, k, v [B, H, T, hd] with optional QK-norm then 2D RoPE (see module doc).

    impl: "auto" (Triton on CUDA, reference elsewhere), "triton" or "torch" (kernels/_dispatch.py).
    """
    _check(qkv, num_heads, norm, rope_grid, rope_pairs)
    args = (qkv, num_heads, q_weight, q_bias, k_weight, k_bias, eps, norm, rope_grid, rope_base, rope_pairs)
    if not use_triton(impl, qkv, q_weight, q_bias, k_weight, k_bias):
        return qk_norm_rope_reference(*args)
    if norm is None and rope_grid is None:  # a pure re-layout: nothing worth a kernel
        return qk_norm_rope_reference(*args)
    if norm is None:  # parameters are ignored without a norm (as in the reference)
        q_weight = q_bias = k_weight = k_bias = None
    if norm == "rmsnorm":  # RMSNorm has no bias (the reference ignores it too)
        q_bias = k_bias = None
    q, k, v, _ = torch.ops.fastrepa.qk_norm_rope_fwd(
        qkv, q_weight, q_bias, k_weight, k_bias, num_heads, float(eps), norm is not None,
        norm == "rmsnorm", rope_grid is not None, 0 if rope_grid is None else int(rope_grid[1]),
        float(rope_base), rope_pairs == "interleaved")
    return q, k, v
