"""A plain ViT whose parameter names are those of the official encoder checkpoints.

One module covers DINOv2 (with and without registers, MLP or SwiGLU FFN, layer-scale), MoCo v3 and
MAE: they share the layout `cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.{norm1, attn.qkv,
attn.proj, norm2, mlp.*}`, `norm` and differ only in the options below. Attention is the standard
softmax(q k^T / sqrt(d)) v with heads contiguous in the qkv rows ([q | k | v], then heads), as in
timm and the DINOv2 hub code; GELU is the exact (erf) one; LayerNorm eps is 1e-6 everywhere.

The positional embedding is built at the token grid the encoder runs at (the checkpoint's grid is
resampled once at load time, see `fastrepa.encoders.resample_pos_embed`), so the forward never
interpolates: an input whose grid differs is an error.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """DINOv2's SwiGLUFFNFused (vit-g): w12 packs [x1 | x2], out = w3(silu(x1) * x2)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class Block(nn.Module):
    def __init__(self, dim, heads, hidden, ffn="mlp", layerscale=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, hidden) if ffn == "swiglu" else Mlp(dim, hidden)
        self.ls1 = LayerScale(dim) if layerscale else nn.Identity()
        self.ls2 = LayerScale(dim) if layerscale else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """Returns the patch tokens [B, grid*grid, C] (class and register tokens dropped).

    final_norm: apply `norm` before taking the tokens (DINOv2 x_norm_patchtokens, MoCo v3
    forward_features); MAE as REPA runs it skips it (the `norm` weights are still loaded).
    """

    def __init__(self, *, patch, dim, depth, heads, grid, hidden=None, ffn="mlp", layerscale=False,
                 num_registers=0, mask_token=False, final_norm=True):
        super().__init__()
        self.patch, self.embed_dim, self.grid = patch, dim, grid
        self.num_registers, self.final_norm = num_registers, final_norm
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        if num_registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, dim))
        if mask_token:  # DINOv2 checkpoints carry it; unused for unmasked inputs
            self.mask_token = nn.Parameter(torch.zeros(1, dim))
        hidden = hidden or 4 * dim
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, ffn, layerscale) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        B, _, H, W = x.shape
        if (H // self.patch, W // self.patch) != (self.grid, self.grid) or H % self.patch or W % self.patch:
            raise ValueError(f"ViT encoder built for a {self.grid}x{self.grid} grid of {self.patch}px patches "
                             f"({self.grid * self.patch}px input), got a {H}x{W} input")
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1) + self.pos_embed.to(x.dtype)
        if self.num_registers:  # DINOv2 -reg: registers go after the class token, without pos-embed
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1).to(x.dtype), x[:, 1:]], dim=1)
        for blk in self.blocks:
            x = blk(x)
        if self.final_norm:
            x = self.norm(x)
        return x[:, 1 + self.num_registers:]
