"""The single-process trainer and generate.py on the embedded synthetic data."""
import json
import os

import numpy as np
import pytest
import torch

import generate as generate_cli
from fastrepa.official_ckpt import load_checkpoint_file
from fastrepa.config import PRESETS, from_flat
from fastrepa.data.synthetic import write_dataset
from fastrepa.train import NonFiniteError, train
from faults import nan_loss_at

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


def assert_same_run(full: dict, resumed: dict, terms, steps: int = 6) -> dict:
    """Two train() reports of the same run (one uninterrupted, one resumed): every metrics row of `terms`
    and the final model and EMA weights equal bit for bit. Returns the full run's final checkpoint."""
    for key in terms:
        rows = [[json.loads(line)[key] for line in open(os.path.join(r["exp_dir"], "metrics.jsonl"))]
                for r in (full, resumed)]
        assert rows[0] == rows[1] and len(rows[0]) == steps, key
    a, b = load_checkpoint_file(full["checkpoint"]), load_checkpoint_file(resumed["checkpoint"])
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    return a


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


def test_gradient_accumulation_trains_like_one_batch(tmp_path, data16):
    """--gradient-accumulation-steps 4: the same samples and draws, so the same losses, grad norms and
    weights as one batch, up to float round-off."""
    one = train(cfg(tmp_path / "one", data16, max_train_steps=3))
    four = train(cfg(tmp_path / "four", data16, max_train_steps=3, gradient_accumulation_steps=4))
    rows = [[json.loads(line) for line in open(os.path.join(r["exp_dir"], "metrics.jsonl"))] for r in (one, four)]
    for key in ("loss", "proj_loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in rows[1]], [r[key] for r in rows[0]], rtol=1e-5, atol=1e-7)
    a, b = load_checkpoint_file(one["checkpoint"]), load_checkpoint_file(four["checkpoint"])
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-6)


def test_non_finite_loss_stops_before_the_update(tmp_path, data16, monkeypatch):
    """A NaN at step 4 stops the run before the update and checkpoints the good weights of step 4 (the
    step-3 checkpoint stays); a fixed rerun resumes there and ends bit-identical to an uninterrupted run."""
    from fastrepa.train import dcp
    full = train(cfg(tmp_path / "full", data16, exp_name="nan"))
    with pytest.MonkeyPatch.context() as mp:
        nan_loss_at(mp.setattr, 4)
        with pytest.raises(NonFiniteError, match="step 4: .* not finite; the weights were not updated"):
            train(cfg(tmp_path, data16, exp_name="nan"))
    ckpts = str(tmp_path / "nan" / "checkpoints")
    assert [s for s, _ in dcp.list_complete(ckpts)] == [3, 4]
    assert len(losses(str(tmp_path / "nan"))) == 4
    # the step-4 checkpoint holds exactly the weights of a clean run that stopped after 4 steps
    from fastrepa.train import export
    assert export.main([str(tmp_path / "nan"), "--step", "4", "--pt", str(tmp_path / "at4.pt"), "--only", "pt"]) == 0
    clean = train(cfg(tmp_path / "clean", data16, exp_name="nan", max_train_steps=4))
    a, b = load_checkpoint_file(clean["checkpoint"]), load_checkpoint_file(str(tmp_path / "at4.pt"))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    rerun = train(cfg(tmp_path, data16, exp_name="nan"))
    assert rerun["resumed_from"] == 4
    assert losses(str(tmp_path / "nan")) == losses(full["exp_dir"])
    a, b = load_checkpoint_file(full["checkpoint"]), load_checkpoint_file(rerun["checkpoint"])
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)


def test_non_finite_skip_leaves_weights_and_counts(tmp_path, data16, monkeypatch):
    """--on-nonfinite skip: the poisoned step changes nothing (weights, EMA, optimizer state) and is counted."""
    from fastrepa.train import dcp
    ref = train(cfg(tmp_path / "ref", data16, exp_name="s", max_train_steps=4, checkpointing_steps=4))
    nan_loss_at(monkeypatch.setattr, 4)
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
    assert dcp.read_extra(dcp.latest(str(tmp_path / "s" / "checkpoints"))[1])["nonfinite_skipped"] == 1


def test_data_that_does_not_fit_the_model_fails_early(tmp_path, data16):
    with pytest.raises(ValueError, match=r"moments \[6, 32, 32\]"):
        train(cfg(tmp_path, data16, input_size=32, resolution=32))
    # 10 classes of data for a 5-class model: label 5 would be read as the null class
    with pytest.raises(ValueError, match="labels in .* go up to 9 .* pass --num-classes 10 or more"):
        train(cfg(tmp_path, data16, num_classes=5))
    assert not (tmp_path / TINY_RUN["exp_name"]).exists()


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


