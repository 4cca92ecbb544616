"""The REPA objective (official loss.py `SILoss`): velocity denoising loss + projection (alignment) loss.

denoising: x_t = alpha_t x + sigma_t eps, target = alpha'_t x + sigma'_t eps, per-sample mean over
C, H, W of (model(x_t, t, y) - target)^2.
projection: for each encoder k, per sample, the mean over tokens of -cos(z_k, z_tilde_k) (fp32, via
`fastrepa.kernels.alignment_loss`), averaged over samples and encoders, i.e. the official
sum / (len(zs) * bsz).

Every random draw (time, noise, label dropout) can come from one `torch.Generator`, so a training step
is a pure function of its seed. Without a generator the draws use the global RNG and the model drops
labels itself, as the official code does.
"""
import torch

from fastrepa.kernels import alignment_loss
from fastrepa.models import unwrap
from fastrepa.objectives.interpolants import check_path_type, interpolant

WEIGHTINGS = ("uniform", "lognormal")
PREDICTIONS = ("v",)


def check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r} is not one of {WEIGHTINGS}")


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction={prediction!r} is not supported; allowed: {PREDICTIONS} "
                         "(the official REPA code implements only velocity prediction)")


def _draw_device(generator):
    return generator.device if generator is not None else torch.device("cpu")


def sample_time(n: int, weighting: str = "uniform", path_type: str = "linear", generator=None, device=None):
    """n training times in [0, 1] as a float32 tensor [n].

    "uniform": U(0, 1). "lognormal" (EDM-style, P_mean 0 and P_std 1): sigma = exp(randn), then
    t = sigma / (1 + sigma) for "linear" and t = 2/pi * atan(sigma) for "cosine".
    Drawn on the generator's device (CPU for a CPU generator or for the global RNG when generator is
    None), then moved to `device`.
    """
    check_weighting(weighting)
    check_path_type(path_type)
    where = _draw_device(generator)
    if weighting == "uniform":
        t = torch.rand(n, generator=generator, device=where, dtype=torch.float32)
    else:
        sigma = torch.randn(n, generator=generator, device=where, dtype=torch.float32).exp()
        if path_type == "linear":
            t = sigma / (1 + sigma)
        else:
            t = 2 / torch.pi * torch.atan(sigma)
    return t if device is None else t.to(device)


def label_dropout_prob(model) -> float:
    y_embedder = getattr(unwrap(model), "y_embedder", None)
    return float(getattr(y_embedder, "dropout_prob", 0.0) or 0.0)


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
    zs = list(zs)

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
    t = time.to(device=x.device, dtype=x.dtype)
    alpha, sigma, d_alpha, d_sigma = interpolant(t.view(n, *([1] * (x.dim() - 1))), path_type)
    x_t = alpha * x + sigma * noise
    wide = torch.promote_types(x.dtype, torch.float32)
    target = d_alpha.to(wide) * x.to(wide) + d_sigma.to(wide) * noise.to(wide)

    if force_drop_ids is None:
        result = model(x_t, t, y)
    else:
        result = model(x_t, t, y, force_drop_ids=force_drop_ids)
    if isinstance(result, (tuple, list)):
        out, zs_tilde = result[0], list(result[1])
    else:
        out, zs_tilde = result, []

    denoising = (out.to(wide) - target).square().mean(dim=tuple(range(1, x.dim())))

    if len(zs) != len(zs_tilde):
        raise ValueError(f"got {len(zs)} encoder feature tensor(s) (zs) but the model has {len(zs_tilde)} "
                         "projector output(s); pass one encoder's features per projector (model z_dims)")
    if not zs:
        return denoising, torch.zeros((), dtype=torch.float32, device=x.device)
    kernels = getattr(unwrap(model), "kernels", "auto")
    per_encoder = []
    for k, (z, z_tilde) in enumerate(zip(zs, zs_tilde)):
        if z.dim() != 3 or z.shape != z_tilde.shape:
            raise ValueError(
                f"encoder {k}: features zs[{k}] have shape {tuple(z.shape)} but projector {k} outputs "
                f"{tuple(z_tilde.shape)}; [batch, tokens, dim] must match (token grid and z_dims)")
        per_encoder.append(alignment_loss(z, z_tilde, impl=kernels).float().mean())
    proj = torch.stack(per_encoder).mean()
    return denoising, proj


def total_loss(denoising, proj, proj_coeff: float):
    """The scalar REPA training loss: denoising.mean() + proj_coeff * proj (official default 0.5)."""
    return denoising.mean() + proj_coeff * proj


__all__ = ["PREDICTIONS", "WEIGHTINGS", "check_prediction", "check_weighting", "label_dropout_prob",
           "repa_loss", "sample_time", "total_loss"]
