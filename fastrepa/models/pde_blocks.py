"""FourierFlow's building blocks (arXiv 2506.00862; WillDreamer/FourierFlow models/diff_afno_sit.py and
models/afno2d.py read for facts), written for the paper's intent:

- `SalientAttention`, the "salient flow" differential attention over a token grid [B, h*w, D]:
      A = softmax(s Q1 K1^T) - lambda softmax(s Q2 K~2^T),  K~2 = K2 - mean_3x3(K2) over the (h, w) grid,
  out = W_o((1 - lambda_init) GroupNorm_per_head(A V)), s = head_dim^-0.5. Both softmax products run through
  `fastrepa.attention` (A V is linear in A, so it is two fused attention calls, never the T x T matrices).
- `AFNO2D`, the adaptive Fourier neural operator mixer: rfft2 over the grid (ortho), a block-diagonal
  complex two-layer MLP (ReLU), amplitude modulation (1 + gamma |X|), softshrink, irfft2, plus the input.
- `BranchGate`: out = G a + (1 - G) f with G = sigmoid(1x1 conv over the frames of both branches).

Deliberate differences from the released code, each a choice for what the paper describes:
- the local mean pools over the token grid's (h, w) with circular padding (the CNS box is periodic); the
  released code pools a (B*H, 16, 16, D) view, i.e. over (w, feature), with zero padding;
- lambda is a parameter (`lambda_mode="learned"`: DIFF Transformer's exp(l_q1.l_k1) - exp(l_q2.l_k2) +
  lambda_init) or a constant (`"fixed"`), never redrawn per forward (released: U(0, 1) every call);
- scores are scaled by head_dim^-0.5 (released: unscaled); heads are split with a transpose (released:
  `.view` without one, which mixes tokens and heads); the GroupNorm normalises each head per token (DIFF
  Transformer's per-head norm; released: each head over all its tokens and features at once);
- temporal blocks take the local mean over neighbouring frames without wrapping (released: a 2x2 "grid"
  view of the 4 frames);
- the AFNO branch sees its input with gradients (released: `x.detach()`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastrepa.attention import attention

LAMBDA_MODES = ("learned", "fixed")


def lambda_init_for(depth: int) -> float:
    """DIFF Transformer's lambda_init for layer `depth` (1-based): 0.8 - 0.6 exp(-0.3 (depth - 1))."""
    return 0.8 - 0.6 * math.exp(-0.3 * (depth - 1))


def local_mean_3x3(k: torch.Tensor, grid: tuple[int, int], periodic: bool = True) -> torch.Tensor:
    """k [B, H, h*w, d] (row-major tokens) -> the mean of each token's 3x3 neighbourhood on the grid:
    periodic (the CNS box), or over the neighbours that exist (time: a (1, frames) grid)."""
    B, H, T, d = k.shape
    h, w = grid
    x = k.reshape(B * H, h, w, d).permute(0, 3, 1, 2)  # [BH, d, h, w]
    if periodic:
        x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="circular"), 3, stride=1)
    else:
        x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return x.permute(0, 2, 3, 1).reshape(B, H, T, d)


