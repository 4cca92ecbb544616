"""FourierFlow's alignment target: the encoder of its MAE-pretrained ViViT (align/MAE_ViViT.py: `MAE_Encoder`
as `ViViT_Encoder` runs it, without masking), under the released key names, frozen.

    fields [B, F, C, H, W] -> (p p c) patches -> Linear (`to_patch_embedding.1`) + `pos_embedding` [1, F, n, D]
    -> `space_transformer` over each frame's n tokens -> `layer_norm`
    -> `temporal_transformer` over each token position's F frames -> `layer_norm` -> tokens [B, F, n, D]

Each transformer: `layers.N.0` = PreNorm(LayerNorm, attention: `fn.to_qkv` (no bias) with heads of width D,
as released (dim_head = dim), `fn.to_out.0`), `layers.N.1` = PreNorm(LayerNorm, `fn.net.0` - GELU -
`fn.net.3`, hidden D), then its own `norm`. `space_token` and `temporal_token` are in the checkpoint and
unused (as released). The weights are `model_state_dict` of the MAE checkpoint, keys `encoder.*` (a
`module.` prefix from DDP is dropped); every size is read off them.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from fastrepa.attention import attention
from fastrepa.encoders import EncoderWeightsError, FrozenEncoder, _frozen


class _PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(dim), fn

    def forward(self, x):
        return self.fn(self.norm(x))


class _Attention(nn.Module):
    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim))

    def forward(self, x):
        N, T, _ = x.shape
        q, k, v = (t.reshape(N, T, self.heads, self.dim_head).transpose(1, 2) for t in self.to_qkv(x).chunk(3, -1))
        return self.to_out(attention(q, k, v))


class _FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Identity(), nn.Linear(hidden, dim))

    def forward(self, x):
        return self.net(x)


class _Transformer(nn.Module):
    def __init__(self, dim, depth, heads):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleList([_PreNorm(dim, _Attention(dim, heads, dim)),
                                                   _PreNorm(dim, _FeedForward(dim, dim))]) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


class ViViTEncoder(FrozenEncoder):
    enc_type = "vivit-mae"

    def __init__(self, *, patch=8, channels=4, frames=4, num_patches=256, dim=768, depth=12, heads=12):
        super().__init__()
        self.patch, self.channels, self.frames, self.embed_dim = patch, channels, frames, dim
        self.num_tokens = num_patches
        self.to_patch_embedding = nn.Sequential(nn.Identity(), nn.Linear(patch * patch * channels, dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, frames, num_patches, dim))
        self.space_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.space_transformer = _Transformer(dim, depth, heads)
        self.temporal_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.temporal_transformer = _Transformer(dim, depth, heads)
        self.layer_norm = nn.LayerNorm(dim)

    def forward_flops(self) -> int:
        """2 x the multiply-accumulates of one sample's forward (linear layers, scores, weighted values)."""
        Fr, n, D, p = self.frames, self.num_tokens, self.embed_dim, self.patch
        macs = Fr * n * p * p * self.channels * D
        for tr, groups, tokens in ((self.space_transformer, Fr, n), (self.temporal_transformer, n, Fr)):
            for attn, ff in tr.layers:
                a = attn.fn
                inner = a.heads * a.dim_head
                lin = sum(m.in_features * m.out_features for m in (*attn.modules(), *ff.modules())
                          if isinstance(m, nn.Linear))
                macs += groups * tokens * lin + groups * 2 * tokens * tokens * inner
        return 2 * macs

    @torch.no_grad()
    def forward(self, fields):
        B, Fr, C, H, W = fields.shape
        p = self.patch
        if (Fr, C) != (self.frames, self.channels) or (H // p) * (W // p) != self.num_tokens or H % p or W % p:
            raise ValueError(f"ViViT encoder built for [B, {self.frames}, {self.channels}, H, W] with "
                             f"{self.num_tokens} patches of {p}px, got {tuple(fields.shape)}")
        x = fields.reshape(B, Fr, C, H // p, p, W // p, p).permute(0, 1, 3, 5, 4, 6, 2)
        x = self.to_patch_embedding(x.reshape(B, Fr, -1, p * p * C)) + self.pos_embedding.to(fields.dtype)
        n, D = x.shape[2:]
        x = self.layer_norm(self.space_transformer(x.flatten(0, 1)))
        x = x.reshape(B, Fr, n, D).transpose(1, 2).flatten(0, 1)
        x = self.layer_norm(self.temporal_transformer(x))
        return x.reshape(B, n, Fr, D).transpose(1, 2)


def vivit_state_dict(ckpt, where: str = "the checkpoint") -> dict:
    """The encoder's state dict from an MAE ViViT checkpoint: `model_state_dict` (or the dict itself), a
    `module.` prefix dropped, the `encoder.*` keys with the prefix removed."""
    sd = ckpt.get("model_state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise EncoderWeightsError(f"{where}: expected a dict with 'model_state_dict' (FourierFlow's MAE ViViT "
                                  f"checkpoint), got {type(ckpt).__name__}")
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    if not enc:
        raise EncoderWeightsError(f"{where}: no 'encoder.*' keys (found {', '.join(sorted(sd)[:8])}...); expected "
                                  "FourierFlow's MAE ViViT layout, model_state_dict['encoder.*']")
    return enc


def load_vivit(path: str, channels: int = 4) -> ViViTEncoder:
    """The frozen ViViT encoder of the MAE checkpoint at `path` (sizes read off its weights; strict)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ViViT encoder weights {path}: no such file")
    sd = vivit_state_dict(torch.load(path, map_location="cpu", weights_only=True), path)
    try:
        _, frames, n, dim = sd["pos_embedding"].shape
        patch = int(round((sd["to_patch_embedding.1.weight"].shape[1] / channels) ** 0.5))
        depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("space_transformer.layers."))
        heads = sd["space_transformer.layers.0.0.fn.to_qkv.weight"].shape[0] // (3 * dim)
    except (KeyError, ValueError, AttributeError) as e:
        raise EncoderWeightsError(f"{path}: not FourierFlow's MAE ViViT encoder layout ({e!r} missing or "
                                  "malformed)") from None
    enc = ViViTEncoder(patch=patch, channels=channels, frames=frames, num_patches=n, dim=dim, depth=depth, heads=heads)
    own = enc.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise EncoderWeightsError(f"{path}: the ViViT encoder keys do not match: missing {missing[:6]}, unexpected "
                                  f"{unexpected[:6]}, wrong shapes {bad[:6]}")
    enc.load_state_dict(sd)
    return _frozen(enc)


__all__ = ["ViViTEncoder", "load_vivit", "vivit_state_dict"]
