"""Shared checks for the Triton kernel tests (the tolerance rule of docs/design.md, "The fused-op rule").

|kernel - fp64 oracle| <= 2 * |torch at the same dtype - fp64 oracle| + atol, elementwise in the max
norm: the kernel may be no worse than twice plain PyTorch in the same precision.

Every tensor that reaches an `impl="triton"` call lives on DEVICE: the CPU while Triton interprets
(tests/conftest.py sets TRITON_INTERPRET=1 when CUDA is absent), CUDA otherwise, so on a GPU machine
the kernels run compiled. Inputs are drawn on the CPU (CPU generators) and then moved, so the values
are the same on both devices; the fp64 oracle runs on DEVICE too.
"""
import os

import torch

ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


# Triton's CPU interpreter converts fp32 -> bf16 by truncation (its cast ignores the rounding mode),
# where the GPU rounds to nearest even: an interpreted bf16 store may be off by up to one bf16 ulp
# (< 2^-7 relative) more than a compiled one. The check allows exactly that much, elementwise.
INTERPRETED_BF16_ULP = 2.0 ** -7


def interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Read at import, after tests/conftest.py has set TRITON_INTERPRET (conftest is imported first).
DEVICE = torch.device("cpu") if interpreting() or not torch.cuda.is_available() else torch.device("cuda")


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_within_rule(name, got, torch_same_dtype, oracle64, atol=None):
    """`got` (Triton) vs `torch_same_dtype` (reference in the test dtype), both vs the fp64 oracle."""
    assert got.shape == oracle64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(oracle64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    atol = ATOL[got.dtype] if atol is None else atol
    e_t = max_err(torch_same_dtype, oracle64)
    slack = 0.0
    if got.dtype == torch.bfloat16 and interpreting():
        slack = oracle64.double().abs() * INTERPRETED_BF16_ULP
    e_k = ((got.double() - oracle64.double()).abs() - slack).max().item()
    assert e_k <= 2 * e_t + atol, f"{name}: kernel error {e_k:.3g} > 2 x torch error {e_t:.3g} + {atol:g}"


def grads(outputs, inputs, cotangents):
    """Gradients of sum(<out, cot>) w.r.t. inputs (None for inputs without grad)."""
    outs = [o for o in outputs if o is not None]
    g = torch.autograd.grad(outs, [i for i in inputs if i.requires_grad], cotangents, allow_unused=True)
    it = iter(g)
    return [next(it) if i.requires_grad else None for i in inputs]


def leaf(t, dtype, requires_grad=True):
    """A fresh leaf with t's values, on DEVICE, in `dtype`."""
    return t.detach().to(device=DEVICE, dtype=dtype).requires_grad_(requires_grad)


def non_contiguous(t):
    """The same values in a non-contiguous tensor on DEVICE (a transposed copy seen through a transpose)."""
    d = t.detach().to(DEVICE)
    return d.transpose(0, -1).contiguous().transpose(0, -1).requires_grad_(t.requires_grad)
