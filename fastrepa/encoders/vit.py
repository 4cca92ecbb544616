"""A plain ViT whose parameter names are those of the official encoder checkpoints.

`ViT` covers DINOv2 (with and without registers, MLP or SwiGLU FFN, layer-scale), MoCo v3, MAE,
DINO v1 and I-JEPA: they share the layout `cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.{norm1,
attn.qkv, attn.proj, norm2, mlp.*}`, `norm` and differ only in the options below (I-JEPA has no class
token: its `pos_embed` covers the patches only). `CLIPVisual` is OpenAI CLIP's `VisionTransformer`
(`model.visual`) under its own names: conv1 (no bias), class_embedding, positional_embedding, ln_pre,
transformer.resblocks.N.{ln_1, attn.in_proj_weight/in_proj_bias, attn.out_proj, ln_2, mlp.c_fc,
mlp.c_proj}, ln_post, proj; QuickGELU and LayerNorm eps 1e-5. Attention is the standard
softmax(q k^T / sqrt(d)) v with heads contiguous in the qkv rows ([q | k | v], then heads), as in
timm and the DINOv2 hub code (nn.MultiheadAttention's in_proj_weight has the same [q | k | v] layout);
in `ViT` GELU is the exact (erf) one and LayerNorm eps is 1e-6 everywhere.

The positional embedding is built at the token grid the encoder runs at (the checkpoint's grid is
resampled once at load time, see `fastrepa.encoders.resample_pos_embed`), so the forward never
interpolates: an input whose grid differs is an error.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastrepa.attention import attention_logits


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

    def forward(self, x, logits: bool = False):
        """x [B, N, C] -> the attention output, and with `logits` also the scores (q * hd^-0.5) k^T
        [B, heads, N, N] (as HASTE's modified DINOv2 returns them)."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))
        return (out, attention_logits(q, k)) if logits else out


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

    def forward(self, x, logits: bool = False):
        if logits:
            a, scores = self.attn(self.norm1(x), logits=True)
            x = x + self.ls1(a)
            return x + self.ls2(self.mlp(self.norm2(x))), scores
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """Returns the patch tokens [B, grid*grid, C] (class and register tokens dropped).

    final_norm: apply `norm` before taking the tokens (DINOv2 x_norm_patchtokens, MoCo v3
    forward_features); MAE as REPA runs it skips it (the `norm` weights are still loaded).
    """

    def __init__(self, *, patch, dim, depth, heads, grid, hidden=None, ffn="mlp", layerscale=False,
                 num_registers=0, mask_token=False, final_norm=True, cls_token=True):
        super().__init__()
        self.patch, self.embed_dim, self.grid = patch, dim, grid
        self.num_registers, self.final_norm = num_registers, final_norm
        self.num_prefix = 1 if cls_token else 0
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        if cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix + grid * grid, dim))
        if num_registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, dim))
        if mask_token:  # DINOv2 checkpoints carry it; unused for unmasked inputs
            self.mask_token = nn.Parameter(torch.zeros(1, dim))
        hidden = hidden or 4 * dim
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, ffn, layerscale) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    @property
    def num_heads(self) -> int:
        return self.blocks[0].attn.heads

    def forward(self, x):
        return self.features(x)["patch"]

    def features(self, x, attn_blocks=()):
        """{"patch": the patch tokens [B, grid*grid, C] (forward's output), "cls": the class token [B, C]
        (after `norm` when final_norm, as DINOv2's x_norm_clstoken; absent without a class token), "attn": one
        [B, heads, P, P] patch-to-patch score tensor per block of `attn_blocks` (1-based), the class and
        register rows and columns dropped (HASTE drops the class token's; softmax over them then runs over
        the patch keys alone)}."""
        attn_blocks = list(attn_blocks)
        bad = [b for b in attn_blocks if not 1 <= b <= len(self.blocks)]
        if bad:
            raise ValueError(f"encoder attention blocks {bad} are outside 1..{len(self.blocks)} (the encoder depth)")
        B, _, H, W = x.shape
        if (H // self.patch, W // self.patch) != (self.grid, self.grid) or H % self.patch or W % self.patch:
            raise ValueError(f"ViT encoder built for a {self.grid}x{self.grid} grid of {self.patch}px patches "
                             f"({self.grid * self.patch}px input), got a {H}x{W} input")
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        if self.num_prefix:
            x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)
        x = x + self.pos_embed.to(x.dtype)
        if self.num_registers:  # DINOv2 -reg: registers go after the class token, without pos-embed
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1).to(x.dtype), x[:, 1:]], dim=1)
        prefix, scores = self.num_prefix + self.num_registers, {}
        for depth, blk in enumerate(self.blocks, 1):
            if depth in attn_blocks:
                x, s = blk(x, logits=True)
                scores[depth] = s[:, :, prefix:, prefix:]
            else:
                x = blk(x)
        if self.final_norm:
            x = self.norm(x)
        out = {"patch": x[:, prefix:], "attn": [scores[b] for b in attn_blocks]}
        if self.num_prefix:
            out["cls"] = x[:, 0]
        return out


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    """nn.MultiheadAttention's parameters (in_proj_weight [3D, D] = [q | k | v], in_proj_bias,
    out_proj), self-attention without mask, batch first."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(x.transpose(1, 2).reshape(B, N, C))


class CLIPBlock(nn.Module):
    """CLIP's ResidualAttentionBlock: x += attn(ln_1(x)); x += c_proj(QuickGELU(c_fc(ln_2(x))))."""

    def __init__(self, dim, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CLIPAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(dim, 4 * dim))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CLIPVisual(nn.Module):
    """OpenAI CLIP's visual ViT, returning what REPA's `UpdatedVisionTransformer` returns: the patch
    tokens of the last residual block [B, grid*grid, width], class token dropped, WITHOUT ln_post and
    proj (both are loaded, as in the checkpoint, and unused). LayerNorm eps 1e-5 (torch default)."""

    def __init__(self, *, patch, width, layers, heads, grid, output_dim):
        super().__init__()
        self.patch, self.embed_dim, self.grid = patch, width, grid
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(CLIPBlock(width, heads) for _ in range(layers))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, output_dim))

    def forward(self, x):
        B, _, H, W = x.shape
        if (H, W) != (self.grid * self.patch,) * 2:
            raise ValueError(f"CLIP ViT built for a {self.grid}x{self.grid} grid of {self.patch}px patches "
                             f"({self.grid * self.patch}px input), got a {H}x{W} input")
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.to(x.dtype).expand(B, 1, -1), x], dim=1)
        x = self.ln_pre(x + self.positional_embedding.to(x.dtype))
        for blk in self.transformer.resblocks:
            x = blk(x)
        return x[:, 1:]
