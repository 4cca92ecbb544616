"""Train suite: images/s and MFU of one optimizer step of a method (REPA, SRA), timed on the trainer's own
step function (`fastrepa.train.step.TrainStep`, the code `train.py` runs), one process on one device.

A step is what the trainer does per step minus data loading: the method's no-grad preparation (REPA: the
frozen encoder's forward under the step's autocast), the SiT forward/backward of the method's loss (REPA:
denoising + 0.5 x alignment; SRA: the same plus the EMA teacher's forward up to its block), the grad-norm
clip, the host sync, AdamW and the EMA update, plus the next step's per-sample random draws (made before
the sync, as in the trainer). Inputs are random uint8 images and SD-VAE-shaped latent moments already on
the device; weights are random (the SiT's zero-initialised adaLN / final layers redrawn so every path
carries signal; the encoder built with `random_init`, so no weight file is needed). Weights do not change
speed.

Variants (each measured in the same run, same weights and inputs):
- eager:              REPA, no compile, fused attention (sdpa) only, PyTorch reference ops, torch's default
                      (foreach) AdamW, in the run's precision (bf16 autocast on CUDA);
- official:           the official REPA recipe: the same eager path under fp16 autocast with loss scaling
                      (GradScaler), REPA's default `--mixed-precision fp16`, and the unfused (foreach) AdamW
                      upstream builds; the baseline of the "x official" column. The step around it is
                      still fastrepa's (foreach EMA, one host sync), not upstream's per-parameter EMA loop
                      and per-step .item() logging, so the ratios to it are if anything too low;
- eager+fused-adamw:  the same with AdamW(fused=True), fastrepa's replacement for apex's fused Adam;
- compile:            every SiT block and the encoder compiled in place (as `--compile`), fused AdamW;
- compile+triton:     the same with the Triton kernels (`--kernels triton`; CUDA only);
- sra:                SRA (`--method sra`, official SiT blocks 8/20 on SiT-XL/2, cos loss) on the
                      compile+triton path, the EMA teacher's blocks compiled too (CUDA only);
- sra-eager:          SRA on the eager+fused-adamw path (runs everywhere);
- irepa, erw-warmup:  iREPA (conv projector, z-scored target) and ERW's warmup step (blocks 1..4 only), on
                      the compile+triton path; -eager twins on eager+fused-adamw;
- haste:              HASTE while it aligns (REPA + the model's attention scores of blocks 5-8 against the
                      encoder's of blocks 9-12, materialised beside the fused attention), compile+triton;
- haste-after-stop:   HASTE past --align-stop-step: plain SiT, no encoder forward, no projector;
- reg:                REG (the class token: T + 1 tokens in every block, its loss), compile+triton; all three
                      with -eager twins on eager+fused-adamw.
Per row: the median step time over the repeats (first call, which compiles, timed apart), images/s,
TFLOP/s from the method's FLOP count (`objective.train_flops`: REPA 3 x SiT forward + encoder forward per
image; SRA 3 x (SiT forward + ap_head) + the teacher forward up to its block), MFU against the device's
data-sheet bf16 peak (CUDA; none on the CPU) and against this run's matmul probe, peak device memory
(CUDA), the loss of the first step (same weights and inputs: the variants of one method must agree up to
rounding), and for SRA rows "x REPA": img/s over the REPA row of the same path and B (the teacher's cost).
"""
import statistics
import time

import torch

from common import BenchUsageError, fmt, measure_row, num, parse_names, time_calls, timer_description, triton_skip_reason
from sample_suite import _reset, _sync, build

CUDA_MODEL, CPU_MODEL = "SiT-XL/2", "SiT-S/2"
CUDA_ENCODER, CPU_ENCODER = "dinov2-vit-b", "dinov2-vit-s"
CUDA_BATCH_SIZES, CPU_BATCH_SIZES, QUICK_BATCH_SIZES = [32, 64], [2], [2]
RESOLUTION = 256
# --quick: a tiny width on an 8x8 latent (T=16), two blocks, the parameter-free patch encoder
QUICK_OVERRIDES = dict(hidden_size=64, depth=2, num_heads=4, input_size=8, encoder_depth=1, projector_dim=32)
QUICK_ENCODER, QUICK_RESOLUTION = "patch-pixels", 64