class SalientAttention(nn.Module):
    """Differential attention with a locally-centred second key (module docstring). `qkv` holds
    [q1 | q2 | k1 | k2 | v] (each heads x head_dim wide, heads contiguous), `proj` is W_o. head_dim defaults
    to `dim`, as FourierFlow builds it (every head as wide as the model: its W_v is D -> heads x D);
    `periodic`: the local mean wraps around the grid (space) or not (time)."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], depth: int = 1,
                 lambda_mode: str = "learned", lambda_value: float | None = None, attn_backend: str = "sdpa",
                 head_dim: int | None = None, periodic: bool = True):
        super().__init__()
        if lambda_mode not in LAMBDA_MODES:
            raise ValueError(f"lambda_mode={lambda_mode!r}: expected one of {LAMBDA_MODES}")
        self.num_heads, self.head_dim, self.grid = num_heads, head_dim or dim, tuple(grid)
        self.periodic, self.lambda_mode, self.attn_backend = periodic, lambda_mode, attn_backend
        self.lambda_init = lambda_init_for(depth) if lambda_value is None else float(lambda_value)
        inner = num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 5 * inner)
        self.norm = nn.GroupNorm(num_heads, inner, eps=1e-5)  # per head and token, over its head_dim features
        self.proj = nn.Linear(inner, dim)
        if lambda_mode == "learned":
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                setattr(self, name, nn.Parameter(torch.randn(self.head_dim) * 0.1))

    def lam(self) -> torch.Tensor:
        if self.lambda_mode == "fixed":
            return torch.tensor(self.lambda_init)
        return (torch.exp((self.lambda_q1 * self.lambda_k1).sum()) - torch.exp((self.lambda_q2 * self.lambda_k2).sum())
                + self.lambda_init)

    def forward(self, x):
        B, T, _ = x.shape
        if T != self.grid[0] * self.grid[1]:
            raise ValueError(f"SalientAttention built for a {self.grid[0]}x{self.grid[1]} grid, got {T} tokens")
        q1, q2, k1, k2, v = (t.reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)
                             for t in self.qkv(x).chunk(5, dim=-1))
        k2 = k2 - local_mean_3x3(k2, self.grid, self.periodic)
        lam = self.lam().to(x.dtype)
        out = attention(q1, k1, v, self.attn_backend) - lam * attention(q2, k2, v, self.attn_backend)
        inner = self.num_heads * self.head_dim
        out = self.norm(out.reshape(B * T, inner)).reshape(B, T, inner) * (1 - self.lambda_init)
        return self.proj(out)


class AFNO2D(nn.Module):
    """The AFNO spectral mixer on tokens [B, h*w, D] of a grid: X = rfft2(x) (ortho, over h and w), per block
    of D / num_blocks channels a complex MLP o = W2 ReLU(W1 X + b1) + b2 (complex weights stored as real and
    imaginary parts: `w1`, `b1`, `w2`, `b2` [2, blocks, ...]), o *= 1 + gamma |X| (gamma per channel, 0 at
    init), softshrink(o, `sparsity`) on the real and imaginary parts, then irfft2 and + x."""

    def __init__(self, dim: int, grid: tuple[int, int], num_blocks: int = 8, hidden_factor: int = 1,
                 sparsity: float = 0.01, scale: float = 0.02):
        super().__init__()
        if dim % num_blocks:
            raise ValueError(f"dim={dim} is not divisible by num_blocks={num_blocks}")
        self.grid, self.num_blocks, self.sparsity = tuple(grid), num_blocks, sparsity
        b = dim // num_blocks
        self.w1 = nn.Parameter(scale * torch.randn(2, num_blocks, b, b * hidden_factor))
        self.b1 = nn.Parameter(scale * torch.randn(2, num_blocks, b * hidden_factor))
        self.w2 = nn.Parameter(scale * torch.randn(2, num_blocks, b * hidden_factor, b))
        self.b2 = nn.Parameter(scale * torch.randn(2, num_blocks, b))
        self.gamma = nn.Parameter(torch.zeros(dim))

    @staticmethod
    def _complex_linear(xr, xi, w, bias):
        """(xr + i xi) (w[0] + i w[1]) + (bias[0] + i bias[1]), blockwise: x [..., blocks, b]."""
        yr = torch.einsum("...nb,nbo->...no", xr, w[0]) - torch.einsum("...nb,nbo->...no", xi, w[1]) + bias[0]
        yi = torch.einsum("...nb,nbo->...no", xi, w[0]) + torch.einsum("...nb,nbo->...no", xr, w[1]) + bias[1]
        return yr, yi

    def forward(self, x):
        B, T, D = x.shape
        h, w = self.grid
        if T != h * w:
            raise ValueError(f"AFNO2D built for a {h}x{w} grid, got {T} tokens")
        dtype, wide = x.dtype, torch.promote_types(x.dtype, torch.float32)  # the FFT in fp32 at least
        X = torch.fft.rfft2(x.to(wide).reshape(B, h, w, D), dim=(1, 2), norm="ortho")  # [B, h, w//2+1, D]
        blocks = (B, h, w // 2 + 1, self.num_blocks, D // self.num_blocks)
        xr, xi = X.real.reshape(blocks), X.imag.reshape(blocks)
        w1, b1, w2, b2 = (p.to(wide) for p in (self.w1, self.b1, self.w2, self.b2))
        o1r, o1i = self._complex_linear(xr, xi, w1, b1)
        o2r, o2i = self._complex_linear(F.relu(o1r), F.relu(o1i), w2, b2)
        amp = 1 + self.gamma.to(wide) * X.abs()
        o2r, o2i = o2r.reshape(X.shape) * amp, o2i.reshape(X.shape) * amp
        o = torch.complex(F.softshrink(o2r, self.sparsity), F.softshrink(o2i, self.sparsity))
        y = torch.fft.irfft2(o, s=(h, w), dim=(1, 2), norm="ortho").reshape(B, T, D)
        return (y + x.to(wide)).to(dtype)


class BranchGate(nn.Module):
    """out = G a + (1 - G) f, G = sigmoid(conv1x1 over the 2F frames of cat([f, a])) -> [B, 1, T, D], shared by
    the frames: a (attention branch) and f (Fourier branch) are [B, F, T, D]."""

    def __init__(self, frames: int):
        super().__init__()
        self.conv = nn.Conv2d(2 * frames, 1, kernel_size=1)

    def forward(self, a, f):
        g = torch.sigmoid(self.conv(torch.cat([f, a], dim=1)))
        return g * a + (1 - g) * f


__all__ = ["AFNO2D", "BranchGate", "LAMBDA_MODES", "SalientAttention", "lambda_init_for", "local_mean_3x3"]
