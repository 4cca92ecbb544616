"""iREPA (End2End-Diffusion/iREPA): REPA with two changes, as its `configs/irepa.yaml` selects them:

- the projector is a convolution over the token grid (`--projection-layer-type conv`, kernel
  `--proj-kwargs-kernel-size`, 3 as iREPA's README writes it) instead of REPA's MLP: a model option,
  fastrepa.models.sit.ConvProjector, keys `projectors.K.projection_layer.*` as official;
- the encoder's patch tokens are z-scored over the tokens before the cosine (`--spnorm-method zscore`):
  z' = (z - alpha * mean_T(z)) / (std_T(z) + 1e-6), with the unbiased std over the T tokens and
  alpha = `--zscore-alpha` (official default 0.6);
- the alignment weight is 1.0 (`--proj-coeff`).
The denoising loss, the per-token negative cosine and the draws are REPA's.
"""
import torch

from fastrepa.objectives.repa import REPA

SPNORM_METHODS = ("none", "zscore")
ZSCORE_EPS = 1e-6


def spatial_zscore(z: torch.Tensor, alpha: float = 1.0, eps: float = ZSCORE_EPS) -> torch.Tensor:
    """[N, T, D] features normalised over the token axis (official iREPA `spatial_zscore`)."""
    return (z - alpha * z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + eps)


class IREPA(REPA):
    name = "irepa"

    def __init__(self, model, denoiser, encoders=(), *, spnorm: str = "zscore", zscore_alpha: float = 0.6, **kw):
        if spnorm not in SPNORM_METHODS:
            raise ValueError(f"--spnorm-method={spnorm!r}: expected one of {SPNORM_METHODS}")
        super().__init__(model, denoiser, encoders, **kw)
        self.spnorm, self.zscore_alpha = spnorm, zscore_alpha

    def prepare(self, batch, draws, ctx):
        inputs = super().prepare(batch, draws, ctx)
        if self.spnorm == "zscore":
            inputs["zs"] = [spatial_zscore(z.float(), self.zscore_alpha) for z in inputs["zs"]]
        return inputs


__all__ = ["IREPA", "SPNORM_METHODS", "spatial_zscore"]
