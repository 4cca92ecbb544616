"""ERW (embedded representation warmup, LINs-lab/ERW): a warmup phase that trains the first blocks to the
encoder's representation, then REPA with a decaying alignment weight, in one run.

- Phase 1, steps 0..W-1 (`--warmup-steps W`): the embedders, blocks 1..l2r-depth and the projectors see
  the clean latents x at t = 0 and train on the alignment loss alone, 0.5 x mean over tokens of
  -cos(z, projector(h_l2r)) (`model.project_at`: blocks past l2r-depth and the final layer never run, so
  every other parameter gets no gradient and stays bit-identical; AdamW skips it).
- Transition at step W (`restart_steps`): the trainer starts a fresh optimizer and sets the EMA from the
  model, whose embedders, first blocks and projectors now hold the warmed-up weights; the projector
  trained after block l2r-depth is the one REPA uses after block --encoder-depth.
- Phase 2, steps W..: REPA (the backbone's denoising loss + lambda(s) x the projection loss) with
  lambda(s) = c0 * 2 ** (-(s - W) / half_life), c0 = 6 (XL), 3 (L), 1 otherwise, half_life 50000.

The released ERW code does not run (it imports modules its repository lacks), so this is the behaviour
its paper and code describe; where a choice was ours it says so in the README. The draws are REPA's
(the time and noise of phase 1 are drawn and unused, so the draw order is the same in both phases).
Terms: "loss" (the denoising loss; in phase 1, where there is none, the warmup loss 0.5 x proj_loss),
"proj_loss" (unweighted), "proj_coeff" (the alignment weight of the step: 0.5, then lambda(s)).
"""
from __future__ import annotations

import torch

from fastrepa.objectives.repa import REPA, projection_loss

WARMUP_COEFF = 0.5  # ERW's weight of the alignment loss during the warmup
HALF_LIFE = 50000


def default_lambda_c0(model_name: str) -> float:
    """ERW's lambda(W): 6 for XL models, 3 for L, 1 otherwise."""
    size = model_name.split("-", 1)[1].split("/")[0] if "-" in model_name else ""
    return {"XL": 6.0, "L": 3.0}.get(size, 1.0)


def erw_lambda(step: int, warmup_steps: int, c0: float, half_life: float = HALF_LIFE) -> float:
    """The phase-2 alignment weight at `step` (>= warmup_steps)."""
    return c0 * 2.0 ** (-(step - warmup_steps) / half_life)


def check_erw(l2r_depth: int, encoder_depth: int, depth: int, warmup_steps: int, max_train_steps: int) -> None:
    """Bad ERW settings, named by flag, before any heavy work."""
    if not 1 <= l2r_depth <= depth:
        raise ValueError(f"--l2r-depth={l2r_depth}: expected a block in 1..{depth} (the model depth)")
    if l2r_depth >= encoder_depth:
        raise ValueError(f"--l2r-depth={l2r_depth} must be below --encoder-depth={encoder_depth} (ERW warms up the "
                         f"blocks before the aligned one)")
    if not 1 <= warmup_steps < max_train_steps:
        raise ValueError(f"--warmup-steps={warmup_steps}: expected 1 <= W < --max-train-steps={max_train_steps} "
                         f"(the warmup steps count towards --max-train-steps, as in ERW)")


class ERW(REPA):
    name = "erw"

    def __init__(self, model, denoiser, encoders=(), *, warmup_steps: int, l2r_depth: int, lambda_c0: float,
                 half_life: float = HALF_LIFE, **kw):
        if model.prediction != "velocity":
            raise ValueError(f"--method erw trains SiT models (flow matching); this model predicts "
                             f"{model.prediction!r}")
        super().__init__(model, denoiser, encoders, proj_coeff=lambda_c0, **kw)
        self.warmup_steps, self.l2r_depth, self.lambda_c0, self.half_life = warmup_steps, l2r_depth, lambda_c0, half_life
        self.terms = ("loss", "proj_loss", "proj_coeff")
        self.restart_steps = (warmup_steps,)
        self.phase = "warmup"

    def phase_of(self, step: int) -> str:
        return "warmup" if step < self.warmup_steps else "main"

    def coeff(self, step: int) -> float:
        if step < self.warmup_steps:
            return WARMUP_COEFF
        return erw_lambda(step, self.warmup_steps, self.lambda_c0, self.half_life)

    def loss(self, model, inputs, ctx):
        self.phase = self.phase_of(ctx.step)
        coeff = self.coeff(ctx.step)
        x = inputs["x"]
        if self.phase == "main":  # REPA's loss with this step's weight
            total, terms = super().loss(model, inputs, ctx)
        else:  # the warmup: clean latents at t = 0, blocks 1..l2r-depth, the alignment loss alone
            drop = self.drop_ids(inputs)
            t = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
            zs_tilde = model.project_at(x, t, inputs["y"], self.l2r_depth,
                                        **({} if drop is None else {"force_drop_ids": drop}))
            proj = projection_loss(inputs["zs"], zs_tilde, self.kernels, device=x.device)
            total = coeff * proj
            terms = {"loss": total, "proj_loss": proj}
        return total, {**terms, "proj_coeff": torch.full((), coeff, device=x.device, dtype=torch.float32)}

    # ------------------------------------------------------------------ state and cost

    def state_dict(self) -> dict:
        """The phase of the last step computed, and the settings a resume must match."""
        return {"phase": self.phase, "warmup_steps": self.warmup_steps, "l2r_depth": self.l2r_depth}

    def load_state_dict(self, state: dict) -> None:
        for key, flag in (("warmup_steps", "--warmup-steps"), ("l2r_depth", "--l2r-depth")):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"{flag}={getattr(self, key)} but the checkpoint was trained with {flag} "
                                 f"{state[key]}")
        self.phase = state.get("phase", self.phase)

    def warmup_flops(self, model) -> float:
        """FLOPs of one trained sample in the warmup (train_flops, REPA's, is the phase-2 figure)."""
        from fastrepa.train.flops import encoder_flops
        proj = 2 * model.token_grid[0] * model.token_grid[1] * sum(p.macs_per_token() for p in model.projectors)
        return (3 * (model.forward_flops(self.l2r_depth) + proj)
                + encoder_flops(self.encoder_names, self.resolution, model.token_grid[0]))


__all__ = ["ERW", "HALF_LIFE", "WARMUP_COEFF", "check_erw", "default_lambda_c0", "erw_lambda"]
