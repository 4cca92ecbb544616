"""REG: the class-token model against the official layout and a forward written here, the loss against an
independent formula with fixed draws, the samplers carrying the class token (against an official-style
loop with its own class-token guidance), flags and bad input, exact resume, and a demo-sized run that
learns and samples."""
import contextlib
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import generate as generate_cli
from conftest import TINY, hand_interpolant, tiny_model
from fastrepa.config import ConfigError, from_flat
from fastrepa.models import build_model
from fastrepa.generation import class_token_velocity, model_from_checkpoint, sample_latents
from fastrepa.models.embed import sincos_pos_embed_2d
from fastrepa.objectives import REG, FlowMatching, StepContext
from fastrepa.objectives.interpolants import score_coefficients
from fastrepa.official_ckpt import save_checkpoint_file
from fastrepa.sampling import euler_maruyama_sampler
from fastrepa.train import train
from test_train import TINY_RUN, assert_same_run, data16  # noqa: F401 (data16 is a fixture)

REG_RUN = dict(TINY_RUN, method="reg")
D = 24  # the class token's width in the tiny model (its first encoder's)


def reg_model(**kw):
    model = tiny_model(z_dims=[D], cls_token_dim=D, **kw)
    with torch.no_grad():  # the zero-init class-token output layer carries signal too
        model.final_layer.linear_cls.weight.normal_(0, 0.05)
    return model


