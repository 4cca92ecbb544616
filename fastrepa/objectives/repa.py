"""The REPA objective (official loss.py `SILoss`): denoising loss + projection (alignment) loss.

denoising: the backbone's (fastrepa.objectives.flow for SiT: per-sample mean over C, H, W of
(model(x_t, t, y) - target)^2; fastrepa.objectives.ddpm for DiT: MSE + VB).
projection: for each encoder k, per sample, the mean over tokens of -cos(z_k, z_tilde_k) (fp32, via
`fastrepa.kernels.alignment_loss`), averaged over samples and encoders, i.e. the official
sum / (len(zs) * bsz).

`REPA` is the method the trainer runs (fastrepa.objectives.base); `repa_loss` is the same loss as a
function of a model and a batch, whose random draws (time, noise, label dropout) can come from one
`torch.Generator`, so a training step is a pure function of its seed. Without a generator the draws use
the global RNG and the model drops labels itself, as the official code does.
"""
import torch

from fastrepa.kernels import alignment_loss
from fastrepa.models import unwrap
from fastrepa.objectives.base import Objective
from fastrepa.objectives.flow import (PREDICTIONS, WEIGHTINGS, check_prediction, check_weighting, flow_corrupt,
                                      flow_loss, flow_target, sample_time)
from fastrepa.objectives.interpolants import check_path_type


def label_dropout_prob(model) -> float:
    return float(getattr(unwrap(model), "label_dropout_prob", 0.0) or 0.0)


def projection_loss(zs, zs_tilde, kernels: str = "auto", device=None):
    """The mean over encoders of each encoder's per-sample mean over tokens of -cos(z, z_tilde), in fp32;
    0 without encoders. Shapes are checked, naming the encoder."""
    zs, zs_tilde = list(zs), list(zs_tilde)
    if len(zs) != len(zs_tilde):
        raise ValueError(f"got {len(zs)} encoder feature tensor(s) (zs) but the model has {len(zs_tilde)} "
                         "projector output(s); pass one encoder's features per projector (model z_dims)")
    if not zs:
        return torch.zeros((), dtype=torch.float32, device=device)
    per_encoder = []
    for k, (z, z_tilde) in enumerate(zip(zs, zs_tilde)):
        if z.dim() != 3 or z.shape != z_tilde.shape:
            raise ValueError(
                f"encoder {k}: features zs[{k}] have shape {tuple(z.shape)} but projector {k} outputs "
                f"{tuple(z_tilde.shape)}; [batch, tokens, dim] must match (token grid and z_dims)")
        per_encoder.append(alignment_loss(z, z_tilde, impl=kernels).float().mean())
    return torch.stack(per_encoder).mean()


