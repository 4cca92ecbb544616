"""One optimizer step of a REPA-family objective, shared by the training loop and `bench/run.py --suite train`
(the bench times exactly what training runs).

    step_fn = TrainStep(model, ema, optimizer, encoders, objective=cfg.objective, ...)
    result = step_fn(raw, moments, labels, draws, lr=lr, stop_flag=stop.flag, before_sync=draw_next)

A step: the frozen encoders (no_grad, under the same autocast as the model), the forward/backward of each
micro-batch, ONE all-reduce of the loss statistics and the stop request, the global grad-norm clip, then
the only host sync of the step: are the loss and the grad norm finite, and did any rank ask to stop.
Nothing else waits for the device: the random draws arrive pinned and copied asynchronously
(`to_device`), and the stop request enters the all-reduce through a fill kernel, not a host copy.
A finite step updates the weights (AdamW) and the EMA; a non-finite one leaves weights, optimizer state
and EMA exactly as they were (the gradients are dropped) and says so in the result; the caller decides
whether that stops the run or is skipped and counted (--on-nonfinite).
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from fastrepa.objectives import repa_loss, total_loss
from fastrepa.train.ema import update_ema
from fastrepa.train.parallel import all_reduce_sum, clip_grad_norm, grad_sync

AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
TEST_NAN_ENV = "FASTREPA_TEST_NAN_AT_STEP"  # test hook "k" or "k:rank": that rank's loss is NaN at step k


@dataclass
class StepResult:
    losses: torch.Tensor  # [3] on the device: total, denoising, projection; the mean over the ranks
    grad_norm: torch.Tensor  # the global grad norm before clipping
    finite: bool  # loss and grad norm finite: the weights were updated
    stop: bool  # some rank asked to stop (SIGTERM / SIGINT) during this step


def hook_step(env_var: str, rank: int) -> int:
    """The step a test hook variable ("k": every rank, "k:r": rank r only) names for this rank (-1: none)."""
    value = os.environ.get(env_var, "")
    if not value:
        return -1
    step, _, on_rank = value.partition(":")
    return int(step) if not on_rank or int(on_rank) == rank else -1


class TrainStep:
    """The step function. `model` is the wrapped model (FSDP2 / DDP / plain), `ema` its EMA (same wrapping),
    `encoders` frozen modules mapping uint8 images to tokens. `objective` is an ObjectiveConfig; `data`
    the DataConfig (latent scale/bias)."""

    def __init__(self, model, ema, optimizer, encoders, *, objective, data, device: torch.device,
                 world_size: int = 1, grad_accum: int = 1, max_grad_norm: float = 1.0, ema_decay: float = 0.9999,
                 mixed_precision: str = "bf16", drop_prob: float = 0.0):
        self.model, self.ema, self.optimizer, self.encoders = model, ema, optimizer, encoders
        self.objective, self.data, self.device = objective, data, device
        self.world, self.accum = world_size, grad_accum
        self.max_grad_norm, self.ema_decay, self.drop_prob = max_grad_norm, ema_decay, drop_prob
        use_amp = device.type == "cuda" and mixed_precision in AUTOCAST
        self.autocast = (lambda: torch.autocast("cuda", dtype=AUTOCAST[mixed_precision])) if use_amp else nullcontext
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_amp and mixed_precision == "fp16")
        self.params = [p for p in model.parameters() if p.requires_grad]

    def to_device(self, draws):
        """The CPU draws of a step (fastrepa.train.rng.draw_step) on the device without a host sync: pinned,
        then copied asynchronously (the copies queue behind the kernels already launched)."""
        if self.device.type != "cuda":
            return tuple(t.to(self.device) for t in draws)
        return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in draws)

    def encode(self, raw: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad(), self.autocast():
            return [enc(raw) for enc in self.encoders]

    def __call__(self, raw, moments, labels, draws, *, lr: float, stop_flag: bool = False, poison: bool = False,
                 before_sync=None) -> StepResult:
        """draws = (eps, time, noise, drop) for this rank's samples (fastrepa.train.rng.draw_step), best
        already on the device (`to_device`, e.g. in the previous step's before_sync).
        before_sync: called after the last kernel launch and before the host sync (the loop draws the
        next step's random numbers there, while the device still works)."""
        obj, device, accum = self.objective, self.device, self.accum
        zs_all = self.encode(raw)
        mean, std = moments.chunk(2, dim=1)
        eps, t_all, noise_all, drop_all = (t.to(device) for t in draws)  # no-ops after to_device
        x_all = (mean + std * eps.to(mean.dtype)) * self.data.latents_scale + self.data.latents_bias
        n = x_all.shape[0]
        loss_sum = denoise_sum = proj_sum = torch.zeros((), device=device)
        for k in range(accum):
            part = slice(k * n // accum, (k + 1) * n // accum)
            with self.autocast():
                denoise, proj = repa_loss(
                    self.model, x_all[part], labels[part], [z[part] for z in zs_all], time=t_all[part],
                    noise=noise_all[part], force_drop_ids=drop_all[part] if self.drop_prob > 0 else None,
                    path_type=obj.path_type, prediction=obj.prediction, weighting=obj.weighting)
                loss = total_loss(denoise, proj, obj.proj_coeff)
            if poison:
                loss = loss * float("nan")
            with grad_sync(self.model, enabled=k == accum - 1):
                self.scaler.scale(loss / accum).backward()
            loss_sum = loss_sum + loss.detach() / accum
            denoise_sum = denoise_sum + denoise.detach().mean() / accum
            proj_sum = proj_sum + proj.detach() / accum
        # One all-reduce: the mean losses over the ranks and the stop request (any rank's signal).
        # (torch.full is a fill kernel; torch.tensor(flag, device=...) would be a blocking host-to-device copy)
        flag = torch.full((), float(stop_flag), device=device)
        stats = torch.stack([loss_sum, denoise_sum, proj_sum, flag]).float()
        stats = all_reduce_sum(stats)
        losses = stats[:3] / self.world
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm(self.params, self.max_grad_norm)
        if before_sync is not None:
            before_sync()
        # With fp16 loss scaling an overflowing gradient is routine: the scaler skips that update itself.
        ok = torch.isfinite(losses[0])
        if not self.scaler.is_enabled():
            ok = ok & torch.isfinite(grad_norm.to(ok.device))
        finite, stop = torch.stack([ok, stats[3] > 0]).tolist()
        if finite:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.scaler.step(self.optimizer)
            self.scaler.update()
            update_ema(self.ema, self.model, self.ema_decay)
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(losses, grad_norm, bool(finite), bool(stop))