class Variant:
    def __init__(self, name, kernels, compiled, fused_adamw, cuda_only=False, mixed_precision=None, method="repa",
                 repa_twin=None):
        self.name, self.kernels, self.compiled = name, kernels, compiled
        self.fused_adamw, self.cuda_only = fused_adamw, cuda_only
        self.mixed_precision = mixed_precision  # None: the run's dtype (bf16 autocast on CUDA by default)
        self.method, self.repa_twin = method, repa_twin  # repa_twin: the REPA variant of the same path

    def describe(self):
        compiled = "per-block compile + " + ("compiled teacher blocks" if self.method == "sra" else "compiled encoder")
        return (f"{self.method}, kernels={self.kernels}, " + (compiled if self.compiled else "eager")
                + f", AdamW({'fused=True' if self.fused_adamw else 'foreach (default)'})"
                + (f", {self.mixed_precision} autocast + GradScaler on CUDA" if self.mixed_precision == "fp16" else ""))

    def precision(self, ctx):
        """The TrainStep's mixed_precision for this variant in this run."""
        return self.mixed_precision or ("bf16" if ctx.dtype == torch.bfloat16 else "no")


VARIANTS = {v.name: v for v in [
    Variant("eager", "torch", compiled=False, fused_adamw=False),
    Variant("official", "torch", compiled=False, fused_adamw=False, mixed_precision="fp16"),
    Variant("eager+fused-adamw", "torch", compiled=False, fused_adamw=True),
    Variant("compile", "torch", compiled=True, fused_adamw=True),
    Variant("compile+triton", "triton", compiled=True, fused_adamw=True, cuda_only=True),
    Variant("sra", "triton", compiled=True, fused_adamw=True, cuda_only=True, method="sra",
            repa_twin="compile+triton"),
    Variant("sra-eager", "torch", compiled=False, fused_adamw=True, method="sra", repa_twin="eager+fused-adamw"),
    # iREPA: REPA with a 3x3 conv projector over the token grid and a token-z-scored target
    Variant("irepa", "triton", compiled=True, fused_adamw=True, cuda_only=True, method="irepa",
            repa_twin="compile+triton"),
    Variant("irepa-eager", "torch", compiled=False, fused_adamw=True, method="irepa", repa_twin="eager+fused-adamw"),
    # ERW's warmup step: blocks 1..l2r-depth and the projector only (the early exit), on the same paths
    Variant("erw-warmup", "triton", compiled=True, fused_adamw=True, cuda_only=True, method="erw-warmup",
            repa_twin="compile+triton"),
    Variant("erw-warmup-eager", "torch", compiled=False, fused_adamw=True, method="erw-warmup",
            repa_twin="eager+fused-adamw"),
    # HASTE while aligning (REPA + the attention scores of 4 blocks against DINOv2's) and after its stop (plain
    # SiT: no encoder forward, no projector), and REG (one more token, the class token's loss)
    Variant("haste", "triton", compiled=True, fused_adamw=True, cuda_only=True, method="haste",
            repa_twin="compile+triton"),
    Variant("haste-eager", "torch", compiled=False, fused_adamw=True, method="haste", repa_twin="eager+fused-adamw"),
    Variant("haste-after-stop", "triton", compiled=True, fused_adamw=True, cuda_only=True, method="haste-after-stop",
            repa_twin="compile+triton"),
    Variant("haste-after-stop-eager", "torch", compiled=False, fused_adamw=True, method="haste-after-stop",
            repa_twin="eager+fused-adamw"),
    Variant("reg", "triton", compiled=True, fused_adamw=True, cuda_only=True, method="reg",
            repa_twin="compile+triton"),
    Variant("reg-eager", "torch", compiled=False, fused_adamw=True, method="reg", repa_twin="eager+fused-adamw"),
]}
ERW_L2R_DEPTH = 4  # ERW's --l2r-depth (the tiny --quick model: 1)


def parse_variants(arg):
    return parse_names(arg, VARIANTS, "train")


