"""DiT (learned sigma, DDPM): the official state dict, the forward against a plain formula, the DDPM objective
against the official formulas, respaced sampling with DiT's CFG, training, resume and generate.py."""
import json
import os

import numpy as np
import pytest
import torch

import generate as generate_cli
from fastrepa.config import from_flat
from fastrepa.models import build_model
from fastrepa.objectives import REPA, build_denoiser
from fastrepa.objectives.ddpm import DDPM
from test_gaussian_diffusion import Ref, ref_loop, ref_losses
from test_models import plain_sit_forward
from test_train import TINY_RUN, data16, losses  # noqa: F401 (data16 is a fixture)

DIT_RUN = dict(TINY_RUN, model="DiT-S/4", enc_type="none", sample_num_steps=3)


def meta(name, **kw):
    with torch.device("meta"):
        return build_model(name, **kw)


def tiny_dit(**kw):
    torch.manual_seed(0)
    m = build_model("DiT-S/2", **{**dict(input_size=8, in_channels=4, hidden_size=64, depth=3, num_heads=4,
                                         num_classes=10), **kw})
    with torch.no_grad():  # the zero-initialised adaLN / final layers would make the output 0
        for name, p in m.named_parameters():
            if "adaLN_modulation" in name or "final_layer" in name:
                p.normal_(0, 0.05)
    return m


def test_dit_xl2_manifest_is_the_official_one():
    """DiT-XL/2: 292 tensors, 675,129,632 parameters (pos_embed counted), the SiT key names without
    projectors, a 2C-channel final layer; the SiT registry's layout otherwise."""
    m = meta("DiT-XL/2")
    sd = m.state_dict()
    assert len(sd) == 292 and sum(v.numel() for v in sd.values()) == 675_129_632
    assert sum(p.numel() for p in meta("DiT-B/2").parameters()) == 130_512_416
    sit = set(meta("SiT-XL/2").state_dict())
    assert set(sd) == {k for k in sit if not k.startswith("projectors.")}
    assert sd["final_layer.linear.weight"].shape == (2 * 2 * 2 * 4, 1152)
    assert sd["y_embedder.embedding_table.weight"].shape == (1001, 1152)
    assert m.prediction == "epsilon" and m.latent_shape == (4, 32, 32) and m.out_channels == 8
    # a method adds keys, never renames: REPA's projector, SRA's head
    assert set(meta("DiT-XL/2", z_dims=[768]).state_dict()) - set(sd) == {
        f"projectors.0.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")}
    assert set(meta("DiT-XL/2", ap_head=True).state_dict()) - set(sd) == {
        f"ap_head.linear{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}


def test_dit_forward_matches_plain_formula_and_takes_integer_timesteps():
    m = tiny_dit().eval()
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 421, 999])  # DDPM's integer timesteps, as official DiT is called
    y = torch.tensor([1, 7, 10])  # 10 = the null class
    out = m.denoise(x, t, y)
    ref, _ = plain_sit_forward(m, x, t.double(), y)
    assert out.shape == (3, 8, 8, 8)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(m.denoise(x, t.float(), y), out)
    with pytest.raises(TypeError, match="not a velocity"):
        m.velocity(x, t, y)


