"""The fused bias+SiLU epilogue and the projector: Triton (on DEVICE: CUDA, or the CPU interpreter) vs
the reference vs fp64."""
import pytest
import torch

from fastrepa.kernels.projector import bias_silu, bias_silu_reference, projector, projector_reference
from kernel_checks import DEVICE, assert_within_rule, grads, leaf, non_contiguous

DTYPES = [torch.float32, torch.bfloat16]


def _inputs(bases, dtypes, requires_grad, noncontig):
    out = []
    for b, dt, rg in zip(bases, dtypes, requires_grad):
        t = leaf(b, dt, rg)
        out.append(non_contiguous(t) if noncontig and t.dim() > 1 else t)
    return out


def _check(name, kernel_fn, ref_fn, bases, dtypes, requires_grad, noncontig=False, cot_seed=1):
    """Output and every gradient of kernel_fn vs ref_fn at the same dtypes vs ref_fn in fp64."""
    k_in = _inputs(bases, dtypes, requires_grad, noncontig)
    r_in = _inputs(bases, dtypes, requires_grad, noncontig)
    o_in = [t.detach().double().requires_grad_(t.requires_grad) for t in k_in]  # same values, fp64
    out_k, out_r, out_o = kernel_fn(*k_in), ref_fn(*r_in), ref_fn(*o_in)
    assert out_k.dtype == out_r.dtype
    assert_within_rule(f"{name} out", out_k, out_r, out_o)
    cot = torch.randn(out_o.shape, generator=torch.Generator().manual_seed(cot_seed), dtype=torch.float64)
    cot = cot.to(DEVICE)
    g_k = grads([out_k], k_in, [cot.to(out_k.dtype)])
    g_r = grads([out_r], r_in, [cot.to(out_r.dtype)])
    g_o = grads([out_o], o_in, [cot])
    for i, (gk, gr, go) in enumerate(zip(g_k, g_r, g_o)):
        if not requires_grad[i]:
            assert gk is None
            continue
        assert gk.dtype == k_in[i].dtype, f"{name} grad {i}: dtype {gk.dtype} != {k_in[i].dtype}"
        assert_within_rule(f"{name} grad {i}", gk, gr, go)


def _bases(*shapes, seed=0, scale=1.0, device=DEVICE):
    """fp64 values drawn on the CPU (the same everywhere), then moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * scale).to(device) for s in shapes]


# ---------------------------------------------------------------- bias_silu


def _bs_triton(a, b):
    return bias_silu(a, b, impl="triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7, 40), (2, 5, 300)])  # 300: two column blocks, masked tail
@pytest.mark.parametrize("noncontig", [False, True])
def test_bias_silu_matches_reference(dtype, shape, noncontig):
    a, b = _bases(shape, shape[-1:], scale=2.0)
    _check("bias_silu", _bs_triton, bias_silu_reference, [a, b], [dtype, dtype], [True, True], noncontig)


def test_bias_silu_mixed_dtypes_and_partial_grads():
    """bf16 activations with an fp32 bias (autocast), then each input alone requiring grad."""
    a, b = _bases((3, 24), (24,), seed=1, scale=2.0)
    _check("bias_silu mixed", _bs_triton, bias_silu_reference, [a, b], [torch.bfloat16, torch.float32],
           [True, True])
    _check("bias_silu a only", _bs_triton, bias_silu_reference, [a, b], [torch.float32] * 2, [True, False])
    _check("bias_silu bias only", _bs_triton, bias_silu_reference, [a, b], [torch.float32] * 2,
           [False, True])


def test_bias_silu_many_rows_and_expanded_grad():
    """Enough rows that each backward program loops over several row tiles (plus a ragged tail); the
    incoming gradient of .sum() is an expanded (stride-0) tensor."""
    M, N = 64 * 256 + 100, 40
    a, b = _bases((M, N), (N,), seed=2, scale=2.0)
    ak, bk = leaf(a, torch.float32), leaf(b, torch.float32)
    ao, bo = leaf(a, torch.float64), leaf(b, torch.float64)
    yk, yo = bias_silu(ak, bk, impl="triton"), bias_silu_reference(ao, bo)
    torch.testing.assert_close(yk.double(), yo, rtol=1e-6, atol=1e-6)
    dak, dbk = torch.autograd.grad(yk.sum(), [ak, bk])
    dao, dbo = torch.autograd.grad(yo.sum(), [ao, bo])
    torch.testing.assert_close(dak.double(), dao, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dbk.double(), dbo, rtol=1e-5, atol=1e-4)


def test_bias_silu_dispatch():
    a, b = _bases((2, 8), (8,), device="cpu")  # CPU tensors on any machine
    a, b = a.float(), b.float()
    assert torch.equal(bias_silu(a, b, impl="torch"), bias_silu_reference(a, b))
    assert torch.equal(bias_silu(a, b), bias_silu_reference(a, b))  # auto on CPU: the reference
    with pytest.raises(ValueError):
        bias_silu(a, b, impl="cuda")


# ---------------------------------------------------------------- projector


def _proj_triton(*args):
    return projector(*args, impl="triton")


def _proj_bases(B, T, D, H, Z, seed=0):
    x, w0, b0, w1, b1, w2, b2 = _bases((B, T, D), (H, D), (H,), (H, H), (H,), (Z, H), (Z,), seed=seed)
    # nn.Linear-like scales, so activations stay O(1) through the three layers
    return [x, w0 / D ** 0.5, b0, w1 / H ** 0.5, b1, w2 / H ** 0.5, b2]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", [(1, 7, 72, 40, 24), (2, 5, 144, 300, 40)])
def test_projector_matches_reference(dtype, dims):
    bases = _proj_bases(*dims)
    _check("projector", _proj_triton, projector_reference, bases, [dtype] * 7, [True] * 7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_projector_non_contiguous(dtype):
    bases = _proj_bases(2, 3, 72, 48, 24, seed=3)
    _check("projector nc", _proj_triton, projector_reference, bases, [dtype] * 7, [True] * 7, noncontig=True)


def test_projector_frozen_weights_input_grad_only():
    bases = _proj_bases(1, 7, 72, 40, 24, seed=4)
    _check("projector x only", _proj_triton, projector_reference, bases, [torch.float32] * 7,
           [True] + [False] * 6)


def test_projector_torch_compile_matches_eager():
    bases = _proj_bases(2, 3, 72, 40, 24, seed=5)
    eager_in = [leaf(b, torch.float32) for b in bases]
    comp_in = [leaf(b, torch.float32) for b in bases]

    def fn(*args):
        return projector(*args, impl="triton")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out_e, out_c = fn(*eager_in), compiled(*comp_in)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
    cot = torch.randn(out_e.shape).to(DEVICE)
    for ge, gc in zip(grads([out_e], eager_in, [cot]), grads([out_c], comp_in, [cot])):
        torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-6)
