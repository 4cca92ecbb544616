"""Kernel suite: every fused op of fastrepa.kernels, Triton vs its eager reference vs torch.compile of it.

For each op, model shape, batch size and mode ("fwd": forward under no_grad, the sampling case;
"fwd+bwd": forward with autograd then backward with a random cotangent, the training case) three
implementations are timed:
- triton:  the public op with impl="triton" (CUDA only: the CPU interpreter measures nothing real);
- eager:   `<op>_reference`, imported from the op's own module (never restated here);
- compile: torch.compile(`<op>_reference`, dynamic=False), compiled once per case (after a
           torch._dynamo.reset(), so the recompile limit is never reached), warmed up, then timed.
Each row reports the median time, GB/s from the op's bytes model (the minimum bytes the op must read
and write; see BYTES MODELS below and the functions `*_bytes`), the % of the roofline set by the
bandwidth and matmul probes of the same run, and the speedups of Triton over eager and over compile.

An op whose module is not there yet is skipped with a note, never a crash; an implementation that
fails on a case gets an "error" row with the exception.
"""
import functools
import importlib
import importlib.util
import inspect
import time
from dataclasses import asdict, dataclass

import torch

from common import BenchUsageError, fmt, free_memory, num, short_error

PKG = "fastrepa.kernels"
CUDA_BATCH_SIZES = [32, 128]


# ------------------------------------------------------------------------------------------ shapes

@dataclass(frozen=True)
class ModelShape:
    """The dims of one SiT configuration at one resolution that the fused ops see."""
    name: str
    D: int            # hidden size
    H: int            # heads
    hd: int           # head dim (H * hd == D)
    T: int            # tokens (256 at 256px, 1024 at 512px, patch 2)
    rope_grid: tuple  # token grid for the 2D RoPE
    proj_hidden: int = 2048  # REPA projector hidden width
    z_dim: int = 768         # encoder feature width (DINOv2-B)

    def __post_init__(self):
        assert self.H * self.hd == self.D, self
        assert self.rope_grid[0] * self.rope_grid[1] == self.T, self


FULL_SHAPES = [
    ModelShape("SiT-B/2", 768, 12, 64, 256, (16, 16)),
    ModelShape("SiT-L/2", 1024, 16, 64, 256, (16, 16)),
    ModelShape("SiT-XL/2", 1152, 16, 72, 256, (16, 16)),
    ModelShape("SiT-XL/2@512px", 1152, 16, 72, 1024, (32, 32)),
]
QUICK_SHAPES = [ModelShape("tiny", 64, 4, 16, 16, (4, 4), proj_hidden=64, z_dim=32)]


def _elem(dtype):
    return torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------------- bytes models
# N = B * T tokens, e = bytes per element of the run dtype. Minimum traffic: every input read once,
# every output written once, nothing else (statistics such as mean/rstd are recomputable, so they are
# not counted). "fwd+bwd" = the forward's minimum + the backward's minimum (the backward cannot start
# before its cotangent exists, so the two passes cannot share reads).

def layernorm_modulate_bytes(s, B, e, mode):
    """fwd: read x [N,D], shift, scale [B,D]; write h [N,D] -> (2ND + 2BD) e.
    bwd: read dh, x [N,D], scale [B,D]; write dx [N,D], dshift, dscale [B,D] -> (3ND + 3BD) e."""
    N, D = B * s.T, s.D
    fwd = (2 * N * D + 2 * B * D) * e
    return fwd if mode == "fwd" else fwd + (3 * N * D + 3 * B * D) * e


def gated_residual_layernorm_modulate_bytes(s, B, e, mode):
    """fwd: read x, y [N,D], gate, shift, scale [B,D]; write x', h [N,D] -> (4ND + 3BD) e.
    bwd: read dx', dh, x' (an output already in memory), y [N,D], gate, scale [B,D]; write dx, dy
    [N,D], dgate, dshift, dscale [B,D] -> (6ND + 5BD) e."""
    N, D = B * s.T, s.D
    fwd = (4 * N * D + 3 * B * D) * e
    return fwd if mode == "fwd" else fwd + (6 * N * D + 5 * B * D) * e


