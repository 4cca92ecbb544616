"""Processes and devices: the process group from the torchrun environment, the collectives every
module uses (rank, barrier, sum), and the one device choice.

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
        barrier()


def is_distributed() -> bool:
    """Whether a process group exists (torchrun with more than one process)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    """Wait for every rank (a no-op in one process); nccl barriers name this process's CUDA device."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place (unchanged in one process); returns it."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def resolve_device(device: str | torch.device | None = None, what: str = "device",
                   index: int | None = None) -> torch.device:
    """The device to run on: None = CUDA when available, else the CPU; a CUDA device without an index gets
    `index` (the local rank) or the current device. Errors name `what` (the flag or caller) when CUDA is
    asked for but missing, or the device is neither cpu nor cuda."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{what} {device!r}: expected 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what} {device}: CUDA is not available here (use cpu)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device() if index is None
                                  else index % torch.cuda.device_count())
    elif device.type != "cpu":
        raise ValueError(f"{what} {device}: expected 'cpu' or a CUDA device")
    return device


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
    device = resolve_device(device, "device", index=local_rank)
    if device.type == "cuda":
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


__all__ = ["DEFAULT_TIMEOUT_S", "DistEnv", "all_reduce_sum", "barrier", "exit_process", "is_distributed", "rank",
           "resolve_device", "setup", "teardown", "world_size"]
