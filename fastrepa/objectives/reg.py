"""REG (Martinser/REG): one extra token carrying the encoder's class feature, noised and denoised with the
latents, and REPA on every token.

- the clean class feature c [N, d] is the first encoder's class token (DINOv2 `x_norm_clstoken`; official
  REG runs DINOv2 only); it follows the latents' interpolant with its own noise at the same time:
  c_t = alpha_t c + sigma_t eps_c, target alpha'_t c + sigma'_t eps_c;
- the model (fastrepa.models.sit.SiT with cls_token_dim = d, official keys `cls_projectors2`, `wg_norm`,
  `final_layer.linear_cls`, and a zero pos-embed row for the token) takes c_t as token 0 and predicts its
  velocity from the final layer's token 0;
- the projection loss aligns the projectors' T + 1 outputs to cat(class token, patch tokens) of each
  encoder (official: `dense_z = cat([cls_token, x_norm_patchtokens])`);
- loss = denoising + `--proj-coeff` (0.5) x projection + `--cls` (0.03) x the class token's denoising
  loss (the per-sample mean over d of the squared velocity error).
Sampling integrates the class token alongside the latents and discards it (fastrepa.generation).
"""
import torch

from fastrepa.objectives.base import Objective
from fastrepa.objectives.flow import FlowMatching, flow_corrupt, flow_loss, flow_target
from fastrepa.objectives.repa import REPA, projection_loss, total_loss

CLS_COEFF = 0.03  # official --cls


class REG(REPA):
    name = "reg"

    def __init__(self, model, denoiser, encoders=(), *, cls_coeff: float = CLS_COEFF, **kw):
        if not isinstance(denoiser, FlowMatching):
            raise ValueError("--method reg trains a velocity model (SiT) with flow matching, as official REG; "
                             f"this model predicts {model.prediction!r}")
        super().__init__(model, denoiser, encoders, **kw)
        if not model.cls_token_dim:
            raise ValueError("--method reg needs a model built with REG's class token (cls_token_dim > 0)")
        if not self.encoders:
            raise ValueError("--method reg needs an encoder (--enc-type) whose class token it denoises")
        enc = self.encoders[0]
        if not getattr(enc, "has_cls_token", False):
            raise ValueError(f"--method reg: encoder {getattr(enc, 'enc_type', type(enc).__name__)} has no class "
                             "token; use a ViT encoder with one (dinov2-vit-b, as official REG)")
        if getattr(enc, "embed_dim", model.cls_token_dim) != model.cls_token_dim:
            raise ValueError(f"--method reg: the model's class token has {model.cls_token_dim} dims but encoder "
                             f"{enc.enc_type} gives {enc.embed_dim}")
        self.cls_coeff, self.cls_dim = cls_coeff, model.cls_token_dim
        self.terms = ("loss", "proj_loss", "cls_loss")

    def extra_draws(self, g):
        return {"cls_noise": torch.randn(self.cls_dim, generator=g)}

    def prepare(self, batch, draws, ctx):
        inputs = Objective.prepare(self, batch, draws, ctx)
        with torch.no_grad(), ctx.autocast():
            feats = [enc.features(batch["image"]) for enc in self.encoders]
        inputs["zs"] = [torch.cat([f["cls"].unsqueeze(1), f["patch"]], dim=1) for f in feats]
        inputs["cls"] = feats[0]["cls"].to(inputs["x"].dtype)
        return inputs

    def loss(self, model, inputs, ctx):
        x, den = inputs["x"], self.denoiser
        x_t, t = den.corrupt(x, inputs["time"], inputs["noise"])
        cls_t, _ = flow_corrupt(inputs["cls"], inputs["time"], inputs["cls_noise"], den.path_type)
        drop = self.drop_ids(inputs)
        kw = {} if drop is None else {"force_drop_ids": drop}
        out, zs_tilde, cls_out = model(x_t, t, inputs["y"], cls_token=cls_t, **kw)
        denoising, _ = den.loss(out, x, x_t, inputs["time"], inputs["noise"])
        cls_loss = flow_loss(cls_out, flow_target(inputs["cls"], t, inputs["cls_noise"], den.path_type)).mean()
        proj = projection_loss(inputs["zs"], zs_tilde, self.kernels, device=x.device)
        total = total_loss(denoising, proj, self.proj_coeff) + self.cls_coeff * cls_loss
        return total, {"loss": denoising.mean(), "proj_loss": proj, "cls_loss": cls_loss}


__all__ = ["CLS_COEFF", "REG"]
