"""Which implementation of a fused op runs: the PyTorch reference or the Triton kernels.

Every public op takes `impl`:
- "torch": the reference (plain PyTorch; what torch.compile fuses on its own);
- "triton": the Triton kernels; needs CUDA tensors, or TRITON_INTERPRET=1 (the CPU interpreter the
  tests use). Asking for it elsewhere is an error, never a silent fallback;
- "auto" (the default): Triton on CUDA tensors, the reference elsewhere.

The Triton paths are registered as torch.library custom ops with fake implementations, so
torch.compile keeps them inside its graph (fullgraph works) and autograd goes through
`register_autograd`. (`torch.library.triton_op` would let Inductor trace into the kernels, but its
fake tracing cannot run under the interpreter, so the CPU tests could not cover it.)
"""
import os

import torch

try:  # triton ships with torch's Linux CUDA wheels; elsewhere only the reference path exists
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the platform
    HAS_TRITON = False

IMPLS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(impl: str, *tensors) -> bool:
    """Resolve `impl` for these input tensors; raises when "triton" cannot run here."""
    if impl == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if impl == "auto":
        return HAS_TRITON and on_cuda and not interpreting()
    if impl != "triton":
        raise ValueError(f"kernels={impl!r} is not one of {IMPLS}")
    if not HAS_TRITON:
        raise RuntimeError("kernels='triton' needs the triton package, which is not installed; "
                           "use kernels='torch'")
    if not (on_cuda or interpreting()):
        raise RuntimeError("kernels='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
                           "interpreter); use kernels='torch' or 'auto' on this machine")
    return True


def check_impl(impl: str, device) -> None:
    """Fail early, naming the flag, when --kernels `impl` cannot run on `device`."""
    if impl not in IMPLS:
        raise ValueError(f"--kernels={impl!r} is not one of {IMPLS}")
    if impl == "triton" and not HAS_TRITON:
        raise RuntimeError("--kernels triton needs the triton package; use --kernels torch or auto")
    if impl == "triton" and torch.device(device).type != "cuda" and not interpreting():
        raise RuntimeError("--kernels triton needs a CUDA GPU (this run is on the CPU); use --kernels auto "
                           "(Triton on CUDA, PyTorch elsewhere) or torch")


def block_size(n: int, at_least: int = 16) -> int:
    """Smallest power of two >= n (Triton block dims must be powers of two); masks cover the rest."""
    return max(at_least, 1 << (max(int(n), 1) - 1).bit_length())


def num_warps_for(block: int) -> int:
    """Warps for a program of `block` elements (the interpreter ignores it)."""
    return min(max(block // 256, 1), 16)

