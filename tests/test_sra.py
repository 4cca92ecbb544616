"""SRA (self-representation alignment) on SiT and DiT: the loss against a formula written here, the teacher's
early exit, time and gradients, the weight schedule, flags and bad input, exact resume, 2 processes = 1,
a demo-sized run that learns, and sampling an SRA checkpoint."""
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
from fastrepa.models import build_model
from fastrepa.objectives import SRA, FlowMatching, StepContext
from fastrepa.objectives.ddpm import DDPM
from fastrepa.objectives.sra import sml1_weight
from fastrepa.train import train
from fastrepa.train.ema import make_ema
from test_train import TINY_RUN, assert_same_run, data16, losses  # noqa: F401 (data16 is a fixture)

SRA_RUN = dict(TINY_RUN, method="sra", depth=4, block_out_s=1, block_out_t=3)


def student_and_teacher(model_fn=tiny_model, **kw):
    student = model_fn(z_dims=[], ap_head=True, **kw)
    teacher = make_ema(student)
    with torch.no_grad():  # a teacher that differs from the student, as an EMA does after some steps
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return student.train(), teacher


def inputs_for(objective, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    draws = [objective.draw(g) for _ in range(n)]
    inputs = {k: torch.stack([d[k] for d in draws]) for k in draws[0] if k != "eps"}
    inputs["x"] = torch.randn(n, *objective.latent_shape, generator=g)
    inputs["y"] = torch.tensor([1, 4, 9])
    inputs["drop"] = torch.tensor([0, 1, 0])  # sample 1's label dropped: the teacher sees the null class too
    return inputs


def plain_block_states(model, x, t, y, depth):
    """The hidden state after block `depth` (1-based) with the model's plain official blocks, one by one."""
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder.embedding_table(y)
    for block in model.blocks[:depth]:
        h = block(h, c)
    return h


@pytest.mark.parametrize("cos_axis", ["tokens", "features"])
def test_sra_loss_on_sit_equals_the_formula(cos_axis):
    student, teacher = student_and_teacher()
    objective = SRA(student, FlowMatching(), block_out_s=2, block_out_t=3, t_max=0.2, cos_axis=cos_axis)
    inp = inputs_for(objective)
    total, terms = objective.loss(student, inp, StepContext(teacher=teacher))

    x, noise, t, y = inp["x"], inp["noise"], inp["time"], inp["y"]
    y_seen = torch.where(inp["drop"] == 1, torch.full_like(y, 10), y)
    a, s, da, ds = (v.view(-1, 1, 1, 1) for v in hand_interpolant(t, "linear"))
    x_t = a * x + s * noise
    h_s = plain_block_states(student, x_t, t, y_seen, 2)
    head = F.linear(F.silu(F.linear(h_s, student.ap_head.linear1.weight, student.ap_head.linear1.bias)),
                    student.ap_head.linear2.weight, student.ap_head.linear2.bias)
    t_teacher = (t - 0.2 * inp["teacher_u"]).clamp(0, 1)
    at, st, _, _ = (v.view(-1, 1, 1, 1) for v in hand_interpolant(t_teacher, "linear"))
    h_t = plain_block_states(teacher, at * x + st * noise, t_teacher, y_seen, 3)
    dim = 1 if cos_axis == "tokens" else 2  # [N, T, D]: official SRA's cosine_similarity(dim=1) is over tokens
    cos = (head * h_t).sum(dim) / (head.norm(dim=dim) * h_t.norm(dim=dim))
    align = 0.5 * (1 - cos).mean()
    out = student(x_t, t, y, force_drop_ids=inp["drop"], return_zs=False)
    denoise = ((out - (da * x + ds * noise)) ** 2).mean(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(terms["align_loss"], align, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss"], denoise, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, denoise + align, rtol=1e-5, atol=1e-6)
    assert objective.terms == ("loss", "align_loss") and terms["align_loss"] > 0


def test_sml1_loss_and_its_epoch_schedule():
    student, teacher = student_and_teacher()
    objective = SRA(student, FlowMatching(), block_out_s=1, block_out_t=2, align_loss="sml1", resolution=256)
    inp = inputs_for(objective)
    _, terms = objective.loss(student, inp, StepContext(teacher=teacher, epoch=400))
    w = 2 * 0.1 ** ((400 - 149) / 1000 + 1)
    assert sml1_weight(400, 256, 2.0) == pytest.approx(w)
    assert sml1_weight(10, 256, 2.0) == pytest.approx(0.2) and sml1_weight(149, 256, 2.0) == pytest.approx(0.2)
    assert sml1_weight(300, 512, 0.4) == pytest.approx(0.4 * 0.1 ** ((300 - 99) / 800 + 1))
    x_t, t = objective.denoiser.corrupt(inp["x"], inp["time"], inp["noise"])
    _, _, head = student(x_t, t, inp["y"], force_drop_ids=inp["drop"], head_depth=1)
    x_T, t_T = objective.denoiser.corrupt(inp["x"], objective.teacher_time(inp), inp["noise"])
    target = teacher.hidden_states(x_T, t_T, objective.dropped_labels(inp), [2])[0]
    d = (head - target).abs()
    sml1 = torch.where(d < 0.05, 0.5 * d ** 2 / 0.05, d - 0.025).mean()  # smooth L1, beta 0.05, by hand
    torch.testing.assert_close(terms["align_loss"], w * sml1, rtol=1e-5, atol=1e-7)


def test_teacher_exits_early_gets_no_gradient_and_is_never_noisier():
    student, teacher = student_and_teacher()
    objective = SRA(student, FlowMatching(), block_out_s=1, block_out_t=2)
    ran = []
    for i, b in enumerate(teacher.blocks):
        b.register_forward_hook(lambda mod, inp, out, i=i: ran.append(i))
    inp = inputs_for(objective, seed=3)
    total, _ = objective.loss(student, inp, StepContext(teacher=teacher))
    total.backward()
    assert ran == [0, 1]  # blocks 3 and 4 of the teacher never ran
    assert all(p.grad is None for p in teacher.parameters())
    assert student.ap_head.linear1.weight.grad is not None and student.blocks[3].mlp.fc2.weight.grad is not None
    g = torch.Generator().manual_seed(5)
    draws = [objective.draw(g) for _ in range(500)]
    t = torch.stack([d["time"] for d in draws])
    t_teacher = objective.teacher_time({"time": t, "teacher_u": torch.stack([d["teacher_u"] for d in draws])})
    assert (t_teacher <= t).all() and (t - t_teacher <= 0.2 + 1e-7).all() and (t_teacher >= 0).all()
    assert (t - t_teacher).max() > 0.15  # the offset spans (0, t_max)
    # DiT: integer times, t_T = clamp(t - randint(0, 1000 t_max), 1, 999): never noisier, but never below 1
    dit = build_model("DiT-S/2", input_size=8, hidden_size=32, depth=4, num_heads=2, num_classes=10, ap_head=True)
    dobj = SRA(dit, DDPM(), block_out_s=1, block_out_t=2, t_max=0.2, family="DiT", align_loss="sml1")
    draws = [dobj.draw(g) for _ in range(500)]
    t = torch.stack([d["time"] for d in draws])
    dt = torch.stack([d["teacher_dt"] for d in draws])
    t_teacher = dobj.teacher_time({"time": t, "teacher_dt": dt})
    assert t_teacher.dtype == torch.int64 and 0 <= dt.min() and 180 < dt.max() <= 199  # randint(0, 200)
    assert (t_teacher <= torch.clamp(t, min=1)).all() and t_teacher.min() >= 1 and t_teacher.max() <= 999
    assert torch.equal(t_teacher, torch.clamp(t - dt, 1, 999))
    assert dobj.align_weight(0) == pytest.approx(0.4 * 0.1)  # DiT's sml1 scale


def test_sra_on_dit_loss_has_the_ddpm_terms():
    def dit_fn(**kw):
        torch.manual_seed(0)
        m = build_model("DiT-S/2", input_size=8, hidden_size=32, depth=4, num_heads=2, num_classes=10, **kw)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "adaLN_modulation" in name or "final_layer" in name:
                    p.normal_(0, 0.05)
        return m
    student, teacher = student_and_teacher(dit_fn)
    objective = SRA(student, DDPM(), block_out_s=1, block_out_t=3, family="DiT", align_loss="sml1")
    inp = inputs_for(objective)
    total, terms = objective.loss(student, inp, StepContext(teacher=teacher, epoch=0))
    assert objective.terms == ("loss", "align_loss", "mse", "vb")
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    torch.testing.assert_close(total, terms["loss"] + terms["align_loss"])
    x_T, t_T = objective.denoiser.corrupt(inp["x"], objective.teacher_time(inp), inp["noise"])
    target = plain_block_states(teacher, x_T, t_T, objective.dropped_labels(inp), 3)
    x_t, t = objective.denoiser.corrupt(inp["x"], inp["time"], inp["noise"])
    head = student.ap_head(plain_block_states(student, x_t, t, objective.dropped_labels(inp), 1))
    torch.testing.assert_close(terms["align_loss"], 0.04 * F.smooth_l1_loss(head, target, beta=0.05),
                               rtol=1e-5, atol=1e-7)


def test_flags_defaults_and_bad_input():
    args = build_parser().parse_args(["--exp-name", "x", "--method", "sra", "--loss-type", "sml1", "--t-max", "0.1"])
    cfg = from_args(args)
    assert cfg.objective.align_loss == "sml1" and cfg.objective.t_max == 0.1 and cfg.objective.encoders == []
    assert cfg.objective.sra_blocks("SiT-XL/2") == (8, 20) and cfg.objective.sra_blocks("DiT-XL/2") == (8, 16)
    assert cfg.objective.sra_blocks("SiT-B/2") == (4, 8)
    assert from_flat({"exp_name": "x", "method": "sra"}).objective.sra_align_loss("DiT-XL/2") == "sml1"
    assert from_flat({"exp_name": "x", "method": "sra"}).objective.sra_align_loss("SiT-XL/2") == "cos"
    for kw, msg in ((dict(block_out_s=8, block_out_t=8), "--block-out-s=8 must be below --block-out-t=8"),
                    (dict(block_out_t=29), r"--block-out-t=29: expected a block in 1..28"),
                    (dict(block_out_s=0, block_out_t=4), r"--block-out-s=0: expected a block in 1..28"),
                    (dict(t_max=0.0), r"--t-max=0.0: expected a number in \(0, 1\]"),
                    (dict(t_max=1.5), r"--t-max=1.5"),
                    (dict(model="SiT-B/2", block_out_t=13), r"--block-out-t=13: expected a block in 1..12")):
        with pytest.raises(ConfigError, match=msg):
            from_flat({"exp_name": "x", "method": "sra", **kw})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--exp-name", "x", "--align-loss", "l2"])


def test_sra_checkpoint_without_ema_is_refused(tmp_path):
    """The teacher is the EMA: resuming SRA from a checkpoint that holds no EMA names the key."""
    from fastrepa.official_ckpt import CheckpointError
    from fastrepa.train import dcp
    model = tiny_model(z_dims=[], ap_head=True)
    dcp.save(str(tmp_path), 3, model=model, extra={"step": 3})
    with pytest.raises(CheckpointError, match="has no ema state"):
        dcp.load(str(tmp_path / "step-000000003"), model=model, ema=make_ema(model))


@pytest.fixture(scope="module")
def sra_run(tmp_path_factory, data16):  # noqa: F811
    out = tmp_path_factory.mktemp("sra")
    full = train(from_flat({**SRA_RUN, "data_dir": data16, "output_dir": str(out / "full"), "exp_name": "s"}))
    return {"out": out, "full": full, "data": data16}


def test_sra_resumes_exactly(sra_run, tmp_path):
    half = dict(SRA_RUN, data_dir=sra_run["data"], output_dir=str(tmp_path), exp_name="s")
    train(from_flat({**half, "max_train_steps": 3}))
    resumed = train(from_flat(half))
    assert resumed["resumed_from"] == 3 and resumed["method"] == "sra"
    a = assert_same_run(sra_run["full"], resumed, ("loss", "align_loss"))
    assert any(k.startswith("ap_head.") for k in a["model"]) and not any(k.startswith("projectors") for k in a["model"])
    # another method cannot resume this run
    with pytest.raises(ValueError, match="--method = sra"):
        train(from_flat({**half, "method": "repa", "max_train_steps": 8}))


def test_sra_two_processes_equal_one(sra_run):
    """FSDP2: the sharded EMA runs the teacher forward every step and a sample grid every 2 steps, and
    its update still finds its shards (FSDP2 keeps a root unsharded after a forward without backward)."""
    from test_train_dist import flags, launch, ok
    out = sra_run["out"] / "two"
    ok(launch(flags(out, sra_run["data"], **{k: SRA_RUN[k] for k in ("method", "depth", "block_out_s",
                                                                     "block_out_t")}, exp_name="s",
                    max_grad_norm=1.0, checkpointing_steps=3, sampling_steps=2)))
    one, two = sra_run["full"]["exp_dir"], str(out / "s")
    for key in ("loss", "align_loss", "grad_norm"):
        a = [json.loads(line)[key] for line in open(os.path.join(one, "metrics.jsonl"))]
        b = [json.loads(line)[key] for line in open(os.path.join(two, "metrics.jsonl"))]
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_demo_sized_sra_run_learns_and_samples(tmp_path, data16):  # noqa: F811
    report = train(from_flat({**SRA_RUN, "data_dir": data16, "output_dir": str(tmp_path), "exp_name": "demo",
                              "max_train_steps": 60, "log_every": 10, "checkpointing_steps": 60,
                              "sampling_steps": 60}))
    assert report["last_loss"] < 0.85 * report["first_loss"]
    assert report["last_align_loss"] < report["first_align_loss"]
    assert report["train_flop_per_image"] > 0
    sample_dir = str(tmp_path / "samples")
    assert generate_cli.main(["--ckpt", report["checkpoint"], "--vae", "identity", "--num-fid-samples", "4",
                              "--per-proc-batch-size", "4", "--num-steps", "4", "--sample-dir", sample_dir]) == 0
    arr = np.load(json.load(open(os.path.join(sample_dir, "generate.json")))["samples"])["arr_0"]
    assert arr.shape == (4, 16, 16, 3) and arr.std() > 0


def test_sra_flops_count_the_teacher_up_to_its_block():
    from fastrepa.train.flops import counts
    sra = counts(from_flat({"exp_name": "x", "method": "sra"}))
    repa = counts(from_flat({"exp_name": "x", "enc_type": "none"}))
    assert sra["method"] == "sra" and sra["projector_params"] == 0
    with torch.device("meta"):
        m = build_model("SiT-XL/2", z_dims=[], ap_head=True)
    teacher = m.forward_flops(20)
    assert math.isclose(sra["train_gflop_per_image"], round((3 * (m.forward_flops() + m.head_flops()) + teacher)
                                                             / 1e9, 3))
    assert 0.65 < teacher / m.forward_flops() < 0.75  # 20 of 28 blocks
    assert sra["train_gflop_per_image"] > repa["train_gflop_per_image"]