def check_args(args):
    from fastrepa.encoders import ALIASES, EMBEDDED, SUPPORTED
    from fastrepa.models import MODEL_NAMES
    model_name, enc = getattr(args, "model", None), getattr(args, "enc_type", None)
    if model_name and model_name not in MODEL_NAMES:
        raise BenchUsageError(f"--model: unknown model {model_name!r}; known: {', '.join(MODEL_NAMES)}")
    if enc and enc not in (*EMBEDDED, *SUPPORTED, *ALIASES):
        raise BenchUsageError(f"--enc-type: unknown encoder {enc!r}; known: {', '.join((*EMBEDDED, *SUPPORTED))} "
                              f"(or REPA's {', '.join(ALIASES)})")
    return parse_variants(getattr(args, "variants", None))


def plan(ctx):
    """(model name, overrides, encoder, resolution, batch sizes, reduced, reason, label)."""
    args, on_cuda = ctx.args, ctx.device.type == "cuda"
    name = getattr(args, "model", None) or (CUDA_MODEL if on_cuda else CPU_MODEL)
    if ctx.quick:
        batches = args.batch_sizes or QUICK_BATCH_SIZES
        enc = getattr(args, "enc_type", None) or QUICK_ENCODER
        label = f"tiny ({name} with D=64, depth 2, 8x8 latent, {enc})"
        return name, dict(QUICK_OVERRIDES), enc, QUICK_RESOLUTION, batches, True, (
            f"--quick: {label}, batch sizes {batches}; a smoke test of the bench, not performance numbers"), label
    enc = getattr(args, "enc_type", None) or (CUDA_ENCODER if on_cuda else CPU_ENCODER)
    batches = args.batch_sizes or (CUDA_BATCH_SIZES if on_cuda else CPU_BATCH_SIZES)
    reasons = []
    if name != CUDA_MODEL:
        reasons.append(f"{name} instead of {CUDA_MODEL}")
    if enc != CUDA_ENCODER:
        reasons.append(f"{enc} instead of {CUDA_ENCODER}")
    if batches != CUDA_BATCH_SIZES:
        reasons.append(f"batch sizes {batches} instead of {CUDA_BATCH_SIZES}")
    if not on_cuda:
        reasons.append("fp32 on the CPU (no autocast); CUDA-only variants skipped")
    return name, {}, enc, RESOLUTION, batches, bool(reasons), ("; ".join(reasons) or None), f"{name} + {enc}"


def repeats_warmup(ctx):
    if ctx.args.repeats:
        return ctx.args.repeats, 1
    if ctx.quick:
        return 2, 1
    return (20, 3) if ctx.device.type == "cuda" else (3, 1)


def skip_reason(ctx, variant):
    if variant.cuda_only and ctx.device.type != "cuda":
        return "needs CUDA: the Triton kernels are timed only on a GPU (the CPU would run the interpreter)"
    return triton_skip_reason() if variant.kernels == "triton" else None


def inputs(B, resolution, in_channels, latent, num_classes, device):
    """Random uint8 images, SD-VAE-like moments (mean, std) and labels, the same for every variant."""
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (B, 3, resolution, resolution), generator=g, dtype=torch.uint8)
    mean = torch.randn(B, in_channels, latent, latent, generator=g) * 5
    std = torch.rand(B, in_channels, latent, latent, generator=g) * 0.1 + 0.01
    labels = torch.randint(0, num_classes, (B,), generator=g)
    return raw.to(device), torch.cat([mean, std], 1).to(device), labels.to(device)


