"""Compile every Triton kernel launch of the fused ops for a real GPU target, without a GPU.

Triton's CPU interpreter runs kernels as numpy and accepts code that the real compiler rejects (types,
layouts, constexpr use, pointer arithmetic). This script runs the public ops (forward and backward,
every option variant, at the real model widths with few tokens) with kernel launches *recorded*
instead of executed, then compiles each distinct launch (kernel, argument types, constexprs,
num_warps) with Triton's own compiler down to a cubin for the target (default sm_90, the H100/H200).
Values computed on the way are garbage (nothing runs); only compilation is checked.

    python tests/compile_kernels.py [--arch 90]      # prints one line per compiled variant
Run it in a process where TRITON_INTERPRET is not set (the kernels must be real JIT functions).
"""
import argparse
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # before the kernel modules are imported: real JITFunctions

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, mangle_type  # noqa: E402

LAUNCHES = []


def _record(self, *args, grid, warmup, **kwargs):
    LAUNCHES.append((self, args, kwargs))


JITFunction.run = _record  # fn[grid](...) now records instead of launching

from fastrepa import kernels as K  # noqa: E402

os.environ["TRITON_INTERPRET"] = "1"  # only so that impl="triton" dispatches on CPU tensors; nothing runs


def _leaf(*shape, dtype=torch.bfloat16, grad=True):
    return torch.randn(*shape).to(dtype).requires_grad_(grad)


def _backward(*outs):
    torch.autograd.backward([o for o in outs if o.requires_grad],
                            [torch.ones_like(o) for o in outs if o.requires_grad])


def run_ops():
    """Every public op, forward + backward, in the dtype combinations training uses."""
    T = 64  # tiles as at 256 tokens (T only sets the rows per program, up to 16-32)
    for D in (768, 1152):  # B/2 and XL/2 widths (L/2's 1024 takes the same block size as 768's)
        for dx, dm in ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.float32, torch.float32)):
            x, y = _leaf(1, T, D, dtype=dx), _leaf(1, T, D, dtype=dm)
            mod = _leaf(1, 6 * D, dtype=dm)
            shift, scale, gate = mod[:, :D], mod[:, D:2 * D], mod[:, 2 * D:3 * D]
            _backward(K.layernorm_modulate(x, shift, scale, impl="triton"))
            _backward(*K.gated_residual_layernorm_modulate(x, gate, y, shift, scale, impl="triton"))
            _backward(K.gated_residual(x, gate, y, impl="triton"))
    for H, hd in ((16, 72), (12, 64)):
        for norm in ("layernorm", "rmsnorm", None):
            for rope, pairs in (((8, 8), "half"), ((8, 8), "interleaved"), (None, "half")):
                if norm is None and rope is None:
                    continue  # a pure view: no kernel
                qkv = _leaf(1, T, 3 * H * hd)
                w = dict(q_weight=_leaf(hd, dtype=torch.float32), q_bias=_leaf(hd, dtype=torch.float32),
                         k_weight=_leaf(hd, dtype=torch.float32), k_bias=_leaf(hd, dtype=torch.float32))
                if norm == "rmsnorm":
                    w.pop("q_bias"), w.pop("k_bias")
                _backward(*K.qk_norm_rope(qkv, H, norm=norm, rope_grid=rope, rope_pairs=pairs, impl="triton",
                                          **(w if norm else {})))
    x = _leaf(1, T, 1152)
    ws = [_leaf(2048, 1152), _leaf(2048), _leaf(2048, 2048), _leaf(2048), _leaf(768, 2048), _leaf(768)]
    _backward(K.projector(x, *ws, impl="triton"))
    for zgrad in (False, True):
        for dt in (torch.bfloat16, torch.float32):
            _backward(K.alignment_loss(_leaf(1, T, 768, dtype=dt, grad=zgrad), _leaf(1, T, 768, dtype=dt), impl="triton"))


def variants():
    """Distinct (kernel, signature, constexprs, num_warps) among the recorded launches."""
    seen = {}
    for fn, args, kwargs in LAUNCHES:
        opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip(fn.arg_names, args))
        bound.update(kwargs)
        sig, consts = {}, {}
        for p in fn.params:
            value = bound[p.name]
            if p.is_constexpr or value is None:
                sig[p.name] = "constexpr"
                consts[p.name] = value
            else:
                sig[p.name] = mangle_type(value)
        key = (fn.fn.__qualname__, tuple(sig.items()), tuple(consts.items()), tuple(opts.items()))
        seen.setdefault(key, (fn, sig, consts, opts))
    return list(seen.values())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability to compile for (90 = H100/H200)")
    a = p.parse_args(argv)
    run_ops()
    target = GPUTarget("cuda", a.arch, 32)
    failures = 0
    for fn, sig, consts, opts in variants():
        name = fn.fn.__name__
        shown = ", ".join(f"{k}={v}" for k, v in consts.items() if v is not None)
        types = ",".join(sorted({t for t in sig.values() if t.startswith("*")}))
        start = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                                      options=opts)
            status = f"ok  {len(compiled.asm['cubin']):>7} B cubin, shared {compiled.metadata.shared} B"
        except Exception as e:  # report every failing variant, not just the first
            failures += 1
            status = "FAIL " + str(e).strip().splitlines()[-1][:300]
        print(f"{name:30s} [{types}] {shown} warps={opts.get('num_warps', 4)}: {status} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    print(f"{len(variants())} variants from {len(LAUNCHES)} launches, {failures} failed (sm_{a.arch})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