def test_model_has_the_official_keys_and_is_the_formula():
    sd = build_model("SiT-S/2", **{**TINY, "z_dims": [D], "cls_token_dim": D}).state_dict()  # as initialised
    plain = tiny_model(z_dims=[D]).state_dict()
    assert set(sd) - set(plain) == {"cls_projectors2.weight", "cls_projectors2.bias", "wg_norm.weight", "wg_norm.bias",
                                    "final_layer.linear_cls.weight", "final_layer.linear_cls.bias"}
    assert sd["cls_projectors2.weight"].shape == (64, D) and sd["final_layer.linear_cls.weight"].shape == (D, 64)
    assert not sd["final_layer.linear_cls.weight"].any() and not sd["final_layer.linear_cls.bias"].any()
    assert sd["pos_embed"].shape == (1, 17, 64) and not sd["pos_embed"][0, 0].any()
    torch.testing.assert_close(sd["pos_embed"][0, 1:], sincos_pos_embed_2d(64, 4).float())

    model = reg_model().eval()
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g), torch.tensor([3, 5])
    cls = torch.randn(2, D, generator=g)
    out, zs, cls_out = model(x, t, y, cls_token=cls)
    # official REG's forward, written out: the class token first, every block on T + 1 tokens
    tok = F.layer_norm(cls @ model.cls_projectors2.weight.T + model.cls_projectors2.bias, (64,),
                       model.wg_norm.weight, model.wg_norm.bias, 1e-6)
    h = torch.cat([tok[:, None], model.x_embedder(x)], 1) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder.embedding_table(y)
    for i, block in enumerate(model.blocks):
        h = block(h, c)
        if i + 1 == model.encoder_depth:
            want_zs = model.projectors[0](h)
    shift, scale = model.final_layer.adaLN_modulation(c).chunk(2, dim=-1)
    hn = F.layer_norm(h, (64,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(cls_out, hn[:, 0] @ model.final_layer.linear_cls.weight.T
                               + model.final_layer.linear_cls.bias)
    torch.testing.assert_close(out, model.unpatchify(model.final_layer.linear(hn[:, 1:])))
    assert zs[0].shape == (2, 17, D)
    torch.testing.assert_close(zs[0], want_zs)
    v, v_cls = model.denoise(x, t, y, cls_token=cls)
    torch.testing.assert_close(v, out)
    torch.testing.assert_close(v_cls, cls_out)
    with pytest.raises(ValueError, match=r"takes cls_token \[2, 24\]"):
        model(x, t, y)


def test_a_reg_checkpoint_in_the_official_layout_loads(tmp_path):
    model = reg_model()
    path = str(tmp_path / "0000100.pt")
    args = {"model": "SiT-S/2", "input_size": 8, "in_channels": 4, "hidden_size": 64, "depth": 4, "num_heads": 4,
            "num_classes": 10, "encoder_depth": 2, "enc_type": "dinov2-vit-b", "cls": 0.03}
    save_checkpoint_file(path, {"model": model.state_dict(), "ema": model.state_dict(), "args": args, "steps": 100})
    loaded, _ = model_from_checkpoint(path)
    assert loaded.cls_token_dim == D
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


class StubEncoder(torch.nn.Module):
    has_cls_token, embed_dim, enc_type = True, D, "stub"

    def __init__(self, cls, patch):
        super().__init__()
        self.cls, self.patch = cls, patch

    def features(self, images, attn_blocks=()):
        return {"patch": self.patch, "cls": self.cls, "attn": []}


def test_reg_loss_equals_the_formula():
    model = reg_model().train()
    g = torch.Generator().manual_seed(1)
    cls, patch = torch.randn(3, D, generator=g) * 2, torch.randn(3, 16, D, generator=g)
    objective = REG(model, FlowMatching(), [StubEncoder(cls, patch)], proj_coeff=0.5, cls_coeff=0.03)
    batch = {"moments": torch.randn(3, 8, 8, 8, generator=g), "label": torch.tensor([1, 4, 9]),
             "image": torch.zeros(3, 3, 16, 16, dtype=torch.uint8)}
    draws = [objective.draw(g) for _ in range(3)]
    draws = {k: torch.stack([d[k] for d in draws]) for k in draws[0]}
    assert draws["cls_noise"].shape == (3, D)
    ctx = StepContext(autocast=contextlib.nullcontext)
    total, terms = objective.loss(model, objective.prepare(batch, draws, ctx), ctx)
    assert objective.terms == ("loss", "proj_loss", "cls_loss")

    mean, std = batch["moments"].chunk(2, dim=1)
    x = (mean + std * draws["eps"]) * 0.18215
    tt, noise, cn = draws["time"], draws["noise"], draws["cls_noise"]
    a, s, da, ds = hand_interpolant(tt, "linear")
    v4 = lambda u: u.view(-1, 1, 1, 1)  # noqa: E731
    out, zt, cls_out = model(v4(a) * x + v4(s) * noise, tt, batch["label"], force_drop_ids=draws["drop"],
                             cls_token=a[:, None] * cls + s[:, None] * cn)
    denoise = ((out - (v4(da) * x + v4(ds) * noise)) ** 2).mean(dim=(1, 2, 3)).mean()
    cls_loss = ((cls_out - (da[:, None] * cls + ds[:, None] * cn)) ** 2).mean(dim=1).mean()
    dense = torch.cat([cls[:, None], patch], 1)  # official: cat(class token, patch tokens)
    proj = (-F.cosine_similarity(dense, zt[0], dim=-1)).mean()
    torch.testing.assert_close(terms["cls_loss"], cls_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["proj_loss"], proj, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, denoise + 0.5 * proj + 0.03 * cls_loss, rtol=1e-5, atol=1e-6)


def official_style_sde(model, x, cls, y, num_steps, cfg, cls_cfg, noise):
    """Official REG's euler_maruyama_sampler written out with separate latent and class-token states (the
    per-step noise given, packed [latents | class token] as our sampler draws it)."""
    t_steps = torch.cat([torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    ratio, var = score_coefficients(t_steps, "linear")
    size = x[0].numel()
    x, cls = x.double(), cls.double()
    for i in range(num_steps):
        t_cur, dt = t_steps[i], t_steps[i + 1] - t_steps[i]
        xin, cin, yin = torch.cat([x, x]), torch.cat([cls, cls]), torch.cat([y, torch.full_like(y, 10)])
        v, v_cls = model.denoise(xin.float(), torch.full((2 * len(y),), float(t_cur)), yin, cls_token=cin.float())
        d = v.double() - t_cur * (ratio[i] * v.double() - xin) / var[i]
        d_cls = v_cls.double() - t_cur * (ratio[i] * v_cls.double() - cin) / var[i]
        dc, du = d.chunk(2)
        cc, cu = d_cls.chunk(2)
        d, d_cls = du + cfg * (dc - du), cu + cls_cfg * (cc - cu)
        if i < num_steps - 1:
            eps = noise[i]
            x = x + d * dt + torch.sqrt(2 * t_cur) * eps[:, :size].view_as(x) * torch.sqrt(dt.abs())
            cls = cls + d_cls * dt + torch.sqrt(2 * t_cur) * eps[:, size:] * torch.sqrt(dt.abs())
        else:
            x, cls = x + d * dt, cls + d_cls * dt
    return x, cls


def test_samplers_carry_the_class_token_with_its_own_guidance():
    model = reg_model().eval()
    g = torch.Generator().manual_seed(2)
    z, cls_z, y = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, D, generator=g), torch.tensor([1, 7])
    gen = torch.Generator().manual_seed(5)
    got = sample_latents(model, z, y, mode="sde", num_steps=4, cfg_scale=2.0, cls_z=cls_z, cls_cfg_scale=3.0,
                         generators=gen)
    gen = torch.Generator().manual_seed(5)
    noise = [torch.randn(2, 256 + D, generator=gen, dtype=torch.float64) for _ in range(3)]
    want, want_cls = official_style_sde(model, z, cls_z, y, 4, 2.0, 3.0, noise)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)  # the fp32 model's rounding of the rescaled v
    # the class token's own state (which sample_latents discards) through the same packed sampler
    velocity = class_token_velocity(model.denoise, z.shape[1:], 2, 2.0, 3.0)
    state = euler_maruyama_sampler(velocity, torch.cat([z.flatten(1), cls_z], 1), y, num_steps=4, cfg_scale=2.0,
                                   null_class=10, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(state[:, 256:], want_cls, rtol=1e-4, atol=1e-6)
    _, same_scale = official_style_sde(model, z, cls_z, y, 4, 2.0, 2.0, noise)
    assert (same_scale - want_cls).abs().max() > 1e-3  # its own guidance scale shows (10x the tolerance)
    # the class token shapes the latents: another start gives other latents
    other = sample_latents(model, z, y, mode="ode", num_steps=4, cfg_scale=2.0, cls_z=cls_z + 1)
    assert not torch.allclose(other, sample_latents(model, z, y, mode="ode", num_steps=4, cfg_scale=2.0, cls_z=cls_z))
    with pytest.raises(ValueError, match=r"cls_z must be \[2, 24\]"):
        sample_latents(model, z, y, mode="ode", num_steps=2)


def test_flags_and_bad_input():
    cfg = from_flat({"exp_name": "x", "method": "reg"})
    assert (cfg.objective.cls, cfg.objective.proj_coeff) == (0.03, 0.5)
    for kw, msg in ((dict(model="DiT-XL/2"), "a SiT model for --method reg"),
                    (dict(projection_layer_type="conv"), "mlp for --method reg"),
                    (dict(rope=True), "False for --method reg"),
                    (dict(cls=-1.0), "--cls=-1.0"),
                    (dict(enc_type="none"), "an encoder for --method reg")):
        with pytest.raises(ConfigError, match=msg):
            from_flat({"exp_name": "x", "method": "reg", **kw})
    model = reg_model()
    with pytest.raises(ValueError, match="has no class token"):
        REG(model, FlowMatching(), [torch.nn.Identity()])
    wide = StubEncoder(None, None)
    wide.embed_dim = 32
    with pytest.raises(ValueError, match="class token has 24 dims but encoder stub gives 32"):
        REG(model, FlowMatching(), [wide])
    with pytest.raises(ValueError, match="needs a model built with REG's class token"):
        REG(tiny_model(z_dims=[D]), FlowMatching(), [StubEncoder(None, None)])


@pytest.fixture(scope="module")
def reg_run(tmp_path_factory, data16):  # noqa: F811
    out = tmp_path_factory.mktemp("reg")
    full = train(from_flat({**REG_RUN, "data_dir": data16, "output_dir": str(out / "full"), "exp_name": "r"}))
    return {"out": out, "full": full, "data": data16}


def test_reg_resumes_exactly(reg_run, tmp_path):
    half = dict(REG_RUN, data_dir=reg_run["data"], output_dir=str(tmp_path), exp_name="r")
    train(from_flat({**half, "max_train_steps": 3}))
    resumed = train(from_flat(half))
    assert resumed["resumed_from"] == 3 and resumed["method"] == "reg"
    a = assert_same_run(reg_run["full"], resumed, ("loss", "proj_loss", "cls_loss"))
    assert "cls_projectors2.weight" in a["model"] and a["model"]["final_layer.linear_cls.weight"].any()


def test_demo_sized_reg_run_learns_and_samples(tmp_path, data16):  # noqa: F811
    report = train(from_flat({**REG_RUN, "data_dir": data16, "output_dir": str(tmp_path), "exp_name": "demo",
                              "max_train_steps": 60, "log_every": 10, "checkpointing_steps": 60,
                              "sampling_steps": 60}))
    rows = [json.loads(line) for line in open(os.path.join(report["exp_dir"], "metrics.jsonl"))]
    assert report["last_loss"] < 0.85 * report["first_loss"]
    assert rows[-1]["cls_loss"] < rows[0]["cls_loss"]
    for mode in ("ode", "sde"):
        sample_dir = str(tmp_path / f"samples-{mode}")
        assert generate_cli.main(["--ckpt", report["checkpoint"], "--vae", "identity", "--num-fid-samples", "4",
                                  "--per-proc-batch-size", "4", "--num-steps", "4", "--mode", mode,
                                  "--cls-cfg-scale", "2.0", "--cls", "48", "--sample-dir", sample_dir]) == 0
        meta = json.load(open(os.path.join(sample_dir, "generate.json")))
        arr = np.load(meta["samples"])["arr_0"]
        assert arr.shape == (4, 16, 16, 3) and arr.std() > 0
    with pytest.raises(SystemExit):
        generate_cli.main(["--ckpt", report["checkpoint"], "--vae", "identity", "--cls", "768",
                           "--sample-dir", str(tmp_path / "bad")])


def test_dry_run_counts_the_class_token(capsys):
    import train as train_cli
    counts = {}
    for method in ("repa", "reg"):
        assert train_cli.main(["--exp-name", "x", "--dry-run", "--method", method]) == 0
        counts[method] = json.loads(capsys.readouterr().out)
    # cls_projectors2 (768 -> 1152), wg_norm (2 x 1152), final_layer.linear_cls (1152 -> 768), its pos_embed row
    assert counts["reg"]["params"] - counts["repa"]["params"] == 2 * 768 * 1152 + 1152 + 768 + 2 * 1152 + 1152
    assert counts["reg"]["train_gflop_per_image"] > counts["repa"]["train_gflop_per_image"]  # 257 tokens


def test_reg_two_processes_equal_one(reg_run):
    """FSDP2 with the class token's layers in the root unit: the same losses as the single process."""
    from test_train_dist import flags, fsdp2_works_on_cpu, launch, ok
    if not fsdp2_works_on_cpu():
        pytest.skip("needs torch.distributed with gloo and FSDP2")
    out = reg_run["out"] / "two"
    ok(launch(flags(out, reg_run["data"], method="reg", exp_name="r", max_grad_norm=1.0, checkpointing_steps=3,
                    sampling_steps=6)))
    for key in ("loss", "proj_loss", "cls_loss", "grad_norm"):
        rows = [[json.loads(line)[key] for line in open(os.path.join(d, "metrics.jsonl"))]
                for d in (str(out / "r"), reg_run["full"]["exp_dir"])]
        np.testing.assert_allclose(rows[0], rows[1], rtol=1e-5, atol=1e-7, err_msg=key)
