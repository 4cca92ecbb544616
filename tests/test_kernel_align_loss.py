"""The REPA alignment loss: Triton (on DEVICE: CUDA, or the CPU interpreter) vs the reference vs an fp64
oracle, every gradient."""
import pytest
import torch

from fastrepa.kernels.align_loss import alignment_loss, alignment_loss_reference
from kernel_checks import DEVICE, assert_within_rule, grads, leaf, non_contiguous

DTYPES = [torch.float32, torch.bfloat16]
# (B, T, C): odd T, C not a power of two (one masked block), batch 1
SHAPES = [(1, 7, 24), (2, 5, 40), (3, 3, 72)]


def _bases(B, T, C, seed=0, device=DEVICE):
    """fp64 (z, z_tilde) drawn on the CPU (the same everywhere), then moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    # correlated with z (as a trained projector's output), at a different scale
    zt = 3.0 * (0.6 * z + 0.8 * torch.randn(B, T, C, generator=g, dtype=torch.float64))
    return z.to(device), zt.to(device)


def _triton(z, zt):
    return alignment_loss(z, zt, impl="triton")


def _check(name, z, zt, dtypes, z_grad, noncontig=False):
    """Loss and both gradients: kernel vs reference at the same dtypes vs reference on fp64 copies."""
    def make():
        ins = [leaf(z, dtypes[0], z_grad), leaf(zt, dtypes[1])]
        return [non_contiguous(t) for t in ins] if noncontig else ins

    k_in, r_in = make(), make()
    if noncontig:
        assert not k_in[0].is_contiguous() and not k_in[1].is_contiguous()
    o_in = [t.detach().double().requires_grad_(t.requires_grad) for t in k_in]
    out_k, out_r, out_o = _triton(*k_in), alignment_loss_reference(*r_in), alignment_loss_reference(*o_in)
    assert out_k.dtype == torch.float32 and out_k.shape == (z.shape[0],)
    assert_within_rule(f"{name} loss", out_k, out_r, out_o)
    cot = torch.randn(out_o.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    cot = cot.to(DEVICE)
    g_k = grads([out_k], k_in, [cot.float()])
    g_r = grads([out_r], r_in, [cot.float()])
    g_o = grads([out_o], o_in, [cot])
    for what, gk, gr, go, t in zip(("dz", "dz_tilde"), g_k, g_r, g_o, k_in):
        if not t.requires_grad:
            assert gk is None
            continue
        assert gk.dtype == t.dtype, f"{name} {what}: dtype {gk.dtype} != {t.dtype}"
        assert_within_rule(f"{name} {what}", gk, gr, go)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("z_grad", [True, False])
def test_alignment_loss_matches_reference(dtype, shape, z_grad):
    z, zt = _bases(*shape)
    _check("align", z, zt, (dtype, dtype), z_grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_alignment_loss_non_contiguous(dtype):
    z, zt = _bases(2, 7, 40, seed=1)
    _check("align nc", z, zt, (dtype, dtype), z_grad=True, noncontig=True)


def test_alignment_loss_mixed_dtypes():
    """fp32 frozen-encoder features against a bf16 (autocast) projector output, and the reverse."""
    z, zt = _bases(2, 7, 24, seed=2)
    _check("align mixed", z, zt, (torch.float32, torch.bfloat16), z_grad=False)
    _check("align mixed", z, zt, (torch.bfloat16, torch.float32), z_grad=True)


def test_alignment_loss_large_feature_dim():
    """C = 1536 (a DINOv2-g sized encoder): one 2048-wide masked block per row."""
    z, zt = _bases(1, 3, 1536, seed=3)
    _check("align C1536", z, zt, (torch.float32, torch.float32), z_grad=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_alignment_loss_zero_and_tiny_norm_rows(dtype):
    """Rows with ||x|| = 0 and 0 < ||x|| < eps: F.normalize's x / max(||x||, eps) and its gradient."""
    z, zt = _bases(2, 5, 24, seed=4)
    zt[0, 1] = 0.0
    z[1, 2] = 0.0
    zt[1, 3] = 0.0
    z[1, 3] = 0.0
    z[0, 4] = 1e-14  # ||z|| ~ 5e-14 < eps (fp32 and bf16 both represent it)
    zt[1, 4] *= 1e-14  # ||z_tilde|| ~ 1.5e-13 < eps, direction kept: c != 0 in that row
    k_in = [leaf(z, dtype), leaf(zt, dtype)]
    r_in = [leaf(z, dtype), leaf(zt, dtype)]
    out_k, out_r = _triton(*k_in), alignment_loss_reference(*r_in)
    torch.testing.assert_close(out_k, out_r, rtol=1e-5, atol=1e-6)
    cot = torch.tensor([0.5, -1.5], device=DEVICE)
    g_k, g_r = grads([out_k], k_in, [cot]), grads([out_r], r_in, [cot])
    for gk, gr in zip(g_k, g_r):
        assert torch.isfinite(gk).all()
        torch.testing.assert_close(gk.float(), gr.float(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-6)
    assert g_k[1][0, 1].abs().max() > 0  # the zero row of z_tilde still gets -z^ / eps (times 1/T)
    assert g_k[0][0, 4].abs().max() > 1e9  # below eps: the gradient of x / eps, no clamp cut-off
    assert g_k[1][1, 4].abs().max() > 1e9


def test_alignment_loss_hand_values():
    """Identical -> -1, orthogonal -> 0, opposite -> +1, whatever the norms; gradients by hand."""
    z = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]],
                      [[0.0, 2.0, 0.0], [3.0, 4.0, 0.0]]], device=DEVICE)
    zt = torch.tensor([[[5.0, 0.0, 0.0], [0.0, 2.0, 0.0]],
                       [[0.0, -1.0, 0.0], [3.0, 4.0, 0.0]]], device=DEVICE, requires_grad=True)
    loss = _triton(z, zt)
    torch.testing.assert_close(loss, torch.tensor([(-1.0 + 0.0) / 2, (1.0 - 1.0) / 2], device=DEVICE))
    (g,) = torch.autograd.grad(loss.sum(), [zt])
    # d(-z^.zt^)/dzt = (c zt^ - z^) / ||zt||, then / T (T = 2)
    expected = torch.tensor([[[0.0, 0.0, 0.0], [-0.25, 0.0, 0.0]],
                             [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]], device=DEVICE)
    torch.testing.assert_close(g, expected, rtol=0, atol=1e-7)