def test_an_infinite_gradient_with_a_finite_loss_changes_nothing():
    """The finite check covers the grad norm too: a finite loss whose gradient overflows leaves the weights,
    the EMA and the optimizer state exactly as they were, and the next clean step trains normally."""
    from conftest import tiny_model
    from fastrepa.objectives import REPA, FlowMatching
    from fastrepa.train.ema import make_ema
    from fastrepa.rng import draw_step
    from fastrepa.train.step import TrainStep
    model = tiny_model(z_dims=[])
    ema = make_ema(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    objective = REPA(model, FlowMatching())
    step = TrainStep(model, ema, opt, objective, device=torch.device("cpu"))
    batch = {"image": None, "moments": torch.randn(4, 8, 8, 8), "label": torch.arange(4)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hook = model.final_layer.linear.weight.register_hook(lambda g: g * float("inf"))
    res = step(batch, draw_step(0, 0, 0, 4, objective.draw), lr=1e-3)
    assert not res.finite and torch.isfinite(res.total) and not torch.isfinite(res.grad_norm)
    assert all(torch.isfinite(v) for v in res.terms.values())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in ema.state_dict().items())
    assert not opt.state and all(p.grad is None for p in model.parameters())
    hook.remove()
    res = step(batch, draw_step(0, 1, 0, 4, objective.draw), lr=1e-3)
    assert res.finite and len(opt.state) > 0
    assert not torch.equal(model.final_layer.linear.weight, before["final_layer.linear.weight"])


def test_resume_with_another_batch_size_or_seed_is_refused(tmp_path, data16):
    train(cfg(tmp_path, data16, exp_name="r", max_train_steps=3))
    for flag, value in (("batch_size", 8), ("seed", 1)):
        with pytest.raises(ValueError, match=f"trained with --{flag.replace('_', '-')} = "):
            train(cfg(tmp_path, data16, exp_name="r", max_train_steps=6, **{flag: value}))
    assert train(cfg(tmp_path, data16, exp_name="r", max_train_steps=6))["resumed_from"] == 3


def test_two_encoders_train_one_projector_each(tmp_path, data16):
    """--enc-type a,b: one projector per encoder, the alignment loss averages both, and the exported
    checkpoint loads (strict) into generate.py's model."""
    from fastrepa.generation import model_from_checkpoint
    one = train(cfg(tmp_path / "one", data16, max_train_steps=2, checkpointing_steps=2, sampling_steps=2))
    two = train(cfg(tmp_path / "two", data16, max_train_steps=2, checkpointing_steps=2, sampling_steps=2,
                    enc_type="patch-pixels,patch-pixels"))
    ck = load_checkpoint_file(two["checkpoint"])
    assert {k.split(".")[1] for k in ck["model"] if k.startswith("projectors.")} == {"0", "1"}
    model, _ = model_from_checkpoint(two["checkpoint"])
    assert len(model.projectors) == 2
    # the same encoder twice: at step 0 the two projectors differ, so the loss is not the one-encoder loss,
    # but it is still a mean of per-encoder cosines in [-1, 1]
    rows = [json.loads(line) for line in open(os.path.join(two["exp_dir"], "metrics.jsonl"))]
    assert all(-1 <= r["proj_loss"] <= 1 for r in rows)
    assert rows[0]["loss"] == json.loads(open(os.path.join(one["exp_dir"], "metrics.jsonl")).readline())["loss"]


def test_encoder_weight_paths_reach_the_loader(tmp_path, data16, monkeypatch):
    from fastrepa.config import ConfigError
    from fastrepa.train import loop
    with pytest.raises(ConfigError, match="--enc-path"):
        cfg(tmp_path, data16, enc_type="patch-pixels,patch-pixels", enc_path="a.pth")
    seen = {}

    def fake(enc_types, paths, resolution, grid):
        seen.update(enc_types=enc_types, paths=paths, resolution=resolution, grid=grid)
        raise RuntimeError("stop here")
    monkeypatch.setattr(loop, "load_encoders", fake)
    with pytest.raises(RuntimeError, match="stop here"):
        train(cfg(tmp_path, data16, enc_type="dinov2-vit-b,mocov3-vit-b", enc_path="/w/dino.pth,"))
    assert seen == {"enc_types": "dinov2-vit-b,mocov3-vit-b", "paths": "/w/dino.pth,", "resolution": 16, "grid": 4}


def test_an_encoder_whose_grid_differs_from_the_model_fails_before_training(tmp_path, data16):
    from test_encoders import mocov3_ckpt
    wpath = tmp_path / "mocov3.pth"
    torch.save(mocov3_ckpt()[0], wpath)  # random weights in the official layout: 1 token at 16 px, patch 16
    with pytest.raises(ValueError, match=r"encoder mocov3-vit-s gives 1 tokens \(a 1x1 grid\) but the model has 16"):
        train(cfg(tmp_path, data16, enc_type="mocov3-vit-s", enc_path=str(wpath)))
    assert not (tmp_path / TINY_RUN["exp_name"] / "checkpoints").exists()


def test_sample_grids_are_decoded_by_the_sd_vae(tmp_path, data16):
    """--vae DIR (an AutoencoderKL folder): the EMA grid goes through its decoder; a VAE whose latent
    channels differ from the data's fails on every rank before any step."""
    diffusers = pytest.importorskip("diffusers")
    from PIL import Image
    for channels in (3, 4):
        torch.manual_seed(0)
        diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                layers_per_block=1, latent_channels=channels, norm_num_groups=4,
                                sample_size=32).save_pretrained(str(tmp_path / f"vae{channels}"))
    with pytest.raises(ValueError, match="decodes 4-channel latents; the latents .* have 3"):
        train(cfg(tmp_path / "bad", data16, vae=str(tmp_path / "vae4"), max_train_steps=2))
    rep = train(cfg(tmp_path / "ok", data16, vae=str(tmp_path / "vae3"), max_train_steps=2, sampling_steps=2,
                    checkpointing_steps=2))
    grid = Image.open(rep["sample_grid"])
    # 16 samples of 16x16 latents, decoded 2x up by this 2-level VAE, 10 per row with 2 px padding
    assert grid.size == (2 + 10 * (32 + 2), 2 + 2 * (32 + 2))


