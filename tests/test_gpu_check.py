"""bench/gpu_check.sh, the one prepared GPU check: its dry run on the CPU writes the summary, the JSON and the
logs with every step reporting ran or skipped-with-reason, its GPU plan is valid for the bench as it is (every
variant, op, shape and flag), fits the time a GPU task gets, and its time limits kill a whole process group."""
import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check as gc  # noqa: E402

STEP_NAMES = ["setup", "kernel-tests", "train-b64-core", "train-b64-rest", "train-b64-family", "train-b32", "kernels",
              "attention", "pde", "sample", "torchrun", "sync-test"]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env["PYTHON"] = sys.executable
    return env


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    t = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - t
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 3, files  # the device tool returns at most 8 files: one summary, one JSON, one tarball
    doc = json.loads(next(out.glob("gpu-check-*-dry-run.json")).read_text())
    md = next(out.glob("gpu-check-*-dry-run.md")).read_text()
    return {"proc": proc, "doc": doc, "md": md, "out": out, "wall": wall}


def test_every_step_ran_or_says_why_not(dry):
    doc = dry["doc"]
    assert doc["schema"] == gc.SCHEMA and doc["dry_run"] is True
    steps = {s["name"]: s for s in doc["steps"]}
    assert [s["name"] for s in doc["steps"]] == STEP_NAMES == [s[0] for s in gc.STEPS]
    for s in doc["steps"]:
        assert s["status"] in ("ok", "skipped"), (s["name"], s["status"], s["reason"])
        assert s["commands"], s["name"]  # every step ran something real, even when its rows were skipped
        if s["status"] == "skipped":
            assert s["reason"], s["name"]
        assert all(c["rc"] == 0 and not c["timed_out"] and c["wall_s"] is not None for c in s["commands"]
                   if not c["log"].startswith("setup-1-where")), s["commands"]
    assert steps["sync-test"]["status"] == "skipped" and "needs CUDA" in steps["sync-test"]["reason"]
    assert steps["kernel-tests"]["results"]["passed"] >= 1 and steps["kernel-tests"]["results"]["failed"] == 0
    env = doc["env"]
    assert env["torch"] == torch.__version__ and env["cuda_available"] is False
    assert Path(env["kernels_file"]).is_relative_to(ROOT) and doc["install"]["method"]
    # every optional package is listed present or absent, and an absent one says what that costs
    assert set(env["optional"]) == set(gc.OPTIONAL)
    for name, there in env["optional"].items():
        assert there or env["optional_missing"][name]["effect"]


def test_bench_steps_hold_the_suites_rows(dry):
    steps = {s["name"]: s for s in dry["doc"]["steps"]}
    core = {r["variant"]: r for r in steps["train-b64-core"]["bench"]["rows"]}
    assert set(core) == {"official", "compile+triton", "sra-eager", "sra"}
    assert core["official"]["status"] == "ok" and core["official"]["step_ms"] > 0
    assert core["compile+triton"]["status"] == "skipped" and "needs CUDA" in core["compile+triton"]["reason"]
    assert core["sra-eager"]["status"] == "ok" and core["sra"]["status"] == "skipped"  # SRA's plumbing ran
    rest = {r["variant"]: r for r in steps["train-b64-rest"]["bench"]["rows"]}
    assert {v: r["status"] for v, r in rest.items() if v != "eager+fused-adamw"} == {  # iREPA's and ERW's plumbing
        "irepa": "skipped", "irepa-eager": "ok", "erw-warmup": "skipped", "erw-warmup-eager": "ok"}
    family = {r["variant"]: r for r in steps["train-b64-family"]["bench"]["rows"]}  # HASTE's and REG's plumbing
    assert {v: r["status"] for v, r in family.items()} == {
        "haste": "skipped", "haste-eager": "ok", "haste-after-stop": "skipped", "haste-after-stop-eager": "ok",
        "reg": "skipped", "reg-eager": "ok"}
    b32 = {r["variant"]: r for r in steps["train-b32"]["bench"]["rows"]}
    assert "compile" in steps["train-b32"]["dry_run_changes"]  # left out on the CPU, and it says so
    assert b32["eager+fused-adamw"]["speedup_vs_official"] == pytest.approx(
        b32["eager+fused-adamw"]["images_per_s"] / b32["official"]["images_per_s"])
    kern = steps["kernels"]["bench"]
    assert kern["ops"] == gc.KERNEL_OPS and kern["modes"] == ["fwd+bwd"]
    assert {r["impl"]: r["status"] for r in kern["rows"]} == {"eager": "ok", "triton": "skipped"}
    att = {r["backend"]: r for r in steps["attention"]["bench"]["rows"]}
    assert att["math"]["status"] == att["auto"]["status"] == "ok" and att["auto"]["auto_is"]  # what auto ran
    assert att["flash_attn"]["status"] == "skipped" and att["auto"]["max_abs_err"] < 1e-5
    pde = {r["variant"]: r for r in steps["pde"]["bench"]["rows"]}
    assert pde["encoder"]["status"] == pde["cached"]["status"] == pde["salient-sdpa"]["status"] == "ok"
    assert pde["cached"]["first_loss"] == pytest.approx(pde["encoder"]["first_loss"], rel=1e-6)
    assert gc.pde_args(dry=False)[0][-1].split(",") == [v for v in pde if "compile" not in v]
    sample = {r["variant"]: r for r in steps["sample"]["bench"]["rows"]}
    assert sample["eager"]["status"] == "ok" and sample["cuda-graphs"]["status"] == "skipped"
    runs = steps["torchrun"]["results"]["runs"]
    assert [r["rc"] for r in runs] == [0, 0]
    assert {"step-000000001", "step-000000002"} <= set(runs[0]["dcp_checkpoints"])
    assert "step 2" in runs[1]["resumed"] and runs[1]["metrics"][-1]["step"] == 3