def test_alignment_loss_no_grad_and_leading_dims():
    z, zt = _bases(2, 5, 24, seed=5)
    z, zt = z.float(), zt.float().requires_grad_()
    with torch.no_grad():
        torch.testing.assert_close(_triton(z, zt), alignment_loss_reference(z, zt))
    z4, zt4 = z.reshape(2, 1, 5, 24), zt.detach().reshape(2, 1, 5, 24)
    torch.testing.assert_close(_triton(z4, zt4), alignment_loss_reference(z4, zt4))


def test_alignment_loss_dispatch():
    z, zt = (t.float() for t in _bases(1, 3, 8, device="cpu"))  # CPU tensors on any machine
    assert torch.equal(alignment_loss(z, zt, impl="torch"), alignment_loss_reference(z, zt))
    assert torch.equal(alignment_loss(z, zt), alignment_loss_reference(z, zt))  # auto on CPU
    with pytest.raises(ValueError):
        alignment_loss(z, zt, impl="cuda")


@pytest.mark.parametrize("z_grad", [True, False])
def test_alignment_loss_torch_compile_matches_eager(z_grad):
    z, zt = _bases(2, 7, 40, seed=6)
    eager_in = [leaf(z, torch.float32, z_grad), leaf(zt, torch.float32)]
    comp_in = [leaf(z, torch.float32, z_grad), leaf(zt, torch.float32)]

    def fn(a, b):
        return alignment_loss(a, b, impl="triton").mean()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out_e, out_c = fn(*eager_in), compiled(*comp_in)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-7)
    g_e = grads([out_e], eager_in, [torch.ones((), device=DEVICE)])
    g_c = grads([out_c], comp_in, [torch.ones((), device=DEVICE)])
    for ge, gc in zip(g_e, g_c):
        if ge is None:
            assert gc is None
        else:
            torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-8)
