"""SiT with REPA projectors, state-dict compatible with the official REPA checkpoints.

Every fused op goes through `fastrepa.kernels` and every attention call through `fastrepa.attention`,
so kernels and backends are configuration, not forks of the model.
"""
import torch
import torch.nn as nn

from fastrepa import kernels as K
from fastrepa.attention import attention
from fastrepa.models.embed import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d


class Attention(nn.Module):
    """timm Attention layout: `qkv` (with bias), optional `q_norm`/`k_norm` LayerNorm(head_dim), `proj`."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, attn_backend: str = "sdpa"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = nn.LayerNorm(self.head_dim)
            self.k_norm = nn.LayerNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_backend = attn_backend

    def forward(self, x):
        if self.qk_norm:
            q, k, v = K.qk_norm_split(self.qkv(x), self.num_heads, self.q_norm.weight, self.q_norm.bias,
                                      self.k_norm.weight, self.k_norm.bias, eps=self.q_norm.eps, norm="layernorm")
        else:
            q, k, v = K.qk_norm_split(self.qkv(x), self.num_heads)
        return self.proj(attention(q, k, v, self.attn_backend))


class Mlp(nn.Module):
    """timm Mlp layout (`fc1`, `fc2`) with tanh-approximated GELU."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


class SiTBlock(nn.Module):
    """adaLN-Zero block; adaLN chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp."""

    eps = 1e-6  # norm1/norm2: LayerNorm without affine (no state-dict keys)

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 attn_backend: str = "sdpa"):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, attn_backend=attn_backend)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        h = K.layernorm_modulate(x, shift_msa, scale_msa, self.eps)
        x, h = K.gated_residual_layernorm_modulate(x, gate_msa, self.attn(h), shift_mlp, scale_mlp, self.eps)
        return K.gated_residual(x, gate_mlp, self.mlp(h))


class FinalLayer(nn.Module):
    eps = 1e-6  # norm_final: LayerNorm without affine

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(K.layernorm_modulate(x, shift, scale, self.eps))


class Projector(nn.Sequential):
    """Linear-SiLU-Linear-SiLU-Linear with keys .0/.2/.4; runs through the fused `projector` op."""

    def __init__(self, hidden_size: int, projector_dim: int, z_dim: int):
        super().__init__(nn.Linear(hidden_size, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, z_dim))

    def forward(self, x):
        return K.projector(x, self[0].weight, self[0].bias, self[2].weight, self[2].bias,
                           self[4].weight, self[4].bias)


class SiT(nn.Module):
    """Scalable Interpolant Transformer with REPA projectors after block `encoder_depth` (1-based)."""

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, z_dims=(768,), encoder_depth: int = 8, projector_dim: int = 2048,
                 qk_norm: bool = False, attn_backend: str = "sdpa"):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.encoder_depth = encoder_depth
        self.z_dims = list(z_dims)

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, attn_backend) for _ in range(depth)])
        self.projectors = nn.ModuleList([Projector(hidden_size, projector_dim, z) for z in self.z_dims])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        grid = self.x_embedder.grid_size
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def unpatchify(self, x):
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def embed(self, x, t, y, force_drop_ids=None):
        """Tokens [N, T, D] and the conditioning vector c [N, D]."""
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
        return tokens, c

    def forward(self, x, t, y, force_drop_ids=None, return_zs: bool = True):
        """x [N, C, H, W], t [N], y [N] -> (velocity [N, C, H, W], zs), zs one [N, T, z_dim] per projector.

        `force_drop_ids` (1 = replace the label by the null class) overrides the model's own random
        label dropout, so a caller can draw it from a seeded generator. With return_zs=False the
        projectors are skipped and only the output is returned (sampling).
        """
        h, c = self.embed(x, t, y, force_drop_ids)
        zs = []
        for i, block in enumerate(self.blocks):
            h = block(h, c)
            if return_zs and i + 1 == self.encoder_depth:
                zs = [projector(h) for projector in self.projectors]
        out = self.unpatchify(self.final_layer(h, c))
        return (out, zs) if return_zs else out

    def velocity(self, x, t, y):
        """The model output alone (no projectors): what the samplers call."""
        return self.forward(x, t, y, return_zs=False)

    def hidden_states(self, x, t, y, depths, force_drop_ids=None):
        """Raw hidden states after each block in `depths` (1-based), in the order given.

        Blocks past max(depths) are not run; the final layer is not run.
        """
        depths = list(depths)
        bad = [d for d in depths if not 1 <= d <= self.depth]
        if bad:
            raise ValueError(f"hidden-state depths {bad} are outside 1..{self.depth} (the model depth)")
        h, c = self.embed(x, t, y, force_drop_ids)
        found = {}
        for i in range(max(depths)):
            h = self.blocks[i](h, c)
            if i + 1 in depths:
                found[i + 1] = h
        return [found[d] for d in depths]
