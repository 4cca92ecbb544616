"""bench/run.py --suite pde --quick on the CPU: the FourierFlow step with the encoder and with cached tokens
(the same first loss; the cached row's FLOPs leave the encoder out), and the salient attention rows, each a
real timed call checked against a float64 evaluation."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import pde_suite as ps  # noqa: E402


def _bench(*argv, out):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OMP_WAIT_POLICY")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), *argv, "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_quick_pde_suite_rows(tmp_path):
    import torch
    from fastrepa.encoders.vivit import ViViTEncoder
    from fastrepa.models import build_model
    proc = _bench("--suite", "pde", "--quick", out=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    suite = json.loads(next(tmp_path.glob("*.json")).read_text())["suites"]["pde"]
    assert suite["reduced"] and "PDE-DiT-XL/8" in suite["reduced_reason"]
    rows = {r["variant"]: r for r in suite["rows"]}
    assert set(rows) == {*ps.STEP_VARIANTS, *ps.ATTN_VARIANTS}
    enc, cached = rows["encoder"], rows["cached"]
    assert enc["status"] == cached["status"] == "ok"
    assert rows["encoder-compile"]["status"] == rows["cached-compile"]["status"] == "skipped"
    # the cached tokens are the encoder's: the same first loss
    assert cached["first_loss"] == pytest.approx(enc["first_loss"], rel=1e-6)
    name, overrides, vivit, _ = ps.QUICK_PLAN
    with torch.device("meta"):
        model = build_model(name, **overrides, z_dims=[vivit["dim"]])
        encoder = ViViTEncoder(patch=4, num_patches=16, **vivit)
    assert cached["flops_per_window"] == 3 * model.forward_flops()
    assert enc["flops_per_window"] == 3 * model.forward_flops() + encoder.forward_flops()
    for r in (enc, cached):
        assert r["windows_per_s"] == pytest.approx(r["B"] / (r["ms"] * 1e-3))
        assert r["ms_min"] <= r["ms"] <= r["ms_max"]
    assert cached["speedup_vs_encoder"] == pytest.approx(cached["windows_per_s"] / enc["windows_per_s"])
    for v in ps.ATTN_VARIANTS:
        r = rows[v]
        assert r["status"] == "ok" and r["ms"] > 0 and r["max_abs_err"] < 1e-4, r
    assert rows["plain-sdpa"]["attn_flops"] * 2 == rows["salient-sdpa"]["attn_flops"]
    assert rows["salient-math"]["ms_vs_salient_sdpa"] == pytest.approx(rows["salient-math"]["ms"]
                                                                       / rows["salient-sdpa"]["ms"])


def test_salient_math_is_the_two_attention_products():
    import torch
    from fastrepa.attention import attention
    g = torch.Generator().manual_seed(0)
    q1, k1, q2, k2, v = (torch.randn(2, 3, 10, 8, generator=g, dtype=torch.float64) for _ in range(5))
    torch.testing.assert_close(ps.salient_math(q1, k1, q2, k2, v, 0.3),
                               attention(q1, k1, v, "math") - 0.3 * attention(q2, k2, v, "math"),
                               rtol=1e-5, atol=1e-6)  # attention_math computes in fp32


def test_unknown_pde_variant_is_a_usage_error(tmp_path):
    proc = _bench("--suite", "pde", "--variants", "encoder,warp", out=tmp_path)
    assert proc.returncode != 0 and "warp" in proc.stderr and "salient-sdpa" in proc.stderr
