"""Sample suite: the REPA evaluation protocol (SDE Euler-Maruyama, 250 steps, CFG 1.8 on the guidance
interval [0, 0.7]) timed with the product's own sampler, for one model at one or more batch sizes.

The model is built by name with random weights (`build_model` + its own init, the zero-initialised
adaLN / final layers redrawn so every path carries signal; weights do not change the speed). The
sampler is `fastrepa.sampling.euler_maruyama_sampler`, called as `fastrepa.generation.sample_batch`
calls it: the model's `denoise` (SiT's velocity; or its torch.compile'd version, as generate.py builds it), latents in
the parameter dtype, the SDE noise drawn per sample from its own CPU generator in float64 (as
generate.py), under bf16 autocast on CUDA (fp32 on the CPU, or whatever --dtype says).

Per variant and batch size B, two per-step latencies are measured (median of `repeats` timed calls of
`steps_per_call` sampler steps each, divided by `steps_per_call`; the sampler's small set-up and its last,
noise-free step are inside the calls):
- CFG step: a step inside the guidance interval, the model on the doubled batch 2B (guidance interval
  [0, 1], so every step of the call is guided);
- plain step: a step outside it, the model on B (an interval no grid point falls in).
A full sample of the protocol is then ESTIMATED as guided_steps x CFG step + unguided_steps x plain step,
with the step counts read off the sampler itself (a counting stand-in model run through the real
protocol), never restated here. images/s = B / that; the 50K projection is pure arithmetic:
ceil(50000 / B) batches, dealt to G devices, ceil(batches / G) x the batch time (ideal scaling, no
decode, no Inception, no I/O). A validation run times one whole `sample_batch` of the protocol's
interval at `--validate-steps` steps (a stand-in decode that only slices the latents) and compares it
with the same estimate for its own step counts.

Variants (each measured in the same run):
- eager:                 kernels=torch, no compile;
- compile:               kernels=torch, torch.compile(model.denoise) as generate.py compiles it
                         (`fastrepa.generation.compile_velocity`: default mode, static shapes);
- cuda-graphs:           kernels=torch, the same with mode="reduce-overhead" (CUDA only);
- compile+triton:        kernels=triton, default mode (CUDA only);
- triton+cuda-graphs:    kernels=triton, mode="reduce-overhead" (CUDA only).
A CUDA-graph row records `cudagraph_skips`: the graphs Inductor ran without CUDA graphs (0: all captured;
more: the row timed compiled code without graphs, and its note says so).
"""
import contextlib
import math
import statistics
import time

import torch

from common import BenchUsageError, fmt, free_memory, measure_row, num, parse_names, time_calls, timer_description, triton_skip_reason

PROTOCOL = {"sampler": "sde (Euler-Maruyama)", "num_steps": 250, "cfg_scale": 1.8, "guidance_low": 0.0,
            "guidance_high": 0.7, "path_type": "linear"}
NUM_SAMPLES = 50_000
GPU_COUNTS = (1, 8)
CUDA_MODEL, CPU_MODEL = "SiT-XL/2", "SiT-S/2"
CUDA_BATCH_SIZES, CPU_BATCH_SIZES, QUICK_BATCH_SIZES = [64, 256], [2], [2]
# --quick: a tiny width on an 8x8 latent (T=16), two blocks; a smoke test, not a measurement
QUICK_OVERRIDES = dict(hidden_size=64, depth=2, num_heads=4, input_size=8, encoder_depth=1, projector_dim=32,
                       z_dims=[16])


class Variant:
    def __init__(self, name, kernels, compile_mode=None, cuda_only=False):
        self.name, self.kernels, self.compile_mode, self.cuda_only = name, kernels, compile_mode, cuda_only

    @property
    def compiled(self):
        return self.compile_mode is not None

    def describe(self):
        if not self.compiled:
            return f"kernels={self.kernels}, eager model.denoise"
        mode = "" if self.compile_mode == "default" else f", mode={self.compile_mode!r}"
        return f"kernels={self.kernels}, torch.compile(model.denoise{mode}, dynamic=False)"


