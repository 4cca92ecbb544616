"""The REPA alignment loss of one encoder: negative cosine per token over the feature dimension.

Semantics (official REPA loss.py): both sides L2-normalised over the last dim (F.normalize, eps 1e-12),
-(z . z_tilde) per token, mean over tokens: one value per sample. Always computed in fp32, even when
the inputs are bf16.

Triton path: ONE forward kernel over the B*T rows computes, in fp32, each token's loss and the gradient
of that token's loss w.r.t. z_tilde (and w.r.t. z only when z needs a gradient: a constexpr flag), so
the normalised [B*T, C] copies are never stored. With n = ||x||, d = max(n, eps), x^ = x / d and
c = z^ . z_tilde^ (the token's loss is -c):
    dloss/dz_tilde = (c' * z_tilde^ - z^) / d_tilde,   c' = c if n_tilde >= eps else 0
(and symmetrically for z): F.normalize's x / max(||x||, eps), whose gradient below eps is that of
x / eps. The forward custom op returns these per-row gradients as extra (non-differentiable) outputs,
stored in the input dtypes, and the public function returns only the loss; the backward scales them
by grad_out[b] / T (a torch multiply in fp32, cast back to the input dtype).

Design envelope of the kernel:
- z, z_tilde: [B, T, C] (more leading dims are flattened into B), equal shapes, fp32 / bf16 / fp16
  (the two may differ in dtype), any strides (read in place, never copied);
- C up to ~4096 (one masked block of next_pow2(C) per row; REPA uses C <= 1536), any B*T (one program
  per BLOCK_R = max(1, 2048 // next_pow2(C)) rows, int64 offsets);
- saved gradients: [B, T, C] in the input dtype (z's only when z requires grad), i.e. the memory of
  one copy of the input each; bf16 inputs thus round the gradient twice (the per-row gradient, then
  its scaled value), within the tolerance rule but not bit-equal to the reference;
- no double backward through the Triton path (use impl="torch" for that).
"""
import torch
import torch.nn.functional as F

from ._dispatch import HAS_TRITON, block_size, num_warps_for, use_triton

EPS = 1e-12

if HAS_TRITON:
    import triton
    import triton.language as tl


# --------------------------------------------------------------------------------------------------
# 1. Reference: plain PyTorch, the definition of the semantics.
# --------------------------------------------------------------------------------------------------

def _fp32_or_wider(x):
    """x.float(), except that fp64 stays fp64 (so the reference on .double() inputs is the oracle)."""
    return x if x.dtype == torch.float64 else x.float()


def alignment_loss_reference(z, z_tilde):
    """z (encoder features) and z_tilde (projector output), both [B, T, C] -> [B]."""
    z = F.normalize(_fp32_or_wider(z), dim=-1)
    z_tilde = F.normalize(_fp32_or_wider(z_tilde), dim=-1)
    return -(z * z_tilde).sum(dim=-1).mean(dim=-1)