def qk_norm_rope_bytes(s, B, e, mode):
    """C = H*hd. fwd: read the q and k thirds of qkv [N,2C] and the 4 norm vectors [hd]; write q, k
    [N,C] each; v can be returned as a strided view of qkv, so it costs nothing; the RoPE tables can be
    computed in registers -> (4NC + 4hd) e.
    bwd: read dq, dk, dv [N,C] each, the q and k thirds of qkv [N,2C], q/k weights [hd]; write dqkv
    [N,3C] and the 4 vector grads [hd] -> (8NC + 6hd) e."""
    N, C, hd = B * s.T, s.H * s.hd, s.hd
    fwd = (4 * N * C + 4 * hd) * e
    return fwd if mode == "fwd" else fwd + (8 * N * C + 6 * hd) * e


def _projector_weights(s):
    F, D, Z = s.proj_hidden, s.D, s.z_dim
    return F * D + F + F * F + F + Z * F + Z


def projector_bytes(s, B, e, mode):
    """F = hidden (2048), Z = z_dim (768), W = all weights and biases. A lower bound: the two hidden
    activations stay on chip in the forward. fwd: read x [N,D], W; write out [N,Z] -> (ND + W + NZ) e.
    With autograd the forward also writes the two pre-activations [N,F] the backward needs (2NF); the
    backward reads dout [N,Z], x [N,D], W and the two saved pre-activations (2NF), writes dx [N,D] and
    dW (W) -> fwd+bwd = (3ND + 3W + 2NZ + 4NF) e. The projector is compute-bound: see the FLOP model."""
    N, D, F, Z = B * s.T, s.D, s.proj_hidden, s.z_dim
    W = _projector_weights(s)
    if mode == "fwd":
        return (N * D + W + N * Z) * e
    return (3 * N * D + 3 * W + 2 * N * Z + 4 * N * F) * e


def projector_flops(s, B, mode):
    """fwd: 2 N (DF + FF + FZ) (the three matmuls); fwd+bwd: 3x that (dX and dW matmuls)."""
    N, D, F, Z = B * s.T, s.D, s.proj_hidden, s.z_dim
    fwd = 2 * N * (D * F + F * F + F * Z)
    return fwd if mode == "fwd" else 3 * fwd


def alignment_loss_bytes(s, B, e, mode):
    """C = z_dim. fwd: read z, z_tilde [N,C]; write the loss [B] in fp32 -> 2NC e + 4B.
    bwd: read dloss [B] fp32, z, z_tilde [N,C]; write dz_tilde [N,C] (z has no grad) -> 3NC e + 4B."""
    N, C = B * s.T, s.z_dim
    fwd = 2 * N * C * e + 4 * B
    return fwd if mode == "fwd" else fwd + 3 * N * C * e + 4 * B


# ----------------------------------------------------------------------------------------- inputs

def _randn(*shape, dtype, device, scale=1.0, grad=False):
    t = torch.randn(*shape, device=device, dtype=torch.float32) * scale
    return t.to(dtype).requires_grad_(grad)


def build_layernorm_modulate(s, B, dtype, device, grad):
    r = functools.partial(_randn, dtype=dtype, device=device, grad=grad)
    x, shift, scale = r(B, s.T, s.D), r(B, s.D, scale=0.1), r(B, s.D, scale=0.1)
    return (x, shift, scale), {}, [x, shift, scale]


def build_gated_residual_layernorm_modulate(s, B, dtype, device, grad):
    r = functools.partial(_randn, dtype=dtype, device=device, grad=grad)
    x, gate, y = r(B, s.T, s.D), r(B, s.D, scale=0.1), r(B, s.T, s.D)
    shift, scale = r(B, s.D, scale=0.1), r(B, s.D, scale=0.1)
    return (x, gate, y, shift, scale), {}, [x, gate, y, shift, scale]


