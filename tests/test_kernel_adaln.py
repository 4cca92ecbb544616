"""Triton adaLN kernels (on DEVICE: compiled on CUDA, interpreted on CPU) against the reference and an
fp64 oracle, every gradient."""
import pytest
import torch

from fastrepa.kernels.adaln import (
    gated_residual,
    gated_residual_layernorm_modulate,
    gated_residual_layernorm_modulate_reference,
    gated_residual_reference,
    layernorm_modulate,
    layernorm_modulate_reference,
)
from kernel_checks import DEVICE, assert_within_rule, grads, leaf, non_contiguous

DTYPES = [torch.float32, torch.bfloat16]
# (B, T, D): odd T, D = 72*k and not a power of two, batch 1
SHAPES = [(2, 7, 72), (1, 5, 144), (3, 3, 40)]


def _inputs(B, T, D, seed=0, device=DEVICE):
    """Drawn on the CPU (same values everywhere), then moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g) * 2 + 0.5
    mod = torch.randn(B, 6 * D, generator=g) * 0.5  # the adaLN output, chunked in place like the model
    y = torch.randn(B, T, D, generator=g)
    return x.to(device), mod.to(device), y.to(device)


def _check_all(name, fn_kernel, fn_ref, inputs, dtype, n_out):
    """Run kernel / reference at `dtype` and reference at fp64; compare outputs and every gradient."""
    torch.manual_seed(1)
    results = {}
    for tag, fn, dt in (("kernel", fn_kernel, dtype), ("torch", fn_ref, dtype), ("oracle", fn_ref, torch.float64)):
        leaves = [leaf(t, dt) for t in inputs]
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        assert len(outs) == n_out
        cot = [torch.randn(o.shape, generator=torch.Generator().manual_seed(7 + i)).to(DEVICE, dt)
               for i, o in enumerate(outs)]
        results[tag] = ([o.detach() for o in outs], grads(outs, leaves, cot))
    for i in range(n_out):
        assert_within_rule(f"{name} out{i} {dtype}", results["kernel"][0][i], results["torch"][0][i], results["oracle"][0][i])
    for j, (gk, gt, go) in enumerate(zip(results["kernel"][1], results["torch"][1], results["oracle"][1])):
        assert gk is not None and gk.dtype == dtype, f"{name}: grad {j} missing or wrong dtype"
        assert_within_rule(f"{name} grad{j} {dtype}", gk, gt, go)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layernorm_modulate(shape, dtype):
    x, mod, _ = _inputs(*shape)
    D = shape[-1]
    shift, scale = mod[:, :D], mod[:, D:2 * D]

    def kernel(x, shift, scale):
        return layernorm_modulate(x, shift, scale, impl="triton")

    _check_all("layernorm_modulate", kernel, layernorm_modulate_reference, [x, shift, scale], dtype, 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_residual_layernorm_modulate(shape, dtype):
    x, mod, y = _inputs(*shape)
    D = shape[-1]
    gate, shift, scale = mod[:, :D], mod[:, D:2 * D], mod[:, 2 * D:3 * D]

    def kernel(x, gate, y, shift, scale):
        return gated_residual_layernorm_modulate(x, gate, y, shift, scale, impl="triton")

    _check_all("gated_residual_layernorm_modulate", kernel, gated_residual_layernorm_modulate_reference,
               [x, gate, y, shift, scale], dtype, 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_residual(dtype):
    x, mod, y = _inputs(2, 7, 72)
    gate = mod[:, :72]
    _check_all("gated_residual", lambda x, g, y: gated_residual(x, g, y, impl="triton"),
               gated_residual_reference, [x, gate, y], dtype, 1)


def test_modulation_views_are_used_in_place_and_match():
    """shift/scale as strided chunks of the adaLN output [B, 6D] give the same values as contiguous copies."""
    x, mod, _ = _inputs(2, 5, 72)
    shift, scale = mod.chunk(6, dim=-1)[:2]
    assert not shift.is_contiguous()
    a = layernorm_modulate(x, shift, scale, impl="triton")
    b = layernorm_modulate(x, shift.contiguous(), scale.contiguous(), impl="triton")
    assert torch.equal(a, b)


def test_non_contiguous_inputs():
    x, mod, y = _inputs(2, 5, 72)
    gate, shift, scale = mod[:, :72], mod[:, 72:144], mod[:, 144:216]
    xn, yn = non_contiguous(x), non_contiguous(y)
    assert not xn.is_contiguous()
    _check_all("non-contiguous", lambda *a: gated_residual_layernorm_modulate(*a, impl="triton"),
               gated_residual_layernorm_modulate_reference, [xn, gate, yn, shift, scale], torch.float32, 2)


def test_only_one_output_used_still_gives_grads():
    """Backward with x' unused downstream (its grad arrives as None) equals the reference."""
    x, mod, y = _inputs(1, 3, 40)
    args = [x, mod[:, :40], y, mod[:, 40:80], mod[:, 80:120]]
    lk, lr = [leaf(t, torch.float32) for t in args], [leaf(t, torch.float32) for t in args]
    gated_residual_layernorm_modulate(*lk, impl="triton")[1].square().sum().backward()
    gated_residual_layernorm_modulate_reference(*lr)[1].square().sum().backward()
    for a, b in zip(lk, lr):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_compile_fullgraph_keeps_the_triton_op():
    x, mod, y = _inputs(2, 5, 72)
    args = [x, mod[:, :72], y, mod[:, 72:144], mod[:, 144:216]]

    def f(x, gate, y, shift, scale):
        x2, h = gated_residual_layernorm_modulate(x, gate, y, shift, scale, impl="triton")
        return (x2 * 2 + layernorm_modulate(h, shift, scale, impl="triton")).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    le, lc = [leaf(t, torch.float32) for t in args], [leaf(t, torch.float32) for t in args]
    f(*le).backward()
    out = compiled(*lc)
    out.backward()
    torch.testing.assert_close(out, f(*[t.detach() for t in le]))
    for a, b in zip(le, lc):
        torch.testing.assert_close(a.grad, b.grad)


