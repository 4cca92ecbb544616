"""HASTE (NUS-HPC-AI-Lab/HASTE): REPA plus alignment of the model's attention maps to the encoder's, both
switched off at a fixed step, after which training is plain SiT.

- attention alignment: for each pair (model block m_i, encoder block e_i) of `--attn-blocks` /
  `--attn-encoder-blocks` (1-based; official HASTE hard-codes SiT blocks 5-8 against DINOv2-B blocks 9-12),
  the cross-entropy -sum_k p_k log q_k of every query row, where p is the softmax over the patch keys of the
  encoder's scores (q * hd^-0.5) k^T with the class token's row and column dropped first, and q the softmax
  of the model's scores of its first H heads (H: the encoder's heads, 12 for DINOv2-B against SiT-XL's 16);
  averaged over the rows (samples, heads, queries) and then over the pairs. Only the first encoder's maps
  are aligned (official: `zs[0]`). We take log_softmax where official takes log(softmax): the same value,
  without the underflow.
- the projection loss is REPA's (`--encoder-depth`, every encoder);
- loss = denoising + `--proj-coeff` (0.5) x projection + `--attn-coeff` (0.5) x attention, until step
  `--align-stop-step` (official `--early-stop-point`, 250000); from that step on, the denoising loss alone
  and, unlike official HASTE (which still runs the encoder and discards its output), the encoder does not
  run and the model runs without its projectors or attention scores.
"""
import torch

from fastrepa.objectives.base import Objective
from fastrepa.objectives.repa import REPA, projection_loss

ATTN_BLOCKS = (5, 6, 7, 8)  # official HASTE: SiT blocks 5..8 (its range(4, 8), 0-based)
ATTN_ENCODER_BLOCKS = (9, 10, 11, 12)  # against DINOv2-B blocks 9..12 (its i + 4)
STOP_STEP = 250000


