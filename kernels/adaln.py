"""adaLN modulation around the SiT block's LayerNorms.

Semantics (official SiT): LayerNorm without affine, eps 1e-6, then `modulate(h) = h * (1 + scale) +
shift` with shift/scale [B, D] broadcast over the T tokens; the residual update is `x + gate * y`.

Three ops, each as reference + Triton kernels + public function (docs/design.md, "The fused-op rule"):
- layernorm_modulate(x, shift, scale)                        -> h
- gated_residual(x, gate, y)                                  -> x + gate * y
- gated_residual_layernorm_modulate(x, gate, y, shift, scale) -> (x', h), one pass: the boundary
  between attention and MLP inside a block, and between blocks.

Design envelope of the Triton kernels: x, y [B, T, D] (made contiguous), D <= 8192 in one block of
next_pow2(D) lanes (masked: memory traffic is exact), any T and B; shift/scale/gate [B, D] with unit
stride along D (the chunks of the adaLN output are used in place, no copy). Statistics and all
arithmetic in fp32 whatever the input dtype; outputs in the input dtype. A program owns one sample
and ROWS consecutive tokens, walked BLOCK_T rows at a time. The backward reads each input once: the
T-reductions for d(shift), d(scale) and d(gate) are accumulated in registers while dx is computed,
written as fp32 partials per program [B, programs along T, D] and summed by torch (small).
The fused op saves x' (its own output) with the LN statistics, so the backward recomputes the
normalised value from x' instead of storing it.
"""
import torch
import torch.nn.functional as F

from ._dispatch import HAS_TRITON, block_size, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

# --------------------------------------------------------------------------------------------------
# 1. References: plain PyTorch, the definition of the semantics.
# --------------------------------------------------------------------------------------------------

