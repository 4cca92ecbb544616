"""Parameter and FLOP counts from the config alone (no weights, no data): what `--dry-run` prints.

FLOPs are 2 x the multiply-accumulates of the matmuls (linear layers, patch embedding, attention scores
and attention-weighted values; the backbone's own count, `model.forward_flops`); elementwise ops, norms and
softmax are not counted. A REPA training step costs 3 x the model forward (forward + backward) plus one
forward of each frozen encoder; other methods say what they add (`objective.train_flops`, e.g. SRA's
teacher forward up to its block).
SiT-XL/2 + DINOv2-B at 256px: ~237 GFLOP SiT forward, ~770 GFLOP per trained image.
"""
from __future__ import annotations

import torch

from fastrepa.encoders import _CLIP, _DINOV1, _DINOV2, _JEPA, _MAE, _MOCOV3

_FAMILIES = {"dinov2": (_DINOV2, 14, 224), "dinov1": (_DINOV1, 16, 224), "mocov3": (_MOCOV3, 16, 224),
             "mae": (_MAE, 16, 224), "jepa": (_JEPA, 14, 224), "clip": (_CLIP, 14, 224)}


def encoder_dims(name: str, resolution: int, grid: int) -> tuple[int, int]:
    """(embed_dim, forward FLOPs per image) of an encoder, from its name alone."""
    from fastrepa.encoders import canonical_name
    name = canonical_name(name)
    if name == "patch-pixels":
        return 3 * (resolution // grid) ** 2, 0
    if name == "vivit":  # FourierFlow's released ViViT (its file may differ: the trainer counts the loaded one)
        from fastrepa.encoders.vivit import ViViTEncoder
        with torch.device("meta"):
            enc = ViViTEncoder(num_patches=grid * grid)
        return enc.embed_dim, enc.forward_flops()
    family, _, size = name.split("-")[:3]
    table, patch, res = _FAMILIES[family]
    width, depth = table[size][0], table[size][1]
    tokens = (res // patch) ** 2 + 1
    macs = depth * (12 * tokens * width * width + 2 * tokens * tokens * width) + tokens * 3 * patch * patch * width
    return width, 2 * macs


def encoder_flops(encoder_names, resolution: int, grid: int) -> int:
    """Forward FLOPs per image of the frozen encoders, from their names alone."""
    return sum(encoder_dims(e, resolution, grid)[1] for e in encoder_names)


def counts(cfg) -> dict:
    """Parameter and FLOP counts of the configured model and method, built on the meta device."""
    from fastrepa.models import build_model, model_kwargs
    from fastrepa.objectives import build_objective, method_model_options
    overrides = cfg.model_overrides()
    kw = model_kwargs(cfg.model.model, **overrides, z_dims=[])
    grid = kw["input_size"] // kw["patch_size"]
    encs = {e: encoder_dims(e, cfg.data.resolution, grid) for e in cfg.objective.encoders}
    from fastrepa.encoders import load_encoder
    with torch.device("meta"):  # the encoders too (random_init: no file read), for the methods that ask them
        model = build_model(cfg.model.model, **overrides, **method_model_options(cfg, [d for d, _ in encs.values()]))
        encoders = [load_encoder(e, resolution=cfg.data.resolution, grid=grid, random_init=True)
                    for e in cfg.objective.encoders]
    objective = build_objective(cfg, model, encoders)
    train_flops = objective.train_flops(model)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fwd = model.forward_flops()
    enc_flops = sum(f for _, f in encs.values())
    if getattr(cfg.data, "feature_cache", ""):  # the encoder's tokens are read, not computed
        train_flops -= enc_flops
    return {"method": cfg.objective.method, "params": params, "trainable_params": trainable,
            "projector_params": sum(p.numel() for p in model.projectors.parameters()),
            "sit_forward_gflop_per_image": round(fwd / 1e9, 3),
            "encoder_forward_gflop_per_image": round(enc_flops / 1e9, 3),
            "train_gflop_per_image": round(train_flops / 1e9, 3),
            "train_gflop_per_step": round(train_flops * cfg.batch_size / 1e9, 3),
            **({"warmup_train_gflop_per_image": round(objective.warmup_flops(model) / 1e9, 3)}
               if hasattr(objective, "warmup_flops") else {}),
            **({"after_stop_train_gflop_per_image": round(objective.plain_flops(model) / 1e9, 3)}
               if hasattr(objective, "plain_flops") else {})}


# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, matched in this order against
# torch.cuda.get_device_name(); the MFU metric divides by these. Unknown devices (and the CPU) have none.
PEAK_BF16_TFLOPS = (
    ("GH200", 989.4), ("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4),
    ("H800", 989.4), ("H20", 148.0), ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0),
    ("L40S", 362.0), ("L40", 181.0), ("A10G", 70.0), ("L4", 121.0),
)


def peak_tflops(device: torch.device, override: float = 0.0) -> float | None:
    """Per-device peak TFLOP/s: `override` when > 0, else the table's value for this CUDA device, else None."""
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for key, v in PEAK_BF16_TFLOPS if key in name), None)


def train_flops_per_image(model, encoder_names, resolution: int) -> float:
    """FLOPs of one REPA-trained image: 3 x the model's forward (forward + backward) + one forward per
    encoder (other methods: their objective's `train_flops`)."""
    return 3 * model.forward_flops() + encoder_flops(encoder_names, resolution, model.token_grid[0])