def test_compile_and_activation_checkpointing_keep_keys_and_losses(tmp_path, data16):
    """--activation-checkpointing recomputes the same numbers (bit for bit on the CPU); --compile (each
    block and the encoder, in place) trains to the same losses within compiler round-off; neither adds a
    wrapper prefix (`_orig_mod.`, `module.`) to the checkpoint keys."""
    kw = dict(max_train_steps=2, checkpointing_steps=2, sampling_steps=2)
    ref = train(cfg(tmp_path / "ref", data16, **kw))
    ac = train(cfg(tmp_path / "ac", data16, activation_checkpointing=True, **kw))
    comp = train(cfg(tmp_path / "compile", data16, compile=True, **kw))
    assert losses(ac["exp_dir"]) == losses(ref["exp_dir"])
    np.testing.assert_allclose(losses(comp["exp_dir"]), losses(ref["exp_dir"]), rtol=1e-4)
    a = load_checkpoint_file(ref["checkpoint"])
    for run in (ac, comp):
        b = load_checkpoint_file(run["checkpoint"])
        for key in ("model", "ema"):
            assert list(b[key]) == list(a[key])
    assert all(torch.equal(v, a["model"][k]) for k, v in load_checkpoint_file(ac["checkpoint"])["model"].items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: counts the host syncs of a CUDA step")
def test_a_cuda_step_syncs_the_host_once():
    """The step's only host sync is its finite/stop decision: the draws are copied asynchronously and the
    stop flag is a fill kernel. torch's sync debug mode reports every synchronizing call of the step."""
    import warnings

    from conftest import tiny_model
    from fastrepa.encoders import load_encoder
    from fastrepa.objectives import REPA, FlowMatching
    from fastrepa.train.ema import make_ema
    from fastrepa.rng import draw_step
    from fastrepa.train.step import TrainStep
    dev = torch.device("cuda")
    model = tiny_model(z_dims=[48], in_channels=3).to(dev)
    enc = load_encoder("patch-pixels", resolution=16, grid=4).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    objective = REPA(model, FlowMatching(), [enc], encoder_names=["patch-pixels"], resolution=16)
    step = TrainStep(model, make_ema(model), opt, objective, device=dev)
    batch = {"image": torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, device=dev),
             "moments": torch.randn(4, 6, 8, 8, device=dev), "label": torch.arange(4, device=dev)}
    for s in range(3):
        draws = step.to_device(draw_step(0, s, 0, 4, objective.draw))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = step(batch, draws, lr=1e-3)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
        assert res.finite
        if s > 0:  # the first step may initialise state (optimizer, caches) with syncs of its own
            assert len(syncs) <= 1, syncs