def build_qk_norm_rope(s, B, dtype, device, grad):
    r = functools.partial(_randn, dtype=dtype, device=device, grad=grad)
    qkv = r(B, s.T, 3 * s.D)
    vecs = {}
    for side in ("q", "k"):
        w = (1 + torch.randn(s.hd, device=device) * 0.1).to(dtype).requires_grad_(grad)
        vecs[f"{side}_weight"], vecs[f"{side}_bias"] = w, r(s.hd, scale=0.1)
    kw = dict(num_heads=s.H, **vecs, norm="layernorm", rope_grid=s.rope_grid)
    return (qkv,), kw, [qkv, *vecs.values()]


def build_projector(s, B, dtype, device, grad):
    r = functools.partial(_randn, dtype=dtype, device=device, grad=grad)
    F, Z = s.proj_hidden, s.z_dim
    x = r(B, s.T, s.D)
    w0, b0 = r(F, s.D, scale=s.D ** -0.5), r(F, scale=0.02)
    w1, b1 = r(F, F, scale=F ** -0.5), r(F, scale=0.02)
    w2, b2 = r(Z, F, scale=F ** -0.5), r(Z, scale=0.02)
    args = (x, w0, b0, w1, b1, w2, b2)
    return args, {}, list(args)


def build_alignment_loss(s, B, dtype, device, grad):
    z = _randn(B, s.T, s.z_dim, dtype=dtype, device=device)  # encoder features: no grad
    z_tilde = _randn(B, s.T, s.z_dim, dtype=dtype, device=device, grad=grad)
    return (z, z_tilde), {}, [z_tilde]


@dataclass(frozen=True)
class OpSpec:
    name: str
    module: str
    build: object
    bytes: object
    flops: object = None

    @property
    def reference(self):
        return f"{self.name}_reference"


OPS = {spec.name: spec for spec in [
    OpSpec("layernorm_modulate", f"{PKG}.adaln", build_layernorm_modulate, layernorm_modulate_bytes),
    OpSpec("gated_residual_layernorm_modulate", f"{PKG}.adaln", build_gated_residual_layernorm_modulate,
           gated_residual_layernorm_modulate_bytes),
    OpSpec("qk_norm_rope", f"{PKG}.qk_norm_rope", build_qk_norm_rope, qk_norm_rope_bytes),
    OpSpec("projector", f"{PKG}.projector", build_projector, projector_bytes, projector_flops),
    OpSpec("alignment_loss", f"{PKG}.align_loss", build_alignment_loss, alignment_loss_bytes),
]}
MODES = ("fwd", "fwd+bwd")
IMPLS = ("eager", "compile", "triton")


def load_op(spec):
    """(public op or None, reference, None) when the op can be benched, else (None, None, reason)."""
    try:
        found = importlib.util.find_spec(spec.module)
    except Exception as e:  # noqa: BLE001 - a broken parent package is a reason, not a crash
        return None, None, f"cannot look up {spec.module}: {type(e).__name__}: {e}"
    if found is None:
        return None, None, f"module {spec.module} not found (op not built yet)"
    try:
        mod = importlib.import_module(spec.module)
    except Exception as e:  # noqa: BLE001
        return None, None, f"importing {spec.module} failed: {type(e).__name__}: {e}"
    ref = getattr(mod, spec.reference, None)
    if ref is None:
        return None, None, f"{spec.module} has no {spec.reference} (op not built yet)"
    return getattr(mod, spec.name, None), ref, None


def triton_skip_reason(ctx, spec, public):
    """Why the Triton row of this op cannot be timed here, or None when it can."""
    if ctx.device.type != "cuda":
        return "needs CUDA: Triton rows are timed only on a GPU (the CPU interpreter measures nothing real)"
    try:
        from fastrepa.kernels import _dispatch
    except Exception as e:  # noqa: BLE001
        return f"cannot import fastrepa.kernels._dispatch: {short_error(e)}"
    if _dispatch.interpreting():
        return "TRITON_INTERPRET is set: the interpreter measures nothing real"
    if not _dispatch.HAS_TRITON:
        return "the triton package is not installed"
    if public is None:
        return f"{spec.module} has no public {spec.name}"
    try:
        has_impl = "impl" in inspect.signature(public).parameters
    except (TypeError, ValueError):
        has_impl = True
    if not has_impl:
        return f"{spec.module}.{spec.name} has no impl argument yet (no Triton path)"
    return None