def test_summary_has_every_section(dry):
    md = dry["md"]
    assert md.startswith("# fastrepa GPU check: ") and "DRY RUN" in md
    for section in ("## Steps", "## Train step:", "## Kernels:", "## Attention:", "## PDE (FourierFlow)", "## Sampling:",
                    "## torchrun train.py",
                    "host-sync test", "versions: torch " + torch.__version__, "install: "):
        assert section in md, section
    for name in STEP_NAMES:
        assert f"| {name} " in md
    # the console ends with the summary too: the device tool returns the last 12,000 characters
    assert "## Steps" in dry["proc"].stdout[-12000:]


def test_logs_tarball_has_every_step(dry):
    tar_path = next(dry["out"].glob("*-logs.tar.gz"))
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
    for step in dry["doc"]["steps"]:
        for cmd in step["commands"]:
            assert any(n.endswith("/logs/" + cmd["log"]) for n in names), cmd["log"]
    assert any(n.endswith("junit/kernel-tests.xml") for n in names)


def test_the_gpu_plan_is_valid_for_the_bench_and_fits_the_time():
    """What the dry run cannot run (the CUDA command lines) is checked against the bench's own parser and
    registries, so a renamed variant, op, shape or flag fails here, not on the GPU."""
    import attention_suite
    import run as bench_run
    import kernels_suite
    import sample_suite
    import train_suite

    parser = bench_run.build_parser()
    for name in gc.TRAIN_VARIANTS:
        args = parser.parse_args(["--suite", "train", *gc.train_args(name, dry=False)[0]])
        assert train_suite.check_args(args) == gc.TRAIN_VARIANTS[name][1]
        assert args.model == train_suite.CUDA_MODEL and args.enc_type == train_suite.CUDA_ENCODER
    all_b = sorted({b for b, _ in gc.TRAIN_VARIANTS.values()})
    assert all_b == train_suite.CUDA_BATCH_SIZES
    # every variant but the CPU stand-ins (eager; the methods' -eager twins, which the dry run runs instead)
    assert set(gc.METHOD_TWINS) == {v for v in train_suite.VARIANTS if v.endswith("-eager") and v != "eager"}
    assert {v for _, vs in gc.TRAIN_VARIANTS.values() for v in vs} == set(train_suite.VARIANTS) - {"eager",
                                                                                                  *gc.METHOD_TWINS}
    args = parser.parse_args(["--suite", "kernels", *gc.kernels_args(dry=False)[0]])
    names, (shapes, modes, impls) = kernels_suite.check_args(args)
    assert set(names) == set(kernels_suite.OPS) and shapes == ["SiT-XL/2"] and modes == ["fwd+bwd"]
    assert impls == list(kernels_suite.IMPLS) and args.batch_sizes == kernels_suite.CUDA_BATCH_SIZES
    args = parser.parse_args(["--suite", "attention", *gc.attention_args(dry=False)[0]])
    assert args.batch_sizes == attention_suite.CUDA_BATCH_SIZES
    args = parser.parse_args(["--suite", "sample", *gc.sample_args(dry=False)[0]])
    assert sample_suite.check_args(args) == ["compile", "cuda-graphs"] and args.batch_sizes == [256]
    for dry_args in ([gc.train_args(n, True)[0] for n in gc.TRAIN_VARIANTS], [gc.kernels_args(True)[0]],
                     [gc.sample_args(True)[0]]):
        for a in dry_args:
            parser.parse_args(a)
    test_file, test_name = gc.SYNC_TEST.split("::")
    assert f"def {test_name}(" in (ROOT / test_file).read_text()
    # 15 minutes of device time: the machine's start (1-2 min) + this run + margin; 8.5 minutes at most
    assert sum(b for _, _, b, _ in gc.STEPS) <= gc.DEFAULT_BUDGET <= 510


def test_a_step_with_too_little_time_left_is_skipped_with_a_reason(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--budget", "1",
                           "--steps", "kernels", "--out", str(tmp_path)], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    steps = {s["name"]: s for s in doc["steps"]}
    assert list(steps) == ["setup", "kernels"], proc.stdout[-2000:]
    assert steps["kernels"]["status"] == "skipped" and "out of time" in steps["kernels"]["reason"]
    assert "out of time" in next(tmp_path.glob("*.md")).read_text()


def test_a_time_limit_kills_the_whole_process_group(tmp_path):
    """A step that hangs (here: a child that started a grandchild, then sleeps) is cut at its limit, with
    its grandchildren (torchrun's workers, inductor's compile workers), and the run goes on."""
    args = argparse.Namespace(dry_run=True, python=sys.executable, out=str(tmp_path),
                                                      work_dir=str(tmp_path / "work"), budget=60)
    c = gc.Check(args)
    step = {"name": "hang", "commands": []}
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print('grandchild', p.pid, flush=True); time.sleep(60)")
    t = time.monotonic()
    rec, text = c.run(step, [sys.executable, "-c", code], timeout=2)
    assert rec["timed_out"] and time.monotonic() - t < 20
    pid = int(text.split("grandchild")[1].split()[0])
    for _ in range(50):  # the grandchild was killed with its group (its parent, init, reaps it)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {pid} survived the step's time limit")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the GPU check's setup step on a real device")
def test_setup_on_a_gpu_records_the_device(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--steps", "setup", "--out", str(tmp_path)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert doc["steps"][0]["status"] == "ok" and doc["env"]["cuda_available"]
    assert doc["env"]["bench_env"]["gpu_model"] and doc["nvidia_smi"].get("csv")