VARIANTS = {v.name: v for v in [
    Variant("eager", "torch"),
    Variant("compile", "torch", "default"),
    Variant("cuda-graphs", "torch", "reduce-overhead", cuda_only=True),
    Variant("compile+triton", "triton", "default", cuda_only=True),
    Variant("triton+cuda-graphs", "triton", "reduce-overhead", cuda_only=True),
]}


# ------------------------------------------------------------------------------------ FLOP model

def velocity_flops_per_image(kw):
    """Matmul FLOPs (2 per multiply-add) of one `model.denoise` call per image, no projectors.
    T = (input_size / p)^2 tokens, D hidden, M = mlp_ratio D, C channels, L blocks:
    patch embed 2 T (C p^2) D; timestep MLP 2 (256 D + D^2); per block: adaLN 2 D (6D), qkv 2 T D (3D),
    attention 4 T^2 D (q k^T and p v), out proj 2 T D^2, MLP 4 T D M; final adaLN 2 D (2D) and linear
    2 T D (p^2 C). Norms, activations, the label lookup and the sampler's update are not counted.
    SiT-XL/2 at 256px: 237.2 GFLOP (the DiT paper's 118.6 "Gflops" are multiply-adds)."""
    p, C, D, L = kw["patch_size"], kw["in_channels"], kw["hidden_size"], kw["depth"]
    T = (kw["input_size"] // p) ** 2
    M = int(D * kw["mlp_ratio"])
    block = 2 * D * 6 * D + 2 * T * D * 3 * D + 4 * T * T * D + 2 * T * D * D + 4 * T * D * M
    return 2 * T * C * p * p * D + 2 * (256 * D + D * D) + L * block + 2 * D * 2 * D + 2 * T * D * p * p * C


# ------------------------------------------------------------------------------- protocol counts

def sampler_counts(num_steps, cfg_scale, guidance_low, guidance_high, path_type="linear"):
    """(guided, unguided) model calls of euler_maruyama_sampler with these settings, counted by running
    the real sampler with a stand-in model on a one-element latent (so the grid and the interval test
    are the sampler's own)."""
    from fastrepa.sampling import euler_maruyama_sampler

    widths = []

    def stand_in(x, t, y):
        widths.append(x.shape[0])
        return torch.zeros_like(x)

    euler_maruyama_sampler(stand_in, torch.zeros(1, 1, 1, 1), torch.zeros(1, dtype=torch.long),
                           num_steps=num_steps, cfg_scale=cfg_scale, guidance_low=guidance_low,
                           guidance_high=guidance_high, path_type=path_type,
                           generator=torch.Generator().manual_seed(0))
    return sum(w == 2 for w in widths), sum(w == 1 for w in widths)


def batch_seconds(step_ms_cfg, step_ms, guided, unguided):
    """Estimated seconds of one batch: guided x CFG step + unguided x plain step."""
    return (guided * step_ms_cfg + unguided * step_ms) / 1e3


def projection_50k(batch_s, B, gpus=GPU_COUNTS, n=NUM_SAMPLES):
    """{G: seconds} for n samples in ceil(n / B) batches dealt to G devices (ideal scaling)."""
    batches = math.ceil(n / B)
    return {str(g): math.ceil(batches / g) * batch_s for g in gpus}


# ------------------------------------------------------------------------------------------- plan

def plan(ctx):
    """(model name, overrides, batch sizes, reduced, reason, label)."""
    args, on_cuda = ctx.args, ctx.device.type == "cuda"
    name = getattr(args, "model", None) or (CUDA_MODEL if on_cuda else CPU_MODEL)
    if ctx.quick:
        batches = args.batch_sizes or QUICK_BATCH_SIZES
        label = f"tiny ({name} with D=64, depth 2, 8x8 latent)"
        return name, dict(QUICK_OVERRIDES), batches, True, (
            f"--quick: {label}, batch sizes {batches}, {steps_per_call(ctx)} steps per timed call; a smoke test "
            "of the bench, not performance numbers"), label
    batches = args.batch_sizes or (CUDA_BATCH_SIZES if on_cuda else CPU_BATCH_SIZES)
    reasons = []
    if not on_cuda and name != CUDA_MODEL:
        reasons.append(f"{name} instead of {CUDA_MODEL}" + ("" if getattr(args, "model", None) else
                                                            " (the CPU default)"))
    if batches != CUDA_BATCH_SIZES:
        reasons.append(f"batch sizes {batches} instead of {CUDA_BATCH_SIZES}")
    if not on_cuda:
        reasons.append("fp32 on the CPU; CUDA-only variants skipped")
    return name, {}, batches, bool(reasons), ("; ".join(reasons) or None), name


def steps_per_call(ctx):
    return 2 if ctx.quick else (5 if ctx.device.type == "cuda" else 3)


def repeats_warmup(ctx):
    if ctx.args.repeats:
        return ctx.args.repeats, (1 if ctx.quick else 2)
    if ctx.quick:
        return 3, 1
    return (10, 2) if ctx.device.type == "cuda" else (3, 1)


def validate_steps(ctx):
    n = getattr(ctx.args, "validate_steps", None)
    if n is not None:
        return n
    return 3 if ctx.quick else (25 if ctx.device.type == "cuda" else 10)


def _parse_variants(arg):
    return parse_names(arg, VARIANTS, "sample")


def skip_reason(ctx, variant):
    """Why this variant cannot run here, or None."""
    if variant.cuda_only and ctx.device.type != "cuda":
        what = "CUDA graphs" if variant.compile_mode == "reduce-overhead" else "Triton kernels"
        return f"needs CUDA: {what} are timed only on a GPU (the CPU has no such path worth timing)"
    return triton_skip_reason() if variant.kernels == "triton" else None


# ---------------------------------------------------------------------------------------- running

def build(name, overrides, kernels, device):
    from fastrepa.models import build_model, model_kwargs

    kw = model_kwargs(name, **overrides, kernels=kernels)
    torch.manual_seed(0)
    model = build_model(name, **overrides, kernels=kernels)
    with torch.no_grad():  # the zero-initialised adaLN-Zero and final layers get random weights too
        for pname, p in model.named_parameters():
            if "adaLN_modulation" in pname or "final_layer" in pname:
                p.normal_(0, 0.02)
    return model.to(device).eval(), kw


class _NoDecode:
    """sample_batch's VAE slot: the decode is not part of this benchmark, so only slice 3 channels."""

    def decode(self, latents):
        return latents[:, :3]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset(variant, device):
    """After a variant: drop its compiled graphs (and the CUDA-graph memory pools), free the cache."""
    if variant.compiled:
        torch._dynamo.reset()
    free_memory(device)


def run_variant(ctx, variant, model, kw, B, counts, spc, repeats, warmup, n_val):
    """One row: both per-step latencies, the estimate, the projection, the validation run."""
    from fastrepa.generation import compile_velocity, cudagraph_skips, sample_batch
    from fastrepa.sampling import euler_maruyama_sampler

    device = ctx.device
    amp_dtype = torch.bfloat16 if ctx.dtype == torch.bfloat16 else None
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    row = {"status": None, "reason": None, "step_ms_cfg": None, "step_ms": None}
    ch, size, _ = model.latent_shape
    from fastrepa.generation import STREAM_SDE
    from fastrepa.rng import index_generators
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(B, ch, size, size, generator=gen).to(device)
    y = torch.randint(0, model.num_classes, (B,), generator=gen).to(device)
    gens = index_generators(0, STREAM_SDE, range(B))  # the SDE noise: one CPU float64 stream per sample, as sample_batch
    if variant.compiled:
        torch._dynamo.reset()
        velocity = compile_velocity(model, variant.compile_mode)
    else:
        velocity = model.denoise
    skips0 = cudagraph_skips()
    cfg = PROTOCOL["cfg_scale"]
    # guided: interval [0, 1] covers every grid point; plain: an interval no grid point falls in
    phases = {"plain": dict(guidance_low=2.0, guidance_high=2.0), "cfg": dict(guidance_low=0.0, guidance_high=1.0)}

    def call_of(phase):
        def call():
            with amp():
                return euler_maruyama_sampler(velocity, z, y, num_steps=spc, cfg_scale=cfg,
                                              path_type=PROTOCOL["path_type"], null_class=model.num_classes,
                                              generator=gens, **phases[phase])
        return call

    # the sampler meets B first (t = 1 lies outside [0, 0.7]), then 2B: compile in that order
    first = 0.0
    for phase in ("plain", "cfg"):
        t0 = time.perf_counter()
        call_of(phase)()
        _sync(device)
        first += time.perf_counter() - t0
    row["first_call_s"] = round(first, 3)
    for phase, key in (("plain", "step_ms"), ("cfg", "step_ms_cfg")):
        times = time_calls(call_of(phase), device, repeats, warmup)
        per_step = [t / spc for t in times]
        row[key], row[f"{key}_min"], row[f"{key}_max"] = statistics.median(per_step), min(per_step), max(per_step)

    guided, unguided = counts["protocol"]
    batch_s = batch_seconds(row["step_ms_cfg"], row["step_ms"], guided, unguided)
    row.update(sample_s_estimate=batch_s, images_per_s_estimate=B / batch_s,
               wall_50k_s=projection_50k(batch_s, B), batches_50k=math.ceil(NUM_SAMPLES / B))
    row["wall_50k_h"] = {g: s / 3600 for g, s in row["wall_50k_s"].items()}

    if n_val:
        vg, vu = counts["validate"]
        kwargs = dict(batch_size=B, mode="sde", num_steps=n_val, cfg_scale=cfg,
                      guidance_low=PROTOCOL["guidance_low"], guidance_high=PROTOCOL["guidance_high"],
                      path_type=PROTOCOL["path_type"], seed=0, device=device, velocity=velocity,
                      autocast_dtype=amp_dtype)
        _sync(device)
        t0 = time.perf_counter()
        sample_batch(model, _NoDecode(), 0, B, **kwargs)  # ends with a copy to the CPU: synchronised
        measured = time.perf_counter() - t0
        est = batch_seconds(row["step_ms_cfg"], row["step_ms"], vg, vu)
        row["validate"] = {"what": "one sample_batch of the protocol's interval, no VAE decode", "num_steps": n_val,
                           "guided_steps": vg, "unguided_steps": vu, "measured_s": measured, "estimated_s": est,
                           "measured_over_estimate": measured / est}
    if variant.compile_mode == "reduce-overhead":
        row["cudagraph_skips"] = cudagraph_skips() - skips0
    row["status"] = "ok"
    return row


def add_metrics(rows, matmul_tflops):
    eager = {r["B"]: r for r in rows if r["variant"] == "eager" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        f = r["flops_per_image_forward"]
        r["TFLOP_per_s_cfg"] = 2 * r["B"] * f / (r["step_ms_cfg"] * 1e-3) / 1e12
        r["TFLOP_per_s_plain"] = r["B"] * f / (r["step_ms"] * 1e-3) / 1e12
        r["TFLOP_per_s"] = r["B"] * r["flops_per_image_sample"] / r["sample_s_estimate"] / 1e12
        r["mfu_pct"] = 100 * r["TFLOP_per_s"] / matmul_tflops if matmul_tflops else None
        e = eager.get(r["B"])
        r["speedup_vs_eager"] = (r["images_per_s_estimate"] / e["images_per_s_estimate"]
                                 if e and r["variant"] != "eager" else None)
    return rows


HEADERS = ["model", "B", "variant", "ms/step CFG (2B)", "ms/step (B)", "img/s (est.)", "NFE/img", "50K h x1",
           "50K h x8", "TFLOP/s", "MFU %", "x eager", "run/est", "note"]


def table_rows(rows):
    out = []
    for r in rows:
        if r["status"] == "ok":
            note = f"compile {r['first_call_s']:.1f} s" if r["compile"] else ""
            if r.get("cudagraph_skips"):
                note += f"; {r['cudagraph_skips']} graph(s) NOT captured as CUDA graphs"
            check = fmt(r["validate"]["measured_over_estimate"], ".2f") if r.get("validate") else ""
        else:
            reason = r["reason"] or ""
            note = f"{r['status']}: " + (reason.split(":")[0] if r["status"] == "skipped" else reason[:80])
            check = ""
        h = r.get("wall_50k_h") or {}
        out.append([r["model"], r["B"], r["variant"], fmt(r["step_ms_cfg"], ".4g"), fmt(r["step_ms"], ".4g"),
                    num(r.get("images_per_s_estimate")), r["nfe_per_image"], num(h.get("1")), num(h.get("8")),
                    num(r.get("TFLOP_per_s")), num(r.get("mfu_pct")), fmt(r.get("speedup_vs_eager"), ".2f"),
                    check, note])
    return out


def check_args(args):
    """The variant names to run; a BenchUsageError for an unknown variant or model (before any work)."""
    from fastrepa.models import MODEL_NAMES

    names = _parse_variants(getattr(args, "variants", None))
    model_name = getattr(args, "model", None)
    if model_name and model_name not in MODEL_NAMES:
        raise BenchUsageError(f"--model: unknown model {model_name!r}; known: {', '.join(MODEL_NAMES)}")
    return names


def run(args, ctx):
    """The sample suite; returns its result dict for run.py to write."""
    names = check_args(args)
    name, overrides, batches, reduced, reduced_reason, label = plan(ctx)
    spc, (repeats, warmup), n_val = steps_per_call(ctx), repeats_warmup(ctx), validate_steps(ctx)
    P = PROTOCOL
    counts = {"protocol": sampler_counts(P["num_steps"], P["cfg_scale"], P["guidance_low"], P["guidance_high"]),
              "validate": sampler_counts(n_val, P["cfg_scale"], P["guidance_low"], P["guidance_high"]) if n_val
              else None}
    assert sampler_counts(spc, P["cfg_scale"], 0.0, 1.0) == (spc, 0)  # the CFG phase: every step guided
    assert sampler_counts(spc, P["cfg_scale"], 2.0, 2.0) == (0, spc)  # the plain phase: none
    guided, unguided = counts["protocol"]
    matmul = ctx.matmul()
    ctx.bandwidth()
    rows, notes, models = [], [], {}
    for vname in names:
        variant = VARIANTS[vname]
        reason = skip_reason(ctx, variant)
        for B in batches:
            row = {"model": label, "model_name": name, "variant": vname, "kernels": variant.kernels,
                   "compile": variant.compile_mode, "cuda_graphs": variant.compile_mode == "reduce-overhead",
                   "impl": variant.describe(), "B": B, "dtype": ctx.dtype_name,
                   "autocast": "bf16" if ctx.dtype == torch.bfloat16 else None,
                   "steps": P["num_steps"], "guided_steps": guided, "unguided_steps": unguided,
                   "nfe_per_image": unguided + 2 * guided, "steps_per_call": spc, "repeats": repeats,
                   "warmup": warmup, "estimate": True, "status": None, "reason": None,
                   "step_ms_cfg": None, "step_ms": None, "flops_per_image_forward": None,
                   "flops_per_image_sample": None, "cudagraph_skips": None}

            def sample_row(variant=variant, B=B, nfe=row["nfe_per_image"]):
                if variant.kernels not in models:
                    models.clear()
                    free_memory(ctx.device)
                    models[variant.kernels] = build(name, overrides, variant.kernels, ctx.device)
                model, kw = models[variant.kernels]
                f = velocity_flops_per_image(kw)
                return {"latent": [kw["in_channels"], kw["input_size"], kw["input_size"]],
                        "tokens": (kw["input_size"] // kw["patch_size"]) ** 2, "hidden_size": kw["hidden_size"],
                        "depth": kw["depth"], "num_heads": kw["num_heads"], "flops_per_image_forward": f,
                        "flops_per_image_sample": f * nfe,
                        **run_variant(ctx, variant, model, kw, B, counts, spc, repeats, warmup, n_val)}
            measure_row(rows, row, reason, sample_row, f"[sample] {label} B={B} {vname}",
                        lambda r: f"CFG step {r['step_ms_cfg']:.4g} ms, step {r['step_ms']:.4g} ms, "
                                  f"{r['images_per_s_estimate']:.3g} img/s (est.)",
                        cleanup=lambda variant=variant: _reset(variant, ctx.device))
    models.clear()
    add_metrics(rows, matmul.get("TFLOP_per_s"))
    if ctx.device.type != "cuda":
        notes.append("compile+triton and the CUDA-graph variants are not timed on the CPU (needs CUDA); eager and "
                     "torch.compile rows are real.")
    notes += [
        f"Protocol: {P['sampler']}, {P['num_steps']} steps, CFG {P['cfg_scale']} on [{P['guidance_low']}, "
        f"{P['guidance_high']}]: {guided} steps inside the interval (model on 2B), {unguided} outside (on B); "
        f"NFE per image = {unguided} + 2 x {guided} = {unguided + 2 * guided}.",
        "img/s and the 50K hours are ESTIMATES: guided x (CFG step) + unguided x (plain step) per batch; 50K = "
        f"ceil({NUM_SAMPLES} / B) batches, ceil(batches / G) per device for G = 1 and 8 (ideal scaling). They "
        "leave out the VAE decode, the Inception features and writing shards.",
        "run/est: one whole sample_batch at the protocol's interval with fewer steps (`validate`), measured / "
        "estimated from the per-step medians; above 1 means per-batch overheads the estimate misses.",
    ]
    legend = ["- ms/step CFG (2B): median per-step time of a step inside the guidance interval (the model on "
              "cat([x, x]), 2B latents); ms/step (B): a step outside it. Each is the median of the timed calls "
              "of `steps_per_call` sampler steps, divided by `steps_per_call`.",
              "- TFLOP/s: the FLOP model below x NFE x B / estimated batch time; MFU %: that / the matmul probe "
              "of this run (not the data-sheet peak).",
              "- x eager: img/s over the eager row of the same B. compile s: the first (compiling) calls at B "
              "and 2B."]
    return {
        "reduced": reduced, "reduced_reason": reduced_reason, "batch_sizes": batches, "model": label,
        "model_name": name, "model_overrides": overrides, "protocol": PROTOCOL, "num_samples": NUM_SAMPLES,
        "gpu_counts": list(GPU_COUNTS), "variants": names, "steps_per_call": spc, "validate_steps": n_val,
        "repeats": repeats, "warmup": warmup,
        "timer": (timer_description(ctx.device, repeats, warmup)
                  + f"; each call runs {spc} sampler steps, per-step = call / {spc}"),
        "notes": notes, "rows": rows, "table": {"headers": HEADERS, "rows": table_rows(rows)},
        "appendix": {"columns": legend,
                     "variants": [f"- {v.name}: {v.describe()}" + (" (CUDA only)" if v.cuda_only else "")
                                  for v in VARIANTS.values() if v.name in names],
                     "FLOP model": ["- " + " ".join(velocity_flops_per_image.__doc__.split())]},
    }

