"""The method seam: what a training objective is to the trainer.

A method (REPA, SRA, later ERW, repa-rf, ...) is one `Objective` subclass in its own module. The trainer
(fastrepa.train.step / loop) knows only this protocol:

    draws  = objective.draw(generator)            one sample's random draws, a dict of tensors, drawn in a
                                                  fixed order from that sample's own generator (seeded by
                                                  seed, step and index in the global batch: fastrepa.rng)
    inputs = objective.prepare(batch, draws, ctx) no grad, the whole local batch: latents, frozen features...
                                                  (a dict of per-sample tensors, sliced for micro-batches)
    total, terms = objective.loss(model, inputs, ctx)
                                                  the scalar to back-propagate and the named terms to log,
                                                  `objective.terms` in that order (terms[0] is the denoising
                                                  loss as the official code logs it: the progress bar's "loss")
    objective.state_dict() / load_state_dict()    plain-JSON state the method adds to a checkpoint (a phase)
    objective.restart_steps                       steps at whose start the trainer begins a fresh optimizer
                                                  and sets the EMA from the model (ERW's end of warmup)
    objective.train_flops(model)                  FLOPs of one trained sample (MFU)

The denoising part is the backbone's: a `Denoiser` matching `model.prediction` (flow matching for SiT's
velocity, DDPM for DiT's epsilon with learned sigma) draws the time and noise, corrupts the clean latents
and scores the output. A method combines a denoiser with its own terms, so REPA and SRA run on SiT and DiT
alike without the trainer knowing either.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class StepContext:
    """What an objective may use besides the model and its inputs."""
    step: int = 0  # the optimizer step being computed (0-based)
    epoch: int = 0  # step // steps per epoch (SRA's smooth-L1 weight schedule counts epochs)
    teacher: torch.nn.Module | None = None  # the EMA model (wrapped like the model), for self-alignment
    autocast: Callable = None  # the step's autocast context factory (for the no-grad encoder forward)


class Denoiser:
    """The denoising objective of one prediction type (see fastrepa.objectives.flow / ddpm)."""

    prediction = "?"  # must equal model.prediction
    extra_terms: tuple[str, ...] = ()  # logged besides the denoising loss (DDPM: mse, vb)
    num_timesteps: int | None = None  # discrete time (DDPM: 1000); None: continuous time in [0, 1]

    def draw(self, g: torch.Generator, latent_shape) -> dict:
        """This sample's time and noise, in a fixed order: {"time": 0-dim, "noise": latent_shape}."""
        raise NotImplementedError

    def corrupt(self, x, time, noise):
        """(x_t, the time tensor the model takes) for clean latents x [N, ...] at `time` [N] with `noise`."""
        raise NotImplementedError

    def loss(self, out, x, x_t, time, noise):
        """(per-sample denoising loss [N] in fp32 or wider, {extra term: scalar})."""
        raise NotImplementedError


def latents_from_moments(moments, eps, scale: float, bias: float):
    """The SD-VAE posterior sample of the official loaders: (mean + std * eps) * scale + bias, where
    moments [N, 2C, h, w] = cat(mean, std) as the official REPA latent files store them."""
    mean, std = moments.chunk(2, dim=1)
    return (mean + std * eps.to(mean.dtype)) * scale + bias


class Objective:
    """Base of the methods: the posterior sample, the denoiser's draws and the label-drop coin, common to
    every latent-space image method; subclasses add their terms (and draws, after these)."""

    name = "?"
    terms: tuple[str, ...] = ("loss",)
    uses_teacher = False  # True: the trainer passes the EMA as ctx.teacher (and keeps it like the model)
    restart_steps: tuple[int, ...] = ()  # a fresh optimizer and EMA = model at the start of these steps

    def __init__(self, model, denoiser: Denoiser, *, latents_scale: float = 0.18215, latents_bias: float = 0.0):
        if denoiser.prediction != model.prediction:
            raise ValueError(f"the {self.name} objective's denoiser predicts {denoiser.prediction!r} but the model "
                             f"predicts {model.prediction!r}")
        self.denoiser = denoiser
        self.latent_shape = tuple(model.latent_shape)
        self.null_class = model.null_class
        self.drop_prob = model.label_dropout_prob
        self.latents_scale, self.latents_bias = latents_scale, latents_bias

    # ------------------------------------------------------------------ randomness

    def draw(self, g: torch.Generator) -> dict:
        """One sample's draws, in this order: posterior noise, the denoiser's (time, noise), label-drop coin,
        then the method's own (`extra_draws`). The order is part of the format: changing it changes runs."""
        out = {"eps": torch.randn(self.latent_shape, generator=g)}
        out.update(self.denoiser.draw(g, self.latent_shape))
        out["drop"] = (torch.rand(1, generator=g) < self.drop_prob)[0].long()
        out.update(self.extra_draws(g))
        return out

    def extra_draws(self, g: torch.Generator) -> dict:
        return {}

    # ------------------------------------------------------------------ the step

    def prepare(self, batch: dict, draws: dict, ctx: StepContext) -> dict:
        """Per-sample inputs of `loss`, without grad: the clean latents x, the labels y and the draws."""
        x = latents_from_moments(batch["moments"], draws["eps"], self.latents_scale, self.latents_bias)
        return {"x": x, "y": batch["label"], **{k: v for k, v in draws.items() if k != "eps"}}

    def drop_ids(self, inputs: dict):
        """The label-drop mask for the model call; None (the model's own dropout, which is off) when the
        model has no label dropout."""
        return inputs["drop"] if self.drop_prob > 0 else None

    def dropped_labels(self, inputs: dict):
        """The labels after dropout, as the model saw them (dropped ones are the null class)."""
        y = inputs["y"]
        if self.drop_prob <= 0:
            return y
        return torch.where(inputs["drop"] == 1, torch.full_like(y, self.null_class), y)

    def loss(self, model, inputs: dict, ctx: StepContext):
        raise NotImplementedError

    # ------------------------------------------------------------------ state and cost

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"the {self.name} objective has no state, but the checkpoint holds {sorted(state)}")

    def train_flops(self, model) -> float:
        """FLOPs of one trained sample: forward + backward (3 x the forward) plus what the method adds."""
        return 3 * model.forward_flops()


def slice_inputs(inputs: dict, part: slice) -> dict:
    """The micro-batch `part` of per-sample inputs (tensors, and lists of tensors such as one feature
    tensor per encoder)."""
    return {k: ([t[part] for t in v] if isinstance(v, (list, tuple)) else v[part]) for k, v in inputs.items()}


__all__ = ["Denoiser", "Objective", "StepContext", "latents_from_moments", "slice_inputs"]
