"""Backbone registry: `build_model("SiT-XL/2", **overrides)`, `build_model("DiT-XL/2", ...)`, with the official
constructor names.

A backbone family is a name prefix, a model class and its defaults (`FAMILIES`). Every model class offers
the same interface, so nothing outside fastrepa/models touches a block's attributes:

    model.latent_shape            (C, H, W) of the latents it denoises
    model.token_grid              (grid_h, grid_w) of its patch tokens
    model.prediction              what forward() predicts: "velocity" (SiT) or "epsilon" (DiT: eps and the
                                  learned-range variance values, 2C channels)
    model.null_class              the label index of the unconditional class (CFG, label dropout)
    model.label_dropout_prob      its label dropout probability (training)
    model(x, t, y, ...)           (output, projector outputs[, head output]) for training
    model.denoise(x, t, y)        the output alone, what the samplers call
    model.hidden_states(x, t, y, depths)   raw hidden states after the given blocks; later blocks never run
    model.project_at(x, t, y, depth)       the projectors after block `depth`; later blocks never run (ERW)
    model(..., attn_depths=, attn_heads=)  also the attention scores of those blocks (HASTE)
    model.cls_token_dim           REG's class token width (0: none); such a model takes and returns it
    model.fsdp_units()            the modules wrapped one by one (FSDP2, per-unit compile, checkpointing)
    model.forward_flops(depth)    matmul FLOPs of one forward of one sample (up to block `depth`)

The `PDE-DiT-<S|B|XL>/<patch>` family (fastrepa.models.pde_dit, FourierFlow's forecaster) is the one
non-image family: its own sizes and options (`PDE_OVERRIDES`), `model(x, t, cond)` on [B, F, C, H, W]
fields, no labels (`null_class` None) and `modality = "fields"` (the image families have none: "images").
"""
from torch import nn

from fastrepa.attention import BACKENDS
from fastrepa.kernels._dispatch import IMPLS
from fastrepa.kernels.qk_norm_rope import ROPE_PAIRS
from fastrepa.models.dit import DiT
from fastrepa.models.pde_blocks import LAMBDA_MODES
from fastrepa.models.pde_dit import PDE_SIZES, PDEDiT
from fastrepa.models.sit import SiT

# size -> (depth, hidden_size, num_heads), shared by SiT and DiT. S is fixed here: upstream SiT's width
# silently defaults to 768.
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PATCHES = (2, 4, 8)

# family prefix -> (class, the defaults that differ between families). SiT's official REPA defaults align
# one projector (DINOv2-B, 768) after block 8; DiT (facebookresearch/DiT) has no projector and learns sigma.
FAMILIES = {
    "SiT": (SiT, dict(z_dims=[768])),
    "DiT": (DiT, dict(z_dims=[])),
}
PROJECTOR_TYPES = ("mlp", "conv")  # REPA's MLP, iREPA's convolution over the token grid
PDE_FAMILY = "PDE-DiT"
PDE_PATCHES = (4, 8, 16)
MODEL_NAMES = (tuple(f"{fam}-{s}/{p}" for fam in FAMILIES for s in SIZES for p in PATCHES)
               + tuple(f"{PDE_FAMILY}-{s}/{p}" for s in PDE_SIZES for p in PDE_PATCHES))
# PDE-DiT's constructor options (`depth` is its number of spatial blocks, as FourierFlow's `depth`)
PDE_OVERRIDES = ("input_size", "patch_size", "in_channels", "num_frames", "hidden_size", "num_heads", "depth",
                 "tem_depth", "afno_depth", "encoder_depth", "mlp_ratio", "z_dims", "projector_dim", "head_dim",
                 "lambda_mode", "afno_blocks", "attn_backend")

OVERRIDES = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
             "class_dropout_prob", "num_classes", "z_dims", "encoder_depth", "projector_dim", "qk_norm",
             "attn_backend", "kernels", "rope", "rope_pairs", "ap_head", "projector_type", "projector_kernel",
             "cls_token_dim")


