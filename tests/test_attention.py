"""fastrepa.attention: every backend against the fp32 math reference; CUDA-only ones skip cleanly."""
import pytest
import torch

from fastrepa.attention import BACKENDS, attention, attention_math, check_backend


def reference(q, k, v):
    w = torch.softmax(q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    out = w @ v.double()
    B, H, T, hd = q.shape
    return out.transpose(1, 2).reshape(B, T, H * hd)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_cpu_backends_match_plain_softmax(backend):
    q, k, v = (torch.randn(2, 3, 17, 24) for _ in range(3))  # odd T, head_dim not a power of two
    torch.testing.assert_close(attention(q, k, v, backend).double(), reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_math_keeps_dtype_and_accumulates_in_fp32():
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.bfloat16) for _ in range(3))
    out = attention_math(q, k, v)
    assert out.dtype == torch.bfloat16
    ref = attention_math(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
def test_cuda_backends(backend):
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=backend):
            check_backend(backend)
        pytest.skip(f"{backend} needs CUDA (checked that it says so)")
    try:
        check_backend(backend)
    except RuntimeError as e:
        pytest.skip(str(e))
    q, k, v = (torch.randn(2, 16, 256, 72, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, backend).double(), reference(q, k, v).cuda(), atol=2e-2, rtol=2e-2)


def test_unknown_backend():
    with pytest.raises(ValueError, match="not one of"):
        check_backend("triton")
    assert set(BACKENDS) == {"sdpa", "math", "flash_attn", "xformers"}
