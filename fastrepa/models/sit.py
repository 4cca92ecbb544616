"""SiT with REPA projectors, state-dict compatible with the official REPA checkpoints.

Every fused op goes through `fastrepa.kernels` and every attention call through `fastrepa.attention`,
so kernels and backends are configuration, not forks of the model.
"""
import torch
import torch.nn as nn

from fastrepa import kernels as K
from fastrepa.attention import attention, attention_logits
from fastrepa.models.embed import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d, xavier_linear_init


class Attention(nn.Module):
    """timm Attention layout: `qkv` (with bias), optional `q_norm`/`k_norm` LayerNorm(head_dim), `proj`.

    `rope_grid` (grid_h, grid_w) applies 2D axial rotary embeddings to q and k after the QK-norm (no
    parameters, so no state-dict keys), pairing dims as `rope_pairs` says ("half": ours; "interleaved":
    EVA-02's, as ERW uses); `kernels` picks the fused-op implementation (fastrepa.kernels).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, attn_backend: str = "sdpa",
                 kernels: str = "auto", rope_grid=None, rope_pairs: str = "half"):
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
        self.kernels = kernels
        self.rope_grid = None if rope_grid is None else tuple(rope_grid)
        self.rope_pairs = rope_pairs

    def forward(self, x, logit_heads: int | None = None):
        """x [N, T, D] -> the attention output; with `logit_heads` = h also the scores (q * hd^-0.5) k^T
        [N, h, T, T] of the first h heads, after the QK-norm and RoPE (HASTE's model computes them so)."""
        norm = dict(q_weight=self.q_norm.weight, q_bias=self.q_norm.bias, k_weight=self.k_norm.weight,
                    k_bias=self.k_norm.bias, eps=self.q_norm.eps, norm="layernorm") if self.qk_norm else {}
        q, k, v = K.qk_norm_rope(self.qkv(x), self.num_heads, rope_grid=self.rope_grid, rope_pairs=self.rope_pairs,
                                 impl=self.kernels, **norm)
        out = self.proj(attention(q, k, v, self.attn_backend))
        return out if logit_heads is None else (out, attention_logits(q, k, logit_heads))


class Mlp(nn.Module):
    """timm Mlp layout (`fc1`, `fc2`) with tanh-approximated GELU."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))


class SiTBlock(nn.Module):
    """adaLN-Zero block; adaLN chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.

    The residual updates are fused with the LayerNorm that follows them: inside the block (attention ->
    MLP) always, and across blocks when the caller passes the previous block's deferred MLP residual
    as `pending` = (gate, y) and asks for its own with `defer=True`. `block(x, c)` alone is the
    plain official block.
    """

    eps = 1e-6  # norm1/norm2: LayerNorm without affine (no state-dict keys)

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 attn_backend: str = "sdpa", kernels: str = "auto", rope_grid=None, rope_pairs: str = "half"):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, attn_backend=attn_backend,
                              kernels=kernels, rope_grid=rope_grid, rope_pairs=rope_pairs)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.kernels = kernels

    def forward(self, x, c, pending=None, defer: bool = False, attn_heads: int | None = None):
        """x [N, T, D], c [N, D] -> x after the block, or (x, (gate_mlp, mlp_out)) with defer=True; with
        `attn_heads` = h, (that, the attention scores of the first h heads [N, h, T, T])."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        if pending is None:
            h = K.layernorm_modulate(x, shift_msa, scale_msa, self.eps, impl=self.kernels)
        else:
            x, h = K.gated_residual_layernorm_modulate(x, pending[0], pending[1], shift_msa, scale_msa, self.eps,
                                                       impl=self.kernels)
        a = self.attn(h, attn_heads)
        if attn_heads is not None:
            a, scores = a
        x, h = K.gated_residual_layernorm_modulate(x, gate_msa, a, shift_mlp, scale_mlp, self.eps, impl=self.kernels)
        y = self.mlp(h)
        out = (x, (gate_mlp, y)) if defer else K.gated_residual(x, gate_mlp, y, impl=self.kernels)
        return out if attn_heads is None else (out, scores)


class FinalLayer(nn.Module):
    """norm_final (LayerNorm without affine) + adaLN modulation + `linear` to the patch outputs; with
    `cls_token_dim` (REG) also `linear_cls` on token 0, the class token: (patch outputs of tokens 1..,
    class-token output)."""

    eps = 1e-6

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, kernels: str = "auto",
                 cls_token_dim: int = 0):
        super().__init__()
        self.kernels = kernels
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        if cls_token_dim:
            self.linear_cls = nn.Linear(hidden_size, cls_token_dim, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        h = K.layernorm_modulate(x, shift, scale, self.eps, impl=self.kernels)
        if hasattr(self, "linear_cls"):
            return self.linear(h[:, 1:]), self.linear_cls(h[:, 0])
        return self.linear(h)


class Projector(nn.Sequential):
    """Linear-SiLU-Linear-SiLU-Linear with keys .0/.2/.4; runs through the fused `projector` op."""

    def __init__(self, hidden_size: int, projector_dim: int, z_dim: int, kernels: str = "auto"):
        super().__init__(nn.Linear(hidden_size, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, z_dim))
        self.kernels = kernels

    def forward(self, x):
        return K.projector(x, self[0].weight, self[0].bias, self[2].weight, self[2].bias,
                           self[4].weight, self[4].bias, impl=self.kernels)

    def macs_per_token(self) -> int:
        return sum(m.in_features * m.out_features for m in self if isinstance(m, nn.Linear))


class ConvProjector(nn.Module):
    """iREPA's projector: one Conv2d(hidden, z_dim, k, padding k // 2) over the token grid (row-major
    [T] <-> [grid, grid]), key `projection_layer` as official iREPA names it; PyTorch's default Conv2d init
    (official iREPA's init touches Linear layers only)."""

    def __init__(self, hidden_size: int, z_dim: int, kernel_size: int, grid: int):
        super().__init__()
        self.projection_layer = nn.Conv2d(hidden_size, z_dim, kernel_size, padding=kernel_size // 2)
        self.grid = grid

    def forward(self, x):
        n, t, d = x.shape
        y = self.projection_layer(x.reshape(n, self.grid, self.grid, d).permute(0, 3, 1, 2))
        return y.flatten(2).transpose(1, 2)

    def macs_per_token(self) -> int:
        w = self.projection_layer.weight
        return w.shape[0] * w.shape[1] * w.shape[2] * w.shape[3]


class APHead(nn.Module):
    """SRA's alignment head on the student's hidden state (official `SimpleHead`, keys `ap_head.linear1/2`):
    Linear(D, 2D) - SiLU - Linear(2D, D). Used in training only; the samplers never run it."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, 2 * hidden_size)
        self.linear2 = nn.Linear(2 * hidden_size, hidden_size)

    def forward(self, x):
        return self.linear2(nn.functional.silu(self.linear1(x)))


class SiT(nn.Module):
    """Scalable Interpolant Transformer with REPA projectors after block `encoder_depth` (1-based) and, with
    `ap_head=True`, SRA's alignment head (applied after the block the caller names, `head_depth`).

    `cls_token_dim` = d > 0 adds REG's class token (official REG keys): the noised encoder class feature
    [N, d] enters as one more token in front of the patches through `cls_projectors2` (Linear(d, D)) and
    `wg_norm` (LayerNorm(D), affine), `pos_embed` gets a zero row in front for it ([1, T + 1, D]), every
    block and the projectors see T + 1 tokens, and `final_layer.linear_cls` (Linear(D, d), zero-init) maps
    token 0 to its velocity; the model then takes `cls_token=` and returns the class token's output too.

    The backbone interface (fastrepa.models): latent_shape, token_grid, prediction, null_class,
    label_dropout_prob, forward / denoise / hidden_states, fsdp_units, forward_flops."""

    prediction = "velocity"  # what forward() predicts (DiT: "epsilon", with the learned variance)
    learn_sigma = False  # DiT: the final layer also outputs the variance values (2C channels)

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, z_dims=(768,), encoder_depth: int = 8, projector_dim: int = 2048,
                 qk_norm: bool = False, attn_backend: str = "sdpa", kernels: str = "auto", rope: bool = False,
                 ap_head: bool = False, rope_pairs: str = "half", projector_type: str = "mlp",
                 projector_kernel: int = 3, cls_token_dim: int = 0):
        super().__init__()
        self.kernels = kernels
        self.in_channels = in_channels
        self.out_channels = in_channels * (2 if self.learn_sigma else 1)
        self.hidden_size = hidden_size
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.encoder_depth = encoder_depth
        self.z_dims = list(z_dims)
        self.cls_token_dim = int(cls_token_dim)

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        extra = 1 if self.cls_token_dim else 0  # REG's class token
        self.pos_embed = nn.Parameter(torch.zeros(1, extra + num_patches, hidden_size), requires_grad=False)
        grid = self.x_embedder.grid_size
        self.blocks = nn.ModuleList(
            [SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, attn_backend, kernels,
                      rope_grid=(grid, grid) if rope else None, rope_pairs=rope_pairs) for _ in range(depth)])
        self.projectors = nn.ModuleList([Projector(hidden_size, projector_dim, z, kernels) if projector_type == "mlp"
                                         else ConvProjector(hidden_size, z, projector_kernel, grid)
                                         for z in self.z_dims])
        if ap_head:
            self.ap_head = APHead(hidden_size)
        if self.cls_token_dim:
            self.cls_projectors2 = nn.Linear(self.cls_token_dim, hidden_size, bias=True)
            self.wg_norm = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, kernels, self.cls_token_dim)
        self.initialize_weights()

    def initialize_weights(self):
        self.apply(xavier_linear_init)
        grid = self.x_embedder.grid_size
        table = sincos_pos_embed_2d(self.pos_embed.shape[-1], grid).float()
        if self.cls_token_dim:  # REG: a zero row in front, for the class token
            table = torch.cat([torch.zeros(1, table.shape[1]), table])
        self.pos_embed.data.copy_(table.unsqueeze(0))
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
        if self.cls_token_dim:
            nn.init.zeros_(self.final_layer.linear_cls.weight)
            nn.init.zeros_(self.final_layer.linear_cls.bias)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    # ---------------------------------------------------------------- the backbone interface

    @property
    def token_grid(self) -> tuple[int, int]:
        return (self.x_embedder.grid_size, self.x_embedder.grid_size)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.x_embedder.grid_size * self.patch_size
        return (self.in_channels, size, size)

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def label_dropout_prob(self) -> float:
        return float(self.y_embedder.dropout_prob or 0.0)

    def fsdp_units(self) -> list[nn.Module]:
        """The modules sharded (FSDP2), compiled and checkpointed one by one: the blocks."""
        return list(self.blocks)

    def forward_flops(self, depth: int | None = None) -> int:
        """2 x the multiply-accumulates of the matmuls of one forward of one sample (linear layers, patch
        embedding, attention scores and attention-weighted values; not norms, softmax, elementwise).
        depth=None: the whole model with its projectors (not the training-only SRA head); depth=k: the
        embedders and blocks 1..k only (what `hidden_states` runs)."""
        d, t = self.hidden_size, self.pos_embed.shape[1]
        p, c = self.patch_size, self.in_channels
        macs = t * c * p * p * d  # patch embedding
        macs += sum(m.in_features * m.out_features for m in self.t_embedder.modules() if isinstance(m, nn.Linear))
        for block in self.blocks[:self.depth if depth is None else depth]:
            mlp_hidden = block.mlp.fc1.out_features
            macs += d * 6 * d  # adaLN (per image, not per token)
            macs += t * (3 * d * d + d * d + 2 * d * mlp_hidden)  # qkv, proj, fc1, fc2
            macs += 2 * t * t * d  # q k^T and attn @ v
        if depth is None:
            macs += d * 2 * d + t * d * self.final_layer.linear.out_features
            macs += t * sum(proj.macs_per_token() for proj in self.projectors)
        if self.cls_token_dim:  # REG: the class token's input projection and (whole model) its output layer
            macs += self.cls_token_dim * d * (2 if depth is None else 1)
        return 2 * macs

    def head_flops(self) -> int:
        """FLOPs of the SRA head on one sample's tokens (0 without one)."""
        head = getattr(self, "ap_head", None)
        if head is None:
            return 0
        t = self.pos_embed.shape[1]
        return 2 * t * (head.linear1.in_features * head.linear1.out_features
                        + head.linear2.in_features * head.linear2.out_features)

    def unpatchify(self, x):
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def embed(self, x, t, y, force_drop_ids=None, cls_token=None):
        """Tokens [N, T, D] (REG: [N, 1 + T, D], the class token first) and the conditioning vector c [N, D]."""
        tokens = self.x_embedder(x)
        if self.cls_token_dim:
            if cls_token is None or tuple(cls_token.shape) != (x.shape[0], self.cls_token_dim):
                got = None if cls_token is None else tuple(cls_token.shape)
                raise ValueError(f"a model with REG's class token takes cls_token [{x.shape[0]}, "
                                 f"{self.cls_token_dim}] (the noised class feature), got {got}")
            cls = self.wg_norm(self.cls_projectors2(cls_token.to(tokens.dtype)))
            tokens = torch.cat([cls.unsqueeze(1), tokens], dim=1)
        elif cls_token is not None:
            raise ValueError("cls_token given to a model without REG's class token (cls_token_dim=0)")
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
        return tokens + self.pos_embed, c

    def forward(self, x, t, y, force_drop_ids=None, return_zs: bool = True, head_depth: int | None = None,
                attn_depths=(), attn_heads: int | None = None, cls_token=None):
        """x [N, C, H, W], t [N], y [N] -> (output [N, out_channels, H, W], zs, *extras), zs one [N, T, z_dim]
        per projector, and the extras asked for, in this order:
        - `head_depth` = k (1-based; a model built with ap_head=True): the SRA head of the hidden state after
          block k;
        - `attn_depths` (1-based blocks; HASTE): the list of their attention scores [N, h, T, T] of the first
          `attn_heads` heads (all when None);
        - REG's model (cls_token_dim > 0) takes `cls_token` [N, cls_token_dim], the noised class feature, and
          gives the class token's output [N, cls_token_dim]; zs then cover its T + 1 tokens.

        `force_drop_ids` (1 = replace the label by the null class) overrides the model's own random
        label dropout, so a caller can draw it from a seeded generator. With return_zs=False the
        projectors are skipped and only the output is returned (REG: (output, class-token output)).
        """
        if head_depth is not None and not 1 <= head_depth <= self.depth:
            raise ValueError(f"head_depth={head_depth} is outside 1..{self.depth} (the model depth)")
        attn_depths = tuple(attn_depths)
        bad = [d for d in attn_depths if not 1 <= d <= self.depth]
        if bad:
            raise ValueError(f"attention depths {bad} are outside 1..{self.depth} (the model depth)")
        h, c = self.embed(x, t, y, force_drop_ids, cls_token)
        zs, head, scores = [], None, {}
        keep = {self.encoder_depth} if return_zs and self.projectors else set()
        if head_depth is not None:
            keep.add(head_depth)
        for depth, h in self.run_blocks(h, c, self.depth, keep, attn_depths, attn_heads, scores):
            if depth == self.encoder_depth and return_zs:
                zs = [projector(h) for projector in self.projectors]
            if depth == head_depth:
                head = self.ap_head(h)
        final = self.final_layer(h, c)
        out = self.unpatchify(final[0] if self.cls_token_dim else final)
        if not return_zs:
            return (out, final[1]) if self.cls_token_dim else out
        extras = [head] if head_depth is not None else []
        if attn_depths:
            extras.append([scores[d] for d in attn_depths])
        if self.cls_token_dim:
            extras.append(final[1])
        return (out, zs, *extras)

    def denoise(self, x, t, y, cls_token=None):
        """The model output alone (no projectors, no head): what the samplers call. REG's model takes the
        class-token state and returns (output, class-token output)."""
        return self.forward(x, t, y, return_zs=False, cls_token=cls_token)

    def velocity(self, x, t, y):
        """SiT's name for `denoise` (its output is the velocity)."""
        return self.denoise(x, t, y)

    def hidden_states(self, x, t, y, depths, force_drop_ids=None):
        """Raw hidden states after each block in `depths` (1-based), in the order given.

        Blocks past max(depths) are not run; the final layer is not run.
        """
        depths = list(depths)
        bad = [d for d in depths if not 1 <= d <= self.depth]
        if bad:
            raise ValueError(f"hidden-state depths {bad} are outside 1..{self.depth} (the model depth)")
        h, c = self.embed(x, t, y, force_drop_ids)
        found = dict(self.run_blocks(h, c, max(depths), set(depths)))
        return [found[d] for d in depths]

    def project_at(self, x, t, y, depth: int, force_drop_ids=None):
        """The projectors (one output [N, T, z_dim] per encoder) applied to the hidden state after block
        `depth` (1-based) instead of --encoder-depth; blocks past `depth` and the final layer are not run
        (ERW's warmup trains the embedders, these blocks and the projectors alone)."""
        if not self.projectors:
            raise ValueError("project_at needs projectors (a model built with z_dims)")
        if not 1 <= depth <= self.depth:
            raise ValueError(f"project_at depth {depth} is outside 1..{self.depth} (the model depth)")
        h, c = self.embed(x, t, y, force_drop_ids)  # not via hidden_states: both are FSDP2 forward methods
        (_, h), = self.run_blocks(h, c, depth, set())
        return [projector(h) for projector in self.projectors]

    def run_blocks(self, h, c, last: int, keep, attn_depths=(), attn_heads=None, scores=None):
        """Run blocks 1..last, yielding (depth, hidden state) at each depth in `keep` and at `last`; the
        attention scores of the blocks in `attn_depths` (first `attn_heads` heads) go into `scores` by depth.

        Between other blocks the MLP residual is deferred into the next block's first LayerNorm
        (one fused pass instead of two); at the yielded depths the hidden state is complete.
        """
        pending = None
        for i in range(last):
            depth = i + 1
            extra = dict(attn_heads=attn_heads or self.num_heads) if depth in attn_depths else {}
            done = depth in keep or depth == last
            out = self.blocks[i](h, c, pending, defer=not done, **extra)
            if extra:
                out, scores[depth] = out
            if done:
                h, pending = out, None
                yield depth, h
            else:
                h, pending = out