def sra_blocks(name, depth):
    """SRA's (block_out_s, block_out_t): the official ones of the model when they fit its depth, else a
    quarter and three quarters of it (the tiny --quick model: 1, 2)."""
    from fastrepa.objectives.sra import default_blocks
    s, t = default_blocks(name)
    if t <= depth:
        return s, t
    return max(1, depth // 4), max(2, 3 * depth // 4)


def haste_blocks(depth, encoder):
    """HASTE's (model, encoder) attention blocks: the official 5-8 / 9-12 where they fit the model and the
    encoder, else the model's first two blocks against the encoder's first (the tiny --quick model)."""
    from fastrepa.objectives.haste import ATTN_BLOCKS, ATTN_ENCODER_BLOCKS
    enc_depth = getattr(encoder, "depth", None)
    if max(ATTN_BLOCKS) <= depth and (enc_depth is None or max(ATTN_ENCODER_BLOCKS) <= enc_depth):
        return ATTN_BLOCKS, ATTN_ENCODER_BLOCKS
    n = min(2, depth)
    return tuple(range(1, n + 1)), (1,) * n


def make_step(ctx, variant, name, overrides, enc_type, resolution):
    """The model, EMA, optimizer and objective of one variant (REPA: with its encoder), wrapped in the
    trainer's TrainStep."""
    from fastrepa.encoders import load_encoder
    from fastrepa.models import model_kwargs
    from fastrepa.objectives import ERW, HASTE, IREPA, REG, REPA, SRA, FlowMatching
    from fastrepa.train.ema import make_ema
    from fastrepa.train.parallel import compile_blocks
    from fastrepa.train.step import TrainStep

    device = ctx.device
    encoder = None
    if variant.method != "sra":
        probe = model_kwargs(name, **overrides)
        torch.manual_seed(1)  # the encoder's random weights, the same in every variant
        encoder = load_encoder(enc_type, resolution=resolution, grid=probe["input_size"] // probe["patch_size"],
                               random_init=True).to(device)
        options = {"z_dims": [encoder.embed_dim], **({"projector_type": "conv"} if variant.method == "irepa" else {}),
                   **({"cls_token_dim": encoder.embed_dim} if variant.method == "reg" else {})}
    else:
        options = {"z_dims": [], "ap_head": True}
    model, kw = build(name, {**overrides, **options}, variant.kernels, device)
    model.train()
    ema = make_ema(model)
    if variant.method == "repa":
        objective = REPA(model, FlowMatching(), [encoder], encoder_names=[enc_type], resolution=resolution)
    elif variant.method == "irepa":
        objective = IREPA(model, FlowMatching(), [encoder], proj_coeff=1.0, encoder_names=[enc_type],
                          resolution=resolution)
    elif variant.method == "erw-warmup":  # every timed step inside the warmup
        objective = ERW(model, FlowMatching(), [encoder], warmup_steps=10**9, lambda_c0=1.0,
                        l2r_depth=min(ERW_L2R_DEPTH, max(1, kw["depth"] - 1)), encoder_names=[enc_type],
                        resolution=resolution)
    elif variant.method in ("haste", "haste-after-stop"):  # after the stop: every timed step past it
        blocks, enc_blocks = haste_blocks(kw["depth"], encoder)
        objective = HASTE(model, FlowMatching(), [encoder], stop_step=0 if variant.method == "haste-after-stop"
                          else 10**9, attn_blocks=blocks, encoder_blocks=enc_blocks, encoder_names=[enc_type],
                          resolution=resolution)
    elif variant.method == "reg":
        objective = REG(model, FlowMatching(), [encoder], encoder_names=[enc_type], resolution=resolution)
    else:
        s, t = sra_blocks(name, kw["depth"])
        objective = SRA(model, FlowMatching(), block_out_s=s, block_out_t=t, resolution=resolution)
    if variant.compiled:  # as train.py --compile: the blocks, the encoder, and a teacher's blocks
        compile_blocks(model)
        if encoder is not None:
            encoder.compile()
        if objective.uses_teacher:
            compile_blocks(ema)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0,
                            **({"fused": True} if variant.fused_adamw else {"foreach": True}))
    step = TrainStep(model, ema, opt, objective, device=device, mixed_precision=variant.precision(ctx))
    return step, model, kw, encoder, objective


def stepper(step_fn, objective, batch, B):
    """(one_step, state): one_step() runs one optimizer step of `step_fn` on `batch` with step s's per-sample
    draws (the next step's drawn before the sync, as the trainer does); state holds the step count and the
    first step's loss."""
    from fastrepa.objectives import StepContext
    from fastrepa.rng import draw_step
    draw = lambda s: step_fn.to_device(draw_step(0, s, 0, B, objective.draw))  # noqa: E731
    state = {"step": 0, "draws": draw(0), "loss": None}

    def one_step():
        s = state["step"]

        def draw_next():
            state["next"] = draw(s + 1)
        res = step_fn(batch, state["draws"], lr=1e-4, ctx=StepContext(step=s), before_sync=draw_next)
        if not res.finite:
            raise RuntimeError(f"step {s}: the loss is not finite ({float(res.total)})")
        if state["loss"] is None:
            state["loss"] = float(res.total)
        state["step"], state["draws"] = s + 1, state.pop("next")

    return one_step, state


