"""Process-group setup from the torchrun environment, for generate.py and (later) the trainer.

    dist_env = setup()           # reads RANK / WORLD_SIZE / LOCAL_RANK; one process without them
    ...
    dist_env.barrier()
    teardown(dist_env)

Backend: nccl when the device is CUDA, gloo on the CPU (the tests run CPU processes under torchrun).
A plain `python script.py` (no WORLD_SIZE, or WORLD_SIZE=1) creates no process group: rank 0 of 1,
and `barrier()` is a no-op, so callers need no special case.
"""
from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when no process group was created

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def barrier(self) -> None:
        if self.distributed:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r}: expected an integer (set by torchrun)") from None


def setup(device: str | torch.device | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Read the torchrun environment, pick this process's device, and init the process group.

    device: None = cuda:LOCAL_RANK when CUDA is available, else cpu; "cpu" forces CPU processes (gloo).
    timeout_s: how long collectives (barriers) wait for the slowest rank before failing.
    """
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} / WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device cuda requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if world == 1:
        return DistEnv(0, 1, local_rank, device, None)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        kw = dict(backend=backend, rank=rank, world_size=world, timeout=timeout)
        if backend == "nccl":
            kw["device_id"] = device
        dist.init_process_group(**kw)
    return DistEnv(rank, world, local_rank, device, backend)


def teardown(env: DistEnv | None = None) -> None:
    """Destroy the process group if one exists (safe to call more than once)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End a CLI process with `code`. Under torchrun (WORLD_SIZE > 1), after the process group was destroyed,
    the interpreter's own shutdown is skipped (stdout/stderr flushed, then os._exit): with gloo, objects
    still holding the group (FSDP's device mesh, ...) are otherwise destroyed during finalization, which
    now and then aborts a rank that had finished cleanly ("terminate called without an active exception";
    seen here about once in 20-60 two-process runs under load)."""
    if _env_int("WORLD_SIZE", 1) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


__all__ = ["DEFAULT_TIMEOUT_S", "DistEnv", "exit_process", "setup", "teardown"]
