"""PDE suite (`--suite pde`): FourierFlow's training step and its salient attention, so the feature cache and
any fusion of the two softmaxes are decided by measurement.

Step rows: one optimizer step of `--method fourierflow` on the trainer's own TrainStep (the code train.py
runs), one process: PDE-DiT-XL/8 on 4 + 4 frames of 128^2 x 4 variables aligned to FourierFlow's ViViT
(768 wide, 12 + 12 layers; random weights) on CUDA in bf16 autocast; reduced sizes on the CPU and with
--quick. Variants:
- encoder:           the frozen ViViT runs in the step's no-grad preparation (upstream's path), eager;
- cached:            its tokens come with the batch (`--feature-cache`), the encoder is not run, eager;
- encoder-compile, cached-compile: the same with every PDE-DiT unit and the encoder compiled (CUDA only).
Per row: median step ms, windows/s, TFLOP/s from the objective's FLOP count, MFU against the data-sheet
peak (CUDA), peak memory, the first step's loss (the same weights, inputs and draws in every variant), and
for cached rows "x encoder": windows/s over the encoder row of the same path and B.

Attention rows: forward + backward of the salient core, softmax(s Q1 K1^T) V - lambda softmax(s Q2 K~2^T) V,
at the model's heads, head width and tokens (B x 4 frames sequences, as its spatial blocks): salient-sdpa
is two fastrepa.attention sdpa calls (what SalientAttention runs), salient-math the two score matrices
materialised and combined before one product with V (what a fused pass would compute), plain-sdpa one
sdpa call (the floor such a pass approaches if it shares the loads of V); each with its largest deviation
from a float64 evaluation.
"""
import statistics
import time

import torch

from common import fmt, free_memory, measure_row, num, parse_names, time_calls, timer_description
from sample_suite import _sync
from train_suite import stepper

# (model, its overrides, ViViT sizes, batch sizes) per run kind
CUDA_PLAN = ("PDE-DiT-XL/8", {}, dict(dim=768, depth=12, heads=12), [8, 16])
CPU_PLAN = ("PDE-DiT-S/8", dict(input_size=64), dict(dim=192, depth=2, heads=3), [2])
QUICK_PLAN = ("PDE-DiT-S/4", dict(input_size=16, hidden_size=32, num_heads=2, depth=2, tem_depth=1, afno_depth=1,
                                  encoder_depth=1, projector_dim=32), dict(dim=32, depth=1, heads=2), [2])
STEP_VARIANTS = {"encoder": (False, False), "cached": (True, False), "encoder-compile": (False, True),
                 "cached-compile": (True, True)}  # name -> (cached, compiled)
ATTN_VARIANTS = ("salient-sdpa", "salient-math", "plain-sdpa")
HEADERS = ["model", "B", "variant", "ms", "windows/s", "TFLOP/s", "MFU % (peak)", "x encoder", "peak GiB",
           "first loss", "note"]


def plan(ctx):
    name, overrides, vivit, batches = QUICK_PLAN if ctx.quick else CUDA_PLAN if ctx.device.type == "cuda" else CPU_PLAN
    batches = ctx.args.batch_sizes or batches
    reduced = ctx.quick or ctx.device.type != "cuda" or batches != CUDA_PLAN[3]
    return name, overrides, vivit, batches, reduced


