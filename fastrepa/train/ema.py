"""Exponential moving average of the weights (every parameter, pos_embed included, as official REPA).

Under FSDP2 the EMA module is sharded exactly like the model (fastrepa.train.parallel.shard), so the
update runs on the local fp32 shards with one foreach op and no communication."""
import copy

import torch
from torch.distributed.tensor import DTensor


def make_ema(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of `model` in eval mode (the official init: EMA starts as the weights)."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema.eval()


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model, over all parameters, with one foreach op."""
    ema_params = [_local(p) for p in ema.parameters()]
    params = [_local(p.detach()) for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def reset_ema(ema: torch.nn.Module, model: torch.nn.Module) -> None:
    """ema = model, parameter by parameter (the same sharding under FSDP2): a method's restart (ERW)."""
    with torch.no_grad():
        torch._foreach_copy_([_local(p) for p in ema.parameters()], [_local(p.detach()) for p in model.parameters()])
