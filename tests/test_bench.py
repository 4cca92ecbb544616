"""bench/run.py: the kernel suite in --quick mode on the CPU, the suite registry, bytes models, results files.

The bench runs in a subprocess exactly as a user would run it (`python bench/run.py ...`), with CUDA
hidden so the CPU path is what is checked, and without TRITON_INTERPRET (the bench never times the
interpreter). Two ops keep the run short: every torch.compile row costs seconds on the CPU.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "bench" / "run.py"
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402
import kernels_suite as ks  # noqa: E402

QUICK_OPS = ["layernorm_modulate", "projector"]


def _bench(*args, out):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([sys.executable, str(RUN), *args, "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = _bench("--suite", "kernels", "--quick", "--ops", ",".join(QUICK_OPS), out=out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jsons, mds = sorted(out.glob("*.json")), sorted(out.glob("*.md"))
    assert len(jsons) == 1 and len(mds) == 1, sorted(p.name for p in out.iterdir())
    assert jsons[0].stem == mds[0].stem and jsons[0].stem.startswith("cpu-")
    return proc, json.loads(jsons[0].read_text()), mds[0].read_text()


def test_quick_kernel_suite_rows(quick_run):
    _, doc, _ = quick_run
    suite = doc["suites"]["kernels"]
    shape, B = ks.QUICK_SHAPES[0], 2
    assert suite["dtype"] == "fp32" and suite["quick"] is True
    assert suite["reduced"] is True and "--quick" in suite["reduced_reason"]
    rows = suite["rows"]
    for op in QUICK_OPS:
        for mode in ks.MODES:
            case = {r["impl"]: r for r in rows if r["op"] == op and r["mode"] == mode}
            assert set(case) == {"eager", "compile", "triton"}, (op, mode, sorted(case))
            want_bytes = ks.OPS[op].bytes(shape, B, 4, mode)
            for impl in ("eager", "compile"):
                r = case[impl]
                assert r["status"] == "ok", r
                assert r["median_ms"] > 0 and r["repeats"] == 3
                assert r["bytes"] == want_bytes
                assert r["GB_per_s"] == pytest.approx(want_bytes / (r["median_ms"] * 1e-3) / 1e9)
            assert case["compile"]["speedup_vs_eager"] == pytest.approx(
                case["eager"]["median_ms"] / case["compile"]["median_ms"])
            assert case["compile"]["max_abs_err_vs_eager"] < 1e-4
            tri = case["triton"]
            assert tri["status"] == "skipped" and tri["median_ms"] is None
            assert "needs CUDA" in tri["reason"]
    assert {r["op"] for r in rows} == set(QUICK_OPS)
    proj = next(r for r in rows if r["op"] == "projector" and r["impl"] == "eager" and r["mode"] == "fwd")
    assert proj["flops"] == ks.projector_flops(shape, B, "fwd") and proj["TFLOP_per_s"] > 0


def test_quick_kernel_suite_environment_and_report(quick_run):
    proc, doc, md = quick_run
    suite = doc["suites"]["kernels"]
    env = suite["env"]
    for key in ("device_name", "cpu_model", "torch", "triton", "python", "cuda_build"):
        assert key in env, key
    assert env["device"] == "cpu" and env["torch"] and env["python"]
    assert "bench/run.py" in suite["command"] and "--quick" in suite["command"]
    assert suite["bandwidth"]["GB_per_s"] > 0 and suite["started"] and suite["finished"]
    assert doc["date"] in suite["started"]
    # the table, the reduced-shapes warning and the versions, printed and in the .md
    for text in (proc.stdout, md):
        assert "| op" in text and "| layernorm_modulate" in text and "needs CUDA" in text
        assert "REDUCED SHAPES" in text and f"torch {env['torch']}" in text
    assert "bandwidth probe" in md and "bytes models" in md


def test_layernorm_modulate_bytes_hand_count():
    shape = ks.FULL_SHAPES[0]
    assert (shape.name, shape.D, shape.T) == ("SiT-B/2", 768, 256)
    B, e = 2, 2  # bf16
    x = B * 256 * 768 * e  # one [B, T, D] tensor: 786,432 bytes
    vec = B * 768 * e      # one [B, D] tensor: 3,072 bytes
    fwd = x + 2 * vec + x                  # read x, shift, scale; write h
    bwd = 2 * x + vec + x + 2 * vec        # read dh, x, scale; write dx, dshift, dscale
    assert fwd == 1_579_008 and bwd == 2_368_512
    assert ks.layernorm_modulate_bytes(shape, B, e, "fwd") == fwd
    assert ks.layernorm_modulate_bytes(shape, B, e, "fwd+bwd") == fwd + bwd


def test_missing_op_is_skipped_with_a_reason():
    missing = ks.OpSpec("not_an_op", "fastrepa.kernels.not_a_module", ks.build_layernorm_modulate,
                        ks.layernorm_modulate_bytes)
    public, ref, reason = ks.load_op(missing)
    assert public is None and ref is None and "not found" in reason
    no_ref = ks.OpSpec("not_an_op", "fastrepa.kernels.adaln", ks.build_layernorm_modulate,
                       ks.layernorm_modulate_bytes)
    assert "no not_an_op_reference" in ks.load_op(no_ref)[2]
    public, ref, reason = ks.load_op(ks.OPS["layernorm_modulate"])
    assert reason is None and ref.__name__ == "layernorm_modulate_reference"


def _result(tag):
    env = {"device": "cpu", "device_name": "CPU: test", "cpu_model": "test", "cpu_threads": 1,
           "torch": "x", "triton": None, "python": "3", "cuda_build": None, "git": None}
    return {"command": f"python bench/run.py {tag}", "started": "s", "finished": "f", "env": env,
            "table": {"headers": ["a"], "rows": [[tag]]}, "rows": [{"tag": tag}]}


def test_results_merge_by_suite_and_never_overwrite(tmp_path):
    env = _result("")["env"]
    write = lambda suites: common.write_results(tmp_path, "cpu-test", "2026-01-01", "CPU: test", env, suites)  # noqa: E731
    j1, m1 = write({"kernels": _result("k1")})
    j2, _ = write({"train": _result("t1")})   # another suite: merged into the same file
    assert j2 == j1 and set(json.loads(j1.read_text())["suites"]) == {"kernels", "train"}
    j3, m3 = write({"kernels": _result("k2")})  # the same suite again: a new file, the first kept
    assert j3.name == "cpu-test-2026-01-01-2.json" and m3.name == "cpu-test-2026-01-01-2.md"
    first = json.loads(j1.read_text())["suites"]["kernels"]
    assert first["rows"] == [{"tag": "k1"}] and "| k1" in m1.read_text()
    assert json.loads(j3.read_text())["suites"]["kernels"]["rows"] == [{"tag": "k2"}]


# ------------------------------------------------------------------------------------ sample suite

import math  # noqa: E402

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import sample_suite as ss  # noqa: E402

CUDA_ONLY_VARIANTS = ("compile+triton", "cuda-graphs", "triton+cuda-graphs")


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_sample")
    proc = _bench("--suite", "sample", "--quick", out=out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jsons, mds = sorted(out.glob("*.json")), sorted(out.glob("*.md"))
    assert len(jsons) == 1 and len(mds) == 1, sorted(p.name for p in out.iterdir())
    return proc, json.loads(jsons[0].read_text()), mds[0].read_text()


def test_quick_sample_suite_rows(sample_run):
    proc, doc, md = sample_run
    suite = doc["suites"]["sample"]
    assert suite["dtype"] == "fp32" and suite["quick"] is True
    assert suite["reduced"] is True and "--quick" in suite["reduced_reason"]
    # the suite's own repeat counts reach the file (run.py does not overwrite them)
    assert suite["repeats"] == 3 and suite["steps_per_call"] == 2 and "2 sampler steps" in suite["timer"]
    rows = {r["variant"]: r for r in suite["rows"]}
    assert set(rows) == set(ss.VARIANTS) and all(r["B"] == 2 for r in rows.values())
    for name in ("eager", "compile"):
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["step_ms_cfg"] > 0 and r["step_ms"] > 0 and r["estimate"] is True
        # 250 steps of linspace(1, 0.04, 250): t_i <= 0.7 from i = 78 on -> 172 guided, 78 not
        assert (r["steps"], r["guided_steps"], r["unguided_steps"], r["nfe_per_image"]) == (250, 172, 78, 422)
        batch_s = (172 * r["step_ms_cfg"] + 78 * r["step_ms"]) / 1e3
        assert r["sample_s_estimate"] == pytest.approx(batch_s, rel=1e-12)
        assert r["images_per_s_estimate"] == pytest.approx(2 / batch_s, rel=1e-12)
        batches = math.ceil(50_000 / 2)
        assert r["batches_50k"] == batches == 25_000
        assert r["wall_50k_s"]["1"] == pytest.approx(batches * batch_s, rel=1e-12)
        assert r["wall_50k_s"]["8"] == pytest.approx(math.ceil(batches / 8) * batch_s, rel=1e-12)
        assert r["wall_50k_h"]["8"] == pytest.approx(r["wall_50k_s"]["8"] / 3600)
        assert r["flops_per_image_forward"] == ss.velocity_flops_per_image(
            {"patch_size": 2, "in_channels": 4, "hidden_size": 64, "depth": 2, "input_size": 8, "mlp_ratio": 4.0})
        assert r["flops_per_image_sample"] == 422 * r["flops_per_image_forward"]
        assert r["TFLOP_per_s"] == pytest.approx(2 * r["flops_per_image_sample"] / batch_s / 1e12)
        assert r["mfu_pct"] == pytest.approx(100 * r["TFLOP_per_s"] / suite["matmul"]["TFLOP_per_s"])
        v = r["validate"]
        assert (v["num_steps"], v["guided_steps"], v["unguided_steps"]) == (3, 2, 1) and v["measured_s"] > 0
        assert v["estimated_s"] == pytest.approx((2 * r["step_ms_cfg"] + r["step_ms"]) / 1e3)
    assert rows["compile"]["compile"] == "default" and rows["compile"]["first_call_s"] > 0
    assert "dynamic=False" in rows["compile"]["impl"]  # as generate.py compiles (compile_velocity)
    assert all(r["cudagraph_skips"] is None for r in rows.values())  # only a timed CUDA-graph row counts them
    assert rows["compile"]["speedup_vs_eager"] == pytest.approx(
        rows["compile"]["images_per_s_estimate"] / rows["eager"]["images_per_s_estimate"])
    for name in CUDA_ONLY_VARIANTS:
        r = rows[name]
        assert r["status"] == "skipped" and r["step_ms"] is None and r["step_ms_cfg"] is None
        assert "needs CUDA" in r["reason"]
    for text in (proc.stdout, md):
        assert "| eager" in text and "| cuda-graphs" in text and "ESTIMATES" in text and "REDUCED SHAPES" in text


def test_suite_all_runs_every_suite(tmp_path):
    proc = _bench("--suite", "all", "--quick", "--ops", "layernorm_modulate", "--variants", "eager", out=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "not built yet" not in proc.stdout
    (jpath,) = tmp_path.glob("*.json")
    suites = json.loads(jpath.read_text())["suites"]
    assert set(suites) == {"kernels", "sample", "train", "data", "attention", "pde"}
    pde = {r["variant"]: r["status"] for r in suites["pde"]["rows"]}  # --variants names other suites' rows
    assert pde["encoder"] == pde["cached"] == pde["salient-sdpa"] == "ok"
    att = {r["backend"]: r for r in suites["attention"]["rows"]}
    assert att["auto"]["status"] == att["math"]["status"] == "ok" and att["auto"]["auto_is"]
    assert all("skipped_suites" not in suite for suite in suites.values())
    (row,) = suites["train"]["rows"]
    assert row["variant"] == "eager" and row["status"] == "ok" and row["steps_run"] > 1
    assert {r["op"] for r in suites["kernels"]["rows"]} == {"layernorm_modulate"}
    (row,) = suites["sample"]["rows"]
    assert row["variant"] == "eager" and row["status"] == "ok" and row["step_ms"] > 0


def test_sample_flop_model_matches_the_flop_counter():
    # the math attention backend runs as einsum/bmm, which the counter sees (CPU SDPA it does not)
    model, kw = ss.build("SiT-S/2", dict(ss.QUICK_OVERRIDES, attn_backend="math"), "torch", torch.device("cpu"))
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.randint(0, 1000, (3,))
    with FlopCounterMode(display=False) as counter:
        model.velocity(x, t, y)
    assert counter.get_total_flops() == 3 * ss.velocity_flops_per_image(kw)
    from fastrepa.models import model_kwargs
    xl = ss.velocity_flops_per_image(model_kwargs("SiT-XL/2"))
    assert xl == pytest.approx(2 * 118.6e9, rel=1e-3)  # the DiT paper's 118.6 G multiply-adds


def test_sample_protocol_counts_and_projection():
    assert ss.sampler_counts(250, 1.8, 0.0, 0.7) == (172, 78)
    assert ss.sampler_counts(3, 1.8, 0.0, 0.7) == (2, 1)       # t = 1, 0.52, 0.04
    assert ss.sampler_counts(4, 1.0, 0.0, 1.0) == (0, 4)       # no CFG at scale 1
    assert ss.projection_50k(10.0, 256) == {"1": 196 * 10.0, "8": 25 * 10.0}  # 50000/256 -> 196 batches
    with pytest.raises(common.BenchUsageError, match="unknown variant"):
        ss._parse_variants("eager,warp-drive")


def test_cudagraph_skips_count_graphs_run_without_cuda_graphs():
    """The counter a cuda-graphs row reports: here on the CPU, where nothing can be captured, each static-shape
    graph of compile_velocity (one for B, one for the CFG-doubled 2B) is one skip."""
    from torch._dynamo.utils import counters

    from fastrepa.generation import compile_velocity, cudagraph_skips

    class Scale(torch.nn.Module):
        def denoise(self, x, t, y):  # the backbone interface generate.py compiles
            return x * t[:, None, None, None] + y[:, None, None, None]

    torch._dynamo.reset()
    velocity = compile_velocity(Scale(), "reduce-overhead")
    before, graphs = cudagraph_skips(), counters["stats"]["unique_graphs"]
    for b in (2, 4, 2):
        x, t, y = torch.ones(b, 1, 2, 2), torch.full((b,), 0.5), torch.arange(b)
        torch.testing.assert_close(velocity(x, t, y), x * 0.5 + torch.arange(b).view(b, 1, 1, 1).float())
    assert cudagraph_skips() - before == 2 and counters["stats"]["unique_graphs"] - graphs == 2  # static shapes
    torch._dynamo.reset()
