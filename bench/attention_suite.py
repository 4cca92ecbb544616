"""Attention suite: which SDPA backend runs at SiT's head_dim 72 and what each costs, so the default is chosen
by measurement (issue: speed, item 7).

Per batch size, fwd+bwd of scaled_dot_product_attention on q, k, v [B, H, T, 72] (SiT-XL/2: H 16, T 256; bf16
on CUDA) under each backend forced with torch.nn.attention.sdpa_kernel (flash, cudnn, efficient, math), with
no restriction (auto), and the flash-attn / xformers packages where installed. A backend that cannot run
these inputs is reported `unsupported` with torch's reason. Per row: median ms, TFLOP/s (forward 4 B H T^2
hd, backward 2.5x the forward), the largest deviation of the output from an fp32 math reference, and for
auto which forced backends give its output bit for bit (`auto_is`: what auto picked, observed rather than
read from torch's priority list).
"""
import statistics

import torch
import torch.nn.functional as F

from common import measure_row, num, time_calls

CUDA_SHAPE, CPU_SHAPE, QUICK_SHAPE = (16, 256, 72), (6, 64, 72), (2, 16, 72)  # heads, tokens, head_dim
CUDA_BATCH_SIZES, CPU_BATCH_SIZES = [32, 64], [2]
BACKENDS = ("auto", "flash", "cudnn", "efficient", "math", "flash_attn", "xformers")
HEADERS = ["B", "H x T x hd", "backend", "status", "ms fwd+bwd", "TFLOP/s", "max |err|", "auto is", "note"]


def _sdpa_backend(name):
    from torch.nn.attention import SDPBackend
    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


def attention_fn(name):
    """q, k, v [B, H, T, hd] -> out [B, H, T, hd] through backend `name`."""
    if name == "auto":
        return F.scaled_dot_product_attention
    if name in ("flash", "cudnn", "efficient", "math"):
        from torch.nn.attention import sdpa_kernel
        backend = _sdpa_backend(name)

        def fn(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return fn
    if name == "flash_attn":
        from flash_attn import flash_attn_func
        return lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    import xformers.ops as xops
    return lambda q, k, v: xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def skip_reason(name, device):
    if name in ("flash_attn", "xformers"):
        if device.type != "cuda":
            return f"needs CUDA (the {name} package has no CPU kernels)"
        try:
            __import__("flash_attn" if name == "flash_attn" else "xformers.ops")
        except ImportError:
            return f"the {name} package is not installed"
    return None


def plan(args, ctx):
    if ctx.quick:
        return QUICK_SHAPE, args.batch_sizes or [2]
    if ctx.device.type == "cuda":
        return CUDA_SHAPE, args.batch_sizes or CUDA_BATCH_SIZES
    return CPU_SHAPE, args.batch_sizes or CPU_BATCH_SIZES


def run(args, ctx):
    device, dtype = ctx.device, ctx.dtype
    (H, T, hd), batches = plan(args, ctx)
    repeats, warmup = ctx.repeats, ctx.warmup
    rows = []
    for B in batches:
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(B, H, T, hd, generator=g).to(device=device, dtype=dtype) for _ in range(3))
        dout = torch.randn(B, H, T, hd, generator=g).to(device=device, dtype=dtype)
        ref = torch.softmax(q.float() @ k.float().transpose(-1, -2) / hd ** 0.5, -1) @ v.float()
        flops = 3.5 * 4 * B * H * T * T * hd
        outs = {}
        for name in BACKENDS:
            row = {"B": B, "heads": H, "tokens": T, "head_dim": hd, "backend": name, "status": None, "reason": None}

            def measure(name=name):
                fn = attention_fn(name)
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                try:
                    with torch.no_grad():
                        out = fn(q, k, v)
                except RuntimeError as e:  # this backend cannot take these inputs
                    return {"status": "unsupported", "reason": str(e).strip().splitlines()[0][:200]}
                outs[name] = out

                def step():
                    torch.autograd.backward(fn(*leaves), dout)
                times = time_calls(step, device, repeats, warmup, leaves)
                ms = statistics.median(times)
                return {"ms": ms, "TFLOP_per_s": flops / (ms * 1e-3) / 1e12,
                        "max_abs_err": float((out.float() - ref).abs().max())}
            measure_row(rows, row, skip_reason(name, device), measure, f"[attention] {name} B={B}",
                        lambda r: f"{r['ms']:.3f} ms" if r.get("ms") else r["status"])
        auto = next(r for r in rows if r["B"] == B and r["backend"] == "auto")
        if "auto" in outs:
            auto["auto_is"] = [n for n in ("flash", "cudnn", "efficient", "math") if n in outs
                               and torch.equal(outs[n], outs["auto"])]
    notes = []
    for B in batches:
        ok = [r for r in rows if r["B"] == B and r["status"] == "ok" and r["backend"] != "auto"]
        if ok:
            best = min(ok, key=lambda r: r["ms"])
            auto = next(r for r in rows if r["B"] == B and r["backend"] == "auto")
            notes.append(f"B={B}: fastest {best['backend']} ({num(best['ms'])} ms); auto runs "
                         f"{'/'.join(auto.get('auto_is') or ['?'])} ({num(auto.get('ms'))} ms)")
    return {"reduced": ctx.quick or device.type != "cuda",
            "reduced_reason": (f"H x T x hd = {H} x {T} x {hd} at B {batches} instead of SiT-XL/2's 16 x 256 x 72 "
                               "on CUDA" if (ctx.quick or device.type != "cuda") else None),
            "shape": {"heads": H, "tokens": T, "head_dim": hd}, "batch_sizes": batches, "rows": rows,
            "notes": notes, "table": {"headers": HEADERS, "rows": [
                [r["B"], f"{r['heads']} x {r['tokens']} x {r['head_dim']}", r["backend"], r["status"],
                 num(r.get("ms")), num(r.get("TFLOP_per_s")), num(r.get("max_abs_err")),
                 "/".join(r.get("auto_is") or []), (r.get("reason") or "")[:60]] for r in rows]}}