# --------------------------------------------------------------------------------------------------
# 2. Triton kernel.
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:  # the kernels exist only where triton does; the references work everywhere
    @triton.jit
    def _align_fwd_kernel(z_ptr, t_ptr, loss_ptr, gz_ptr, gt_ptr, R, T, C,
                          szb, szt, szc, stb, stt, stc, eps,
                          NEED_DZ: tl.constexpr, NEED_DT: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        rmask = rows < R
        mask = rmask[:, None] & (cols < C)[None, :]
        b = rows // T
        tok = rows % T
        z_off = (b * szb + tok * szt)[:, None] + cols[None, :].to(tl.int64) * szc
        t_off = (b * stb + tok * stt)[:, None] + cols[None, :].to(tl.int64) * stc
        z = tl.load(z_ptr + z_off, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + t_off, mask=mask, other=0.0).to(tl.float32)
        nz = tl.sqrt(tl.sum(z * z, axis=1))
        nt = tl.sqrt(tl.sum(t * t, axis=1))
        dz = tl.maximum(nz, eps)
        dt = tl.maximum(nt, eps)
        zh = z / dz[:, None]
        th = t / dt[:, None]
        c = tl.sum(zh * th, axis=1)
        tl.store(loss_ptr + rows, -c, mask=rmask)
        out_off = rows[:, None] * C + cols[None, :]
        if NEED_DT:
            ct = tl.where(nt >= eps, c, 0.0)
            gt = (ct[:, None] * th - zh) / dt[:, None]
            tl.store(gt_ptr + out_off, gt.to(gt_ptr.dtype.element_ty), mask=mask)
        if NEED_DZ:
            cz = tl.where(nz >= eps, c, 0.0)
            gz = (cz[:, None] * zh - th) / dz[:, None]
            tl.store(gz_ptr + out_off, gz.to(gz_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# 3. The torch.library custom op and its autograd.
# --------------------------------------------------------------------------------------------------

def _grad_buffer(x, need):
    return torch.empty(x.shape if need else (0,), dtype=x.dtype, device=x.device)


@torch.library.custom_op("fastrepa::alignment_loss_fwd", mutates_args=())
def _align_fwd(z: torch.Tensor, z_tilde: torch.Tensor, need_dz: bool,
               need_dt: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss [B] fp32, dloss_row/dz [B,T,C] or empty, dloss_row/dz_tilde [B,T,C] or empty)."""
    B, T, C = z.shape
    R = B * T
    row_loss = torch.empty((R,), dtype=torch.float32, device=z.device)
    gz, gt = _grad_buffer(z, need_dz), _grad_buffer(z_tilde, need_dt)
    if R > 0 and C > 0:
        BC = block_size(C)
        BR = max(1, min(2048 // BC, block_size(R, at_least=1)))
        grid = (triton.cdiv(R, BR),)
        _align_fwd_kernel[grid](z, z_tilde, row_loss, gz, gt, R, T, C,
                                *z.stride(), *z_tilde.stride(), EPS,
                                NEED_DZ=need_dz, NEED_DT=need_dt, BLOCK_R=BR, BLOCK_C=BC,
                                num_warps=num_warps_for(BR * BC))
    elif R > 0:  # C == 0: both sides normalise to empty vectors, the dot product is 0
        row_loss.zero_()
        gz.zero_()
        gt.zero_()
    return row_loss.view(B, T).mean(dim=1), gz, gt


@_align_fwd.register_fake
def _(z, z_tilde, need_dz, need_dt):
    loss = torch.empty((z.shape[0],), dtype=torch.float32, device=z.device)
    return loss, _grad_buffer(z, need_dz), _grad_buffer(z_tilde, need_dt)


def _align_setup_context(ctx, inputs, output):
    _, gz, gt = output
    ctx.mark_non_differentiable(gz, gt)
    ctx.save_for_backward(gz, gt)
    ctx.tokens = inputs[0].shape[1]


def _scaled(saved, scale):
    return (saved.float() * scale[:, None, None]).to(saved.dtype)


def _align_backward(ctx, grad_loss, _grad_gz, _grad_gt):
    if grad_loss is None:
        return None, None, None, None
    gz, gt = ctx.saved_tensors
    scale = grad_loss.float() / ctx.tokens  # d(mean over T)/d(row loss), per sample
    dz = _scaled(gz, scale) if ctx.needs_input_grad[0] else None
    dt = _scaled(gt, scale) if ctx.needs_input_grad[1] else None
    return dz, dt, None, None


_align_fwd.register_autograd(_align_backward, setup_context=_align_setup_context)


# --------------------------------------------------------------------------------------------------
# 4. The public op.
# --------------------------------------------------------------------------------------------------

def alignment_loss(z, z_tilde, impl: str = "auto"):
    """z (encoder features) and z_tilde (projector output), both [B, T, C] -> [B] fp32."""
    if use_triton(impl, z, z_tilde):
        if z.shape != z_tilde.shape or z.dim() < 2:
            raise ValueError(f"alignment_loss: z {tuple(z.shape)} and z_tilde {tuple(z_tilde.shape)} "
                             "must have the same shape [B, T, C]")
        lead = z.shape[:-2]
        if z.dim() != 3:
            z = z.reshape(-1, *z.shape[-2:])
            z_tilde = z_tilde.reshape(-1, *z_tilde.shape[-2:])
        grad = torch.is_grad_enabled()
        loss, _, _ = _align_fwd(z, z_tilde, grad and z.requires_grad, grad and z_tilde.requires_grad)
        return loss.reshape(lead)
    return alignment_loss_reference(z, z_tilde)