def erw_rope(rope, rope_pairs, use_rope):
    """(rope, rope_pairs) with ERW's `use_rope` applied: True is the RoPE with EVA-02's interleaved pairs
    unless `rope_pairs` names others, False no RoPE, None leaves both as they are."""
    if use_rope is None:
        return rope, rope_pairs
    return bool(use_rope), (rope_pairs or "interleaved") if use_rope else rope_pairs


def family_of(name: str) -> str:
    """The family prefix of a registry name ("SiT-XL/2" -> "SiT"); unknown names fail naming the known ones."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    return PDE_FAMILY if name.startswith(PDE_FAMILY + "-") else name.split("-", 1)[0]


def overrides_of(name: str) -> tuple[str, ...]:
    """The constructor options a registry name's family takes."""
    return PDE_OVERRIDES if family_of(name) == PDE_FAMILY else OVERRIDES


def pde_model_kwargs(name: str, **overrides) -> dict:
    """PDE-DiT's constructor arguments for `PDE-DiT-<size>/<patch>` (FourierFlow's defaults: 128x128 fields,
    4 frames x 4 variables, projectors after spatial block 4 to 768-wide ViViT tokens)."""
    unknown = sorted(set(overrides) - set(PDE_OVERRIDES))
    if unknown:
        raise ValueError(f"unknown {PDE_FAMILY} option(s) {unknown}; allowed: {', '.join(PDE_OVERRIDES)}")
    size, patch = name[len(PDE_FAMILY) + 1:].split("/")
    hidden, heads, spa, tem, afno = PDE_SIZES[size]
    kw = dict(input_size=128, patch_size=int(patch), in_channels=4, num_frames=4, hidden_size=hidden,
              num_heads=heads, depth=spa, tem_depth=tem, afno_depth=afno, encoder_depth=4, mlp_ratio=4.0,
              z_dims=[768], projector_dim=2048, head_dim=None, lambda_mode="learned", afno_blocks=8,
              attn_backend="sdpa")
    kw.update({k: v for k, v in overrides.items() if v is not None})
    kw["z_dims"] = [int(z) for z in kw["z_dims"]]
    _check_shared(kw, ("num_frames", "afno_blocks"), "the spatial blocks")
    for key in ("tem_depth", "afno_depth"):
        _need(int(kw[key]) >= 0, f"model option {key}={kw[key]} must be an integer >= 0")
    _need(kw["hidden_size"] % kw["afno_blocks"] == 0,
          f"hidden_size={kw['hidden_size']} must be divisible by afno_blocks={kw['afno_blocks']}")
    _need(kw["lambda_mode"] in LAMBDA_MODES, f"lambda_mode={kw['lambda_mode']!r} is not one of {LAMBDA_MODES}")
    return kw


def _need(cond, msg):
    if not cond:
        raise ValueError(msg)


def _check_shared(kw: dict, positive: tuple, depth_is: str) -> None:
    """The checks every family shares: sizes positive, the grid divisible by the patch, the projectors'
    block inside the depth (`depth_is` says what the depth counts), a known attention backend."""
    for key in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "projector_dim",
                *positive):
        _need(int(kw[key]) >= 1, f"model option {key}={kw[key]} must be a positive integer")
    _need(kw["input_size"] % kw["patch_size"] == 0,
          f"input_size={kw['input_size']} must be divisible by patch_size={kw['patch_size']}")
    _need(kw["mlp_ratio"] > 0, f"mlp_ratio={kw['mlp_ratio']} must be > 0")
    _need(all(z >= 1 for z in kw["z_dims"]), f"z_dims={kw['z_dims']} must be positive feature sizes")
    if kw["z_dims"]:
        _need(1 <= kw["encoder_depth"] <= kw["depth"],
              f"encoder_depth={kw['encoder_depth']} is outside 1..{kw['depth']} ({depth_is})")
    _need(kw["attn_backend"] in BACKENDS, f"attn_backend={kw['attn_backend']!r} is not one of {BACKENDS}")