def parse_blocks(flag: str, value) -> tuple[int, ...]:
    """'5,6,7,8' or '5-8' (or a sequence of ints) -> (5, 6, 7, 8); ValueError naming the flag."""
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    out = []
    try:
        for part in str(value).split(","):
            part = part.strip()
            if "-" in part:
                a, b = (int(p) for p in part.split("-"))
                out.extend(range(a, b + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise ValueError(f"{flag}={value!r}: expected 1-based block numbers such as 5,6,7,8 or 5-8") from None
    if not out or min(out) < 1:
        raise ValueError(f"{flag}={value!r}: expected 1-based block numbers such as 5,6,7,8 or 5-8")
    return tuple(out)


def check_haste(attn_blocks, encoder_blocks, depth: int, stop_step: int) -> None:
    if len(attn_blocks) != len(encoder_blocks):
        raise ValueError(f"--attn-blocks {list(attn_blocks)} and --attn-encoder-blocks {list(encoder_blocks)} must "
                         "pair up one to one (the same number of blocks)")
    if max(attn_blocks) > depth:
        raise ValueError(f"--attn-blocks {list(attn_blocks)} reach past the model's {depth} blocks")
    if stop_step < 0:
        raise ValueError(f"--align-stop-step={stop_step}: expected a step >= 0")


def attention_alignment(encoder_scores, model_scores):
    """The mean over block pairs of the mean over rows of -sum_k softmax(e)_k log_softmax(m)_k, in fp32."""
    if len(encoder_scores) != len(model_scores) or not encoder_scores:
        raise ValueError(f"{len(encoder_scores)} encoder attention maps for {len(model_scores)} model maps")
    per_pair = []
    for e, m in zip(encoder_scores, model_scores):
        if e.shape != m.shape:
            raise ValueError(f"encoder attention scores {tuple(e.shape)} and the model's {tuple(m.shape)} differ "
                             "([batch, heads, tokens, tokens] must match: token grid and heads)")
        p = e.float().softmax(dim=-1)
        per_pair.append(-(p * m.float().log_softmax(dim=-1)).sum(dim=-1).mean())
    return torch.stack(per_pair).mean()


class HASTE(REPA):
    name = "haste"

    def __init__(self, model, denoiser, encoders=(), *, attn_coeff: float = 0.5, stop_step: int = STOP_STEP,
                 attn_blocks=ATTN_BLOCKS, encoder_blocks=ATTN_ENCODER_BLOCKS, **kw):
        super().__init__(model, denoiser, encoders, **kw)
        self.attn_coeff, self.stop_step = attn_coeff, int(stop_step)
        self.attn_blocks, self.encoder_blocks = tuple(attn_blocks), tuple(encoder_blocks)
        check_haste(self.attn_blocks, self.encoder_blocks, model.depth, self.stop_step)
        if not self.encoders:
            raise ValueError("--method haste needs an encoder (--enc-type) whose attention maps it aligns to")
        enc = self.encoders[0]
        name = getattr(enc, "enc_type", type(enc).__name__)
        self.heads = getattr(enc, "num_heads", None)
        if self.heads is None:
            raise ValueError(f"--method haste: encoder {name} gives no attention maps; use a ViT encoder "
                             "(dinov2-vit-b, as official HASTE)")
        if self.heads > model.num_heads:
            raise ValueError(f"--method haste: encoder {name} has {self.heads} heads but the model {model.num_heads}; "
                             "the model's first heads are aligned to the encoder's, so it needs at least as many")
        enc_depth = getattr(enc, "depth", None)
        if enc_depth is not None and max(self.encoder_blocks) > enc_depth:
            raise ValueError(f"--attn-encoder-blocks {list(self.encoder_blocks)} reach past encoder {name}'s "
                             f"{enc_depth} blocks")
        self.terms = ("loss", "proj_loss", "attn_loss", *denoiser.extra_terms)

    def aligning(self, step: int) -> bool:
        return step < self.stop_step

    def prepare(self, batch, draws, ctx):
        inputs = Objective.prepare(self, batch, draws, ctx)
        if not self.aligning(ctx.step):  # plain SiT from the stop on: no encoder at all
            return inputs
        with torch.no_grad(), ctx.autocast():
            first = self.encoders[0].features(batch["image"], self.encoder_blocks)
            inputs["zs"] = [first["patch"]] + [enc(batch["image"]) for enc in self.encoders[1:]]
            inputs["attn"] = first["attn"]
        return inputs

    def loss(self, model, inputs, ctx):
        x, den = inputs["x"], self.denoiser
        x_t, t = den.corrupt(x, inputs["time"], inputs["noise"])
        drop = self.drop_ids(inputs)
        kw = {} if drop is None else {"force_drop_ids": drop}
        zero = torch.zeros((), dtype=torch.float32, device=x.device)
        if not self.aligning(ctx.step):
            out = model(x_t, t, inputs["y"], return_zs=False, **kw)
            denoising, extra = den.loss(out, x, x_t, inputs["time"], inputs["noise"])
            return denoising.mean(), {"loss": denoising.mean(), "proj_loss": zero, "attn_loss": zero, **extra}
        out, zs_tilde, scores = model(x_t, t, inputs["y"], attn_depths=self.attn_blocks, attn_heads=self.heads, **kw)
        denoising, extra = den.loss(out, x, x_t, inputs["time"], inputs["noise"])
        proj = projection_loss(inputs["zs"], zs_tilde, self.kernels, device=x.device)
        attn = attention_alignment(inputs["attn"], scores)
        total = denoising.mean() + self.proj_coeff * proj + self.attn_coeff * attn
        return total, {"loss": denoising.mean(), "proj_loss": proj, "attn_loss": attn, **extra}

    def train_flops(self, model) -> float:
        """FLOPs of one trained sample while aligning: REPA's, plus the model's explicit attention scores of
        the aligned blocks (forward and backward) and the encoder's (forward)."""
        t = model.token_grid[0] * model.token_grid[1]
        head_dim = model.hidden_size // model.num_heads
        enc_dim = getattr(self.encoders[0], "embed_dim", 0)  # its heads x head_dim
        scores = len(self.attn_blocks) * 2 * t * t * (3 * self.heads * head_dim + enc_dim)
        return super().train_flops(model) + scores

    def plain_flops(self, model) -> float:
        """FLOPs of one trained sample after the stop: the model without its projectors, no encoder."""
        t = model.token_grid[0] * model.token_grid[1]
        return 3 * (model.forward_flops() - 2 * t * sum(p.macs_per_token() for p in model.projectors))


__all__ = ["ATTN_BLOCKS", "ATTN_ENCODER_BLOCKS", "HASTE", "STOP_STEP", "attention_alignment", "check_haste",
           "parse_blocks"]
