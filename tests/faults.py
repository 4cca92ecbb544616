"""Faults injected into the product from outside, for the tests (the product has no test hooks).

Each injector takes `patch`, a setattr-like callable: pytest's `monkeypatch.setattr` in a test process
(undone after the test), the builtin `setattr` in a launched one. Processes started by a test (train.py or
generate.py, alone or under torchrun) get their faults through this file as the launcher:

    python tests/faults.py train.py ARGS...                     # or: torchrun ... tests/faults.py train.py ...
    FAULTS='{"nan_loss_at": [3, 1], "exit_after_step": [5, null]}'  # JSON: injector name -> its arguments

`launch_env(faults)` makes that environment; `LAUNCHER` is this file's path.
"""
from __future__ import annotations

import json
import os
import re
import runpy
import signal
import sys

LAUNCHER = os.path.abspath(__file__)
ENV = "FAULTS"
EXIT_CODE = 75  # exit_after_shards: the status a "killed" generate.py ends with
EXIT_AFTER_STEP_CODE = 3


class SimulatedCrash(RuntimeError):
    """A crash injected into the middle of a checkpoint save."""


def _on(rank: int | None) -> bool:
    from fastrepa.distributed import rank as this_rank
    return rank is None or rank == this_rank()


def nan_loss_at(patch, step: int, rank: int | None = None) -> None:
    """The loss of optimizer step `step` (0-based) is NaN (on `rank` only, or on every rank): every term
    the objective returns stays finite, as with a real overflow in the backbone."""
    from fastrepa.train.step import TrainStep
    init = TrainStep.__init__

    def patched_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        inner = self.objective.loss

        def loss(model, inputs, ctx):
            value, terms = inner(model, inputs, ctx)
            if ctx.step == step and _on(rank):
                value = value * float("nan")
            return value, terms
        self.objective.loss = loss
    patch(TrainStep, "__init__", patched_init)


def exit_after_step(patch, step: int, rank: int | None = None) -> None:
    """The process ends at once (os._exit, status 3: no cleanup, like a kill) right after the trainer
    finished `step` optimizer steps (on `rank` only, or on every rank)."""
    from fastrepa.train.loop import Trainer
    inner = Trainer.step

    def patched(self, *args, **kwargs):
        res = inner(self, *args, **kwargs)
        if self.step_now == step and _on(rank):
            sys.stdout.flush()
            os._exit(EXIT_AFTER_STEP_CODE)
        return res
    patch(Trainer, "step", patched)


class _SignalBefore:
    """The trainer's loader, sending SIGTERM to this process (rank 0) before handing out step `step`'s batch."""

    def __init__(self, loader, trainer, step: int):
        self.loader, self.trainer, self.at = loader, trainer, step

    def __iter__(self):
        for batch in self.loader:
            if self.trainer.step_now == self.at and self.trainer.rank0:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def sigterm_at_step(patch, step: int) -> None:
    """Rank 0 receives SIGTERM while step `step` (0-based) runs: the run stops after that step."""
    from fastrepa.train.loop import Trainer
    inner = Trainer.build

    def patched(self, *args, **kwargs):
        out = inner(self, *args, **kwargs)
        self.loader = _SignalBefore(self.loader, self, step)
        return out
    patch(Trainer, "build", patched)


_SAVE_PHASES = {"after_shards": "committing ", "after_marker": "publishing "}


def crash_in_save(patch, point: str, step: int | None = None) -> None:
    """SimulatedCrash on every rank in the middle of a DCP save (of step `step` only, or of any):
    after_shards = after the shards and train_state.json, before the COMMITTED marker;
    after_marker = after the marker, before the rename that publishes the checkpoint."""
    from fastrepa.train import dcp
    if point not in _SAVE_PHASES:
        raise ValueError(f"crash_in_save point {point!r}: expected one of {sorted(_SAVE_PHASES)}")
    inner = dcp.on_rank0

    def patched(fn, what: str):
        if what.startswith(_SAVE_PHASES[point]):
            found = re.search(r"step-(\d{9})", what)
            if step is None or (found and int(found.group(1)) == step):
                raise SimulatedCrash(f"crash injected {point} ({what})")
        return inner(fn, what)
    patch(dcp, "on_rank0", patched)


def exit_after_shards(patch, shards: int) -> None:
    """generate.py ends with EXIT_CODE after this process wrote `shards` sample shards."""
    from fastrepa import generation
    inner, written = generation.write_shard, []

    def patched(*args, **kwargs):
        out = inner(*args, **kwargs)
        written.append(out)
        if len(written) >= shards:
            print(f"fault: stopping after {len(written)} shard(s)", flush=True)
            sys.exit(EXIT_CODE)
        return out
    patch(generation, "write_shard", patched)


INJECTORS = {f.__name__: f for f in (nan_loss_at, exit_after_step, sigterm_at_step, crash_in_save,
                                     exit_after_shards)}


def install(faults: dict, patch=setattr) -> None:
    """Install {injector name: its arguments (a list, or one value)}."""
    for name, args in faults.items():
        if name not in INJECTORS:
            raise ValueError(f"{ENV}: unknown fault {name!r}; expected one of {sorted(INJECTORS)}")
        INJECTORS[name](patch, *(args if isinstance(args, list) else [args]))


def launch_env(env: dict, faults: dict | None = None) -> dict:
    """`env` for a process started through LAUNCHER, with `faults` (and no faults of the parent's env)."""
    env = {k: v for k, v in env.items() if k != ENV}
    if faults:
        env[ENV] = json.dumps(faults)
    return env


if __name__ == "__main__":
    script, *rest = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as if the script itself had been started
    install(json.loads(os.environ.get(ENV) or "{}"))
    sys.argv = [script, *rest]
    runpy.run_path(script, run_name="__main__")
