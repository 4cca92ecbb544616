"""Flow matching as SiT trains (official REPA loss.py): the velocity denoiser.

x_t = alpha_t x + sigma_t eps, target = alpha'_t x + sigma'_t eps (fastrepa.objectives.interpolants), per-sample
mean over C, H, W of (model(x_t, t, y) - target)^2. The time is drawn uniformly or log-normally
(`sample_time`); the time cast to the latents' dtype and the interpolant computed in that dtype, the target
and the loss in fp32 (fp64 for fp64 latents), as officially.
"""
import torch

from fastrepa.objectives.base import Denoiser
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


def sample_time(n: int, weighting: str = "uniform", path_type: str = "linear", generator=None, device=None):
    """n training times in [0, 1] as a float32 tensor [n].

    "uniform": U(0, 1). "lognormal" (EDM-style, P_mean 0 and P_std 1): sigma = exp(randn), then
    t = sigma / (1 + sigma) for "linear" and t = 2/pi * atan(sigma) for "cosine".
    Drawn on the generator's device (CPU for a CPU generator or for the global RNG when generator is
    None), then moved to `device`.
    """
    check_weighting(weighting)
    check_path_type(path_type)
    where = generator.device if generator is not None else torch.device("cpu")
    if weighting == "uniform":
        t = torch.rand(n, generator=generator, device=where, dtype=torch.float32)
    else:
        sigma = torch.randn(n, generator=generator, device=where, dtype=torch.float32).exp()
        if path_type == "linear":
            t = sigma / (1 + sigma)
        else:
            t = 2 / torch.pi * torch.atan(sigma)
    return t if device is None else t.to(device)


def _view(t, x):
    return t.view(x.shape[0], *([1] * (x.dim() - 1)))


def flow_corrupt(x, time, noise, path_type: str):
    """(x_t, t): t is `time` cast to x's dtype (what the model takes), x_t = alpha_t x + sigma_t noise in
    x's dtype."""
    t = time.to(device=x.device, dtype=x.dtype)
    alpha, sigma, _, _ = interpolant(_view(t, x), path_type)
    return alpha * x + sigma * noise.to(device=x.device, dtype=x.dtype), t


def flow_target(x, t, noise, path_type: str):
    """The velocity target alpha'_t x + sigma'_t noise in fp32 (fp64 for fp64 x); t as flow_corrupt gives it."""
    _, _, d_alpha, d_sigma = interpolant(_view(t, x), path_type)
    wide = torch.promote_types(x.dtype, torch.float32)
    return d_alpha.to(wide) * x.to(wide) + d_sigma.to(wide) * noise.to(device=x.device, dtype=x.dtype).to(wide)


def flow_loss(out, target):
    """Per-sample mean over the non-batch dims of (out - target)^2, in the target's (wide) dtype."""
    return (out.to(target.dtype) - target).square().mean(dim=tuple(range(1, target.dim())))


class FlowMatching(Denoiser):
    """SiT's velocity objective with the official flags --path-type, --prediction, --weighting."""

    prediction = "velocity"

    def __init__(self, path_type: str = "linear", weighting: str = "uniform", prediction: str = "v"):
        check_path_type(path_type)
        check_weighting(weighting)
        check_prediction(prediction)
        self.path_type, self.weighting = path_type, weighting

    def draw(self, g, latent_shape) -> dict:
        time = sample_time(1, self.weighting, self.path_type, generator=g)[0]
        return {"time": time, "noise": torch.randn(latent_shape, generator=g)}

    def corrupt(self, x, time, noise):
        return flow_corrupt(x, time, noise, self.path_type)

    def loss(self, out, x, x_t, time, noise):
        t = time.to(device=x.device, dtype=x.dtype)
        return flow_loss(out, flow_target(x, t, noise, self.path_type)), {}


__all__ = ["PREDICTIONS", "WEIGHTINGS", "FlowMatching", "check_prediction", "check_weighting", "flow_corrupt",
           "flow_loss", "flow_target", "sample_time"]
