"""The REPA alignment projector: Linear-SiLU-Linear-SiLU-Linear (keys `projectors.K.0/2/4`).

Triton path: the three matmuls stay on cuBLAS (`F.linear` without bias, so autocast still applies);
the two bias+SiLU epilogues are one fused custom op each, `bias_silu(a, bias) = silu(a + bias)`:
- forward: reads `a` once, writes silu(a + bias) in a's dtype (fp32 math inside); it saves `a`
  (the pre-bias matmul output) for backward, not a second activation;
- backward: one pass over (g, a) writes da = g * dsilu(a + bias) in a's dtype and per-program fp32
  partial column sums of da, which torch sums into db (in bias's dtype).

Design envelope of the kernels:
- a: [..., N] fp32 / bf16 / fp16, any strides (read through the strides of its [M, N] view; only a
  layout that cannot be viewed as [M, N] is copied first); bias: [N], any float dtype;
- any number of rows M (B*T; up to ~10^6 and beyond, offsets are int64) and any number of columns N
  (masked column blocks of at most 256; the projector has N = 2048);
- the incoming gradient may be non-contiguous (e.g. expanded from a .sum()): read through strides;
- backward grid: at most ~256 row-programs x ceil(N / BLOCK_N) column blocks, each row-program looping
  over its consecutive row tiles, so the db partial buffer stays small ([<=256, N] fp32);
- no double backward through the Triton path (use impl="torch" for that).
"""
import torch
import torch.nn.functional as F

from ._dispatch import HAS_TRITON, block_size, num_warps_for, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl


# --------------------------------------------------------------------------------------------------
# 1. References: plain PyTorch, the definition of the semantics.
# --------------------------------------------------------------------------------------------------

def bias_silu_reference(a, bias):
    """silu(a + bias) computed in fp32, returned in a's dtype. a [..., N], bias [N]."""
    wide = torch.float64 if a.dtype == torch.float64 else torch.float32  # fp64: the test oracle
    return F.silu(a.to(wide) + bias.to(wide)).to(a.dtype)


def projector_reference(x, w0, b0, w1, b1, w2, b2):
    h = F.silu(F.linear(x, w0, b0))
    h = F.silu(F.linear(h, w1, b1))
    return F.linear(h, w2, b2)


