"""iREPA: the conv projector against conv2d on the token grid (official keys), the spatial z-score against
its formula, the loss against a formula written here with fixed draws, flags and bad input, exact resume,
and a demo-sized run that learns and samples."""
import contextlib
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import generate as generate_cli
from conftest import hand_interpolant, tiny_model
from fastrepa.config import ConfigError, from_flat
from fastrepa.objectives import IREPA, FlowMatching, StepContext
from fastrepa.objectives.irepa import spatial_zscore
from fastrepa.train import train
from test_train import TINY_RUN, assert_same_run, data16  # noqa: F401 (data16 is a fixture)

IREPA_RUN = dict(TINY_RUN, method="irepa")


def test_conv_projector_is_a_conv_over_the_token_grid_with_official_keys():
    model = tiny_model(projector_type="conv", projector_kernel=3)
    sd = model.state_dict()
    assert {k for k in sd if k.startswith("projectors.")} == {
        f"projectors.{i}.projection_layer.{p}" for i in (0, 1) for p in ("weight", "bias")}
    assert sd["projectors.0.projection_layer.weight"].shape == (16, 64, 3, 3)
    g = model.token_grid[0]
    h = torch.randn(2, g * g, 64)
    conv = model.projectors[1].projection_layer
    grid = h.reshape(2, g, g, 64).permute(0, 3, 1, 2)  # token t = row * g + column
    want = F.conv2d(grid, conv.weight, conv.bias, padding=1).permute(0, 2, 3, 1).reshape(2, g * g, 24)
    torch.testing.assert_close(model.projectors[1](h), want)
    # a token's output sees its 3x3 neighbourhood only
    h2 = h.clone()
    h2[:, 0] += 1.0
    moved = (model.projectors[1](h2) - model.projectors[1](h)).abs().sum(-1)[0].reshape(g, g)
    assert moved[:2, :2].min() > 0 and moved[2:].sum() == 0 and moved[:, 2:].sum() == 0


def test_spatial_zscore_formula():
    z = torch.randn(2, 5, 3, dtype=torch.float64) * 3 + 1
    for alpha in (1.0, 0.6):
        got = spatial_zscore(z, alpha)
        for n in range(2):
            for d in range(3):
                col = z[n, :, d]
                mean = col.sum() / 5
                std = ((col - mean) ** 2).sum().div(4).sqrt()  # unbiased, as torch.std
                torch.testing.assert_close(got[n, :, d], (col - alpha * mean) / (std + 1e-6))


def test_irepa_loss_equals_the_formula():
    model = tiny_model(projector_type="conv").train()
    objective = IREPA(model, FlowMatching(), [torch.nn.Identity()] * 2, proj_coeff=1.0, zscore_alpha=0.6)
    g = torch.Generator().manual_seed(0)
    tokens = model.token_grid[0] ** 2
    raw_zs = [torch.randn(3, tokens, z, generator=g) * 2 + 0.5 for z in model.z_dims]
    objective.encoders = [lambda image, i=i: raw_zs[i] for i in range(2)]
    batch = {"moments": torch.randn(3, 8, 8, 8, generator=g), "label": torch.tensor([1, 4, 9]),
             "image": torch.zeros(3, 3, 16, 16, dtype=torch.uint8)}
    draws = [objective.draw(g) for _ in range(3)]
    draws = {k: torch.stack([d[k] for d in draws]) for k in draws[0]}
    ctx = StepContext(autocast=contextlib.nullcontext)
    inputs = objective.prepare(batch, draws, ctx)
    total, terms = objective.loss(model, inputs, ctx)

    mean, std = batch["moments"].chunk(2, dim=1)
    x = (mean + std * draws["eps"]) * 0.18215
    t, noise = draws["time"], draws["noise"]
    a, s, da, ds = (v.view(-1, 1, 1, 1) for v in hand_interpolant(t, "linear"))
    out, zt = model(a * x + s * noise, t, batch["label"], force_drop_ids=draws["drop"])
    denoise = ((out - (da * x + ds * noise)) ** 2).mean(dim=(1, 2, 3)).mean()
    proj = []
    for z, p in zip(raw_zs, zt):
        zn = (z - 0.6 * z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-6)
        proj.append((-F.cosine_similarity(zn, p, dim=-1)).mean())
    proj = torch.stack(proj).mean()
    torch.testing.assert_close(terms["proj_loss"], proj, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, denoise + 1.0 * proj, rtol=1e-5, atol=1e-6)


def test_flags_and_bad_input():
    cfg = from_flat({"exp_name": "x", "method": "irepa"})
    o, kw = cfg.objective, cfg.model_overrides()
    assert (o.proj_coeff, o.spnorm_method, o.zscore_alpha) == (1.0, "zscore", 0.6)
    assert (kw["projector_type"], kw["projector_kernel"]) == ("conv", 3)
    cfg = from_flat({"exp_name": "x", "method": "irepa", "projection_layer_type": "mlp", "spnorm_method": "none",
                     "proj_coeff": 0.5, "proj_kwargs_kernel_size": 5})
    assert cfg.model_overrides()["projector_type"] == "mlp" and cfg.objective.spnorm_method == "none"
    assert from_flat({"exp_name": "x"}).model_overrides()["projector_type"] == "mlp"
    for kw, msg in ((dict(proj_kwargs_kernel_size=2), "projector_kernel=2 must be an odd kernel size"),
                    (dict(method="repa", spnorm_method="zscore"), "--spnorm-method='zscore': expected none unless")):
        with pytest.raises(ConfigError, match=msg):
            from_flat({"exp_name": "x", "method": "irepa", **kw})


@pytest.fixture(scope="module")
def irepa_run(tmp_path_factory, data16):  # noqa: F811
    out = tmp_path_factory.mktemp("irepa")
    full = train(from_flat({**IREPA_RUN, "data_dir": data16, "output_dir": str(out / "full"), "exp_name": "i"}))
    return {"out": out, "full": full, "data": data16}


def test_irepa_resumes_exactly(irepa_run, tmp_path):
    half = dict(IREPA_RUN, data_dir=irepa_run["data"], output_dir=str(tmp_path), exp_name="i")
    train(from_flat({**half, "max_train_steps": 3}))
    resumed = train(from_flat(half))
    assert resumed["resumed_from"] == 3 and resumed["method"] == "irepa"
    a = assert_same_run(irepa_run["full"], resumed, ("loss", "proj_loss"))
    assert "projectors.0.projection_layer.weight" in a["model"]


def test_demo_sized_irepa_run_learns_and_samples(tmp_path, data16):  # noqa: F811
    report = train(from_flat({**IREPA_RUN, "data_dir": data16, "output_dir": str(tmp_path), "exp_name": "demo",
                              "max_train_steps": 60, "log_every": 10, "checkpointing_steps": 60,
                              "sampling_steps": 60}))
    assert report["last_loss"] < 0.85 * report["first_loss"]
    assert report["last_proj_loss"] < report["first_proj_loss"]
    sample_dir = str(tmp_path / "samples")  # the conv projector is read off the weights
    assert generate_cli.main(["--ckpt", report["checkpoint"], "--vae", "identity", "--num-fid-samples", "4",
                              "--per-proc-batch-size", "4", "--num-steps", "4", "--sample-dir", sample_dir]) == 0
    arr = np.load(json.load(open(os.path.join(sample_dir, "generate.json")))["samples"])["arr_0"]
    assert arr.shape == (4, 16, 16, 3) and arr.std() > 0
