"""PDE-DiT, FourierFlow's forecaster (its `models/diff_afno_sit.py` read for the structure), with the
blocks of fastrepa.models.pde_blocks:

    x [B, F, C, H, W] (the noised target frames), t [B], cond [B, F, C, H, W] (the condition frames)
    tokens  = Linear((p p c) patches) + a learned position table [1, F, h*w, D], for x and cond alike
    tokens += CrossAttention(tokens, cond tokens)                  (per frame)
    Fourier branch: `afno_depth` AFNO blocks, then LayerNorm
    attention branch: `spa_depth` spatial blocks (salient attention over each frame's h x w grid, adaLN-zero
        on the time embedding only; the projectors after spatial block `encoder_depth`, 1-based), then
        `tem_depth` temporal blocks (salient attention over the F frames of each token position)
    both branches -> the same zero-init Linear to (p p c) patches -> BranchGate -> [B, F, C, H, W]

Presets (`PDE_SIZES`): FourierFlow's defaults are "XL" (D 512, 8 heads, 6 spatial + 3 temporal + 6 AFNO
blocks, patch 8 on 128x128, 4 frames x 4 variables). Deliberate differences from the released code (besides
those of pde_blocks): the tokens attend to the condition (query = tokens; released: query = condition, key
and value = tokens); the time embedding is repeated in the (batch, frame) order of the tokens (released:
`repeat`, which mismatches them); the branches' MLPs keep every batch element (released: `[0]`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastrepa.attention import attention
from fastrepa import kernels as K
from fastrepa.models.embed import TimestepEmbedder, xavier_linear_init
from fastrepa.models.pde_blocks import AFNO2D, BranchGate, SalientAttention

# size -> (hidden, heads, spatial blocks, temporal blocks, AFNO blocks)
PDE_SIZES = {"S": (128, 4, 4, 2, 2), "B": (256, 8, 6, 3, 6), "XL": (512, 8, 6, 3, 6)}


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CrossAttention(nn.Module):
    """Multi-head attention of x [N, T, D] to a context [N, S, D] (no biases on q and kv, as released)."""

    def __init__(self, dim: int, heads: int = 8, head_dim: int = 64, attn_backend: str = "sdpa"):
        super().__init__()
        self.heads, self.head_dim, self.attn_backend = heads, head_dim, attn_backend
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim)

    def forward(self, x, context):
        N, T, _ = x.shape
        q = self.to_q(x).reshape(N, T, self.heads, self.head_dim).transpose(1, 2)
        k, v = (t.reshape(N, context.shape[1], self.heads, self.head_dim).transpose(1, 2)
                for t in self.to_kv(context).chunk(2, dim=-1))
        return self.to_out(attention(q, k, v, self.attn_backend))


class PDEBlock(nn.Module):
    """adaLN-zero block (time only) around salient attention and an MLP: x [N, T, D], c [N, D]; the norms,
    modulations and gated residuals through `fastrepa.kernels`, as SiT's."""

    eps = 1e-6

    def __init__(self, dim, heads, grid, depth, mlp_ratio=4.0, periodic=True, **attn):
        super().__init__()
        self.attn = SalientAttention(dim, heads, grid, depth=depth, periodic=periodic, **attn)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        h = K.layernorm_modulate(x, shift_msa, scale_msa, self.eps)
        x, h = K.gated_residual_layernorm_modulate(x, gate_msa, self.attn(h), shift_mlp, scale_mlp, self.eps)
        return K.gated_residual(x, gate_mlp, self.mlp(h))