# --------------------------------------------------------------------------------------------------
# 2. Triton kernels.
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:  # the kernels exist only where triton does; the references work everywhere
    @triton.jit
    def _bias_silu_fwd_kernel(a_ptr, b_ptr, y_ptr, M, N, stride_am, stride_an,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < M
        cmask = cols < N
        mask = rmask[:, None] & cmask[None, :]
        a = tl.load(a_ptr + rows[:, None] * stride_am + cols[None, :] * stride_an, mask=mask, other=0.0)
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0)
        u = a.to(tl.float32) + b.to(tl.float32)[None, :]
        y = u * tl.sigmoid(u)
        tl.store(y_ptr + rows[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bias_silu_bwd_kernel(g_ptr, a_ptr, b_ptr, da_ptr, dbp_ptr, M, N, TILES,
                              stride_gm, stride_gn, stride_am, stride_an,
                              COMPUTE_DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        row0 = pid_m.to(tl.int64) * TILES * BLOCK_M
        for i in range(TILES):
            rows = row0 + i * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
            mask = (rows < M)[:, None] & cmask[None, :]
            a = tl.load(a_ptr + rows[:, None] * stride_am + cols[None, :] * stride_an, mask=mask, other=0.0)
            g = tl.load(g_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gn, mask=mask, other=0.0)
            u = a.to(tl.float32) + b[None, :]
            s = tl.sigmoid(u)
            da = g.to(tl.float32) * (s * (1.0 + u * (1.0 - s)))
            da = tl.where(mask, da, 0.0)
            tl.store(da_ptr + rows[:, None] * N + cols[None, :], da.to(da_ptr.dtype.element_ty), mask=mask)
            if COMPUTE_DB:
                acc += tl.sum(da, axis=0)
        if COMPUTE_DB:
            tl.store(dbp_ptr + pid_m * N + cols, acc, mask=cmask)


# --------------------------------------------------------------------------------------------------
# 3. Launch helpers, the torch.library custom ops and their autograd.
# --------------------------------------------------------------------------------------------------

def _blocks(M, N):
    block_n = min(block_size(N), 256)
    block_m = max(1, min(4096 // block_n, block_size(M, at_least=1)))
    return block_m, block_n


def _rows_view(t, N):
    """t [..., N] as [M, N], a view whenever the strides allow it (else a copy)."""
    return t.reshape(-1, N)


@torch.library.custom_op("fastrepa::bias_silu_fwd", mutates_args=())
def _bias_silu_fwd(a: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    N = a.shape[-1]
    y = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    if a.numel() == 0:
        return y
    a2 = _rows_view(a, N)
    M = a2.shape[0]
    BM, BN = _blocks(M, N)
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _bias_silu_fwd_kernel[grid](a2, bias.contiguous(), y, M, N, a2.stride(0), a2.stride(1),
                                BLOCK_M=BM, BLOCK_N=BN, num_warps=num_warps_for(BM * BN))
    return y


@_bias_silu_fwd.register_fake
def _(a, bias):
    return torch.empty(a.shape, dtype=a.dtype, device=a.device)


@torch.library.custom_op("fastrepa::bias_silu_bwd", mutates_args=())
def _bias_silu_bwd(g: torch.Tensor, a: torch.Tensor, bias: torch.Tensor,
                   need_db: bool) -> tuple[torch.Tensor, torch.Tensor]:
    N = a.shape[-1]
    da = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    if not need_db:
        db = torch.empty((0,), dtype=bias.dtype, device=bias.device)
    if a.numel() == 0:
        return da, (torch.zeros(bias.shape, dtype=bias.dtype, device=bias.device) if need_db else db)
    a2, g2 = _rows_view(a, N), _rows_view(g, N)
    M = a2.shape[0]
    BM, BN = _blocks(M, N)
    row_tiles = triton.cdiv(M, BM)
    tiles = triton.cdiv(row_tiles, 256)  # row tiles per program
    grid = (triton.cdiv(row_tiles, tiles), triton.cdiv(N, BN))
    partial = torch.empty((grid[0], N) if need_db else (1,), dtype=torch.float32, device=a.device)
    _bias_silu_bwd_kernel[grid](g2, a2, bias.contiguous(), da, partial, M, N, tiles,
                                g2.stride(0), g2.stride(1), a2.stride(0), a2.stride(1),
                                COMPUTE_DB=need_db, BLOCK_M=BM, BLOCK_N=BN,
                                num_warps=num_warps_for(BM * BN))
    if need_db:
        db = partial.sum(dim=0).to(bias.dtype)
    return da, db


@_bias_silu_bwd.register_fake
def _(g, a, bias, need_db):
    da = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    db = torch.empty(bias.shape if need_db else (0,), dtype=bias.dtype, device=bias.device)
    return da, db


def _bias_silu_setup_context(ctx, inputs, output):
    a, bias = inputs
    ctx.save_for_backward(a, bias)


def _bias_silu_backward(ctx, grad):
    if grad is None:
        return None, None
    a, bias = ctx.saved_tensors
    need_da, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_da or need_db):
        return None, None
    da, db = _bias_silu_bwd(grad, a, bias, bool(need_db))
    return (da if need_da else None), (db if need_db else None)


_bias_silu_fwd.register_autograd(_bias_silu_backward, setup_context=_bias_silu_setup_context)


# --------------------------------------------------------------------------------------------------
# 4. The public ops the model calls.
# --------------------------------------------------------------------------------------------------

def bias_silu(a, bias, impl: str = "auto"):
    """silu(a + bias) in a's dtype (fp32 math inside); the fused Triton epilogue or the reference."""
    if use_triton(impl, a, bias):
        if bias.dim() != 1 or bias.shape[0] != a.shape[-1]:
            raise ValueError(f"bias_silu: bias shape {tuple(bias.shape)} does not match a's last dim "
                             f"{a.shape[-1]}")
        return _bias_silu_fwd(a, bias)
    return bias_silu_reference(a, bias)


def projector(x, w0, b0, w1, b1, w2, b2, impl: str = "auto"):
    """x [..., D] -> [..., z_dim]; matmuls on cuBLAS, bias+SiLU epilogues fused on the Triton path."""
    if use_triton(impl, x, w0, b0, w1, b1, w2, b2):
        h = _bias_silu_fwd(F.linear(x, w0), b0)
        h = _bias_silu_fwd(F.linear(h, w1), b1)
        return F.linear(h, w2, b2)
    return projector_reference(x, w0, b0, w1, b1, w2, b2)