# ------------------------------------------------------------------------------------------ cases

def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(ctx, spec, public, ref, shape, B, mode, triton_reason, impls=IMPLS):
    """The rows (eager, compile, triton, or the `impls` asked for) of one op x shape x batch x mode."""
    device, dtype, grad = ctx.device, ctx.dtype, mode == "fwd+bwd"
    e = _elem(dtype)
    base = {"op": spec.name, "model": shape.name, "shape": f"{shape.name} B={B} T={shape.T}", "B": B,
            "T": shape.T, "D": shape.D, "H": shape.H, "hd": shape.hd, "dtype": ctx.dtype_name, "mode": mode,
            "bytes": spec.bytes(shape, B, e, mode), "flops": spec.flops(shape, B, mode) if spec.flops else None}
    rows = {impl: dict(base, impl=impl, status=None, reason=None, median_ms=None) for impl in impls}
    try:
        args, kw, leaves = spec.build(shape, B, dtype, device, grad)
        base_tensors = {f"arg{i}": list(a.shape) for i, a in enumerate(args)}
        base_tensors.update({k: list(v.shape) for k, v in kw.items() if torch.is_tensor(v)})
        with torch.no_grad():
            expected = _as_tuple(ref(*args, **kw))
        cot = [torch.randn(o.shape, device=device).to(o.dtype) for o in expected] if grad else None
    except Exception as e:  # noqa: BLE001
        for r in rows.values():
            r.update(status="error", reason=f"building the case failed: {short_error(e)}")
        free_memory(device)
        return list(rows.values())

    def step_of(f):
        if not grad:
            def step():
                with torch.no_grad():
                    return f(*args, **kw)
        else:
            def step():
                torch.autograd.backward(_as_tuple(f(*args, **kw)), cot)
        return step

    def max_err(f):
        with torch.no_grad():
            got = _as_tuple(f(*args, **kw))
        return max((g.float() - x.float()).abs().max().item() for g, x in zip(got, expected))

    for impl in impls:
        row = rows[impl]
        row["inputs"] = base_tensors
        if impl == "triton" and triton_reason:
            row.update(status="skipped", reason=triton_reason)
            continue
        try:
            if impl == "eager":
                f = ref
            elif impl == "compile":
                torch._dynamo.reset()
                f = torch.compile(ref, dynamic=False)
            else:
                f = functools.partial(public, impl="triton")
            step = step_of(f)
            t0 = time.perf_counter()
            step()  # compiles (torch.compile, Triton JIT) on the first call
            _sync(device)
            first_s = time.perf_counter() - t0
            if impl != "eager":
                row["first_call_s"] = round(first_s, 3)
                row["max_abs_err_vs_eager"] = max_err(f)
            row["median_ms"], row["min_ms"], row["max_ms"] = ctx.time_ms(step, leaves if grad else ())
            row["repeats"] = ctx.repeats
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - one failing implementation must not stop the suite
            row.update(status="error", reason=short_error(e), median_ms=None)
        finally:
            free_memory(device)
    del args, kw, leaves, expected, cot
    free_memory(device)
    return list(rows.values())