def model_kwargs(name: str, **overrides) -> dict:
    """The full, validated constructor arguments of `name` with `overrides` applied."""
    family = family_of(name)
    if family == PDE_FAMILY:
        return pde_model_kwargs(name, **overrides)
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; allowed: {', '.join(OVERRIDES)}")
    size, patch = name[len(family) + 1:].split("/")
    depth, hidden, heads = SIZES[size]
    kw = dict(input_size=32, patch_size=int(patch), in_channels=4, hidden_size=hidden, depth=depth,
              num_heads=heads, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, encoder_depth=8,
              projector_dim=2048, qk_norm=False, attn_backend="sdpa", kernels="auto", rope=False, rope_pairs="half",
              ap_head=False, projector_type="mlp", projector_kernel=3, cls_token_dim=0,
              **FAMILIES[family][1])
    kw.update({k: v for k, v in overrides.items() if v is not None})
    kw["z_dims"] = [int(z) for z in kw["z_dims"]]
    validate_model_kwargs(kw)
    return kw


def validate_model_kwargs(kw: dict) -> None:
    need = _need
    _check_shared(kw, ("num_classes",), "the model depth")
    need(kw["hidden_size"] % kw["num_heads"] == 0,
         f"hidden_size={kw['hidden_size']} must be divisible by num_heads={kw['num_heads']}")
    need(kw["hidden_size"] % 4 == 0, f"hidden_size={kw['hidden_size']} must be a multiple of 4 (2D sin-cos table)")
    need(0.0 <= kw["class_dropout_prob"] < 1.0, f"class_dropout_prob={kw['class_dropout_prob']} must be in [0, 1)")
    need(kw["kernels"] in IMPLS, f"kernels={kw['kernels']!r} is not one of {IMPLS}")
    need(kw["projector_type"] in PROJECTOR_TYPES,
         f"projector_type={kw['projector_type']!r} is not one of {PROJECTOR_TYPES}")
    need(int(kw["projector_kernel"]) >= 1 and int(kw["projector_kernel"]) % 2 == 1,
         f"projector_kernel={kw['projector_kernel']} must be an odd kernel size (the grid keeps its size)")
    need(int(kw["cls_token_dim"]) >= 0, f"cls_token_dim={kw['cls_token_dim']} must be >= 0 (0: no REG class token)")
    if kw["cls_token_dim"]:
        need(not kw["rope"] and kw["projector_type"] == "mlp",
             f"cls_token_dim={kw['cls_token_dim']} (REG's class token) needs rope=False and projector_type='mlp' "
             "(both act on the token grid, which the extra token is not part of)")
    need(kw["rope_pairs"] in ROPE_PAIRS, f"rope_pairs={kw['rope_pairs']!r} is not one of {ROPE_PAIRS}")
    if kw["rope"]:
        head_dim = kw["hidden_size"] // kw["num_heads"]
        need(head_dim % 4 == 0, f"rope=True needs head_dim (hidden_size / num_heads = {head_dim}) divisible by 4")


def unwrap(model):
    """The module behind `model`: a bound method's owner (`model.denoise`), DDP `.module`, torch.compile
    `_orig_mod`, so attributes such as num_classes are found whatever wraps the model."""
    model = getattr(model, "__self__", model)
    for _ in range(4):
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def build_model(name: str, **overrides) -> SiT:
    """Build a backbone by registry name; overrides use the official constructor names (PDE-DiT: its own,
    `PDE_OVERRIDES`)."""
    kw = model_kwargs(name, **overrides)
    if family_of(name) == PDE_FAMILY:
        return PDEDiT(**{("spa_depth" if k == "depth" else k): v for k, v in kw.items()})
    return FAMILIES[family_of(name)][0](**kw)


__all__ = ["FAMILIES", "MODEL_NAMES", "OVERRIDES", "PDE_FAMILY", "PDE_OVERRIDES", "PROJECTOR_TYPES", "SIZES", "DiT",
           "PDEDiT", "SiT", "build_model", "erw_rope", "family_of", "overrides_of", "pde_model_kwargs",
           "model_kwargs", "unwrap"]