def run_variant(ctx, variant, name, overrides, enc_type, resolution, B, repeats, warmup):
    from fastrepa.train.flops import peak_tflops

    device = ctx.device
    step_fn, model, kw, encoder, objective = make_step(ctx, variant, name, overrides, enc_type, resolution)
    latent = kw["input_size"]
    raw, moments, labels = inputs(B, resolution, kw["in_channels"], latent, kw["num_classes"], device)
    batch = {"image": raw, "moments": moments, "label": labels}
    one_step, state = stepper(step_fn, objective, batch, B)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    one_step()  # the first call: compiles (compiled variants) and allocates the optimizer state
    _sync(device)
    first_s = time.perf_counter() - t0
    times = time_calls(one_step, device, repeats, warmup)
    med = statistics.median(times)
    flops = (objective.warmup_flops(model) if variant.method == "erw-warmup" else
             objective.plain_flops(model) if variant.method == "haste-after-stop" else objective.train_flops(model))
    peak = peak_tflops(device)
    tflops = B * flops / (med * 1e-3) / 1e12
    row = {"status": "ok", "method": variant.method, "step_ms": med, "step_ms_min": min(times),
           "step_ms_max": max(times), "first_call_s": round(first_s, 3), "images_per_s": B / (med * 1e-3),
           "flops_per_image": flops, "TFLOP_per_s": tflops, "peak_tflops": peak,
           "mfu": tflops / peak if peak else None, "first_loss": state["loss"], "steps_run": state["step"],
           "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
           "tokens": (latent // kw["patch_size"]) ** 2, "hidden_size": kw["hidden_size"], "depth": kw["depth"],
           "encoder_tokens": encoder.num_tokens if encoder is not None else None,
           "encoder_dim": encoder.embed_dim if encoder is not None else None,
           "sra_blocks": [objective.s, objective.t] if variant.method == "sra" else None,
           "l2r_depth": objective.l2r_depth if variant.method == "erw-warmup" else None}
    del step_fn, model, encoder, objective
    return row


def add_metrics(rows, matmul_tflops):
    ok = {(r["variant"], r["B"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        r["pct_of_matmul_probe"] = 100 * r["TFLOP_per_s"] / matmul_tflops if matmul_tflops else None
        e, o = ok.get(("eager", r["B"])), ok.get(("official", r["B"]))
        twin = ok.get((VARIANTS[r["variant"]].repa_twin, r["B"]))
        r["speedup_vs_eager"] = r["images_per_s"] / e["images_per_s"] if e and r["variant"] != "eager" else None
        r["speedup_vs_official"] = (r["images_per_s"] / o["images_per_s"]
                                    if o and r["variant"] != "official" else None)
        r["speedup_vs_repa"] = r["images_per_s"] / twin["images_per_s"] if twin else None
        # the first loss is comparable within one method (the same weights, inputs and draws)
        method = r.get("method", "repa")
        ref = e if method == "repa" else ok.get((f"{method}-eager", r["B"]))
        r["loss_rel_diff_vs_eager"] = (abs(r["first_loss"] - ref["first_loss"]) / abs(ref["first_loss"])
                                       if ref else None)
    return rows


HEADERS = ["model", "B", "variant", "ms/step", "img/s", "TFLOP/s", "MFU % (peak)", "% matmul probe", "x eager",
           "x official", "x REPA", "peak GiB", "first loss", "note"]


def table_rows(rows):
    out = []
    for r in rows:
        if r["status"] == "ok":
            note = f"first call {r['first_call_s']:.1f} s"
        else:
            reason = r["reason"] or ""
            note = f"{r['status']}: " + (reason.split(":")[0] if r["status"] == "skipped" else reason[:80])
        mfu = r.get("mfu")
        out.append([r["model"], r["B"], r["variant"], fmt(r.get("step_ms"), ".4g"), num(r.get("images_per_s")),
                    num(r.get("TFLOP_per_s")), num(None if mfu is None else 100 * mfu),
                    num(r.get("pct_of_matmul_probe")), fmt(r.get("speedup_vs_eager"), ".2f"),
                    fmt(r.get("speedup_vs_official"), ".2f"), fmt(r.get("speedup_vs_repa"), ".2f"),
                    fmt(r.get("peak_mem_gib"), ".1f"), fmt(r.get("first_loss"), ".5g"), note])
    return out


def run(args, ctx):
    names = check_args(args)
    name, overrides, enc, resolution, batches, reduced, reduced_reason, label = plan(ctx)
    repeats, warmup = repeats_warmup(ctx)
    matmul = ctx.matmul()
    rows = []
    for vname in names:
        variant = VARIANTS[vname]
        reason = skip_reason(ctx, variant)
        for B in batches:
            row = {"model": label, "model_name": name, "encoder": enc if variant.method != "sra" else None,
                   "method": variant.method, "resolution": resolution, "B": B,
                   "variant": vname, "impl": variant.describe(), "kernels": variant.kernels,
                   "compile": variant.compiled, "fused_adamw": variant.fused_adamw, "dtype": ctx.dtype_name,
                   "autocast": variant.precision(ctx) if ctx.device.type == "cuda" else None,
                   "repeats": repeats, "warmup": warmup, "status": None, "reason": None}
            measure_row(rows, row, reason,
                        lambda variant=variant, B=B: run_variant(ctx, variant, name, overrides, enc, resolution, B,
                                                                 repeats, warmup),
                        f"[train] {label} B={B} {vname}",
                        lambda r: f"{r['step_ms']:.4g} ms/step, {r['images_per_s']:.3g} img/s",
                        cleanup=lambda variant=variant: _reset(variant, ctx.device))
    add_metrics(rows, matmul.get("TFLOP_per_s"))
    notes = ["One process on one device; data loading is not in the step (inputs sit on the device). Multi-GPU "
             "FSDP2 adds the all-gathers and reduce-scatters that overlap with compute."]
    if ctx.device.type != "cuda":
        notes.append("CPU: fp32, no autocast, no data-sheet peak (MFU % (peak) is empty); the compile+triton "
                     "variant is not timed (needs CUDA); official runs as eager (fp16 autocast and loss scaling "
                     "are CUDA-only).")
    notes.append("first loss: the loss of the first step, same weights and inputs in every variant of a method; "
                 "differences are rounding (compile fuses and reorders float ops). SRA rows have no encoder: "
                 "the EMA teacher's forward up to block_out_t replaces it.")
    return {
        "reduced": reduced, "reduced_reason": reduced_reason, "batch_sizes": batches, "model": label,
        "model_name": name, "encoder": enc, "resolution": resolution, "model_overrides": overrides,
        "variants": names, "repeats": repeats, "warmup": warmup,
        "timer": timer_description(ctx.device, repeats, warmup) + "; one optimizer step per call",
        "notes": notes, "rows": rows, "table": {"headers": HEADERS, "rows": table_rows(rows)},
        "appendix": {
            "variants": [f"- {v.name}: {v.describe()}" + (" (CUDA only)" if v.cuda_only else "")
                         for v in VARIANTS.values() if v.name in names],
            "columns": ["- ms/step: median wall time of one optimizer step (encoder, forward, backward, clip, "
                        "sync, AdamW, EMA, next step's draws); first call timed apart.",
                        "- TFLOP/s: B x FLOPs per trained image (REPA: 3 x SiT forward + encoder forward; SRA: "
                        "3 x (SiT forward + ap_head) + teacher forward to its block; matmuls only) "
                        "/ step time; MFU % (peak): that / the device's data-sheet dense bf16 peak; % matmul "
                        "probe: that / this run's matmul probe.",
                        "- x eager, x official: img/s over the eager / official (REPA) row of the same B; x REPA "
                        "(SRA, iREPA and ERW rows): img/s over the REPA row of the same path (sra, irepa, "
                        "erw-warmup: compile+triton; the -eager ones: eager+fused-adamw) and B. erw-warmup: "
                        "ERW's warmup step (clean latents at t = 0, blocks 1..4, the projector, the alignment "
                        "loss; the later blocks never run), FLOPs counted for those blocks."]},
    }
