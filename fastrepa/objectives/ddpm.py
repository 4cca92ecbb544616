"""DDPM as DiT trains (facebookresearch/DiT `create_diffusion()` + `training_losses`): the epsilon denoiser.

Linear betas 1e-4..0.02 over 1000 steps, integer t uniform in [0, 1000), x_t = q_sample(x, t, eps); the model
predicts eps and the LEARNED_RANGE variance values ([N, 2C, ...]); loss = MSE(eps) + the variational bound
term in bits per dimension on a stop-gradient mean (its gradient reaches the variance values only), with
loss type MSE as DiT's default (the num_timesteps / 1000 rescale of RESCALED_MSE is `rescale_vb`; at 1000
steps it is 1 either way). The math is fastrepa.gaussian_diffusion; the model sees the integer timesteps
(int64, so no mixed-precision policy can round them).
"""
import torch

from fastrepa.gaussian_diffusion import create_diffusion
from fastrepa.objectives.base import Denoiser


class DDPM(Denoiser):
    prediction = "epsilon"
    extra_terms = ("mse", "vb")

    def __init__(self, num_timesteps: int = 1000, rescale_vb: bool = False):
        self.diffusion = create_diffusion("", diffusion_steps=num_timesteps, learn_sigma=True, rescale_vb=rescale_vb)
        self.num_timesteps = self.diffusion.num_timesteps

    def draw(self, g, latent_shape) -> dict:
        t = torch.randint(0, self.num_timesteps, (1,), generator=g)[0]
        return {"time": t, "noise": torch.randn(latent_shape, generator=g)}

    def corrupt(self, x, time, noise):
        t = time.to(device=x.device, dtype=torch.long)
        return self.diffusion.q_sample(x, t, noise.to(device=x.device, dtype=x.dtype)), t

    def loss(self, out, x, x_t, time, noise):
        wide = torch.promote_types(x.dtype, torch.float32)
        t = time.to(device=x.device, dtype=torch.long)
        terms = self.diffusion.training_losses(out.to(wide), x.to(wide), x_t.to(wide), t,
                                               noise.to(device=x.device, dtype=wide))
        return terms["loss"], {"mse": terms["mse"].mean(), "vb": terms["vb"].mean()}


__all__ = ["DDPM"]
