"""bench/run.py --suite train --quick on the CPU: every variant's row is a real timed step of the trainer's
step function, with FLOPs, speedups and the first-step loss checked against what they are computed from."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import train_suite as ts  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_train")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OMP_WAIT_POLICY")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--suite", "train", "--quick",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(next(out.glob("*.json")).read_text())
    return proc, doc["suites"]["train"], next(out.glob("*.md")).read_text()


def test_quick_train_suite_rows(quick):
    import torch

    from fastrepa.models import build_model
    from fastrepa.train.flops import encoder_dims, train_flops_per_image
    _, suite, md = quick
    assert suite["reduced"] and "--quick" in suite["reduced_reason"] and suite["omp_wait_policy"] == "PASSIVE"
    rows = {r["variant"]: r for r in suite["rows"]}
    assert set(rows) == set(ts.VARIANTS)
    with torch.device("meta"):
        model = build_model("SiT-S/2", z_dims=[encoder_dims(ts.QUICK_ENCODER, ts.QUICK_RESOLUTION, 4)[0]],
                            **ts.QUICK_OVERRIDES)
    flops = train_flops_per_image(model, [ts.QUICK_ENCODER], ts.QUICK_RESOLUTION)
    for name in ("eager", "eager+fused-adamw", "compile"):
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["steps_run"] == 1 + r["warmup"] + r["repeats"]  # every timed call was a real step
        assert r["flops_per_image"] == flops and r["step_ms"] > 0
        assert r["images_per_s"] == pytest.approx(2 / (r["step_ms"] * 1e-3))
        assert r["TFLOP_per_s"] == pytest.approx(2 * flops / (r["step_ms"] * 1e-3) / 1e12)
        assert r["mfu"] is None and r["peak_tflops"] is None  # no data-sheet peak for a CPU
    e = rows["eager"]
    # the optimizer does not touch the first loss: same weights, same inputs, the same number
    assert rows["eager+fused-adamw"]["first_loss"] == e["first_loss"]
    assert rows["compile"]["loss_rel_diff_vs_eager"] < 1e-4
    assert rows["compile"]["speedup_vs_eager"] == pytest.approx(rows["compile"]["images_per_s"] / e["images_per_s"])
    assert rows["compile+triton"]["status"] == "skipped" and "needs CUDA" in rows["compile+triton"]["reason"]
    # SRA: no encoder; 3 x (SiT forward + ap_head) + the teacher's forward up to its block (1, 2 of depth 2)
    with torch.device("meta"):
        sra_model = build_model("SiT-S/2", z_dims=[], ap_head=True, **ts.QUICK_OVERRIDES)
    r = rows["sra-eager"]
    assert r["status"] == "ok" and r["method"] == "sra" and r["encoder"] is None and r["sra_blocks"] == [1, 2]
    assert r["flops_per_image"] == 3 * (sra_model.forward_flops() + sra_model.head_flops()) + \
        sra_model.forward_flops(2)
    assert r["steps_run"] == 1 + r["warmup"] + r["repeats"]
    assert r["speedup_vs_repa"] == pytest.approx(r["images_per_s"] / rows["eager+fused-adamw"]["images_per_s"])
    assert r["first_loss"] != e["first_loss"]  # another method's loss, not a REPA row relabelled
    assert rows["sra"]["status"] == "skipped" and rows["sra"]["method"] == "sra"
    # ERW's warmup step: the encoder, blocks 1..l2r-depth (1 of 2 here) and the projector, nothing after
    r = rows["erw-warmup-eager"]
    assert r["status"] == "ok" and r["method"] == "erw-warmup" and r["l2r_depth"] == 1
    from fastrepa.train.flops import encoder_flops
    proj = sum(2 * 16 * m.in_features * m.out_features for m in model.projectors[0] if isinstance(m, torch.nn.Linear))
    assert r["flops_per_image"] == 3 * (model.forward_flops(1) + proj) + encoder_flops(
        [ts.QUICK_ENCODER], ts.QUICK_RESOLUTION, 4)
    assert r["flops_per_image"] < flops and r["steps_run"] == 1 + r["warmup"] + r["repeats"]
    assert r["speedup_vs_repa"] == pytest.approx(r["images_per_s"] / rows["eager+fused-adamw"]["images_per_s"])
    assert rows["erw-warmup"]["status"] == "skipped"
    # iREPA: REPA's FLOPs with a 3x3 conv projector instead of the MLP
    r = rows["irepa-eager"]
    with torch.device("meta"):
        conv_model = build_model("SiT-S/2", z_dims=[encoder_dims(ts.QUICK_ENCODER, ts.QUICK_RESOLUTION, 4)[0]],
                                 projector_type="conv", **ts.QUICK_OVERRIDES)
    assert r["status"] == "ok" and r["method"] == "irepa"
    assert r["flops_per_image"] == train_flops_per_image(conv_model, [ts.QUICK_ENCODER], ts.QUICK_RESOLUTION)
    assert r["flops_per_image"] != flops and r["first_loss"] != e["first_loss"]
    assert "## suite `train`" in md and "eager+fused-adamw" in md


def test_train_suite_usage_errors():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--suite", "train", "--variants",
                           "fast"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "the train suite knows: eager" in proc.stderr
