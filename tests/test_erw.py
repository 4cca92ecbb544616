"""ERW (embedded representation warmup): the warmup loss against a formula written here with early exit,
the parameters it leaves alone, the lambda schedule, the phase-2 loss as REPA's, flags and bad input, the
transition (fresh optimizer, EMA = model), exact resume on both sides of the boundary, and a demo-sized
run that learns and samples."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import generate as generate_cli
from conftest import tiny_model
from fastrepa.config import ConfigError, from_flat
from fastrepa.models import build_model
from fastrepa.train.flops import counts as flop_counts
from fastrepa.objectives import REPA, FlowMatching, StepContext
from fastrepa.objectives.erw import ERW, default_lambda_c0, erw_lambda
from fastrepa.train import train
from fastrepa.train.ema import make_ema
from fastrepa.train.step import TrainStep
from test_train import TINY_RUN, assert_same_run, data16  # noqa: F401 (data16 is a fixture)

W = 3
ERW_RUN = dict(TINY_RUN, method="erw", depth=4, encoder_depth=3, l2r_depth=1, warmup_steps=W, use_rope=True)


def erw_objective(model, **kw):
    encoders = [torch.nn.Identity() for _ in model.z_dims]  # zs are given in the inputs
    return ERW(model, FlowMatching(), encoders, warmup_steps=kw.pop("warmup_steps", 5), l2r_depth=1,
               lambda_c0=kw.pop("lambda_c0", 2.0), **kw)


def inputs_for(objective, model, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    draws = [objective.draw(g) for _ in range(n)]
    inputs = {k: torch.stack([d[k] for d in draws]) for k in draws[0] if k != "eps"}
    inputs["x"] = torch.randn(n, *objective.latent_shape, generator=g)
    inputs["y"] = torch.tensor([1, 4, 9])
    inputs["drop"] = torch.tensor([0, 1, 0])
    tokens = model.token_grid[0] * model.token_grid[1]
    inputs["zs"] = [torch.randn(n, tokens, z, generator=g) for z in model.z_dims]
    return inputs


def plain_projection(model, x, y, depth):
    """Projector outputs after block `depth` with t = 0, the official blocks one by one."""
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(torch.zeros(x.shape[0])) + model.y_embedder.embedding_table(y)
    for block in model.blocks[:depth]:
        h = block(h, c)
    outs = []
    for p in model.projectors:
        outs.append(p[4](F.silu(p[2](F.silu(p[0](h))))))
    return outs


def test_warmup_loss_is_the_formula_and_runs_only_the_first_blocks():
    model = tiny_model(rope=True, rope_pairs="interleaved").train()
    objective = erw_objective(model)
    inp = inputs_for(objective, model)
    ran = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    model.final_layer.register_forward_hook(lambda m, a, o: ran.append("final"))
    total, terms = objective.loss(model, inp, StepContext(step=2))
    assert ran == [0]  # l2r-depth 1: block 1 only, no final layer
    y_seen = torch.where(inp["drop"] == 1, torch.full_like(inp["y"], 10), inp["y"])
    zt = plain_projection(model, inp["x"], y_seen, 1)
    proj = torch.stack([(-F.cosine_similarity(z, p, dim=-1)).mean() for z, p in zip(inp["zs"], zt)]).mean()
    torch.testing.assert_close(terms["proj_loss"], proj, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, 0.5 * proj, rtol=1e-5, atol=1e-6)
    assert float(terms["proj_coeff"]) == 0.5 and objective.terms == ("loss", "proj_loss", "proj_coeff")
    total.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {n for n, _ in model.named_parameters()
                       if n.startswith(("x_embedder.", "t_embedder.", "y_embedder.", "blocks.0.", "projectors."))}


def test_a_warmup_step_leaves_every_other_parameter_bit_identical():
    model = tiny_model(qk_norm=True).train()
    ema = make_ema(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    objective = erw_objective(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    step = TrainStep(model, ema, opt, objective, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    batch = {"moments": torch.randn(3, 8, 8, 8, generator=g), "label": torch.tensor([1, 2, 3]),
             "image": torch.zeros(3, 3, 16, 16, dtype=torch.uint8)}
    tokens = model.token_grid[0] * model.token_grid[1]
    objective.prepare = lambda batch, draws, ctx: {**REPA.prepare(objective, batch, draws, ctx),
                                                   "zs": [torch.randn(3, tokens, z, generator=g) for z in model.z_dims]}
    from fastrepa.rng import draw_step
    res = step(batch, draw_step(0, 0, 0, 3, objective.draw), lr=1e-2, ctx=StepContext(step=0))
    assert res.finite
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    warm = ("x_embedder.", "t_embedder.", "y_embedder.", "blocks.0.", "projectors.")
    assert changed and all(n.startswith(warm) for n in changed)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if not n.startswith(warm))


def test_lambda_schedule_and_the_phase_two_loss_is_repas():
    assert (default_lambda_c0("SiT-XL/2"), default_lambda_c0("SiT-L/2"), default_lambda_c0("SiT-B/2")) == (6, 3, 1)
    for s in (100000, 150000, 200000, 400000):
        assert math.isclose(erw_lambda(s, 100000, 6.0), 6.0 * 2 ** (-(s - 100000) / 50000))
    assert erw_lambda(150000, 100000, 6.0) == 3.0
    model = tiny_model().train()
    objective = erw_objective(model, warmup_steps=5, lambda_c0=2.0, half_life=10)
    inp = inputs_for(objective, model)
    total, terms = objective.loss(model, inp, StepContext(step=15))  # lambda = 2 * 2^(-1) = 1
    repa = REPA(model, FlowMatching(), [torch.nn.Identity()] * 2, proj_coeff=1.0)
    ref_total, ref_terms = repa.loss(model, inp, StepContext(step=15))
    torch.testing.assert_close(total, ref_total)
    torch.testing.assert_close(terms["loss"], ref_terms["loss"])
    assert float(terms["proj_coeff"]) == 1.0 and objective.state_dict()["phase"] == "main"


def test_flags_and_bad_input():
    cfg = from_flat({"exp_name": "x", "method": "erw", "encoder_depth": 14, "use_rope": True})
    assert cfg.objective.warmup_steps == 100000 and cfg.objective.l2r_depth == 4
    assert cfg.objective.erw_lambda_c0("SiT-XL/2") == 6.0
    kw = cfg.model_overrides()
    assert kw["rope"] is True and kw["rope_pairs"] == "interleaved"  # --use_rope: ERW's RoPE
    assert from_flat({"exp_name": "x", "use_rope": True, "rope_pairs": "half"}).model_overrides()["rope_pairs"] == "half"
    assert from_flat({"exp_name": "x", "rope": True}).model_overrides()["rope_pairs"] == "half"
    for kw, msg in ((dict(l2r_depth=8), "--l2r-depth=8 must be below --encoder-depth=8"),
                    (dict(l2r_depth=0), r"--l2r-depth=0: expected a block in 1..28"),
                    (dict(warmup_steps=400000), r"--warmup-steps=400000: expected 1 <= W < --max-train-steps"),
                    (dict(enc_type="none"), "--enc-type='none': expected an encoder for --method erw"),
                    (dict(parallel="ddp"), "--parallel='ddp': expected fsdp or none for --method erw"),
                    (dict(lambda_half_life=0), "--lambda-half-life=0")):
        with pytest.raises(ConfigError, match=msg):
            from_flat({"exp_name": "x", "method": "erw", **kw})
    with pytest.raises(ValueError, match="trains SiT models"):
        ERW(build_model("DiT-S/2", input_size=8, depth=2), FlowMatching(), [], warmup_steps=2, l2r_depth=1,
            lambda_c0=1.0)
    counts = flop_counts(from_flat({"exp_name": "x", "method": "erw", "encoder_depth": 14}))
    repa = flop_counts(from_flat({"exp_name": "x", "encoder_depth": 14}))
    assert counts["train_gflop_per_image"] == repa["train_gflop_per_image"]  # phase 2 is REPA's step
    assert 0.1 < counts["warmup_train_gflop_per_image"] / repa["train_gflop_per_image"] < 0.3  # 4 of 28 blocks


@pytest.fixture(scope="module")
def erw_run(tmp_path_factory, data16):  # noqa: F811
    out = tmp_path_factory.mktemp("erw")
    full = train(from_flat({**ERW_RUN, "data_dir": data16, "output_dir": str(out / "full"), "exp_name": "e",
                            "checkpointing_steps": 1}))
    return {"out": out, "full": full, "data": data16}


def _rows(exp_dir, key):
    return [json.loads(line)[key] for line in open(os.path.join(exp_dir, "metrics.jsonl"))]


@pytest.mark.parametrize("stop_at", [W, W + 1], ids=["at-the-boundary", "after-it"])
def test_resume_across_the_boundary_is_exact(erw_run, tmp_path, stop_at):
    """A run killed at step `stop_at` (the full run's folder cut back to that checkpoint) resumes to the
    full run's metrics and weights, bit for bit."""
    import shutil

    half = dict(ERW_RUN, data_dir=erw_run["data"], output_dir=str(tmp_path), exp_name="e")
    shutil.copytree(erw_run["full"]["exp_dir"], tmp_path / "e")
    for name in os.listdir(tmp_path / "e" / "checkpoints"):
        if not name.startswith("step-") or int(name[5:]) > stop_at:
            shutil.rmtree(tmp_path / "e" / "checkpoints" / name, ignore_errors=True)
            (tmp_path / "e" / "checkpoints" / name).unlink(missing_ok=True)
    state = json.load(open(tmp_path / "e" / "checkpoints" / f"step-{stop_at:09d}" / "train_state.json"))
    assert state["objective"] == {"phase": "warmup" if stop_at == W else "main", "warmup_steps": W, "l2r_depth": 1}
    resumed = train(from_flat(half))
    assert resumed["resumed_from"] == stop_at
    assert_same_run(erw_run["full"], resumed, ("loss", "proj_loss", "proj_coeff", "grad_norm"))
    # --resume-step W from the warmup checkpoint of the full run, with other settings refused
    with pytest.raises(ValueError, match="--l2r-depth=2 but the checkpoint was trained with --l2r-depth 1"):
        train(from_flat({**half, "output_dir": str(erw_run["out"] / "full"), "resume_step": W, "l2r_depth": 2,
                         "max_train_steps": W + 1}))


def test_transition_sets_the_ema_from_the_model_and_a_fresh_optimizer(tmp_path, data16):  # noqa: F811
    """With ema_decay 1 the EMA stays what the transition made it: the model after the W warmup steps."""
    from fastrepa.official_ckpt import load_checkpoint_file
    from fastrepa.train import dcp
    from fastrepa.train.dcp import _read_component
    run = train(from_flat({**ERW_RUN, "data_dir": data16, "output_dir": str(tmp_path), "exp_name": "t",
                           "ema_decay": 1.0, "max_train_steps": W + 1, "checkpointing_steps": W}))
    warm = _read_component(dcp.find(str(tmp_path / "t" / "checkpoints"), W), "model")
    final = load_checkpoint_file(run["checkpoint"])
    assert all(torch.equal(final["ema"][k], warm[k]) for k in final["ema"])
    assert not all(torch.equal(final["model"][k], warm[k]) for k in final["model"])
    assert {int(s["step"]) for s in final["opt"]["state"].values()} == {1}  # one step since the fresh start
    assert len(final["opt"]["state"]) == len(final["model"]) - 1  # every parameter but the fixed pos_embed


def test_demo_sized_erw_run_learns_and_samples(tmp_path, data16):  # noqa: F811
    report = train(from_flat({**ERW_RUN, "data_dir": data16, "output_dir": str(tmp_path), "exp_name": "demo",
                              "warmup_steps": 20, "max_train_steps": 60, "log_every": 5, "checkpointing_steps": 60,
                              "sampling_steps": 60}))
    exp = report["exp_dir"]
    steps, proj, loss = _rows(exp, "step"), _rows(exp, "proj_loss"), _rows(exp, "loss")
    warm = [p for s, p in zip(steps, proj) if s <= 20]
    main = [x for s, x in zip(steps, loss) if s > 25]
    assert warm[-1] < warm[0]  # the warmup aligns the first block to the encoder
    assert main[-1] < 0.9 * main[0]  # then the denoising loss falls
    assert _rows(exp, "proj_coeff")[-1] < 1.0  # lambda decays from c0 = 1 (a small model)
    sample_dir = str(tmp_path / "samples")
    assert generate_cli.main(["--ckpt", report["checkpoint"], "--vae", "identity", "--num-fid-samples", "4",
                              "--per-proc-batch-size", "4", "--num-steps", "4", "--sample-dir", sample_dir]) == 0
    gen = json.load(open(os.path.join(sample_dir, "generate.json")))
    arr = np.load(gen["samples"])["arr_0"]
    assert arr.shape == (4, 16, 16, 3) and arr.std() > 0


def test_erw_two_processes_equal_one(erw_run):
    """FSDP2: the warmup runs only the first block's unit (the others never unshard and get no gradient),
    the transition resets the optimizer and the sharded EMA, and both phases equal the single process."""
    from test_train_dist import flags, fsdp2_works_on_cpu, launch, ok
    if not fsdp2_works_on_cpu():
        pytest.skip("needs torch.distributed with gloo and FSDP2")
    out = erw_run["out"] / "two"
    argv = flags(out, erw_run["data"], **{k: ERW_RUN[k] for k in ("method", "depth", "encoder_depth", "l2r_depth",
                                                                  "warmup_steps")},
                 exp_name="e", max_grad_norm=1.0, checkpointing_steps=3, sampling_steps=6)
    ok(launch(argv + ["--use-rope"]))
    one, two = erw_run["full"]["exp_dir"], str(out / "e")
    for key in ("loss", "proj_loss", "proj_coeff", "grad_norm"):
        np.testing.assert_allclose(_rows(two, key), _rows(one, key), rtol=1e-5, atol=1e-7, err_msg=key)


def test_generate_takes_erws_inference_flags(erw_run, tmp_path, capsys):
    ckpt = erw_run["full"]["checkpoint"]
    for extra, msg in ((["--calculate-fid"], "--calculate-fid: give the reference with --fid-reference"),
                       (["--use_swiglu"], "--use_swiglu: ERW's SwiGLU"), (["--wo_shift"], "--wo_shift")):
        with pytest.raises(SystemExit):
            generate_cli.main(["--ckpt", ckpt, "--sample-dir", str(tmp_path), *extra])
        assert msg in capsys.readouterr().err
    # --no-use_rope builds the model without RoPE: other samples from the same weights and seed
    common = ["--ckpt", ckpt, "--vae", "identity", "--num-fid-samples", "2", "--per-proc-batch-size", "2",
              "--num-steps", "2"]
    arrs = []
    for i, flag in enumerate(["--use_rope", "--no-use_rope"]):
        assert generate_cli.main([*common, flag, "--sample-dir", str(tmp_path / str(i))]) == 0
        gen = json.load(open(tmp_path / str(i) / "generate.json"))
        arrs.append(np.load(gen["samples"])["arr_0"])
    assert not np.array_equal(arrs[0], arrs[1])
