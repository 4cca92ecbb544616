"""Wrapping the model for data parallelism: per-block compile / activation checkpointing, FSDP2 or DDP.

    mode = resolve_mode(cfg.parallel, env)             # "fsdp" | "ddp" | "none"
    model, ema = wrap(model, ema, mode, env, ...)      # same objects for fsdp (fully_shard is in place)

FSDP2: `fully_shard` on every unit of the backbone (`model.fsdp_units()`: the blocks), then on the root
(model and EMA alike, so the EMA's fp32 shards line up one to one with the model's and the EMA update is a local foreach op). On CUDA with bf16 the
model gets MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32); on the CPU everything stays fp32,
so a CPU FSDP2 run equals the single-process run to float tolerance. `compile` and activation
checkpointing are applied per unit before sharding and in place, so state-dict keys never change. A method
whose loss runs the EMA (SRA's teacher) gets the EMA's units compiled too (`compile_ema`).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint


def resolve_mode(parallel: str, world_size: int) -> str:
    """The wrapping to use: none for one process; under torchrun --parallel, where `none` is refused (each rank
    would train its own copy on its slice of the batch, and only one of them would be saved)."""
    if world_size == 1:
        return "none"
    if parallel == "none":
        raise ValueError(f"--parallel none with {world_size} processes: the ranks would train separate copies "
                         f"without syncing gradients; use --parallel fsdp or ddp, or run one process")
    return parallel


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Activation checkpointing per block, in place (the block's forward recomputes in the backward)."""
    for block in model.fsdp_units():
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
        block.forward = forward


def compile_blocks(model: torch.nn.Module) -> None:
    for block in model.fsdp_units():
        block.compile()  # in place: the module keeps its keys (no _orig_mod.)


def shard(module: torch.nn.Module, mp_policy=None) -> None:
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    kw = {} if mp_policy is None else {"mp_policy": mp_policy}
    for block in module.fsdp_units():
        fully_shard(block, **kw)
    fully_shard(module, **kw)
    # the samplers call .denoise (SiT's .velocity calls it), a teacher .hidden_states, ERW .project_at: methods other
    # than forward bypass the root's hooks unless registered
    for method in ("denoise", "hidden_states", "project_at"):
        if hasattr(module, method):  # PDE-DiT has none of them (its forecast calls forward)
            register_fsdp_forward_method(module, method)


def wrap(model, ema, mode: str, device: torch.device, *, bf16: bool = False, compile: bool = False,
         activation_checkpointing: bool = False, compile_ema: bool = False):
    """(model to train, ema) after per-unit options and the parallel wrapping. Collective for fsdp/ddp."""
    if activation_checkpointing:
        checkpoint_blocks(model)
    if compile:
        compile_blocks(model)
        if compile_ema:
            compile_blocks(ema)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if bf16 and device.type == "cuda" else None)
        shard(model, mp)
        shard(ema)  # fp32, the same layout as the model's master weights
    elif mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif mode != "none":
        raise ValueError(f"--parallel={mode!r}: expected fsdp, ddp or none")
    return model, ema


def reshard(module) -> None:
    """Free the unsharded parameters an FSDP2 root keeps after a forward without backward (the EMA after a
    teacher forward or a sample grid): FSDP2 never reshards a root after its forward, expecting the backward
    to need them, so the EMA would otherwise hold full tensors where its update expects its shards.
    Not recursive: the units (blocks) reshard after their own forward. A no-op for other modules."""
    from torch.distributed.fsdp import FSDPModule
    if isinstance(module, FSDPModule):
        module.reshard()


def grad_sync(model, enabled: bool):
    """Context for one micro-batch's backward: under DDP, gradients all-reduce only when `enabled` (the last
    micro-batch of a step; the others accumulate locally, `no_sync`). FSDP2 reduce-scatters every
    micro-batch, which keeps only sharded gradients in memory; one process has nothing to sync."""
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(model, DistributedDataParallel) and not enabled:
        return model.no_sync()
    return nullcontext()


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` and return the total norm over ALL ranks' gradients (a plain tensor).

    Under FSDP2 the gradients are DTensor shards: their norm is a partial DTensor, made global with
    `full_tensor()` (one all-reduce) before the clip coefficient is taken. Under DDP every rank holds the
    averaged full gradient, so the local norm is already the global one."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False, foreach=None)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=None)
    return total

