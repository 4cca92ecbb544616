"""The single-process trainer and generate.py on the embedded synthetic data."""
import json
import os

import numpy as np
import pytest
import torch

import generate as generate_cli
from fastrepa.checkpoint import load_checkpoint_file
from fastrepa.config import PRESETS, from_flat
from fastrepa.data.synthetic import write_dataset
from fastrepa.train import NonFiniteError, train

TINY_RUN = dict(PRESETS["demo"], hidden_size=32, depth=2, num_heads=2, encoder_depth=1, projector_dim=32,
                input_size=16, resolution=16, batch_size=16, learning_rate=2e-3, max_train_steps=6,
                checkpointing_steps=3, sampling_steps=6, log_every=1, sample_num_steps=4, ema_decay=0.9)


@pytest.fixture(scope="module")
def data16(tmp_path_factory):
    from fastrepa.data import synthetic
    root = str(tmp_path_factory.mktemp("d16"))
    return synthetic.write_dataset(root, num_images=64, seed=0, size=16)


def cfg(tmp_path, data_dir, **kw):
    return from_flat({**TINY_RUN, "data_dir": data_dir, "output_dir": str(tmp_path), **kw})


def losses(exp_dir):
    with open(os.path.join(exp_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_demo_run_reduces_loss_and_writes_outputs(tmp_path, data16):
    report = train(cfg(tmp_path, data16, max_train_steps=60, log_every=10, checkpointing_steps=60,
                       sampling_steps=60))
    assert report["last_loss"] < 0.85 * report["first_loss"]  # denoising loss: 1.40 -> 1.04 here
    assert report["last_proj_loss"] < report["first_proj_loss"]
    assert os.path.isfile(report["sample_grid"]) and os.path.isfile(report["checkpoint"])
    ck = load_checkpoint_file(report["checkpoint"])
    assert set(ck) == {"model", "ema", "opt", "args", "steps"} and ck["steps"] == 60
    assert isinstance(ck["args"], dict) and ck["args"]["hidden_size"] == 32
    assert os.path.isfile(os.path.join(report["exp_dir"], "report.md"))


def test_resume_step_continues_exactly(tmp_path, data16):
    full = train(cfg(tmp_path / "a", data16, exp_name="run"))
    half = cfg(tmp_path / "b", data16, exp_name="run", max_train_steps=3)
    train(half)
    resumed = train(cfg(tmp_path / "b", data16, exp_name="run", resume_step=3))
    assert losses(full["exp_dir"]) == losses(resumed["exp_dir"])
    a = load_checkpoint_file(full["checkpoint"])
    b = load_checkpoint_file(resumed["checkpoint"])
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)


def test_non_finite_loss_stops_before_the_update(tmp_path, data16, monkeypatch):
    """A NaN at step 4 stops the run before the update and checkpoints the good weights of step 4 (the
    step-3 checkpoint stays); a fixed rerun resumes there and ends bit-identical to an uninterrupted run."""
    from fastrepa.train import checkpointing as C
    from fastrepa.train.step import TEST_NAN_ENV
    full = train(cfg(tmp_path / "full", data16, exp_name="nan"))
    monkeypatch.setenv(TEST_NAN_ENV, "4")
    with pytest.raises(NonFiniteError, match="step 4: .* not finite; the weights were not updated"):
        train(cfg(tmp_path, data16, exp_name="nan"))
    ckpts = str(tmp_path / "nan" / "checkpoints")
    assert [s for s, _ in C.list_complete(ckpts)] == [3, 4]
    assert len(losses(str(tmp_path / "nan"))) == 4
    monkeypatch.delenv(TEST_NAN_ENV)
    rerun = train(cfg(tmp_path, data16, exp_name="nan"))
    assert rerun["resumed_from"] == 4
    assert losses(str(tmp_path / "nan")) == losses(full["exp_dir"])
    a, b = load_checkpoint_file(full["checkpoint"]), load_checkpoint_file(rerun["checkpoint"])
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)


def test_non_finite_skip_leaves_weights_and_counts(tmp_path, data16, monkeypatch):
    """--on-nonfinite skip: the poisoned step changes nothing (weights, EMA, optimizer state) and is counted."""
    from fastrepa.train import checkpointing as C
    from fastrepa.train.step import TEST_NAN_ENV
    ref = train(cfg(tmp_path / "ref", data16, exp_name="s", max_train_steps=4, checkpointing_steps=4))
    monkeypatch.setenv(TEST_NAN_ENV, "4")
    rep = train(cfg(tmp_path, data16, exp_name="s", max_train_steps=5, checkpointing_steps=4, on_nonfinite="skip"))
    assert rep["nonfinite_skipped"] == 1 and rep["steps"] == 5
    rows = [json.loads(line) for line in open(tmp_path / "s" / "metrics.jsonl")]
    assert rows[4]["skipped"] == 1 and rows[4]["loss"] is None
    assert [r["loss"] for r in rows[:4]] == losses(ref["exp_dir"])
    a, b = load_checkpoint_file(ref["checkpoint"]), load_checkpoint_file(rep["checkpoint"])
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for pid, state in a["opt"]["state"].items():  # AdamW moments and step counts untouched too
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["opt"]["state"][pid][name])), (pid, name)
    assert C.read_extra(C.latest(str(tmp_path / "s" / "checkpoints"))[1])["nonfinite_skipped"] == 1


