"""Official REPA checkpoint files: {"model", "ema", "opt", "args", "steps"} saved with torch.save.

Reading uses weights_only=True (no arbitrary pickles); the official files store `args` as an
argparse.Namespace, which is allowed explicitly and turned into a plain dict. Writing stores plain
types only (args as a dict) and is atomic: a crash mid-write never leaves a truncated file in place.
"""
import argparse
import os
import re
import warnings

import torch

from fastrepa.io import atomic_path

WEIGHT_KEYS = ("ema", "model")


class CheckpointError(ValueError):
    pass


def load_checkpoint_file(path: str) -> dict:
    """The checkpoint dict of an official-layout .pt file, loaded on the CPU with weights_only=True."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict")
    if isinstance(ckpt.get("args"), argparse.Namespace):
        ckpt["args"] = vars(ckpt["args"])
    return ckpt


def is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


BARE = "state_dict"  # what weights_name calls the weights of a bare state dict


def weights_name(ckpt: dict, key: str = "ema") -> str:
    """Which weights select_weights(ckpt, key) gives: `key`, or "state_dict" for a bare state dict."""
    return BARE if is_state_dict(ckpt) else key


def select_weights(ckpt: dict, key: str = "ema", source: str = "checkpoint") -> dict:
    """The state dict under `key` ("ema" or "model"); a bare state dict is returned as it is, with a
    warning (it is neither known to be the EMA nor the raw weights)."""
    if is_state_dict(ckpt):
        warnings.warn(f"{source} is a bare state dict, not a checkpoint with {' / '.join(WEIGHT_KEYS)} weights: "
                      f"its tensors are used as they are (whatever --weights says, here {key!r}); whether they are "
                      f"the EMA is unknown", stacklevel=2)
        return ckpt
    if key not in ckpt:
        raise CheckpointError(f"{source} has no {key!r} weights (keys: {sorted(ckpt)}); "
                              + ("pass --weights model to sample from the raw model weights" if key == "ema" else ""))
    return ckpt[key]


def convert_legacy(state_dict: dict, encoder_depth: int) -> dict:
    """Legacy REPA layout: `decoder_blocks.i.*` -> `blocks.(i + encoder_depth).*`."""
    out = {}
    for k, v in state_dict.items():
        m = re.match(r"decoder_blocks\.(\d+)\.(.*)", k)
        out[f"blocks.{int(m.group(1)) + encoder_depth}.{m.group(2)}" if m else k] = v
    return out


def normalize_keys(state_dict: dict, encoder_depth: int) -> dict:
    """Strip wrapper prefixes (DDP `module.`, torch.compile `_orig_mod.`) and convert the legacy layout."""
    sd = {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in state_dict.items()}
    if any(k.startswith("decoder_blocks.") for k in sd):
        sd = convert_legacy(sd, encoder_depth)
    return sd


def raise_on_mismatch(headline: str, missing, unexpected, shapes) -> None:
    """Raise a CheckpointError listing every missing / unexpected key and shape mismatch (if any)."""
    if not (missing or unexpected or shapes):
        return

    def show(items):
        return ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
    parts = [headline]
    if missing:
        parts.append(f"missing keys: {show(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {show(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches: {show(shapes)}")
    raise CheckpointError("; ".join(parts))


def load_weights(model: torch.nn.Module, state_dict: dict, source: str = "checkpoint") -> None:
    """Strict load that lists every missing, unexpected and mis-shaped key in one error."""
    sd = normalize_keys(state_dict, getattr(model, "encoder_depth", 0))
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    raise_on_mismatch(f"{source} does not match the model", missing, unexpected, shapes)
    model.load_state_dict(sd, strict=True)


def save_checkpoint_file(path: str, ckpt: dict) -> None:
    """torch.save, published atomically (fastrepa.io)."""
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
