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
    import fastrepa.train.loop as loop
    real = loop.repa_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        d, p = real(*a, **k)
        calls["n"] += 1
        return (d * float("nan"), p) if calls["n"] == 5 else (d, p)

    monkeypatch.setattr(loop, "repa_loss", poisoned)
    with pytest.raises(NonFiniteError, match="step 4"):
        train(cfg(tmp_path, data16, exp_name="nan"))
    # the checkpoint of step 3 is intact and is the newest one
    from fastrepa.train import checkpointing as C
    step, path = C.latest(str(tmp_path / "nan" / "checkpoints"))
    assert step == 3 and C.read_extra(path)["step"] == 3


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
