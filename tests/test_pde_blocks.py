"""FourierFlow's blocks against independent float64 formulas: the periodic 3x3 local mean, the salient
(differential) attention with explicit softmax matrices, lambda learned and fixed, the AFNO mixer in numpy's
complex arithmetic, and the branch gate."""
import math

import numpy as np
import pytest
import torch

from fastrepa.models.pde_blocks import AFNO2D, BranchGate, SalientAttention, lambda_init_for, local_mean_3x3


def test_local_mean_is_the_3x3_mean_over_the_grid_periodic_or_not():
    g = torch.Generator().manual_seed(0)
    h, w = 4, 5
    k = torch.randn(2, 3, h * w, 6, generator=g, dtype=torch.float64)
    got = local_mean_3x3(k, (h, w))
    grid = k.reshape(2, 3, h, w, 6)
    for i in range(h):
        for j in range(w):
            want = sum(grid[:, :, (i + di) % h, (j + dj) % w] for di in (-1, 0, 1) for dj in (-1, 0, 1)) / 9
            torch.testing.assert_close(got[:, :, i * w + j], want)
    line = torch.randn(1, 2, 4, 3, generator=g, dtype=torch.float64)  # time: 4 frames, no wrap-around
    got = local_mean_3x3(line, (1, 4), periodic=False)
    torch.testing.assert_close(got[:, :, 0], line[:, :, :2].mean(2))
    torch.testing.assert_close(got[:, :, 2], line[:, :, 1:].mean(2))


def salient_formula(m, x):
    """The module's maths written out: explicit softmax matrices per head, float64."""
    B, T, D = x.shape
    H, d = m.num_heads, m.head_dim
    q1, q2, k1, k2, v = (x @ m.qkv.weight.T + m.qkv.bias).split(H * d, dim=-1)
    h, w = m.grid
    out = torch.zeros(B, T, H * d, dtype=x.dtype)
    lam = float(m.lam().detach())
    for head in range(H):
        s = slice(head * d, (head + 1) * d)
        K2 = k2[..., s].reshape(B, h, w, d)
        mean = sum(torch.roll(K2, (di, dj), dims=(1, 2)) for di in (-1, 0, 1) for dj in (-1, 0, 1)) / 9
        K2t = (K2 - mean).reshape(B, T, d)
        a1 = torch.softmax(q1[..., s] @ k1[..., s].transpose(1, 2) / math.sqrt(d), dim=-1)
        a2 = torch.softmax(q2[..., s] @ K2t.transpose(1, 2) / math.sqrt(d), dim=-1)
        o = (a1 - lam * a2) @ v[..., s]
        mu, var = o.mean(-1, keepdim=True), o.var(-1, unbiased=False, keepdim=True)
        out[..., s] = (o - mu) / torch.sqrt(var + 1e-5) * m.norm.weight[s] + m.norm.bias[s]
    return (out * (1 - m.lambda_init)) @ m.proj.weight.T + m.proj.bias


@pytest.mark.parametrize("mode", ["learned", "fixed"])
def test_salient_attention_is_the_differential_formula(mode):
    torch.manual_seed(0)
    m = SalientAttention(16, 2, (3, 4), depth=3, lambda_mode=mode, lambda_value=None if mode == "learned" else 0.3,
                         head_dim=None if mode == "learned" else 8)  # FourierFlow's D-wide heads, and narrow ones
    m = m.double()
    with torch.no_grad():
        m.norm.weight.normal_()
        m.norm.bias.normal_()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x), salient_formula(m, x))
    if mode == "learned":
        assert m.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.6)) == lambda_init_for(3)
        with torch.no_grad():
            want = math.exp(float((m.lambda_q1 * m.lambda_k1).sum())) - math.exp(float((m.lambda_q2 * m.lambda_k2).sum()))
        assert float(m.lam().detach()) == pytest.approx(want + m.lambda_init)
        m(x).square().sum().backward()
        assert all(getattr(m, n).grad.abs().sum() > 0 for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"))
    else:
        assert float(m.lam()) == pytest.approx(0.3) and m.lambda_init == 0.3
    with pytest.raises(ValueError, match="built for a 3x4 grid, got 10 tokens"):
        m(x[:, :10])


def afno_formula(m, x):
    """numpy's complex arithmetic: X = rfft2, complex weights W = w[0] + i w[1], ReLU on the real and
    imaginary parts, amplitude modulation, softshrink, irfft2, + x."""
    B, T, D = x.shape
    h, w = m.grid
    n, b = m.num_blocks, D // m.num_blocks
    xn = x.detach().numpy().reshape(B, h, w, D)
    X = np.fft.rfft2(xn, axes=(1, 2), norm="ortho")
    W1 = (m.w1[0] + 1j * m.w1[1]).detach().numpy()
    B1 = (m.b1[0] + 1j * m.b1[1]).detach().numpy()
    W2 = (m.w2[0] + 1j * m.w2[1]).detach().numpy()
    B2 = (m.b2[0] + 1j * m.b2[1]).detach().numpy()
    out = np.zeros_like(X)
    for k in range(n):
        Xk = X[..., k * b:(k + 1) * b]
        o1 = Xk @ W1[k] + B1[k]
        o1 = np.maximum(o1.real, 0) + 1j * np.maximum(o1.imag, 0)
        out[..., k * b:(k + 1) * b] = o1 @ W2[k] + B2[k]
    out = out * (1 + m.gamma.detach().numpy() * np.abs(X))
    shrink = lambda a: np.sign(a) * np.maximum(np.abs(a) - m.sparsity, 0)  # noqa: E731
    out = shrink(out.real) + 1j * shrink(out.imag)
    y = np.fft.irfft2(out, s=(h, w), axes=(1, 2), norm="ortho")
    return torch.from_numpy(y.reshape(B, T, D)) + x


def test_afno_is_the_formula_and_the_identity_without_weights():
    torch.manual_seed(1)
    m = AFNO2D(16, (4, 6), num_blocks=4, hidden_factor=2, scale=0.5).double()
    with torch.no_grad():
        m.gamma.normal_()
    x = torch.randn(2, 24, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x), afno_formula(m, x))
    with torch.no_grad():
        for p in (m.w1, m.b1, m.w2, m.b2):
            p.zero_()
    torch.testing.assert_close(m(x), x)  # an empty spectrum adds nothing


def test_gate_mixes_the_branches_by_a_sigmoid_of_both():
    torch.manual_seed(2)
    gate = BranchGate(3).double()
    a, f = torch.randn(2, 3, 5, 4, dtype=torch.float64), torch.randn(2, 3, 5, 4, dtype=torch.float64)
    both = torch.cat([f, a], 1)
    g = torch.sigmoid(torch.einsum("bftd,f->btd", both, gate.conv.weight[0, :, 0, 0]) + gate.conv.bias[0])[:, None]
    torch.testing.assert_close(gate(a, f), g * a + (1 - g) * f)
