"""The learning-rate schedule, the metrics sinks (TensorBoard, W&B), MFU / peak memory in the metrics."""
import json
import math
import sys
import types

import pytest
import torch

from fastrepa.config import ConfigError
from fastrepa.train import train
from fastrepa.train.flops import PEAK_BF16_TFLOPS, peak_tflops, train_flops_per_image
from fastrepa.train.schedule import lr_at
from fastrepa.train.sinks import SinkError, check_report_to, open_sinks
from faults import sigterm_at_step
from test_train import cfg, data16  # noqa: F401 (data16 is a fixture)


def test_lr_schedule_values():
    assert [lr_at(s, 1e-4) for s in (0, 10, 10**6)] == [1e-4] * 3  # official REPA: constant
    assert [lr_at(s, 1.0, "constant", 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    # cosine after a 2-step warmup over 10 steps: base at step 2, half at the midpoint, 0 at the end
    assert lr_at(2, 1.0, "cosine", 2, 10) == 1.0
    assert math.isclose(lr_at(6, 1.0, "cosine", 2, 10), 0.5, abs_tol=1e-12)
    assert math.isclose(lr_at(10, 1.0, "cosine", 2, 10), 0.0, abs_tol=1e-12)
    with pytest.raises(ValueError, match="--lr-schedule='linear'"):
        lr_at(0, 1.0, "linear")


def test_lr_flags_are_checked(tmp_path, data16):  # noqa: F811
    with pytest.raises(ConfigError, match="--lr-warmup-steps=-1"):
        cfg(tmp_path, data16, lr_warmup_steps=-1)
    with pytest.raises(ConfigError, match="--on-nonfinite='ignore'"):
        cfg(tmp_path, data16, on_nonfinite="ignore")


def test_warmup_sets_the_rate_of_every_step(tmp_path, data16):  # noqa: F811
    train(cfg(tmp_path, data16, lr_warmup_steps=4, lr_schedule="cosine", max_train_steps=6, report_to="none"))
    rows = [json.loads(line) for line in open(tmp_path / "demo" / "metrics.jsonl")]
    want = [lr_at(s, 2e-3, "cosine", 4, 6) for s in range(6)]
    assert [r["lr"] for r in rows] == pytest.approx(want, rel=1e-12)
    assert rows[0]["lr"] == pytest.approx(5e-4) and rows[3]["lr"] == pytest.approx(2e-3)


def test_metrics_rows_carry_peak_memory_and_mfu(tmp_path, data16):  # noqa: F811
    # the CPU has no known peak: MFU comes from --peak-tflops
    report = train(cfg(tmp_path, data16, peak_tflops=0.001, max_train_steps=3, report_to="none"))
    rows = [json.loads(line) for line in open(tmp_path / "demo" / "metrics.jsonl")]
    flops = report["train_flop_per_image"]
    for r in rows:
        assert r["peak_mem_gib"] > 0.05  # this process's resident set
        assert r["mfu"] == pytest.approx(r["images_per_s"] * flops / 1e9, rel=1e-3)
    assert report["mfu"] > 0 and report["peak_tflops_per_device"] == 0.001


def test_flops_per_image_matches_the_dry_run_count():
    from fastrepa.config import from_flat
    from fastrepa.models import build_model
    from fastrepa.train.flops import counts
    c = from_flat({"exp_name": "x", "model": "SiT-XL/2", "enc_type": "dinov2-vit-b"})
    with torch.device("meta"):
        model = build_model("SiT-XL/2", z_dims=[768], **c.model_overrides())
    assert round(train_flops_per_image(model, ["dinov2-vit-b"], 256) / 1e9, 3) == counts(c)["train_gflop_per_image"]
    # REPA's spelling of the register variant counts like ours
    reg = train_flops_per_image(model, ["dinov2-vit-b-reg"], 256)
    assert train_flops_per_image(model, ["dinov2reg-vit-b"], 256) == reg > 0


def test_peak_table():
    assert peak_tflops(torch.device("cpu")) is None and peak_tflops(torch.device("cpu"), 5.0) == 5.0
    names = [k for k, _ in PEAK_BF16_TFLOPS]
    # a name that contains another must come first (H100 PCIe before H100, L40S before L40 before L4)
    for i, a in enumerate(names):
        assert not any(a in b for b in names[i + 1:] if b != a), a


def test_tensorboard_sink_writes_readable_scalars(tmp_path, data16):  # noqa: F811
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -e .[dev])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    report = train(cfg(tmp_path, data16, max_train_steps=3))  # --report-to auto: TensorBoard when installed
    assert report["metrics_sinks"] == ["TensorBoardSink"]
    acc = EventAccumulator(str(tmp_path / "demo" / "tensorboard"))
    acc.Reload()
    rows = [json.loads(line) for line in open(tmp_path / "demo" / "metrics.jsonl")]
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == [1, 2, 3]
    assert [e.value for e in events] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert {"train/proj_loss", "train/lr", "train/images_per_s", "train/peak_mem_gib"} <= set(acc.Tags()["scalars"])


def test_wandb_sink_logs_rows_and_keeps_one_run_id(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", step, data))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.__spec__ = types.SimpleNamespace(name="wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr("fastrepa.train.sinks._installed", lambda m: m == "wandb")
    for _ in range(2):  # a resumed run continues the same W&B run
        sinks = open_sinks("wandb", str(tmp_path), {"model": "SiT-B/2"}, "exp", "REPA")
        sinks.log({"step": 7, "loss": 0.5, "mfu": None, "lr": 1e-4})
        sinks.close()
    inits = [c[1] for c in calls if c[0] == "init"]
    assert inits[0]["id"] == inits[1]["id"] and inits[0]["project"] == "REPA" and inits[0]["resume"] == "allow"
    assert inits[0]["config"] == {"model": "SiT-B/2"} and inits[0]["name"] == "exp"
    assert ("log", 7, {"loss": 0.5, "lr": 1e-4}) in calls  # None values are not logged


def test_missing_sink_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("fastrepa.train.sinks._installed", lambda m: False)
    with pytest.raises(SinkError, match="pip install wandb"):
        check_report_to("wandb")
    with pytest.raises(SinkError, match="pip install tensorboard"):
        check_report_to("tensorboard")
    check_report_to("auto")  # auto just writes no events
    assert open_sinks("auto", "/nonexistent", {}, "x").names == []


def test_metrics_windows_survive_a_resume_between_logged_steps(tmp_path, data16, monkeypatch, capsys):  # noqa: F811
    """--log-every 4 and a SIGTERM after step 3 (between two logged steps): the checkpoint carries the open
    window, so the resumed run logs the same averages, bit for bit, as the uninterrupted one; every logged
    row is also a line on stdout."""
    from fastrepa.train import dcp
    kw = dict(exp_name="w", max_train_steps=8, log_every=4, checkpointing_steps=100, sampling_steps=100,
              report_to="none")
    full = train(cfg(tmp_path / "full", data16, **kw))
    want = [json.loads(line) for line in open(tmp_path / "full" / "w" / "metrics.jsonl")]
    assert [r["step"] for r in want] == [4, 8] and [r["images"] for r in want] == [64, 128]
    out = capsys.readouterr().out
    assert f"step 4 | images 64 | loss {want[0]['loss']:.4f} | proj_loss {want[0]['proj_loss']:.4f}" in out
    with pytest.MonkeyPatch.context() as mp:
        sigterm_at_step(mp.setattr, 2)  # the signal arrives during step 3 (0-based 2)
        first = train(cfg(tmp_path / "cut", data16, **kw))
    assert first["stopped_by"] == "SIGTERM" and first["steps"] == 3
    state = dcp.read_extra(dcp.latest(str(tmp_path / "cut" / "w" / "checkpoints"))[1])
    assert state["images"] == 48 and state["batch_size"] == 16 and state["metrics_window"]["n"] == 3
    assert state["data"] == {"epoch": 0, "batch_in_epoch": 3}
    rerun = train(cfg(tmp_path / "cut", data16, **kw))
    assert rerun["resumed_from"] == 3
    got = [json.loads(line) for line in open(tmp_path / "cut" / "w" / "metrics.jsonl")]
    for key in ("step", "images", "loss", "proj_loss", "grad_norm", "lr", "skipped"):
        assert [r[key] for r in got] == [r[key] for r in want], key
    assert full["last_loss"] == want[-1]["loss"]