class AFNOBlock(nn.Module):
    """AFNO's block (double skip): x + AFNO(LN(x)), then + MLP(LN(.))."""

    def __init__(self, dim, grid, mlp_ratio=4.0, num_blocks=8):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.filter = AFNO2D(dim, grid, num_blocks=num_blocks)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.filter(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PDEDiT(nn.Module):
    """The registry's `PDE-DiT-<size>/<patch>` family (fastrepa.models): the backbone interface of the image
    families where it applies (latent_shape, token_grid, prediction, fsdp_units, forward_flops), no labels
    (null_class None, no label dropout) and `modality = "fields"` (no VAE, no image grids)."""

    prediction = "velocity"
    modality = "fields"
    null_class = None
    label_dropout_prob = 0.0

    def __init__(self, input_size: int = 128, patch_size: int = 8, in_channels: int = 4, num_frames: int = 4,
                 hidden_size: int = 512, num_heads: int = 8, spa_depth: int = 6, tem_depth: int = 3,
                 afno_depth: int = 6, encoder_depth: int = 4, mlp_ratio: float = 4.0, z_dims=(768,),
                 projector_dim: int = 2048, head_dim: int | None = None, lambda_mode: str = "learned",
                 afno_blocks: int = 8, attn_backend: str = "sdpa"):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
        if z_dims and not 1 <= encoder_depth <= spa_depth:
            raise ValueError(f"encoder_depth={encoder_depth} is outside 1..{spa_depth} (the spatial blocks)")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.num_frames, self.hidden_size, self.encoder_depth = num_frames, hidden_size, encoder_depth
        g = input_size // patch_size
        self.grid = (g, g)
        n = g * g
        attn = dict(lambda_mode=lambda_mode, head_dim=head_dim, attn_backend=attn_backend)
        self.patch_embed = nn.Linear(patch_size * patch_size * in_channels, hidden_size)
        self.pos_embedding = nn.Parameter(torch.randn(1, num_frames, n, hidden_size))
        self.cross_attn = CrossAttention(hidden_size, attn_backend=attn_backend)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.spatial_blocks = nn.ModuleList(PDEBlock(hidden_size, num_heads, self.grid, i + 1, mlp_ratio, **attn)
                                            for i in range(spa_depth))
        self.temporal_blocks = nn.ModuleList(PDEBlock(hidden_size, num_heads, (1, num_frames), i + 1, mlp_ratio,
                                                      periodic=False, **attn) for i in range(tem_depth))
        self.afno_blocks = nn.ModuleList(AFNOBlock(hidden_size, self.grid, mlp_ratio, afno_blocks)
                                         for _ in range(afno_depth))
        self.afno_norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.z_dims = list(z_dims)
        self.projectors = nn.ModuleList(nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(),
                                                      nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                                                      nn.Linear(projector_dim, z)) for z in self.z_dims)
        self.final_layer = nn.Linear(hidden_size, patch_size * patch_size * in_channels)
        self.gate = BranchGate(num_frames)
        self.initialize_weights()

    def initialize_weights(self):
        self.apply(xavier_linear_init)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in [*self.spatial_blocks, *self.temporal_blocks]:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.weight)
        nn.init.zeros_(self.final_layer.bias)

    @property
    def latent_shape(self):
        return (self.num_frames, self.in_channels, self.input_size, self.input_size)

    @property
    def token_grid(self):
        return self.grid

    def fsdp_units(self) -> list[nn.Module]:
        """The modules sharded (FSDP2), compiled and checkpointed one by one: every block of both branches."""
        return [*self.afno_blocks, *self.spatial_blocks, *self.temporal_blocks]

    def forward_flops(self) -> int:
        """2 x the multiply-accumulates of one forward of one sample (F frames): linear layers, attention
        scores and weighted values (two of each per salient attention), the AFNO block-diagonal complex MLP
        (4 real products per complex one) and its MLP, the gate; not the FFTs, norms, softmax or elementwise ops."""
        Fr, n, D = self.num_frames, self.grid[0] * self.grid[1], self.hidden_size
        P = self.patch_size ** 2 * self.in_channels

        def lin(m):
            return m.in_features * m.out_features

        ca = self.cross_attn
        macs = 2 * Fr * n * P * D  # x and cond patch embeddings
        macs += Fr * n * (lin(ca.to_q) + lin(ca.to_kv) + lin(ca.to_out)) + 2 * Fr * n * n * ca.heads * ca.head_dim
        macs += sum(lin(m) for m in self.t_embedder.modules() if isinstance(m, nn.Linear))
        for blocks, tokens, groups in ((self.spatial_blocks, n, Fr), (self.temporal_blocks, Fr, n)):
            for blk in blocks:
                a = blk.attn
                inner = a.num_heads * a.head_dim
                macs += lin(blk.adaLN_modulation[-1]) * groups
                macs += groups * tokens * (lin(a.qkv) + lin(a.proj) + lin(blk.mlp.fc1) + lin(blk.mlp.fc2))
                macs += groups * 2 * 2 * tokens * tokens * inner  # two softmax(q k^T) v products
        freqs = self.grid[0] * (self.grid[1] // 2 + 1)
        for blk in self.afno_blocks:
            f = blk.filter
            macs += Fr * freqs * 4 * (f.w1[0].numel() + f.w2[0].numel())
            macs += Fr * n * (lin(blk.mlp.fc1) + lin(blk.mlp.fc2))
        macs += 2 * Fr * n * lin(self.final_layer)  # both branches
        macs += 2 * Fr * n * P  # the gate's 1x1 convolution over the 2F frames of both branches
        macs += Fr * n * sum(lin(m) for p in self.projectors for m in p if isinstance(m, nn.Linear))
        return 2 * macs

    def patchify(self, x):
        """[B, F, C, H, W] -> [B, F, h*w, p*p*C] (row-major patches, (p1 p2 c) inside one)."""
        B, Fr, C, H, W = x.shape
        p = self.patch_size
        x = x.reshape(B, Fr, C, H // p, p, W // p, p)
        return x.permute(0, 1, 3, 5, 4, 6, 2).reshape(B, Fr, (H // p) * (W // p), p * p * C)

    def unpatchify(self, x):
        B, Fr, _, _ = x.shape
        p, C, (h, w) = self.patch_size, self.in_channels, self.grid
        x = x.reshape(B, Fr, h, w, p, p, C).permute(0, 1, 6, 2, 4, 3, 5)
        return x.reshape(B, Fr, C, h * p, w * p)

    def embed(self, x):
        return self.patch_embed(self.patchify(x)) + self.pos_embedding

    def forward(self, x, t, cond, return_zs: bool = True):
        """(velocity [B, F, C, H, W], zs: one [B, F, h*w, z_dim] per projector); with return_zs=False the
        velocity alone."""
        if tuple(x.shape[1:]) != self.latent_shape or x.shape != cond.shape:
            raise ValueError(f"PDE-DiT takes x and cond [B, {', '.join(map(str, self.latent_shape))}], got "
                             f"{tuple(x.shape)} and {tuple(cond.shape)}")
        B, Fr = x.shape[:2]
        tok = self.embed(x).flatten(0, 1)  # [(B F), n, D]
        tok = tok + self.cross_attn(tok, self.embed(cond).flatten(0, 1))
        n, D = tok.shape[1:]
        temb = self.t_embedder(t)  # [B, D]
        f = tok
        for blk in self.afno_blocks:
            f = blk(f)
        f = self.afno_norm(f)
        c = temb.repeat_interleave(Fr, dim=0)  # the (batch, frame) order of the tokens
        h, zs = tok, []
        for depth, blk in enumerate(self.spatial_blocks, 1):
            h = blk(h, c)
            if depth == self.encoder_depth and return_zs:
                zs = [p(h).reshape(B, Fr, n, -1) for p in self.projectors]
        h = h.reshape(B, Fr, n, D).transpose(1, 2).flatten(0, 1)  # [(B n), F, D]
        c = temb.repeat_interleave(n, dim=0)
        for blk in self.temporal_blocks:
            h = blk(h, c)
        h = h.reshape(B, n, Fr, D).transpose(1, 2)
        a, fo = self.final_layer(h), self.final_layer(f.reshape(B, Fr, n, D))
        out = self.unpatchify(self.gate(a, fo))
        return (out, zs) if return_zs else out


def build_pde_model(size: str = "XL", **overrides) -> PDEDiT:
    """A PDE-DiT of a preset size (PDE_SIZES) with constructor overrides."""
    if size not in PDE_SIZES:
        raise ValueError(f"unknown PDE-DiT size {size!r}; known: {', '.join(PDE_SIZES)}")
    hidden, heads, spa, tem, afno = PDE_SIZES[size]
    kw = dict(hidden_size=hidden, num_heads=heads, spa_depth=spa, tem_depth=tem, afno_depth=afno)
    kw.update(overrides)
    return PDEDiT(**kw)


__all__ = ["AFNOBlock", "CrossAttention", "PDEBlock", "PDEDiT", "PDE_SIZES", "build_pde_model"]
