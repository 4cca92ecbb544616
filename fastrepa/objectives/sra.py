"""SRA: self-representation alignment (vvvvvjdy/SRA, arXiv 2505.02831), on SiT and on DiT.

No external encoder: the online model (student) aligns its hidden state after block `block_out_s`
(1-based), through the training-only `ap_head` (Linear(D, 2D) - SiLU - Linear(2D, D)), to the hidden state
of the EMA model (teacher: eval mode, no grad, no head) after block `block_out_t`, computed at a less
noisy time with the SAME noise and the student's labels after dropout:
- SiT (flow matching): t_T = clamp(t - t_max * u, 0, 1), u ~ U(0, 1);
- DiT (DDPM, integer t): t_T = clamp(t - r, 1, 999), r ~ randint(0, int(1000 * t_max)).
The teacher runs only up to block_out_t (`hidden_states` stops there; the official code runs every block
and keeps block t's output, the same value). It runs under the step's autocast (bf16 on CUDA; the
official teacher runs in the training precision without autocast): our choice, for speed.

Alignment loss (`align_loss`):
- "cos" (official SiT default): 1 - cosine_similarity(head, teacher) over dim=1, which for [N, T, D]
  tensors is the TOKEN axis (an official quirk, kept as the default: `cos_axis="tokens"`); cos_axis=
  "features" takes the per-token cosine over the feature axis instead. Weight 0.5.
- "sml1": smooth_l1(head, teacher, beta=0.05), weight w(epoch) = c * 0.1 ** ((epoch - e0) / L + 1) for
  epoch > e0, else c * 0.1, with (e0, L) = (149, 1000) at 256 px and (99, 800) otherwise, c = 2 (SiT) or
  0.4 (DiT, whose official code trains with sml1 only).
The loss is denoising.mean() + w * align (alignment math in fp32). Logged terms: "loss" (the denoising
loss), "align_loss" (weighted, as official SRA logs it), then the denoiser's own (DDPM: mse, vb).
"""
import torch
import torch.nn.functional as F

from fastrepa.objectives.base import Objective

ALIGN_LOSSES = ("cos", "sml1")
COS_AXES = ("tokens", "features")
# (family, size) -> (block_out_s, block_out_t): the official recommendations; other models 4, 8 (official
# flag defaults: student ~1/4 of the depth, teacher ~3/4 for XL)
DEFAULT_BLOCKS = {("SiT", "XL"): (8, 20), ("DiT", "XL"): (8, 16)}
SML1_SCALE = {"SiT": 2.0, "DiT": 0.4}


def default_blocks(model_name: str) -> tuple[int, int]:
    family, rest = model_name.split("-", 1)
    return DEFAULT_BLOCKS.get((family, rest.split("/")[0]), (4, 8))


def sml1_weight(epoch: int, resolution: int, scale: float) -> float:
    """The official smooth-L1 weight schedule of SRA's train.py (see the module docstring)."""
    e0, length = (149, 1000) if resolution == 256 else (99, 800)
    return scale * 0.1 ** ((epoch - e0) / length + 1 if epoch > e0 else 1)


def check_sra(block_out_s: int, block_out_t: int, t_max: float, depth: int, align_loss: str = "cos",
              cos_axis: str = "tokens") -> None:
    """ValueError naming the flag unless 1 <= s < t <= depth, 0 < t_max <= 1 and the loss names are known."""
    if not 1 <= block_out_s <= depth:
        raise ValueError(f"--block-out-s={block_out_s}: expected a block in 1..{depth} (the model depth)")
    if not 1 <= block_out_t <= depth:
        raise ValueError(f"--block-out-t={block_out_t}: expected a block in 1..{depth} (the model depth)")
    if block_out_s >= block_out_t:
        raise ValueError(f"--block-out-s={block_out_s} must be below --block-out-t={block_out_t}: the student "
                         f"aligns an earlier block to a deeper block of the teacher")
    if not 0 < t_max <= 1:
        raise ValueError(f"--t-max={t_max}: expected a number in (0, 1]")
    if align_loss not in ALIGN_LOSSES:
        raise ValueError(f"--align-loss={align_loss!r}: expected one of {ALIGN_LOSSES}")
    if cos_axis not in COS_AXES:
        raise ValueError(f"--align-cos-axis={cos_axis!r}: expected one of {COS_AXES}")