def layernorm_modulate_reference(x, shift, scale, eps: float = 1e-6):
    """LN(x) * (1 + scale) + shift, LN over the last dim without affine; fp32 inside (fp64 for fp64
    inputs, which makes it the tests' oracle)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    h = F.layer_norm(x.to(acc), (x.shape[-1],), eps=eps)
    h = h * (1 + scale.to(acc).unsqueeze(1)) + shift.to(acc).unsqueeze(1)
    return h.to(x.dtype)


def gated_residual_reference(x, gate, y):
    """x + gate * y, gate [B, D] broadcast over tokens."""
    return x + gate.unsqueeze(1) * y


def gated_residual_layernorm_modulate_reference(x, gate, y, shift, scale, eps: float = 1e-6):
    """The boundary between attention and MLP: x' = x + gate * y, h = modulate(LN(x')); returns (x', h)."""
    x = gated_residual_reference(x, gate, y)
    return x, layernorm_modulate_reference(x, shift, scale, eps)


# --------------------------------------------------------------------------------------------------
# 2. Triton kernels.
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:  # the kernels exist only where triton does; the references work everywhere
    @triton.jit
    def _ln_mod_fwd_kernel(X, GATE, Y, SHIFT, SCALE, XOUT, H, MEAN, RSTD, T, D, s_mod, eps,
                           HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
                           BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        t_start = tl.program_id(1) * ROWS
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        shift = tl.load(SHIFT + b * s_mod + cols, mask=cmask, other=0.0).to(tl.float32)
        scale1 = 1.0 + tl.load(SCALE + b * s_mod + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_RES:
            gate = tl.load(GATE + b * s_mod + cols, mask=cmask, other=0.0).to(tl.float32)
        for i in tl.static_range(ROWS // BLOCK_T):
            rows = t_start + i * BLOCK_T + tl.arange(0, BLOCK_T)
            rmask = rows < T
            m = rmask[:, None] & cmask[None, :]
            offs = (b * T + rows).to(tl.int64)[:, None] * D + cols[None, :]
            x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
            if HAS_RES:
                y = tl.load(Y + offs, mask=m, other=0.0).to(tl.float32)
                xo = (x + gate[None, :] * y).to(XOUT.dtype.element_ty)
                tl.store(XOUT + offs, xo, mask=m)
                x = xo.to(tl.float32)  # normalise exactly the x' that is returned (and saved)
            mean = tl.sum(x, axis=1) / D
            xc = tl.where(m, x - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
            h = xc * rstd[:, None] * scale1[None, :] + shift[None, :]
            tl.store(H + offs, h.to(H.dtype.element_ty), mask=m)
            tl.store(MEAN + b * T + rows, mean, mask=rmask)
            tl.store(RSTD + b * T + rows, rstd, mask=rmask)


    @triton.jit
    def _ln_mod_bwd_kernel(XN, GATE, Y, SCALE, DH, DXO, MEAN, RSTD, DX, DY, PART, T, D, s_mod, n_prog_t,
                           HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
                           BLOCK_D: tl.constexpr):
        """XN is the normalised input (x, or x' for the fused op); PART [3, B, n_prog_t, D] fp32 gets the
        partial sums of d(shift), d(scale), d(gate) over this program's rows."""
        b = tl.program_id(0)
        pt = tl.program_id(1)
        t_start = pt * ROWS
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        scale1 = 1.0 + tl.load(SCALE + b * s_mod + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_RES:
            gate = tl.load(GATE + b * s_mod + cols, mask=cmask, other=0.0).to(tl.float32)
        acc_shift = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_gate = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i in tl.static_range(ROWS // BLOCK_T):
            rows = t_start + i * BLOCK_T + tl.arange(0, BLOCK_T)
            rmask = rows < T
            m = rmask[:, None] & cmask[None, :]
            offs = (b * T + rows).to(tl.int64)[:, None] * D + cols[None, :]
            mean = tl.load(MEAN + b * T + rows, mask=rmask, other=0.0)
            rstd = tl.load(RSTD + b * T + rows, mask=rmask, other=0.0)
            x = tl.load(XN + offs, mask=m, other=0.0).to(tl.float32)
            xhat = tl.where(m, (x - mean[:, None]) * rstd[:, None], 0.0)
            dh = tl.load(DH + offs, mask=m, other=0.0).to(tl.float32)
            acc_shift += tl.sum(dh, axis=0)
            acc_scale += tl.sum(dh * xhat, axis=0)
            dxhat = dh * scale1[None, :]
            c1 = tl.sum(dxhat * xhat, axis=1) / D
            c2 = tl.sum(dxhat, axis=1) / D
            dx = (dxhat - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            if HAS_RES:
                dx += tl.load(DXO + offs, mask=m, other=0.0).to(tl.float32)
                y = tl.load(Y + offs, mask=m, other=0.0).to(tl.float32)
                acc_gate += tl.sum(tl.where(m, dx * y, 0.0), axis=0)
                tl.store(DY + offs, (dx * gate[None, :]).to(DY.dtype.element_ty), mask=m)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=m)
        part = (b * n_prog_t + pt) * D + cols
        plane = tl.num_programs(0) * n_prog_t * D
        tl.store(PART + part, acc_shift, mask=cmask)
        tl.store(PART + plane + part, acc_scale, mask=cmask)
        if HAS_RES:
            tl.store(PART + 2 * plane + part, acc_gate, mask=cmask)


    @triton.jit
    def _gated_residual_fwd_kernel(X, GATE, Y, OUT, T, D, s_mod, ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
                                   BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        t_start = tl.program_id(1) * ROWS
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        gate = tl.load(GATE + b * s_mod + cols, mask=cmask, other=0.0).to(tl.float32)
        for i in tl.static_range(ROWS // BLOCK_T):
            rows = t_start + i * BLOCK_T + tl.arange(0, BLOCK_T)
            m = (rows < T)[:, None] & cmask[None, :]
            offs = (b * T + rows).to(tl.int64)[:, None] * D + cols[None, :]
            x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
            y = tl.load(Y + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(OUT + offs, (x + gate[None, :] * y).to(OUT.dtype.element_ty), mask=m)


    @triton.jit
    def _gated_residual_bwd_kernel(DO, GATE, Y, DY, PART, T, D, s_mod, n_prog_t, ROWS: tl.constexpr,
                                   BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        pt = tl.program_id(1)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        gate = tl.load(GATE + b * s_mod + cols, mask=cmask, other=0.0).to(tl.float32)
        acc_gate = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i in tl.static_range(ROWS // BLOCK_T):
            rows = pt * ROWS + i * BLOCK_T + tl.arange(0, BLOCK_T)
            m = (rows < T)[:, None] & cmask[None, :]
            offs = (b * T + rows).to(tl.int64)[:, None] * D + cols[None, :]
            do = tl.load(DO + offs, mask=m, other=0.0).to(tl.float32)
            y = tl.load(Y + offs, mask=m, other=0.0).to(tl.float32)
            acc_gate += tl.sum(do * y, axis=0)
            tl.store(DY + offs, (do * gate[None, :]).to(DY.dtype.element_ty), mask=m)
        tl.store(PART + (b * n_prog_t + pt) * D + cols, acc_gate, mask=cmask)


# --------------------------------------------------------------------------------------------------
# 3. Launch helpers, the torch.library custom ops (torch.compile keeps them in its graph), autograd.
# --------------------------------------------------------------------------------------------------

def _tiling(T, D):
    BLOCK_D = block_size(D)
    BLOCK_T = max(1, min(16, 4096 // BLOCK_D))
    ROWS = max(BLOCK_T, min(16, block_size(T, at_least=1)))
    return ROWS, BLOCK_T, BLOCK_D, -(-T // ROWS)


def _warps(BLOCK_D):
    return 1 if BLOCK_D <= 256 else (4 if BLOCK_D <= 1024 else 8)


def _mod_rows(*mods):
    """[B, D] modulation views with unit stride along D, used in place; all must share one row stride."""
    mods = [m if m.stride(-1) == 1 else m.contiguous() for m in mods]
    if len({m.stride(0) for m in mods}) > 1:
        mods = [m.contiguous() for m in mods]
    return mods, mods[0].stride(0)


def _check(x, *mods):
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, D], got shape {tuple(x.shape)}")
    B, _, D = x.shape
    for m in mods:
        if m.shape != (B, D):
            raise ValueError(f"modulation tensors must be [B, D] = {(B, D)}, got {tuple(m.shape)}")


@torch.library.custom_op("fastrepa::layernorm_modulate_fwd", mutates_args=())
def _ln_mod_fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    B, T, D = x.shape
    (shift, scale), s_mod = _mod_rows(shift, scale)
    h = torch.empty_like(x)
    mean = torch.empty(B, T, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    ROWS, BLOCK_T, BLOCK_D, n_t = _tiling(T, D)
    _ln_mod_fwd_kernel[(B, n_t)](x, x, x, shift, scale, h, h, mean, rstd, T, D, s_mod, eps,
                                 HAS_RES=False, ROWS=ROWS, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
                                 num_warps=_warps(BLOCK_D))
    return h, mean, rstd


@_ln_mod_fwd.register_fake
def _(x, shift, scale, eps):
    stats = x.new_empty(x.shape[:2], dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, stats.clone()


@torch.library.custom_op("fastrepa::gated_residual_layernorm_modulate_fwd", mutates_args=())
def _res_ln_mod_fwd(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor,
                    scale: torch.Tensor, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = x.contiguous(), y.contiguous()
    B, T, D = x.shape
    (gate, shift, scale), s_mod = _mod_rows(gate, shift, scale)
    x_out, h = torch.empty_like(x), torch.empty_like(x)
    mean = torch.empty(B, T, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    ROWS, BLOCK_T, BLOCK_D, n_t = _tiling(T, D)
    _ln_mod_fwd_kernel[(B, n_t)](x, gate, y, shift, scale, x_out, h, mean, rstd, T, D, s_mod, eps,
                                 HAS_RES=True, ROWS=ROWS, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
                                 num_warps=_warps(BLOCK_D))
    return x_out, h, mean, rstd


@_res_ln_mod_fwd.register_fake
def _(x, gate, y, shift, scale, eps):
    stats = x.new_empty(x.shape[:2], dtype=torch.float32)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return out, torch.empty_like(out), stats, stats.clone()


@torch.library.custom_op("fastrepa::layernorm_modulate_bwd", mutates_args=())
def _ln_mod_bwd(x_norm: torch.Tensor, gate: torch.Tensor | None, y: torch.Tensor | None,
                scale: torch.Tensor, dh: torch.Tensor, dx_out: torch.Tensor | None, mean: torch.Tensor,
                rstd: torch.Tensor) -> list[torch.Tensor]:
    """-> [dx, dshift, dscale] or, with the residual (gate, y, dx_out given), [dx, dy, dgate, dshift, dscale]."""
    has_res = gate is not None
    x_norm, dh = x_norm.contiguous(), dh.contiguous()
    B, T, D = x_norm.shape
    mods, s_mod = _mod_rows(*([gate, scale] if has_res else [scale]))
    gate_c, scale_c = (mods[0], mods[1]) if has_res else (scale, mods[0])
    ROWS, BLOCK_T, BLOCK_D, n_t = _tiling(T, D)
    part = torch.empty(3 if has_res else 2, B, n_t, D, device=x_norm.device, dtype=torch.float32)
    dx = torch.empty_like(x_norm)
    if has_res:
        y, dx_out = y.contiguous(), dx_out.contiguous()
        dy = torch.empty_like(y)
    else:
        y = dx_out = dy = x_norm  # unused placeholders (HAS_RES=False)
    _ln_mod_bwd_kernel[(B, n_t)](x_norm, gate_c, y, scale_c, dh, dx_out, mean, rstd, dx, dy, part, T, D,
                                 s_mod, n_t, HAS_RES=has_res, ROWS=ROWS, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
                                 num_warps=_warps(BLOCK_D))
    dshift, dscale = part[0].sum(dim=1).to(scale.dtype), part[1].sum(dim=1).to(scale.dtype)
    if has_res:
        return [dx, dy, part[2].sum(dim=1).to(gate.dtype), dshift, dscale]
    return [dx, dshift, dscale]


@_ln_mod_bwd.register_fake
def _(x_norm, gate, y, scale, dh, dx_out, mean, rstd):
    B, _, D = x_norm.shape
    dx = torch.empty_like(x_norm, memory_format=torch.contiguous_format)
    mod = scale.new_empty(B, D)
    if gate is not None:
        return [dx, torch.empty_like(dx), gate.new_empty(B, D), mod, mod.clone()]
    return [dx, mod, mod.clone()]


@torch.library.custom_op("fastrepa::gated_residual_fwd", mutates_args=())
def _gated_residual_fwd(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = x.contiguous(), y.contiguous()
    B, T, D = x.shape
    (gate,), s_mod = _mod_rows(gate)
    out = torch.empty_like(x)
    ROWS, BLOCK_T, BLOCK_D, n_t = _tiling(T, D)
    _gated_residual_fwd_kernel[(B, n_t)](x, gate, y, out, T, D, s_mod, ROWS=ROWS, BLOCK_T=BLOCK_T,
                                         BLOCK_D=BLOCK_D, num_warps=_warps(BLOCK_D))
    return out


@_gated_residual_fwd.register_fake
def _(x, gate, y):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastrepa::gated_residual_bwd", mutates_args=())
def _gated_residual_bwd(d_out: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """-> [dy, dgate]; dx is d_out itself."""
    d_out, y = d_out.contiguous(), y.contiguous()
    B, T, D = d_out.shape
    (gate_c,), s_mod = _mod_rows(gate)
    ROWS, BLOCK_T, BLOCK_D, n_t = _tiling(T, D)
    part = torch.empty(B, n_t, D, device=d_out.device, dtype=torch.float32)
    dy = torch.empty_like(y)
    _gated_residual_bwd_kernel[(B, n_t)](d_out, gate_c, y, dy, part, T, D, s_mod, n_t, ROWS=ROWS,
                                         BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=_warps(BLOCK_D))
    return [dy, part.sum(dim=1).to(gate.dtype)]


@_gated_residual_bwd.register_fake
def _(d_out, gate, y):
    return [torch.empty_like(y, memory_format=torch.contiguous_format), gate.new_empty(gate.shape)]


# Autograd for the forward ops: grads of outputs nobody used arrive as None.

def _zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


def _ln_mod_setup(ctx, inputs, output):
    x, shift, scale, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)


def _ln_mod_backward(ctx, dh, _dmean, _drstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = _ln_mod_bwd(x, None, None, scale, _zeros_if_none(dh, x), None, mean, rstd)
    return dx.to(x.dtype), dshift, dscale, None


_ln_mod_fwd.register_autograd(_ln_mod_backward, setup_context=_ln_mod_setup)


def _res_ln_mod_setup(ctx, inputs, output):
    x, gate, y, shift, scale, eps = inputs
    x_out, _, mean, rstd = output
    ctx.save_for_backward(x_out, gate, y, scale, mean, rstd)
    ctx.x_dtype = x.dtype


def _res_ln_mod_backward(ctx, dx_out, dh, _dmean, _drstd):
    x_out, gate, y, scale, mean, rstd = ctx.saved_tensors
    dx, dy, dgate, dshift, dscale = _ln_mod_bwd(x_out, gate, y, scale, _zeros_if_none(dh, x_out),
                                                _zeros_if_none(dx_out, x_out), mean, rstd)
    return dx.to(ctx.x_dtype), dgate, dy, dshift, dscale, None


_res_ln_mod_fwd.register_autograd(_res_ln_mod_backward, setup_context=_res_ln_mod_setup)


def _gated_residual_setup(ctx, inputs, output):
    x, gate, y = inputs
    ctx.save_for_backward(gate, y)
    ctx.x_dtype = x.dtype


def _gated_residual_backward(ctx, d_out):
    gate, y = ctx.saved_tensors
    dy, dgate = _gated_residual_bwd(d_out, gate, y)
    return d_out.to(ctx.x_dtype), dgate, dy


_gated_residual_fwd.register_autograd(_gated_residual_backward, setup_context=_gated_residual_setup)


# --------------------------------------------------------------------------------------------------
# 4. The public ops the model calls.
# --------------------------------------------------------------------------------------------------

def layernorm_modulate(x, shift, scale, eps: float = 1e-6, impl: str = "auto"):
    """LN(x) * (1 + scale) + shift; x [B, T, D], shift/scale [B, D]."""
    if use_triton(impl, x, shift, scale):
        _check(x, shift, scale)
        return _ln_mod_fwd(x, shift, scale, eps)[0]
    return layernorm_modulate_reference(x, shift, scale, eps)


def gated_residual(x, gate, y, impl: str = "auto"):
    """x + gate * y; x, y [B, T, D], gate [B, D]."""
    if use_triton(impl, x, gate, y):
        _check(x, gate)
        _check(y, gate)
        return _gated_residual_fwd(x, gate, y)
    return gated_residual_reference(x, gate, y)


def gated_residual_layernorm_modulate(x, gate, y, shift, scale, eps: float = 1e-6, impl: str = "auto"):
    """(x', h) with x' = x + gate * y and h = LN(x') * (1 + scale) + shift, in one pass."""
    if use_triton(impl, x, gate, y, shift, scale):
        _check(x, gate, shift, scale)
        _check(y, gate)
        x_out, h, _, _ = _res_ln_mod_fwd(x, gate, y, shift, scale, eps)
        return x_out, h
    return gated_residual_layernorm_modulate_reference(x, gate, y, shift, scale, eps)