def test_ddpm_objective_terms_equal_the_official_formulas():
    """The DDPM denoiser inside the method seam: per-sample MSE(eps) and the VB term (decoder NLL at t = 0,
    KL otherwise, bits per dim) of the model's own output, against the float64 formulas of
    tests/test_gaussian_diffusion.py; the draws are integer t in [0, 1000) and a noise tensor."""
    m = tiny_dit().double()
    den = build_denoiser(m, from_flat({**DIT_RUN, "exp_name": "x"}).objective)
    assert isinstance(den, DDPM) and den.num_timesteps == 1000
    objective = REPA(m, den)
    assert objective.terms == ("loss", "proj_loss", "mse", "vb")
    g = torch.Generator().manual_seed(0)
    draws = [objective.draw(g) for _ in range(64)]
    assert all(d["time"].dtype == torch.int64 and 0 <= d["time"] < 1000 for d in draws)
    assert len({int(d["time"]) for d in draws}) > 50
    x0 = torch.rand(4, 4, 8, 8, dtype=torch.float64) * 2 - 1
    t = torch.tensor([0, 1, 500, 999])
    noise = torch.randn(4, 4, 8, 8, dtype=torch.float64)
    x_t, t_model = den.corrupt(x0, t, noise)
    assert t_model.dtype == torch.int64
    out = m(x_t, t_model, torch.tensor([1, 2, 3, 4]))[0]
    loss, extra = den.loss(out, x0, x_t, t, noise)
    ref = Ref([0.0001 + i * (0.02 - 0.0001) / 999 for i in range(1000)])
    torch.testing.assert_close(x_t, ref.q_sample(x0, t, noise), rtol=1e-12, atol=1e-12)
    mse, vb = ref_losses(ref, out.detach(), x0, x_t, t, noise)
    torch.testing.assert_close(loss.detach(), mse + vb, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(extra["mse"].detach(), mse.mean(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(extra["vb"].detach(), vb.mean(), rtol=1e-7, atol=1e-9)


def test_respaced_ddpm_sampling_with_dit_cfg_equals_a_direct_loop():
    """generate.py's DDPM path (fastrepa.generation.sample_latents): 5 respaced steps of the 1000, the
    model at the ORIGINAL timesteps, DiT's CFG on the first 3 eps channels only (channel 4 and the
    variance from the conditional half), per-sample step noise."""
    from fastrepa.gaussian_diffusion import create_diffusion
    from fastrepa.generation import sample_latents
    from fastrepa.sampling import row_noise
    from fastrepa.rng import index_generators
    m = tiny_dit().double().eval()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y, s = torch.tensor([3, 5]), 2.5
    got = sample_latents(m, z, y, mode="ddpm", num_steps=5, cfg_scale=s, generators=index_generators(0, 2, [0, 1]))

    def guided(x, t):
        cond, uncond = m.denoise(x, t, y), m.denoise(x, t, torch.full_like(y, 10))
        out = cond.clone()
        out[:, :3] = uncond[:, :3] + s * (cond[:, :3] - uncond[:, :3])
        return out
    draws = row_noise(index_generators(0, 2, [0, 1]), z.shape[1:], 5)
    ref = Ref([0.0001 + i * (0.02 - 0.0001) / 999 for i in range(1000)])
    want = ref_loop(create_diffusion("5"), ref, guided, z, lambda x: next(draws).to(x.dtype))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # all-channel CFG is the named option, and differs
    other = sample_latents(m, z, y, mode="ddpm", num_steps=5, cfg_scale=s, guided_channels=None,
                           generators=index_generators(0, 2, [0, 1]))
    assert not torch.allclose(other, got)


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory, data16):  # noqa: F811
    from fastrepa.train import train
    out = tmp_path_factory.mktemp("dit")
    full = train(from_flat({**DIT_RUN, "data_dir": data16, "output_dir": str(out / "full"), "exp_name": "d"}))
    return {"out": out, "full": full, "data": data16}


def test_dit_trains_resumes_exactly_and_logs_the_ddpm_terms(dit_run, tmp_path):
    from fastrepa.official_ckpt import load_checkpoint_file
    from fastrepa.train import train
    full = dit_run["full"]
    rows = [json.loads(line) for line in open(os.path.join(full["exp_dir"], "metrics.jsonl"))]
    assert all(abs(r["loss"] - r["mse"] - r["vb"]) < 1e-5 for r in rows) and all(r["vb"] > 0 for r in rows)
    assert full["method"] == "repa" and full["model"] == "DiT-S/4"
    half = dict(DIT_RUN, data_dir=dit_run["data"], output_dir=str(tmp_path), exp_name="d")
    train(from_flat({**half, "max_train_steps": 3}))
    resumed = train(from_flat(half))
    assert resumed["resumed_from"] == 3
    assert losses(resumed["exp_dir"]) == losses(full["exp_dir"])
    a, b = load_checkpoint_file(full["checkpoint"]), load_checkpoint_file(resumed["checkpoint"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert os.path.isfile(full["sample_grid"])  # the grid samples with DDPM (3 respaced steps)


def test_generate_samples_a_dit_checkpoint_with_ddpm(dit_run, tmp_path, capsys):
    ckpt = dit_run["full"]["checkpoint"]
    base = ["--ckpt", ckpt, "--vae", "identity", "--num-fid-samples", "6", "--per-proc-batch-size", "4",
            "--cfg-scale", "1.5", "--num-sampling-steps", "4"]
    assert generate_cli.main(base + ["--sample-dir", str(tmp_path / "a")]) == 0
    report = json.load(open(tmp_path / "a" / "generate.json"))
    assert report["settings"]["mode"] == "ddpm" and report["settings"]["num_steps"] == 4
    assert report["settings"]["guided_channels"] == "3"
    arr = np.load(report["samples"])["arr_0"]
    assert arr.shape == (6, 16, 16, 3) and arr.dtype == np.uint8 and arr.std() > 0
    # sample i does not depend on the batch it falls in (per-sample noise streams)
    assert generate_cli.main(base[:-6] + ["--per-proc-batch-size", "3", "--cfg-scale", "1.5",
                                          "--num-sampling-steps", "4", "--sample-dir", str(tmp_path / "b")]) == 0
    other = np.load(json.load(open(tmp_path / "b" / "generate.json"))["samples"])["arr_0"]
    np.testing.assert_array_equal(arr, other)


def test_dit_checkpoint_refused_by_a_sit_sampler_and_the_reverse(dit_run, tmp_path, capsys):
    ckpt = dit_run["full"]["checkpoint"]
    common = ["--vae", "identity", "--num-fid-samples", "2", "--sample-dir", str(tmp_path)]
    for argv, msg in ((["--ckpt", ckpt, "--mode", "ode"], "predicts 'epsilon' samples with --mode ddpm"),
                      (["--ckpt", ckpt, "--model", "SiT-S/4"], "holds a DiT .* pass --model DiT-S/4"),
                      (["--ckpt", ckpt, "--guidance-high", "0.7"], "guides every step")):
        with pytest.raises(SystemExit):
            generate_cli.main(argv + common)
        assert msg.split(" .* ")[0] in capsys.readouterr().err
    sit = build_model("SiT-S/4", input_size=16, in_channels=3, hidden_size=32, depth=2, num_heads=2, z_dims=[],
                      num_classes=10)
    path = str(tmp_path / "sit.pt")
    torch.save({"ema": sit.state_dict(), "args": {"model": "DiT-S/4"}}, path)
    with pytest.raises(SystemExit):
        generate_cli.main(["--ckpt", path] + common)
    assert "holds a SiT" in capsys.readouterr().err