def make_step(ctx, name, overrides, vivit, cached, compiled):
    from fastrepa.data.pde_features import CachedEncoder
    from fastrepa.encoders.vivit import ViViTEncoder
    from fastrepa.models import build_model, model_kwargs
    from fastrepa.objectives import FlowMatching
    from fastrepa.objectives.fourierflow import FourierFlowObjective
    from fastrepa.train.ema import make_ema
    from fastrepa.train.parallel import compile_blocks
    from fastrepa.train.step import TrainStep
    device = ctx.device
    kw = model_kwargs(name, **overrides, z_dims=[])
    grid = kw["input_size"] // kw["patch_size"]
    with torch.device(device):  # initialised where they run (FourierFlow's ViViT has 709M parameters)
        torch.manual_seed(1)  # the same encoder and model weights in every variant
        encoder = ViViTEncoder(patch=kw["patch_size"], channels=kw["in_channels"], frames=kw["num_frames"],
                               num_patches=grid * grid, **vivit).eval()
        torch.manual_seed(2)
        model = build_model(name, **overrides, z_dims=[encoder.embed_dim]).train()
    stand_in = CachedEncoder({"enc_type": encoder.enc_type, "frames": encoder.frames, "channels": encoder.channels,
                              "num_tokens": encoder.num_tokens, "embed_dim": encoder.embed_dim}, "the batch")
    objective = FourierFlowObjective(model, FlowMatching(), [stand_in if cached else encoder])
    if compiled:
        compile_blocks(model)
        if not cached:
            encoder.compile()
    ema = make_ema(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0,
                            **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    precision = "bf16" if ctx.dtype == torch.bfloat16 and device.type == "cuda" else "no"
    return TrainStep(model, ema, opt, objective, device=device, mixed_precision=precision), model, encoder, objective


def run_step(ctx, name, overrides, vivit, B, cached, compiled):
    from fastrepa.train.flops import peak_tflops
    device = ctx.device
    step_fn, model, encoder, objective = make_step(ctx, name, overrides, vivit, cached, compiled)
    g = torch.Generator().manual_seed(0)
    shape = tuple(model.latent_shape)
    batch = {"cond": torch.randn(B, *shape, generator=g).to(device),
             "target": torch.randn(B, *shape, generator=g).to(device)}
    if cached:  # what the prepare step stores: the encoder under the step's autocast
        with torch.no_grad(), step_fn.autocast():
            batch["features"] = encoder(batch["target"])
    del encoder
    one_step, state = stepper(step_fn, objective, batch, B)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    one_step()  # compiles (compiled variants) and allocates the optimizer state
    _sync(device)
    first_s = time.perf_counter() - t0
    repeats, warmup = (ctx.args.repeats or (2 if ctx.quick else 10 if device.type == "cuda" else 3)), 1
    times = time_calls(one_step, device, repeats, warmup)
    med = statistics.median(times)
    flops = objective.train_flops(model)
    peak = peak_tflops(device)
    tflops = B * flops / (med * 1e-3) / 1e12
    return {"ms": med, "ms_min": min(times), "ms_max": max(times), "first_call_s": round(first_s, 3),
            "windows_per_s": B / (med * 1e-3), "flops_per_window": flops, "TFLOP_per_s": tflops,
            "mfu": tflops / peak if peak else None, "first_loss": state["loss"], "repeats": repeats,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def salient_math(q1, k1, q2, k2, v, lam):
    """The salient product with its two score matrices materialised and combined before one product with V:
    (softmax(s Q1 K1^T) - lam softmax(s Q2 K2^T)) V, s = hd^-0.5: what one fused pass would compute."""
    N, H, T, hd = q1.shape
    s = hd ** -0.5
    a = torch.softmax((q1 @ k1.transpose(-1, -2)) * s, -1) - lam * torch.softmax((q2 @ k2.transpose(-1, -2)) * s, -1)
    return (a @ v).transpose(1, 2).reshape(N, T, H * hd)  # fastrepa.attention's [N, T, H hd]


def run_attention(ctx, name, overrides, B, variant):
    """fwd + bwd of the salient core on q1, k1, q2, k2, v [B x frames, H, T, hd] (the model's spatial
    blocks): two fastrepa.attention sdpa calls (what SalientAttention runs), the materialised combination,
    or one sdpa call (the floor for a fused pass that shares the loads of V)."""
    from fastrepa.attention import attention
    from fastrepa.models import model_kwargs
    device, dtype = ctx.device, ctx.dtype
    kw = model_kwargs(name, **overrides, z_dims=[])
    H, hd = kw["num_heads"], kw.get("head_dim") or kw["hidden_size"]
    T, N = (kw["input_size"] // kw["patch_size"]) ** 2, B * kw["num_frames"]
    g = torch.Generator().manual_seed(3)
    q1, k1, q2, k2, v = (torch.randn(N, H, T, hd, generator=g).to(device=device, dtype=dtype).requires_grad_()
                         for _ in range(5))
    lam = 0.8
    fns = {"salient-sdpa": lambda: attention(q1, k1, v, "sdpa") - lam * attention(q2, k2, v, "sdpa"),
           "salient-math": lambda: salient_math(q1, k1, q2, k2, v, lam),
           "plain-sdpa": lambda: attention(q1, k1, v, "sdpa")}
    fn = fns[variant]
    leaves = [q1, k1, q2, k2, v]
    dout = torch.randn(N, T, H * hd, generator=g).to(device=device, dtype=dtype)
    with torch.no_grad():
        out = fn().float()
        ref = (salient_math(*(t.double() for t in (q1, k1, q2, k2, v)), lam) if variant != "plain-sdpa" else
               salient_math(q1.double(), k1.double(), q2.double(), k2.double(), v.double(), 0.0))
    times = time_calls(lambda: torch.autograd.backward(fn(), dout), device, ctx.repeats, ctx.warmup, leaves)
    med = statistics.median(times)
    flops = 3.5 * 4 * N * H * T * T * hd * (1 if variant == "plain-sdpa" else 2)
    return {"ms": med, "TFLOP_per_s": flops / (med * 1e-3) / 1e12, "attn_flops": flops, "heads": H, "tokens": T,
            "head_dim": hd, "sequences": N, "max_abs_err": float((out.double() - ref).abs().max())}


def parse_variants(arg):
    return parse_names(arg, [*STEP_VARIANTS, *ATTN_VARIANTS], "pde")


def note(r):
    if r["status"] != "ok":
        return f"{r['status']}: {(r['reason'] or '')[:60]}"
    if r["kind"] == "attention":
        return (f"max |err| {r['max_abs_err']:.2g}" + (f"; {r['ms_vs_salient_sdpa']:.2f} x salient-sdpa time"
                                                       if r.get("ms_vs_salient_sdpa") else ""))
    return f"first call {r['first_call_s']:.1f} s"


def _cleanup(compiled, device):
    if compiled:
        torch._dynamo.reset()
    free_memory(device)


def run(args, ctx):
    name, overrides, vivit, batches, reduced = plan(ctx)
    names = parse_variants(getattr(args, "variants", None) if getattr(args, "suite", None) == "pde" else None)
    rows = []
    for vname, (cached, compiled) in STEP_VARIANTS.items():
        if vname not in names:
            continue
        reason = "needs CUDA: compile is timed on a GPU only" if compiled and ctx.device.type != "cuda" else None
        for B in batches:
            row = {"kind": "step", "model": name, "B": B, "variant": vname, "cached": cached, "compile": compiled,
                   "dtype": ctx.dtype_name, "status": None, "reason": None}
            measure_row(rows, row, reason, lambda B=B, c=cached, k=compiled: run_step(ctx, name, overrides, vivit, B,
                                                                                    c, k),
                        f"[pde] {name} B={B} {vname}", lambda r: f"{r['ms']:.4g} ms, {r['windows_per_s']:.3g} windows/s",
                        cleanup=lambda k=compiled: _cleanup(k, ctx.device))
    for vname in ATTN_VARIANTS:
        if vname not in names:
            continue
        for B in batches:
            row = {"kind": "attention", "model": name, "B": B, "variant": vname, "dtype": ctx.dtype_name,
                   "status": None, "reason": None}
            measure_row(rows, row, None, lambda B=B, v=vname: run_attention(ctx, name, overrides, B, v),
                        f"[pde] attention B={B} {vname}", lambda r: f"{r['ms']:.4g} ms")
    ok = {(r["variant"], r["B"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        twin = ok.get((r["variant"].replace("cached", "encoder"), r["B"])) if r.get("cached") else None
        r["speedup_vs_encoder"] = (r["windows_per_s"] / twin["windows_per_s"] if twin and r["status"] == "ok"
                                   else None)
        if r["kind"] == "attention" and r["status"] == "ok" and r["variant"] != "salient-sdpa":
            base = ok.get(("salient-sdpa", r["B"]))
            r["ms_vs_salient_sdpa"] = r["ms"] / base["ms"] if base else None
    table = [[r["model"], r["B"], r["variant"], fmt(r.get("ms"), ".4g"), num(r.get("windows_per_s")),
              num(r.get("TFLOP_per_s")), num(None if r.get("mfu") is None else 100 * r["mfu"]),
              fmt(r.get("speedup_vs_encoder"), ".2f"), fmt(r.get("peak_mem_gib"), ".1f"),
              fmt(r.get("first_loss"), ".5g"),
              note(r)] for r in rows]
    return {"reduced": reduced,
            "reduced_reason": (f"{name} {overrides or ''}, ViViT {vivit}, B {batches} instead of PDE-DiT-XL/8 + "
                               "FourierFlow's ViViT at B [8, 16] on CUDA") if reduced else None,
            "model_name": name, "model_overrides": overrides, "vivit": vivit, "batch_sizes": batches,
            "timer": timer_description(ctx.device, ctx.repeats, ctx.warmup), "rows": rows,
            "notes": ["step rows: one process, inputs on the device, no data loading; the first loss must agree "
                      "between the encoder and cached rows (the cached tokens are the encoder's)",
                      "attention rows: B x 4 frames sequences of the model's tokens (the spatial blocks' shape)"],
            "table": {"headers": HEADERS, "rows": table}}
