"""HASTE: the attention scores of the encoder (ViT, patch-pixels) and of the model against formulas written
here, the loss against an independent formula with fixed draws, the stop (denoising only, no encoder, no
projectors), flags and bad input, exact resume across the stop step, and a demo-sized run that learns and
samples."""
import contextlib
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import generate as generate_cli
from conftest import hand_interpolant, tiny_model
from fastrepa.config import ConfigError, build_parser, from_args, from_flat
from fastrepa.encoders import IMAGENET_MEAN, IMAGENET_STD, PatchPixelEncoder, PretrainedEncoder
from fastrepa.encoders.vit import ViT
from fastrepa.objectives import HASTE, FlowMatching, StepContext
from fastrepa.train import train
from test_train import TINY_RUN, assert_same_run, data16  # noqa: F401 (data16 is a fixture)

HASTE_RUN = dict(TINY_RUN, method="haste", attn_blocks="1,2", attn_encoder_blocks="1,1", align_stop_step=4)


def tiny_vit(num_registers=0, depth=3):
    torch.manual_seed(3)
    vit = ViT(patch=4, dim=32, depth=depth, heads=2, grid=4, layerscale=True, num_registers=num_registers)
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.2)
    return vit.eval()


def hand_scores(blk, x, heads):
    """(q * hd^-0.5) k^T of one ViT block's attention on its input x, and the block's output, by hand."""
    h = F.layer_norm(x, (x.shape[-1],), blk.norm1.weight, blk.norm1.bias, 1e-6)
    qkv = h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
    B, N, C = x.shape
    q, k, v = qkv.reshape(B, N, 3, heads, C // heads).unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(C // heads)
    a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C) @ blk.attn.proj.weight.T + blk.attn.proj.bias
    x = x + blk.ls1.gamma * a
    h2 = F.layer_norm(x, (C,), blk.norm2.weight, blk.norm2.bias, 1e-6)
    m = F.gelu(h2 @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias) @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
    return scores, x + blk.ls2.gamma * m


@pytest.mark.parametrize("registers", [0, 2])
def test_vit_attention_scores_are_the_formula_with_the_prefix_dropped(registers):
    vit = tiny_vit(registers).double()
    img = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    out = vit.features(img, attn_blocks=(3, 1))
    tokens = vit.patch_embed.proj(img).flatten(2).transpose(1, 2)
    x = torch.cat([vit.cls_token.expand(2, -1, -1), tokens], 1) + vit.pos_embed
    if registers:
        x = torch.cat([x[:, :1], vit.register_tokens.expand(2, -1, -1), x[:, 1:]], 1)
    want = {}
    for depth, blk in enumerate(vit.blocks, 1):
        s, x = hand_scores(blk, x, 2)
        want[depth] = s[:, :, 1 + registers:, 1 + registers:]
    x = F.layer_norm(x, (32,), vit.norm.weight, vit.norm.bias, 1e-6)
    assert [tuple(s.shape) for s in out["attn"]] == [(2, 2, 16, 16)] * 2
    torch.testing.assert_close(out["attn"][0], want[3])
    torch.testing.assert_close(out["attn"][1], want[1])
    torch.testing.assert_close(out["patch"], x[:, 1 + registers:])
    torch.testing.assert_close(out["cls"], x[:, 0])
    torch.testing.assert_close(vit(img), out["patch"])
    with pytest.raises(ValueError, match=r"encoder attention blocks \[4\] are outside 1..3"):
        vit.features(img, attn_blocks=(4,))


def test_patch_pixel_stand_in_gives_a_mean_class_token_and_one_self_similarity_head():
    enc = PatchPixelEncoder(16, 4)
    img = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    out = enc.features(img, attn_blocks=(1, 2))
    z = enc(img)
    torch.testing.assert_close(out["cls"], z.mean(1))
    for s in out["attn"]:
        torch.testing.assert_close(s, (z @ z.transpose(1, 2) / math.sqrt(z.shape[-1]))[:, None])
    assert enc.num_heads == 1 and enc.has_cls_token


