"""FourierFlow's objective (WillDreamer/FourierFlow utils/loss.py, train.py): conditional flow matching of
the target frames given the condition frames, plus alignment of the model's projector output to a frozen
encoder's tokens of the clean target frames.

- x = the target frames [F, C, H, W] (normalised fields), cond = the condition frames; linear path,
  t ~ U(0, 1), x_t = (1 - t) x + t eps, target eps - x (SiT's linear interpolant: the same as upstream), per-
  sample mean squared error;
- alignment: for each encoder, the mean over elements of (normalize(z) - normalize(z_hat))^2 with both
  normalised per token over the features, z_hat the projector after spatial block `--encoder-depth` of
  PDE-DiT ([B, F, n, z]), z the ViViT encoder's tokens of the clean target frames; the mean over encoders,
  weight `--proj-coeff` (upstream 1e-4). Upstream also divides this mean by the per-process batch size,
  which makes the weight depend on the batch and the process count; ours does not (its 1e-4 / B is our
  `--proj-coeff` for an exact match).
No labels, no posterior sample: a sample's draws are the denoiser's (time, noise) alone.
"""
import torch
import torch.nn.functional as F

from fastrepa.objectives.base import Objective


def normalized_mse(zs, zs_tilde):
    """The mean over encoders of mean((normalize(z) - normalize(z_tilde))^2), per token over the last dim,
    in fp32; 0 without encoders."""
    zs, zs_tilde = list(zs), list(zs_tilde)
    if len(zs) != len(zs_tilde):
        raise ValueError(f"{len(zs)} encoder feature tensors for {len(zs_tilde)} projector outputs")
    if not zs:
        return torch.zeros(())
    per = []
    for k, (z, zt) in enumerate(zip(zs, zs_tilde)):
        if z.shape != zt.shape:
            raise ValueError(f"encoder {k}: features {tuple(z.shape)} but projector {k} gives {tuple(zt.shape)}")
        per.append((F.normalize(z.float(), dim=-1) - F.normalize(zt.float(), dim=-1)).square().mean())
    return torch.stack(per).mean()


class FourierFlowObjective(Objective):
    name = "fourierflow"
    terms = ("loss", "proj_loss")

    def __init__(self, model, denoiser, encoders=(), *, proj_coeff: float = 1e-4):
        if denoiser.prediction != model.prediction:
            raise ValueError(f"the fourierflow objective's denoiser predicts {denoiser.prediction!r} but the model "
                             f"predicts {model.prediction!r}")
        self.denoiser, self.latent_shape = denoiser, tuple(model.latent_shape)
        self.encoders, self.proj_coeff = list(encoders), proj_coeff
        self.drop_prob = 0.0
        frames, channels = self.latent_shape[:2]
        tokens = model.token_grid[0] * model.token_grid[1]
        if len(self.encoders) != len(model.z_dims):
            raise ValueError(f"{len(self.encoders)} encoder(s) for a model with {len(model.z_dims)} projector(s)")
        for k, (enc, z) in enumerate(zip(self.encoders, model.z_dims)):
            got = (getattr(enc, "frames", None), getattr(enc, "channels", None), getattr(enc, "num_tokens", None),
                   getattr(enc, "embed_dim", None))
            want = (frames, channels, tokens, z)
            if any(g is not None and g != w for g, w in zip(got, want)):  # what the encoder declares must fit
                raise ValueError(f"encoder {k} ({getattr(enc, 'enc_type', type(enc).__name__)}) takes {got[0]} frames "
                                 f"x {got[1]} variables as {got[2]} tokens of width {got[3]}; the model has {frames} "
                                 f"frames x {channels} variables, {tokens} tokens per frame and projector width {z} "
                                 "(--num-frames, --input-size, the model's patch size, --enc-path)")

    def draw(self, g):
        return self.denoiser.draw(g, self.latent_shape)

    def prepare(self, batch, draws, ctx):
        inputs = {"x": batch["target"], "cond": batch["cond"], **draws}
        with torch.no_grad(), ctx.autocast():  # a cached encoder's tokens ride in the batch (--feature-cache)
            inputs["zs"] = [batch["features"] if getattr(enc, "cached", False) else enc(batch["target"])
                            for enc in self.encoders]
        return inputs

    def train_flops(self, model) -> float:
        """Forward + backward of the model (3 x its forward) and one forward of each frozen encoder."""
        return 3 * model.forward_flops() + sum(enc.forward_flops() for enc in self.encoders)

    def loss(self, model, inputs, ctx):
        x, den = inputs["x"], self.denoiser
        x_t, t = den.corrupt(x, inputs["time"], inputs["noise"])
        out, zs_tilde = model(x_t, t, inputs["cond"])
        denoising, _ = den.loss(out, x, x_t, inputs["time"], inputs["noise"])
        proj = normalized_mse(inputs["zs"], zs_tilde).to(x.device)
        total = denoising.mean() + self.proj_coeff * proj
        return total, {"loss": denoising.mean(), "proj_loss": proj}


__all__ = ["FourierFlowObjective", "normalized_mse"]