class SRA(Objective):
    name = "sra"
    uses_teacher = True

    def __init__(self, model, denoiser, *, block_out_s: int, block_out_t: int, t_max: float = 0.2,
                 align_loss: str = "cos", cos_axis: str = "tokens", family: str = "SiT", resolution: int = 256,
                 **kw):
        super().__init__(model, denoiser, **kw)
        check_sra(block_out_s, block_out_t, t_max, model.depth, align_loss, cos_axis)
        if getattr(model, "ap_head", None) is None:
            raise ValueError("the SRA objective needs a model built with ap_head=True (its alignment head)")
        self.s, self.t, self.t_max = block_out_s, block_out_t, t_max
        self.align, self.cos_axis = align_loss, cos_axis
        self.sml1_scale, self.resolution = SML1_SCALE.get(family, 2.0), resolution
        self.steps = denoiser.num_timesteps  # None: continuous time (flow matching)
        if self.steps is not None and int(self.steps * t_max) < 1:
            raise ValueError(f"--t-max={t_max}: at {self.steps} diffusion steps the teacher's offset range "
                             f"int({self.steps} * t_max) is empty; expected t_max >= {1 / self.steps}")
        self.terms = ("loss", "align_loss", *denoiser.extra_terms)

    def extra_draws(self, g):
        if self.steps is None:
            return {"teacher_u": torch.rand(1, generator=g)[0]}
        return {"teacher_dt": torch.randint(0, int(self.steps * self.t_max), (1,), generator=g)[0]}

    def teacher_time(self, inputs):
        """The teacher's time, never noisier than the student's."""
        time = inputs["time"]
        if self.steps is None:
            return torch.clamp(time - self.t_max * inputs["teacher_u"], 0, 1)
        return torch.clamp(time - inputs["teacher_dt"], 1, self.steps - 1)

    def align_weight(self, epoch: int) -> float:
        return 0.5 if self.align == "cos" else sml1_weight(epoch, self.resolution, self.sml1_scale)

    def alignment(self, head, target):
        """The unweighted alignment loss of the student's head output and the teacher's hidden state."""
        head, target = head.float(), target.float()
        if self.align == "sml1":
            return F.smooth_l1_loss(head, target, beta=0.05)
        return (1 - F.cosine_similarity(head, target, dim=1 if self.cos_axis == "tokens" else -1)).mean()

    def loss(self, model, inputs, ctx):
        if ctx.teacher is None:
            raise ValueError("the SRA objective needs the EMA model as its teacher (ctx.teacher)")
        x, noise, den = inputs["x"], inputs["noise"], self.denoiser
        x_t, t = den.corrupt(x, inputs["time"], noise)
        drop = self.drop_ids(inputs)
        kw = {} if drop is None else {"force_drop_ids": drop}
        out, _, head = model(x_t, t, inputs["y"], head_depth=self.s, **kw)
        with torch.no_grad():
            x_teacher, t_teacher = den.corrupt(x, self.teacher_time(inputs), noise)
            target = ctx.teacher.hidden_states(x_teacher, t_teacher, self.dropped_labels(inputs), [self.t])[0]
        denoising, extra = den.loss(out, x, x_t, inputs["time"], noise)
        align = self.align_weight(ctx.epoch) * self.alignment(head, target)
        return denoising.mean() + align, {"loss": denoising.mean(), "align_loss": align, **extra}

    def train_flops(self, model) -> float:
        """3 x (the student's forward + its head) + the teacher's forward up to block_out_t."""
        return 3 * (model.forward_flops() + model.head_flops()) + model.forward_flops(self.t)


__all__ = ["ALIGN_LOSSES", "COS_AXES", "DEFAULT_BLOCKS", "SRA", "check_sra", "default_blocks", "sml1_weight"]