def add_metrics(rows, bandwidth_gbps, matmul_tflops):
    """GB/s, TFLOP/s, % of roofline (max of bytes/BW and flops/peak over the time), speedups."""
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["shape"], r["mode"]), {})[r["impl"]] = r
    for group in groups.values():
        for r in group.values():
            ms = r["median_ms"]
            r["GB_per_s"] = r["bytes"] / (ms * 1e-3) / 1e9 if ms else None
            r["TFLOP_per_s"] = r["flops"] / (ms * 1e-3) / 1e12 if ms and r["flops"] else None
            bound = []
            if bandwidth_gbps:
                bound.append(r["bytes"] / (bandwidth_gbps * 1e9))
            if matmul_tflops and r["flops"]:
                bound.append(r["flops"] / (matmul_tflops * 1e12))
            r["roofline_ms"] = max(bound) * 1e3 if bound else None
            r["pct_roofline"] = 100 * r["roofline_ms"] / ms if ms and r["roofline_ms"] else None
            r["pct_bandwidth"] = 100 * r["GB_per_s"] / bandwidth_gbps if r["GB_per_s"] and bandwidth_gbps else None
        eager = group.get("eager", {}).get("median_ms")
        comp = group.get("compile", {}).get("median_ms")
        for impl, r in group.items():
            ms = r["median_ms"]
            r["speedup_vs_eager"] = eager / ms if impl != "eager" and ms and eager else None
            r["speedup_vs_compile"] = comp / ms if impl == "triton" and ms and comp else None
    return rows


HEADERS = ["op", "shape", "mode", "impl", "ms", "GB/s", "% roof", "TFLOP/s", "x eager", "x compile", "note"]


def table_rows(rows):
    out = []
    for r in rows:
        if r["status"] == "ok":
            note = []
            if r.get("first_call_s") is not None and r["impl"] == "compile":
                note.append(f"compile {r['first_call_s']:.1f} s")
            if r.get("max_abs_err_vs_eager") is not None:
                note.append(f"err {r['max_abs_err_vs_eager']:.1e}")
            note = ", ".join(note)
        else:
            reason = r["reason"] or ""
            note = f"{r['status']}: " + (reason.split(":")[0] if r["status"] == "skipped" else reason[:80])
        out.append([r["op"], r["shape"], r["mode"], r["impl"], fmt(r["median_ms"], ".4g"), num(r.get("GB_per_s")),
                    num(r.get("pct_roofline")), num(r.get("TFLOP_per_s")),
                    fmt(r.get("speedup_vs_eager"), ".2f"), fmt(r.get("speedup_vs_compile"), ".2f"), note])
    return out