def repa_loss(model, x, y, zs, *, time=None, noise=None, path_type: str = "linear", prediction: str = "v",
              weighting: str = "uniform", generator=None, force_drop_ids=None):
    """(denoising [N], proj scalar) for clean latents x [N, C, H, W], labels y [N], encoder features zs.

    zs: one [N, T, C_k] tensor per model projector (may be empty for a model without projectors: the
    projection loss is then 0). time [N] and noise (shaped like x) are drawn when not given: time by
    `sample_time(N, weighting, path_type, generator)`, noise by torch.randn from `generator` (on the
    generator's device, then moved to x's device) or `randn_like(x)` without one.
    The model is called as `model(x_t, t, y[, force_drop_ids=...])` and must return (out, zs_tilde).
    Label dropout: with a generator, a model in training mode and dropout_prob > 0, the drop mask is
    drawn here from the generator (after time and noise) and passed as force_drop_ids; otherwise the
    model drops labels itself. The losses are in fp32 (fp64 when x is fp64), also under autocast.
    """
    check_path_type(path_type)
    check_prediction(prediction)
    check_weighting(weighting)
    n = x.shape[0]

    if time is None:
        time = sample_time(n, weighting, path_type, generator=generator)
    elif tuple(time.shape) != (n,):
        raise ValueError(f"time must have shape [{n}] (one per sample of x {tuple(x.shape)}), "
                         f"got {tuple(time.shape)}")
    if noise is None:
        if generator is None:
            noise = torch.randn_like(x)
        else:
            noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    elif noise.shape != x.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match x shape {tuple(x.shape)}")
    noise = noise.to(device=x.device, dtype=x.dtype)

    if force_drop_ids is None and generator is not None and model.training:
        p = label_dropout_prob(model)
        if p > 0:
            drop = torch.rand(n, generator=generator, device=generator.device) < p
            force_drop_ids = drop.to(device=y.device, dtype=torch.long)

    # Official: time cast to the latents' dtype, then the interpolant in that dtype.
    x_t, t = flow_corrupt(x, time, noise, path_type)
    if force_drop_ids is None:
        result = model(x_t, t, y)
    else:
        result = model(x_t, t, y, force_drop_ids=force_drop_ids)
    if isinstance(result, (tuple, list)):
        out, zs_tilde = result[0], list(result[1])
    else:
        out, zs_tilde = result, []
    denoising = flow_loss(out, flow_target(x, t, noise, path_type))
    proj = projection_loss(zs, zs_tilde, getattr(unwrap(model), "kernels", "auto"), device=x.device)
    return denoising, proj


def total_loss(denoising, proj, proj_coeff: float):
    """The scalar REPA training loss: denoising.mean() + proj_coeff * proj (official default 0.5)."""
    return denoising.mean() + proj_coeff * proj


class REPA(Objective):
    """REPA: the backbone's denoising loss + proj_coeff x the projection loss of the model's projectors
    (after block --encoder-depth) against the frozen encoders' patch tokens of the clean images.

    Terms: "loss" (the denoising loss, as official REPA logs it), "proj_loss" (unweighted), then the
    denoiser's own (DDPM: mse, vb)."""

    name = "repa"

    def __init__(self, model, denoiser, encoders=(), *, proj_coeff: float = 0.5, encoder_names=(),
                 resolution: int = 256, **kw):
        super().__init__(model, denoiser, **kw)
        self.encoders, self.encoder_names, self.resolution = list(encoders), list(encoder_names), resolution
        self.proj_coeff = proj_coeff
        self.kernels = model.kernels
        self.terms = ("loss", "proj_loss", *denoiser.extra_terms)

    def prepare(self, batch, draws, ctx):
        inputs = super().prepare(batch, draws, ctx)
        with torch.no_grad(), ctx.autocast():
            inputs["zs"] = [enc(batch["image"]) for enc in self.encoders]
        return inputs

    def loss(self, model, inputs, ctx):
        x, den = inputs["x"], self.denoiser
        x_t, t = den.corrupt(x, inputs["time"], inputs["noise"])
        drop = self.drop_ids(inputs)
        if drop is None:
            out, zs_tilde = model(x_t, t, inputs["y"])
        else:
            out, zs_tilde = model(x_t, t, inputs["y"], force_drop_ids=drop)
        denoising, extra = den.loss(out, x, x_t, inputs["time"], inputs["noise"])
        proj = projection_loss(inputs["zs"], zs_tilde, self.kernels, device=x.device)
        total = total_loss(denoising, proj, self.coeff(ctx.step))
        return total, {"loss": denoising.mean(), "proj_loss": proj, **extra}

    def coeff(self, step: int) -> float:
        """The alignment weight at `step` (REPA: --proj-coeff throughout; ERW: a schedule)."""
        return self.proj_coeff

    def train_flops(self, model) -> float:
        from fastrepa.train.flops import encoder_flops
        return super().train_flops(model) + encoder_flops(self.encoder_names, self.resolution, model.token_grid[0])


__all__ = ["PREDICTIONS", "REPA", "WEIGHTINGS", "check_prediction", "check_weighting", "label_dropout_prob",
           "projection_loss", "repa_loss", "sample_time", "total_loss"]
