"""Training objectives: the method seam (fastrepa.objectives.base), the denoisers (flow matching for SiT,
DDPM for DiT) and the methods (REPA, iREPA, SRA, ERW, HASTE, REG; FourierFlow on PDE fields), plus the interpolants and time samplers they share.

    objective = build_objective(cfg, model, encoders)      # --method, with the backbone's denoiser
"""
from fastrepa.objectives.base import Denoiser, Objective, StepContext
from fastrepa.objectives.flow import (
    PREDICTIONS,
    WEIGHTINGS,
    FlowMatching,
    check_prediction,
    check_weighting,
    sample_time,
)
from fastrepa.objectives.interpolants import (
    PATH_TYPES,
    check_path_type,
    interpolant,
    score_coefficients,
    score_from_velocity,
)
from fastrepa.objectives.erw import ERW
from fastrepa.objectives.fourierflow import FourierFlowObjective
from fastrepa.objectives.haste import HASTE
from fastrepa.objectives.irepa import IREPA
from fastrepa.objectives.reg import REG
from fastrepa.objectives.repa import REPA, label_dropout_prob, repa_loss, total_loss
from fastrepa.objectives.sra import SRA

METHODS = {"repa": REPA, "irepa": IREPA, "sra": SRA, "erw": ERW, "haste": HASTE, "reg": REG,
           "fourierflow": FourierFlowObjective}


def build_denoiser(model, objective_cfg) -> Denoiser:
    """The denoising objective of the model's prediction type: flow matching (--path-type, --weighting,
    --prediction) for a velocity model (SiT), DDPM with learned sigma for an epsilon model (DiT)."""
    if model.prediction == "velocity":
        return FlowMatching(objective_cfg.path_type, objective_cfg.weighting, objective_cfg.prediction)
    if model.prediction == "epsilon":
        from fastrepa.objectives.ddpm import DDPM
        return DDPM()
    raise ValueError(f"no denoising objective for a model that predicts {model.prediction!r}")


def method_model_options(cfg, z_dims=None) -> dict:
    """The model options a method needs (build_model keyword arguments): REPA's projectors (one per
    encoder, `z_dims`), SRA's alignment head and no projectors, REG's class token as wide as the first
    encoder's features."""
    if cfg.objective.method == "sra":
        return {"z_dims": [], "ap_head": True}
    z_dims = list(z_dims or [])
    if cfg.objective.method == "reg":
        return {"z_dims": z_dims, "cls_token_dim": z_dims[0] if z_dims else 0}
    return {"z_dims": z_dims}


def build_objective(cfg, model, encoders=()) -> Objective:
    """The --method objective of a TrainConfig for `model` (unwrapped) and the loaded `encoders`."""
    from fastrepa.models import family_of
    o, d = cfg.objective, cfg.data
    common = dict(latents_scale=d.latents_scale, latents_bias=d.latents_bias)
    denoiser = build_denoiser(model, o)
    if o.method == "repa":
        return REPA(model, denoiser, encoders, proj_coeff=o.proj_coeff, encoder_names=o.encoders,
                    resolution=d.resolution, **common)
    if o.method == "irepa":
        return IREPA(model, denoiser, encoders, proj_coeff=o.proj_coeff, spnorm=o.spnorm_method,
                     zscore_alpha=o.zscore_alpha, encoder_names=o.encoders, resolution=d.resolution, **common)
    if o.method == "erw":
        return ERW(model, denoiser, encoders, warmup_steps=o.warmup_steps, l2r_depth=o.l2r_depth,
                   lambda_c0=o.erw_lambda_c0(cfg.model.model), half_life=o.lambda_half_life,
                   encoder_names=o.encoders, resolution=d.resolution, **common)
    if o.method == "haste":
        return HASTE(model, denoiser, encoders, proj_coeff=o.proj_coeff, attn_coeff=o.attn_coeff,
                     stop_step=o.align_stop_step, attn_blocks=o.haste_blocks()[0], encoder_blocks=o.haste_blocks()[1],
                     encoder_names=o.encoders, resolution=d.resolution, **common)
    if o.method == "reg":
        return REG(model, denoiser, encoders, proj_coeff=o.proj_coeff, cls_coeff=o.cls, encoder_names=o.encoders,
                   resolution=d.resolution, **common)
    if o.method == "fourierflow":
        return FourierFlowObjective(model, denoiser, encoders, proj_coeff=o.proj_coeff)
    if o.method == "sra":
        s, t = o.sra_blocks(cfg.model.model)
        return SRA(model, denoiser, block_out_s=s, block_out_t=t, t_max=o.t_max, align_loss=o.sra_align_loss(
            cfg.model.model), cos_axis=o.align_cos_axis, family=family_of(cfg.model.model), resolution=d.resolution,
            **common)
    raise ValueError(f"--method={o.method!r}: expected one of {tuple(METHODS)}")


__all__ = [
    "ERW", "FourierFlowObjective", "HASTE", "IREPA", "METHODS", "REG", "PATH_TYPES", "PREDICTIONS", "REPA", "SRA", "WEIGHTINGS", "Denoiser", "FlowMatching", "Objective",
    "StepContext", "build_denoiser", "build_objective", "check_path_type", "check_prediction", "check_weighting",
    "interpolant", "label_dropout_prob", "method_model_options", "repa_loss", "sample_time",
    "score_coefficients", "score_from_velocity", "total_loss",
]
