"""kernels/qk_norm_rope.py: the Triton path against the reference and an fp64 oracle (the tolerance rule of
docs/design.md, "The fused-op rule").

Runs on kernel_checks.DEVICE: compiled on CUDA, or in the Triton CPU interpreter when there is no GPU
(tests/conftest.py sets TRITON_INTERPRET=1), so shapes stay tiny: a few programs per launch.
"""
import math

import pytest
import torch

from kernel_checks import DEVICE, assert_within_rule, grads, leaf, non_contiguous
from fastrepa.kernels.qk_norm_rope import NORMS, qk_norm_rope, qk_norm_rope_reference, rope_angles

# (B, H, head_dim, rope grid): odd T with a non-square grid, hd 72 (not a power of two), small hd with
# H=3, batch 1, and hd 256 (top of the envelope: 8-token tiles, so T=21 spans 3 tiles, the last partial).
SHAPES = [(2, 2, 72, (3, 5)), (1, 3, 8, (5, 3)), (2, 3, 16, (1, 7)), (1, 1, 256, (3, 7))]
DTYPES = [torch.float32, torch.bfloat16]


def make_inputs(B, H, hd, T, norm, seed=0, device=DEVICE):
    """fp64 qkv (with an offset, so LayerNorm's mean matters), parameters for `norm`, cotangents; drawn
    on the CPU (same values everywhere), then moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, 3 * H * hd, generator=g, dtype=torch.float64) * 1.5 + 0.3
    params = [None] * 4  # q_weight, q_bias, k_weight, k_bias
    if norm is not None:
        params[0] = 1 + 0.3 * torch.randn(hd, generator=g, dtype=torch.float64)
        params[2] = 1 + 0.3 * torch.randn(hd, generator=g, dtype=torch.float64)
        if norm == "layernorm":
            params[1] = 0.2 * torch.randn(hd, generator=g, dtype=torch.float64)
            params[3] = 0.2 * torch.randn(hd, generator=g, dtype=torch.float64)
    cots = [torch.randn(B, H, T, hd, generator=g, dtype=torch.float64) for _ in range(3)]
    params = [None if p is None else p.to(device) for p in params]
    return qkv.to(device), params, [c.to(device) for c in cots]


def run(fn, qkv, params, cots, H, loss=None, **kw):
    """Outputs (q, k, v) and gradients (qkv, q_weight, q_bias, k_weight, k_bias) of one implementation."""
    out = fn(qkv, H, *params, **kw)
    inputs = [qkv] + [p for p in params if p is not None]
    if loss is None:
        g = grads(out, inputs, [c.to(o.dtype) for c, o in zip(cots, out)])
    else:
        g = list(torch.autograd.grad(loss(*out), inputs))
    it = iter(g[1:])
    return list(out), [g[0]] + [None if p is None else next(it) for p in params]


def triton_fn(*a, **kw):
    return qk_norm_rope(*a, impl="triton", **kw)


def relabel(params, dtype):
    """Fresh leaves (same values) in `dtype`; None stays None."""
    return [None if p is None else leaf(p, dtype) for p in params]


def check_against_oracle(qkv64, params64, cots, H, dtype, param_dtype=None, make_x=None, loss=None, **kw):
    param_dtype = dtype if param_dtype is None else param_dtype
    x = leaf(qkv64, dtype)
    ps = relabel(params64, param_dtype)
    cs = [c.to(dtype) for c in cots]
    x_in = x if make_x is None else make_x(x)
    got_out, got_g = run(triton_fn, x_in, ps, cs, H, loss, **kw)
    ref_out, ref_g = run(qk_norm_rope_reference, leaf(x_in, dtype), relabel(ps, param_dtype), cs, H, loss, **kw)
    orc_out, orc_g = run(qk_norm_rope_reference, leaf(x, torch.float64), relabel(ps, torch.float64),
                         [c.double() for c in cs], H, loss, **kw)
    for name, a, b, c in zip("qkv", got_out, ref_out, orc_out):
        assert a.dtype == dtype
        assert_within_rule(name, a, b, c)
    grad_names = ["d_qkv", "d_q_weight", "d_q_bias", "d_k_weight", "d_k_bias"]
    for name, a, b, c in zip(grad_names, got_g, ref_g, orc_g):
        assert (a is None) == (c is None), name
        if a is not None:
            assert a.dtype == (dtype if name == "d_qkv" else param_dtype), name
            assert_within_rule(name, a, b, c)
    return got_out


@pytest.mark.parametrize("rope", [False, True], ids=["norope", "rope"])
@pytest.mark.parametrize("norm", [None, *NORMS], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}H{s[1]}hd{s[2]}g{s[3][0]}x{s[3][1]}")
def test_matches_reference(shape, dtype, norm, rope):
    B, H, hd, grid = shape
    T = grid[0] * grid[1]
    qkv, params, cots = make_inputs(B, H, hd, T, norm)
    out = check_against_oracle(qkv, params, cots, H, dtype, norm=norm, rope_grid=grid if rope else None)
    if norm is not None or rope:  # the kernel writes fresh contiguous outputs
        assert all(o.is_contiguous() for o in out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_input(dtype):
    qkv, params, cots = make_inputs(2, 2, 72, 15, "layernorm", seed=1)
    check_against_oracle(qkv, params, cots, 2, dtype, make_x=non_contiguous, norm="layernorm", rope_grid=(3, 5))


def test_fp32_parameters_with_bf16_activations():
    """As under autocast: bf16 qkv, fp32 norm parameters; parameter grads come back in fp32."""
    qkv, params, cots = make_inputs(1, 3, 16, 15, "layernorm", seed=2)
    check_against_oracle(qkv, params, cots, 3, torch.bfloat16, param_dtype=torch.float32,
                         norm="layernorm", rope_grid=(5, 3))


def test_norm_without_affine():
    qkv, _, cots = make_inputs(2, 2, 16, 15, "layernorm", seed=3)
    for norm in NORMS:
        check_against_oracle(qkv, [None] * 4, cots, 2, torch.float32, norm=norm, rope_grid=(3, 5))


@pytest.mark.parametrize("norm", [None, "rmsnorm"], ids=str)
def test_unused_and_expanded_grads(norm):
    """v unused (its grad arrives as None), q's grad from .sum() (stride 0), k's from a strided slice."""
    qkv, params, cots = make_inputs(2, 3, 8, 15, norm, seed=4)

    def loss(q, k, v):
        return q.sum() + (k[..., ::2].float() ** 2).sum()

    check_against_oracle(qkv, params, cots, 3, torch.float32, loss=loss, norm=norm, rope_grid=(5, 3))


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_rope_identity_at_origin_and_norm_preserving(impl):
    B, H, hd, (gh, gw) = 2, 2, 16, (3, 5)
    qkv = torch.randn(B, gh * gw, 3 * H * hd).to(DEVICE)
    q, k, v = qk_norm_rope(qkv, H, rope_grid=(gh, gw), impl=impl)
    q0, k0, v0 = qkv.view(B, gh * gw, 3, H, hd).permute(2, 0, 3, 1, 4)
    assert torch.equal(q[:, :, 0], q0[:, :, 0]) and torch.equal(k[:, :, 0], k0[:, :, 0])
    assert torch.equal(v, v0)
    # tokens of row 0 keep their first half (row angle 0), tokens of column 0 their second half
    assert torch.equal(q[:, :, :gw, :hd // 2], q0[:, :, :gw, :hd // 2])
    assert torch.equal(q[:, :, ::gw, hd // 2:], q0[:, :, ::gw, hd // 2:])
    for a, b in ((q, q0), (k, k0)):
        torch.testing.assert_close(a.norm(dim=-1), b.norm(dim=-1), rtol=1e-5, atol=1e-6)
    assert not torch.equal(q, q0)


@pytest.mark.parametrize("hd", [4, 8])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_rotation_convention_by_hand(impl, hd):
    """The convention of the module docstring written out element by element."""
    gh, gw, base = 2, 3, 100.0
    T, m = gh * gw, hd // 4
    x = torch.randn(1, T, 3 * hd, dtype=torch.float64)
    expected = torch.empty(T, hd, dtype=torch.float64)
    for t in range(T):
        r, c = t // gw, t % gw
        for half, pos in ((0, r), (1, c)):
            for j in range(m):
                a = pos * base ** (-j / m)
                i0, i1 = half * 2 * m + j, half * 2 * m + j + m
                x0, x1 = x[0, t, i0].item(), x[0, t, i1].item()
                expected[t, i0] = x0 * math.cos(a) - x1 * math.sin(a)
                expected[t, i1] = x1 * math.cos(a) + x0 * math.sin(a)
    dtype = torch.float32 if impl == "triton" else torch.float64
    q, k, _ = qk_norm_rope(x.to(DEVICE, dtype), 1, rope_grid=(gh, gw), rope_base=base, impl=impl)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q[0, 0].double(), expected.to(DEVICE), **tol)
    cos, sin = rope_angles(gh, gw, hd, base, DEVICE)
    assert cos.shape == (T, hd) and cos.dtype == torch.float32
    assert cos.device.type == DEVICE.type and torch.equal(cos[0], torch.ones(hd, device=DEVICE))


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_argument_errors(impl):
    x = torch.randn(1, 15, 3 * 2 * 8).to(DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        qk_norm_rope(torch.randn(1, 15, 3 * 6).to(DEVICE), 1, rope_grid=(3, 5), impl=impl)
    with pytest.raises(ValueError, match="rope_grid"):
        qk_norm_rope(x, 2, rope_grid=(4, 4), impl=impl)
    with pytest.raises(ValueError, match="norm"):
        qk_norm_rope(x, 2, norm="batchnorm", impl=impl)
    with pytest.raises(ValueError, match="num_heads"):
        qk_norm_rope(torch.randn(1, 15, 3 * 2 * 8 + 1).to(DEVICE), 2, impl=impl)


def test_auto_is_reference_on_cpu():
    qkv, params, _ = make_inputs(1, 2, 8, 6, "layernorm", device="cpu")  # CPU tensors on any machine
    ps = [p.float() for p in params]
    a = qk_norm_rope(qkv.float(), 2, *ps, norm="layernorm", rope_grid=(2, 3))
    b = qk_norm_rope_reference(qkv.float(), 2, *ps, norm="layernorm", rope_grid=(2, 3))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("norm", ["layernorm", None], ids=str)
def test_torch_compile_fullgraph(norm):
    torch._dynamo.reset()
    H, grid = 2, (3, 5)
    qkv64, params64, cots = make_inputs(2, H, 16, 15, norm, seed=5)

    def f(qkv, *params):
        return qk_norm_rope(qkv, H, *params, norm=norm, rope_grid=grid, impl="triton")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    res = []
    for fn in (f, compiled):
        x = leaf(qkv64, torch.float32)
        ps = relabel(params64, torch.float32)
        res.append(run(lambda x_, _h, *p, **kw: fn(x_, *p), x, ps, [c.float() for c in cots], H))
    (eo, eg), (co, cg) = res
    for a, b in zip(eo + eg, co + cg):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=0, atol=0)


# ------------------------------------------------------------------ interleaved pairs (EVA-02, as ERW)

def eva02_rope(x, grid, base):
    """EVA-02's VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=grid, theta=base) applied to
    x [..., grid * grid, head_dim], written as EVA-02 writes it, in float64: per-axis frequencies
    theta^(-2i/dim), positions arange(ft) / ft * pt, angles repeated '(n r)' with r = 2, the row angles
    on the first half of head_dim and the column angles on the second (broadcat), rotate_half on the
    pairs (2j, 2j + 1)."""
    hd = x.shape[-1]
    dim = hd // 2
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim))
    t = torch.arange(grid, dtype=torch.float64) / grid * grid
    f = (t[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)  # [grid, dim]
    f = torch.cat([f[:, None, :].expand(grid, grid, dim), f[None, :, :].expand(grid, grid, dim)], dim=-1)
    cos, sin = f.cos().reshape(grid * grid, hd), f.sin().reshape(grid * grid, hd)
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos + rotated * sin


@pytest.mark.parametrize("hd", [8, 16])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_interleaved_pairs_are_eva02_rope(impl, hd):
    grid, base, H = 3, 10000.0, 2
    x = torch.randn(2, grid * grid, 3 * H * hd, dtype=torch.float64)
    dtype = torch.float32 if impl == "triton" else torch.float64
    q, k, v = qk_norm_rope(x.to(DEVICE, dtype), H, rope_grid=(grid, grid), rope_base=base, rope_pairs="interleaved",
                           impl=impl)
    q0, k0, v0 = x.view(2, grid * grid, 3, H, hd).permute(2, 0, 3, 1, 4)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q.double().cpu(), eva02_rope(q0, grid, base), **tol)
    torch.testing.assert_close(k.double().cpu(), eva02_rope(k0, grid, base), **tol)
    assert torch.equal(v.cpu(), v0.to(dtype))
    half, _, _ = qk_norm_rope(x.to(DEVICE, dtype), H, rope_grid=(grid, grid), rope_base=base, impl=impl)
    assert not torch.allclose(half, q)  # the two conventions differ


@pytest.mark.parametrize("norm", [None, "layernorm"], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: f"B{s[0]}H{s[1]}hd{s[2]}g{s[3][0]}x{s[3][1]}")
def test_interleaved_matches_reference(shape, dtype, norm):
    """Two of the shapes (hd 72 and a tiny hd 8 with H=3): each variant is another compile on CUDA, and
    the GPU check's kernel-test step has a fixed budget."""
    B, H, hd, grid = shape
    qkv, params, cots = make_inputs(B, H, hd, grid[0] * grid[1], norm, seed=7)
    check_against_oracle(qkv, params, cots, H, dtype, norm=norm, rope_grid=grid, rope_pairs="interleaved")


def test_rope_pairs_must_be_known():
    with pytest.raises(ValueError, match="rope_pairs 'eva'"):
        qk_norm_rope(torch.randn(1, 4, 3 * 8).to(DEVICE), 1, rope_grid=(2, 2), rope_pairs="eva")