def _parse_ops(arg):
    if not arg:
        return list(OPS)
    names = [n.strip() for n in arg.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise BenchUsageError(f"--ops: unknown op(s) {', '.join(unknown)}; the kernel suite knows: {', '.join(OPS)}")
    return names


def _parse_filter(arg, known, flag):
    """The names of a comma list flag, in the order `known` lists them (all when empty)."""
    if not arg:
        return list(known)
    names = [n.strip() for n in arg.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise BenchUsageError(f"{flag}: unknown value(s) {', '.join(unknown) or repr(arg)}; the kernel suite knows: "
                              f"{', '.join(known)}")
    return [k for k in known if k in names]


def selection(args):
    """(shape names or None for all, modes, impls) from --shapes / --modes / --impls (usage errors first)."""
    shapes = getattr(args, "shapes", None)
    shape_names = _parse_filter(shapes, [s.name for s in FULL_SHAPES], "--shapes") if shapes else None
    return (shape_names, _parse_filter(getattr(args, "modes", None), MODES, "--modes"),
            _parse_filter(getattr(args, "impls", None), IMPLS, "--impls"))


def check_args(args):
    """Usage errors of --ops / --shapes / --modes / --impls, before any suite has run."""
    return _parse_ops(args.ops), selection(args)


def plan(ctx):
    """(shapes, batch sizes, reduced, reason) for this run."""
    args = ctx.args
    shape_names = selection(args)[0]
    if ctx.quick:
        batches = args.batch_sizes or [2]
        return QUICK_SHAPES, batches, True, (
            f"--quick: tiny shapes (D=64, H=4, hd=16, T=16, projector 64 -> 32), batch sizes {batches}, "
            f"{ctx.repeats} repeats; a smoke test of the bench, not performance numbers")
    if args.batch_sizes:
        batches = args.batch_sizes
    else:
        batches = CUDA_BATCH_SIZES if ctx.device.type == "cuda" else [1]
    shapes = [s for s in FULL_SHAPES if shape_names is None or s.name in shape_names]
    if batches == CUDA_BATCH_SIZES:
        return shapes, batches, False, None
    why = " (the CPU default: the GPU batch sizes would take too long here)" if (
        ctx.device.type != "cuda" and not args.batch_sizes) else ""
    return shapes, batches, True, (
        f"batch sizes {batches} instead of {CUDA_BATCH_SIZES}{why}; model dims and token counts as on the GPU")


def run(args, ctx):
    """The kernel suite; returns its result dict (rows, table, notes, ...) for run.py to write."""
    names = _parse_ops(args.ops)  # usage errors before any work
    _, modes, impls = selection(args)
    shapes, batches, reduced, reduced_reason = plan(ctx)
    notes, skipped_ops, rows = [], [], []
    bandwidth, matmul = ctx.bandwidth(), ctx.matmul()
    if ctx.device.type != "cuda":
        notes.append("Triton rows are not timed on the CPU (needs CUDA); eager and torch.compile rows are real.")
    for name in names:
        spec = OPS[name]
        public, ref, reason = load_op(spec)
        if reason:
            skipped_ops.append({"op": name, "reason": reason})
            notes.append(f"{name}: skipped, {reason}")
            print(f"[kernels] {name}: skipped, {reason}", flush=True)
            continue
        triton_reason = triton_skip_reason(ctx, spec, public)
        for shape in shapes:
            for B in batches:
                for mode in modes:
                    t0 = time.perf_counter()
                    case = run_case(ctx, spec, public, ref, shape, B, mode, triton_reason, impls)
                    rows += case
                    done = ", ".join(f"{r['impl']} {fmt(r['median_ms'], '.4g') or r['status']}" for r in case)
                    print(f"[kernels] {name} {shape.name} B={B} {mode}: {done} ({time.perf_counter() - t0:.1f} s)",
                          flush=True)
    add_metrics(rows, bandwidth.get("GB_per_s"), matmul.get("TFLOP_per_s"))
    bytes_docs = [f"- `{spec.name}`: " + " ".join(inspect.getdoc(spec.bytes).split())
                  for spec in OPS.values() if spec.name in names]
    flops_docs = [f"- `{spec.name}`: " + " ".join(inspect.getdoc(spec.flops).split())
                  for spec in OPS.values() if spec.name in names and spec.flops]
    shape_docs = [f"- {s.name}: D={s.D}, H={s.H}, hd={s.hd}, T={s.T}, RoPE grid {s.rope_grid}, "
                  f"projector {s.D} -> {s.proj_hidden} -> {s.proj_hidden} -> {s.z_dim}" for s in shapes]
    legend = ["- ms: median time; GB/s: bytes model / time; % roof: roofline time / time, where the roofline "
              "time is max(bytes / probed bandwidth, FLOPs / probed matmul rate); x eager, x compile: "
              "speedup of this row over the eager / torch.compile row of the same case.",
              "- fwd runs under torch.no_grad (sampling); fwd+bwd runs the forward with autograd and the "
              "backward with a random cotangent, grads reset to None between calls (training).",
              "- err: max |output - eager output| of the forward."]
    return {
        "reduced": reduced, "reduced_reason": reduced_reason, "batch_sizes": batches,
        "shapes": [asdict(s) | {"rope_grid": list(s.rope_grid)} for s in shapes],
        "ops": names, "modes": modes, "impls": impls, "skipped_ops": skipped_ops, "notes": notes, "rows": rows,
        "table": {"headers": HEADERS, "rows": table_rows(rows)},
        "appendix": {"columns": legend, "shapes": shape_docs,
                     "bytes models (N = B*T tokens, e = bytes per element)": bytes_docs,
                     "FLOP models": flops_docs},
    }