def test_impl_choice_and_errors():
    # auto on CPU tensors is the reference, bit for bit (on any machine)
    x, mod, _ = _inputs(1, 3, 40, device="cpu")
    shift, scale = mod[:, :40], mod[:, 40:80]
    assert torch.equal(layernorm_modulate(x, shift, scale), layernorm_modulate_reference(x, shift, scale))
    x, mod, _ = _inputs(1, 3, 40)
    shift, scale = mod[:, :40], mod[:, 40:80]
    with pytest.raises(ValueError, match="kernels="):
        layernorm_modulate(x, shift, scale, impl="cuda")
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        layernorm_modulate(x, shift[:, :8], scale, impl="triton")


def test_autocast_dtype_mix():
    """Under autocast the residual stream is fp32 while y and the modulation are bf16: the kernel keeps
    the reference's dtypes (x', h in fp32; dy, dgate in bf16) and its accuracy."""
    x, mod, y = _inputs(2, 5, 72)
    args32 = [x, mod[:, :72], y, mod[:, 72:144], mod[:, 144:216]]
    dts = [torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16]
    runs = {}
    for tag, fn, cast in (("kernel", lambda *a: gated_residual_layernorm_modulate(*a, impl="triton"), True),
                          ("torch", gated_residual_layernorm_modulate_reference, True),
                          ("oracle", gated_residual_layernorm_modulate_reference, False)):
        leaves = [leaf(t.to(dt) if cast else t.to(dt).double(), t.to(dt).dtype if cast else torch.float64)
                  for t, dt in zip(args32, dts)]
        outs = fn(*leaves)
        cot = [torch.ones_like(o) for o in outs]
        runs[tag] = ([o.detach() for o in outs], grads(outs, leaves, cot))
    for i in range(2):
        assert runs["kernel"][0][i].dtype == runs["torch"][0][i].dtype == torch.float32
        assert_within_rule(f"mixed out{i}", runs["kernel"][0][i], runs["torch"][0][i], runs["oracle"][0][i])
    for j, (gk, gt, go) in enumerate(zip(*(runs[k][1] for k in ("kernel", "torch", "oracle")))):
        assert gk.dtype == gt.dtype, f"grad {j}: {gk.dtype} != {gt.dtype}"
        assert_within_rule(f"mixed grad{j}", gk, gt, go, atol=2e-2)