def test_data_that_does_not_fit_the_model_fails_early(tmp_path, data16):
    with pytest.raises(ValueError, match=r"moments \[6, 32, 32\]"):
        train(cfg(tmp_path, data16, input_size=32, resolution=32))


@pytest.mark.parametrize("mode", ["ode", "sde"])
def test_generate_writes_npz_and_pngs(tmp_path, data16, mode):
    report = train(cfg(tmp_path, data16, exp_name="g", max_train_steps=3))
    out = tmp_path / "samples"
    common = ["--png", "--ckpt", report["checkpoint"], "--num-fid-samples", "5", "--mode", mode, "--num-steps", "3",
              "--cfg-scale", "2.0"]
    assert generate_cli.main(common + ["--sample-dir", str(out), "--per-proc-batch-size", "2"]) == 0
    npz = [p for p in out.iterdir() if p.suffix == ".npz"]
    arr = np.load(npz[0])["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (5, 16, 16, 3)
    folder = out / npz[0].stem
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:06d}.png" for i in range(5)]
    if mode == "ode":
        # sample i does not depend on the batch it falls in
        assert generate_cli.main(common + ["--sample-dir", str(tmp_path / "s2"), "--per-proc-batch-size", "5"]) == 0
        arr2 = np.load(next((tmp_path / "s2").glob("*.npz")))["arr_0"]
        np.testing.assert_array_equal(arr, arr2)


def test_generate_rejects_bad_flags(tmp_path, capsys):
    with pytest.raises(SystemExit):
        generate_cli.main(["--ckpt", str(tmp_path / "missing.pt")])
    assert "missing.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate_cli.main(["--ckpt", "x", "--mode", "sde", "--num-steps", "1"])
    assert "--num-steps" in capsys.readouterr().err


def test_generate_from_an_official_legacy_file(tmp_path, capsys):
    """Namespace args, legacy decoder_blocks keys, no 'vae' in args: the SD-VAE default is refused clearly."""
    import argparse

    from conftest import TINY, tiny_model
    m = tiny_model(in_channels=3)
    sd = {}
    for k, v in m.state_dict().items():
        parts = k.split(".")
        if parts[0] == "blocks" and int(parts[1]) >= TINY["encoder_depth"]:
            k = ".".join(["decoder_blocks", str(int(parts[1]) - TINY["encoder_depth"])] + parts[2:])
        sd[k] = v
    args = argparse.Namespace(model="SiT-S/2", resolution=64, encoder_depth=2, qk_norm=False, num_classes=10,
                              hidden_size=64, depth=4, num_heads=4, in_channels=3)
    path = tmp_path / "0400000.pt"
    torch.save({"model": sd, "ema": sd, "opt": {}, "args": args, "steps": 400000}, path)
    base = ["--ckpt", str(path), "--sample-dir", str(tmp_path / "s"), "--num-fid-samples", "2", "--num-steps", "2"]
    with pytest.raises(SystemExit):
        generate_cli.main(base)
    assert "SD-VAE" in capsys.readouterr().err
    assert generate_cli.main(base + ["--vae", "identity", "--no-png"]) == 0
    arr = np.load(next((tmp_path / "s").glob("*.npz")))["arr_0"]
    assert arr.shape == (2, 8, 8, 3) and arr.dtype == np.uint8


def test_kernels_triton_without_cuda_fails_before_any_work(tmp_path, data16, monkeypatch):
    """--kernels triton on a CPU-only run: a clear error naming the flag, nothing written."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --kernels triton is valid here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="--kernels triton needs a CUDA GPU"):
        train(cfg(tmp_path, data16, kernels="triton"))
    assert not (tmp_path / TINY_RUN["exp_name"]).exists()


def test_trains_with_triton_kernels_interpreted(tmp_path, data16):
    """The whole trainer on the Triton path (interpreted here) equals the PyTorch path step for step."""
    if torch.cuda.is_available():
        pytest.skip("the interpreted comparison is the CPU's; on CUDA the kernel tests run compiled")
    runs = {}
    for kernels in ("triton", "torch"):
        out = tmp_path / kernels
        train(cfg(out, data16, kernels=kernels, max_train_steps=3, checkpointing_steps=3, sampling_steps=3))
        runs[kernels] = losses(str(out / TINY_RUN["exp_name"]))
    np.testing.assert_allclose(runs["triton"], runs["torch"], rtol=1e-4)


def test_packed_data_trains_exactly_like_the_folder(tmp_path, data16):
    """The same run on the official folder, on its raw pack (torch loader) and, where DALI is installed, on
    the pack through DALI's CPU pipeline: the same batches, so bit-identical losses."""
    import importlib.util

    from fastrepa.data.pack import pack
    packed = str(tmp_path / "packed")
    pack(data16, packed, "raw", progress=False)
    loaders = ["torch"] + (["dali"] if importlib.util.find_spec("nvidia.dali") else [])
    ref = train(cfg(tmp_path / "folder", data16, max_train_steps=3, checkpointing_steps=3, sampling_steps=3))
    assert ref["data_loader"] == "torch"
    for loader in loaders:
        rep = train(cfg(tmp_path / loader, packed, max_train_steps=3, checkpointing_steps=3, sampling_steps=3,
                        data_loader=loader))
        assert rep["data_loader"] == loader
        assert losses(rep["exp_dir"]) == losses(ref["exp_dir"]), loader
    with pytest.raises(ValueError, match="--data-loader dali reads packed datasets only"):
        train(cfg(tmp_path / "bad", data16, data_loader="dali"))
