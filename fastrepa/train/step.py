"""One optimizer step of a method (fastrepa.objectives), shared by the training loop and `bench/run.py --suite
train` (the bench times exactly what training runs).

    step_fn = TrainStep(model, ema, optimizer, objective, device=device, ...)
    result = step_fn(batch, draws, lr=lr, ctx=StepContext(step=s, epoch=e), stop_flag=stop.flag,
                     before_sync=draw_next)

A step: the objective's no-grad preparation of the local batch (latents, frozen encoders, under the same
autocast as the model), the forward/backward of each micro-batch, ONE all-reduce of the loss terms and
the stop request, the global grad-norm clip, then the only host sync of the step: are the loss and the
grad norm finite, and did any rank ask to stop. Nothing else waits for the device: the random draws
arrive pinned and copied asynchronously (`to_device`), and the stop request enters the all-reduce
through a fill kernel, not a host copy.
A finite step updates the weights (AdamW) and the EMA; a non-finite one leaves weights, optimizer state
and EMA exactly as they were (the gradients are dropped) and says so in the result; the caller decides
whether that stops the run or is skipped and counted (--on-nonfinite).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch

from fastrepa.objectives.base import StepContext, slice_inputs
from fastrepa.train.ema import update_ema
from fastrepa.distributed import all_reduce_sum
from fastrepa.train.parallel import clip_grad_norm, grad_sync, reshard

AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class StepResult:
    total: torch.Tensor  # the loss back-propagated (mean over the ranks), on the device
    terms: dict  # the objective's named terms (objective.terms order), each the mean over the ranks
    grad_norm: torch.Tensor  # the global grad norm before clipping
    finite: bool  # loss and grad norm finite: the weights were updated
    stop: bool  # some rank asked to stop (SIGTERM / SIGINT) during this step


class TrainStep:
    """The step function. `model` is the wrapped model (FSDP2 / DDP / plain), `ema` its EMA (same wrapping,
    also the teacher of methods that use one), `objective` a fastrepa.objectives.Objective."""

    def __init__(self, model, ema, optimizer, objective, *, device: torch.device, world_size: int = 1,
                 grad_accum: int = 1, max_grad_norm: float = 1.0, ema_decay: float = 0.9999,
                 mixed_precision: str = "bf16"):
        self.model, self.ema, self.optimizer, self.objective = model, ema, optimizer, objective
        self.device, self.world, self.accum = device, world_size, grad_accum
        self.max_grad_norm, self.ema_decay = max_grad_norm, ema_decay
        use_amp = device.type == "cuda" and mixed_precision in AUTOCAST
        self.autocast = (lambda: torch.autocast("cuda", dtype=AUTOCAST[mixed_precision])) if use_amp else nullcontext
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_amp and mixed_precision == "fp16")
        self.params = [p for p in model.parameters() if p.requires_grad]

    def to_device(self, draws: dict) -> dict:
        """The CPU draws of a step (fastrepa.rng.draw_step) on the device without a host sync: pinned,
        then copied asynchronously (the copies queue behind the kernels already launched)."""
        if self.device.type != "cuda":
            return {k: t.to(self.device) for k, t in draws.items()}
        return {k: t.pin_memory().to(self.device, non_blocking=True) for k, t in draws.items()}

    def __call__(self, batch: dict, draws: dict, *, lr: float, ctx: StepContext | None = None,
                 stop_flag: bool = False, before_sync=None) -> StepResult:
        """batch: this rank's samples as a dict (image, moments, label, ...); draws: their random draws
        (fastrepa.rng.draw_step), best already on the device (`to_device`, e.g. in the previous step's
        before_sync). ctx: the step and epoch (the teacher and autocast are filled in here).
        before_sync: called after the last kernel launch and before the host sync (the loop draws the
        next step's random numbers there, while the device still works)."""
        obj, device, accum = self.objective, self.device, self.accum
        ctx = replace(ctx or StepContext(), teacher=self.ema if obj.uses_teacher else None, autocast=self.autocast)
        draws = {k: t.to(device) for k, t in draws.items()}  # no-ops after to_device
        inputs = obj.prepare(batch, draws, ctx)
        n = inputs["x"].shape[0]
        zero = torch.zeros((), device=device)
        total_sum, sums = zero, {name: zero for name in obj.terms}
        for k in range(accum):
            part = slice(k * n // accum, (k + 1) * n // accum)
            with self.autocast():
                loss, terms = obj.loss(self.model, slice_inputs(inputs, part), ctx)
            with grad_sync(self.model, enabled=k == accum - 1):
                self.scaler.scale(loss / accum).backward()
            total_sum = total_sum + loss.detach() / accum
            sums = {name: sums[name] + terms[name].detach() / accum for name in obj.terms}
        if ctx.teacher is not None:
            reshard(self.ema)  # back to the shards its update works on (FSDP2)
        # One all-reduce: the mean terms over the ranks and the stop request (any rank's signal).
        # (torch.full is a fill kernel; torch.tensor(flag, device=...) would be a blocking host-to-device copy)
        flag = torch.full((), float(stop_flag), device=device)
        stats = all_reduce_sum(torch.stack([total_sum, *sums.values(), flag]).float())
        means = stats[:-1] / self.world
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm(self.params, self.max_grad_norm)
        if before_sync is not None:
            before_sync()
        # With fp16 loss scaling an overflowing gradient is routine: the scaler skips that update itself.
        ok = torch.isfinite(means[0])
        if not self.scaler.is_enabled():
            ok = ok & torch.isfinite(grad_norm.to(ok.device))
        finite, stop = torch.stack([ok, stats[-1] > 0]).tolist()
        if finite:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.scaler.step(self.optimizer)
            self.scaler.update()
            update_ema(self.ema, self.model, self.ema_decay)
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(means[0], dict(zip(obj.terms, means[1:])), grad_norm, bool(finite), bool(stop))