def test_model_attention_scores_are_the_formula_and_change_nothing_else():
    model = tiny_model().eval()
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g), torch.tensor([1, 2])
    out, zs, scores = model(x, t, y, attn_depths=(3, 1), attn_heads=3)
    plain, plain_zs = model(x, t, y)
    torch.testing.assert_close(out, plain)
    for a, b in zip(zs, plain_zs):
        torch.testing.assert_close(a, b)
    h, c = model.embed(x, t, y)
    want = {}
    for depth, block in enumerate(model.blocks, 1):  # official blocks one by one
        shift, scale = block.adaLN_modulation(c).chunk(6, dim=-1)[:2]
        hn = F.layer_norm(h, (64,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        q, k, _ = (hn @ block.attn.qkv.weight.T + block.attn.qkv.bias).reshape(2, 16, 3, 4, 16).unbind(2)
        want[depth] = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) / 4.0)[:, :3]
        h = block(h, c)
    torch.testing.assert_close(scores[0], want[3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores[1], want[1], rtol=1e-4, atol=1e-5)
    _, _, every = model(x, t, y, attn_depths=(2,))
    assert every[0].shape == (2, 4, 16, 16)


class StubEncoder(torch.nn.Module):
    """Fixed features and attention scores; raises when called after the stop."""
    num_heads, depth, embed_dim, enc_type = 2, 4, 16, "stub"

    def __init__(self, patch, attn):
        super().__init__()
        self.patch, self.attn, self.calls = patch, attn, 0

    def features(self, images, attn_blocks=()):
        self.calls += 1
        return {"patch": self.patch, "attn": [self.attn[b] for b in attn_blocks]}

    def forward(self, images):
        raise AssertionError("HASTE takes the first encoder's patch tokens from features()")


def fixed_inputs(objective, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {"moments": torch.randn(n, 8, 8, 8, generator=g), "label": torch.tensor([1, 4, 9]),
             "image": torch.zeros(n, 3, 16, 16, dtype=torch.uint8)}
    draws = [objective.draw(g) for _ in range(n)]
    return batch, {k: torch.stack([d[k] for d in draws]) for k in draws[0]}


def test_haste_loss_equals_the_formula_and_stops():
    model = tiny_model(z_dims=[16]).train()
    g = torch.Generator().manual_seed(1)
    patch = torch.randn(3, 16, 16, generator=g)
    attn = {b: torch.randn(3, 2, 16, 16, generator=g) * 3 for b in (1, 2, 3, 4)}
    enc = StubEncoder(patch, attn)
    objective = HASTE(model, FlowMatching(), [enc], attn_coeff=0.7, proj_coeff=0.4, stop_step=10,
                      attn_blocks=(2, 3), encoder_blocks=(4, 1))
    batch, draws = fixed_inputs(objective)
    ctx = StepContext(step=9, autocast=contextlib.nullcontext)
    total, terms = objective.loss(model, objective.prepare(batch, draws, ctx), ctx)
    assert objective.terms == ("loss", "proj_loss", "attn_loss")

    mean, std = batch["moments"].chunk(2, dim=1)
    x = (mean + std * draws["eps"]) * 0.18215
    tt, noise = draws["time"], draws["noise"]
    a, s, da, ds = (v.view(-1, 1, 1, 1) for v in hand_interpolant(tt, "linear"))
    out, zt, sc = model(a * x + s * noise, tt, batch["label"], force_drop_ids=draws["drop"], attn_depths=(2, 3),
                        attn_heads=2)
    denoise = ((out - (da * x + ds * noise)) ** 2).mean(dim=(1, 2, 3)).mean()
    proj = (-F.cosine_similarity(patch, zt[0], dim=-1)).mean()
    ce = []
    for e_block, m in zip((4, 1), sc):
        p = torch.exp(attn[e_block]) / torch.exp(attn[e_block]).sum(-1, keepdim=True)
        q = torch.exp(m) / torch.exp(m).sum(-1, keepdim=True)
        ce.append(-(p * torch.log(q)).sum(-1).mean())  # official: log(softmax)
    attn_loss = sum(ce) / 2
    torch.testing.assert_close(terms["attn_loss"], attn_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["proj_loss"], proj, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, denoise + 0.4 * proj + 0.7 * attn_loss, rtol=1e-5, atol=1e-6)
    assert enc.calls == 1

    # from the stop on: the denoising loss alone, no encoder, no projector
    ran = []
    hook = model.projectors[0].register_forward_hook(lambda *a: ran.append(1))
    ctx = StepContext(step=10, autocast=contextlib.nullcontext)
    inputs = objective.prepare(batch, draws, ctx)
    total, terms = objective.loss(model, inputs, ctx)
    hook.remove()
    assert enc.calls == 1 and not ran and "zs" not in inputs and "attn" not in inputs
    torch.testing.assert_close(total, denoise)
    assert float(terms["proj_loss"]) == 0.0 and float(terms["attn_loss"]) == 0.0


def test_flags_and_bad_input():
    o = from_flat({"exp_name": "x", "method": "haste"}).objective
    assert (o.proj_coeff, o.attn_coeff, o.align_stop_step) == (0.5, 0.5, 250000)
    assert o.haste_blocks() == ((5, 6, 7, 8), (9, 10, 11, 12))
    args = build_parser().parse_args(["--exp-name", "x", "--method", "haste", "--early-stop-point", "1000",
                                      "--attn-blocks", "2-4", "--attn-encoder-blocks", "6,8,10", "--attn-coeff", "1"])
    o = from_args(args).objective
    assert (o.align_stop_step, o.attn_coeff, o.haste_blocks()) == (1000, 1.0, ((2, 3, 4), (6, 8, 10)))
    for kw, msg in ((dict(attn_blocks="5,6"), "must pair up one to one"),
                    (dict(attn_blocks="26-29", attn_encoder_blocks="1-4"), "reach past the model's 28 blocks"),
                    (dict(attn_blocks="a"), "--attn-blocks='a': expected 1-based block numbers"),
                    (dict(align_stop_step=-1), "--align-stop-step=-1"),
                    (dict(parallel="ddp"), "fsdp or none for --method haste"),
                    (dict(enc_type="none"), "an encoder for --method haste")):
        with pytest.raises(ConfigError, match=msg):
            from_flat({"exp_name": "x", "method": "haste", **kw})
    model = tiny_model(z_dims=[16])
    vit = PretrainedEncoder("dinov2-vit-b", tiny_vit(), 16, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match=r"--attn-encoder-blocks \[4\] reach past encoder dinov2-vit-b's 3 blocks"):
        HASTE(model, FlowMatching(), [vit], attn_blocks=(1,), encoder_blocks=(4,))
    many = StubEncoder(None, None)
    many.num_heads = 8
    with pytest.raises(ValueError, match="has 8 heads but the model 4"):
        HASTE(model, FlowMatching(), [many], attn_blocks=(1,), encoder_blocks=(1,))
    with pytest.raises(ValueError, match="gives no attention maps"):
        HASTE(model, FlowMatching(), [torch.nn.Identity()], attn_blocks=(1,), encoder_blocks=(1,))
    with pytest.raises(ValueError, match="gives its patch tokens only"):  # CLIP's visual tower has no features()
        from fastrepa.encoders.vit import CLIPVisual
        clip = PretrainedEncoder("clip-vit-L", CLIPVisual(patch=4, width=32, layers=1, heads=2, grid=4,
                                                          output_dim=8), 16, IMAGENET_MEAN, IMAGENET_STD)
        clip.features(torch.zeros(1, 3, 16, 16))


@pytest.fixture(scope="module")
def haste_run(tmp_path_factory, data16):  # noqa: F811
    out = tmp_path_factory.mktemp("haste")
    full = train(from_flat({**HASTE_RUN, "data_dir": data16, "output_dir": str(out / "full"), "exp_name": "h"}))
    return {"out": out, "full": full, "data": data16}


def test_haste_resumes_exactly_across_the_stop(haste_run, tmp_path):
    half = dict(HASTE_RUN, data_dir=haste_run["data"], output_dir=str(tmp_path), exp_name="h")
    train(from_flat({**half, "max_train_steps": 3}))
    resumed = train(from_flat(half))
    assert resumed["resumed_from"] == 3 and resumed["method"] == "haste"
    assert_same_run(haste_run["full"], resumed, ("loss", "proj_loss", "attn_loss"))
    rows = [json.loads(line) for line in open(os.path.join(haste_run["full"]["exp_dir"], "metrics.jsonl"))]
    assert all(r["attn_loss"] > 0 for r in rows[:4]) and all(r["attn_loss"] == 0 for r in rows[4:])


def test_demo_sized_haste_run_learns_and_samples(tmp_path, data16):  # noqa: F811
    report = train(from_flat({**HASTE_RUN, "data_dir": data16, "output_dir": str(tmp_path), "exp_name": "demo",
                              "max_train_steps": 60, "align_stop_step": 40, "log_every": 10,
                              "checkpointing_steps": 60, "sampling_steps": 60}))
    rows = [json.loads(line) for line in open(os.path.join(report["exp_dir"], "metrics.jsonl"))]
    assert report["last_loss"] < 0.85 * report["first_loss"]
    assert rows[3]["attn_loss"] < rows[0]["attn_loss"] and rows[-1]["attn_loss"] == 0
    sample_dir = str(tmp_path / "samples")
    assert generate_cli.main(["--ckpt", report["checkpoint"], "--vae", "identity", "--num-fid-samples", "4",
                              "--per-proc-batch-size", "4", "--num-steps", "4", "--sample-dir", sample_dir]) == 0
    arr = np.load(json.load(open(os.path.join(sample_dir, "generate.json")))["samples"])["arr_0"]
    assert arr.shape == (4, 16, 16, 3) and arr.std() > 0


def test_dry_run_counts_haste_aligning_and_after_the_stop(capsys):
    import train as train_cli
    counts = {}
    for method in ("repa", "haste"):
        assert train_cli.main(["--exp-name", "x", "--dry-run", "--method", method]) == 0
        counts[method] = json.loads(capsys.readouterr().out)
    repa, haste = counts["repa"], counts["haste"]
    # SiT-XL/2 + DINOv2-B: the scores of 4 blocks (12 heads of 72 dims, 256 tokens) forward and backward plus
    # the encoder's: 4 * 2 * 256^2 * (3 * 12 * 72 + 768) = 1.76 GFLOP over REPA's
    assert haste["train_gflop_per_image"] - repa["train_gflop_per_image"] == pytest.approx(1.762, abs=2e-3)
    # after the stop: no encoder forward, no projector
    assert haste["after_stop_train_gflop_per_image"] < repa["train_gflop_per_image"] - repa[
        "encoder_forward_gflop_per_image"]
    assert haste["params"] == repa["params"]


def test_haste_two_processes_equal_one_across_the_stop(haste_run):
    """FSDP2: after the stop the projectors get no gradient and the encoder does not run; both sides of the
    stop equal the single process."""
    from test_train_dist import flags, fsdp2_works_on_cpu, launch, ok
    if not fsdp2_works_on_cpu():
        pytest.skip("needs torch.distributed with gloo and FSDP2")
    out = haste_run["out"] / "two"
    keys = ("method", "attn_blocks", "attn_encoder_blocks", "align_stop_step")
    ok(launch(flags(out, haste_run["data"], **{k: HASTE_RUN[k] for k in keys}, exp_name="h", max_grad_norm=1.0,
                    checkpointing_steps=3, sampling_steps=6)))
    for key in ("loss", "proj_loss", "attn_loss", "grad_norm"):
        rows = [[json.loads(line)[key] for line in open(os.path.join(d, "metrics.jsonl"))]
                for d in (str(out / "h"), haste_run["full"]["exp_dir"])]
        np.testing.assert_allclose(rows[0], rows[1], rtol=1e-5, atol=1e-7, err_msg=key)
