"""--method fourierflow through the trainer: a PDE-DiT on a PDEBench-format file written by the solver in the
test, aligned to a ViViT in the released layout; the split and normaliser recorded in the checkpoint and
reused by `python -m fastrepa.eval.pde`; exact resume; the flags and the bad input named."""
import json
import os

import pytest
import torch

from fastrepa.config import ConfigError, from_flat
from fastrepa.data.pde import PDEDataError, Split, simulate, write_pde_file
from fastrepa.eval import pde as pde_eval
from fastrepa.official_ckpt import load_checkpoint_file
from fastrepa.train.loop import train

from test_train import assert_same_run
from test_vivit import released_checkpoint

PDE_RUN = dict(method="fourierflow", model="PDE-DiT-S/4", input_size=16, hidden_size=32, num_heads=2, depth=2,
               encoder_depth=1, projector_dim=32, batch_size=8, max_train_steps=6, checkpointing_steps=3,
               sampling_steps=6, log_every=1, sample_num_steps=2, ema_decay=0.9, learning_rate=2e-3,
               num_workers=0, report_to="none", exp_name="pde", test_fraction=0.25, mixed_precision="no")


@pytest.fixture(scope="module")
def pde_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("pde")
    path = str(root / "CFD_sw.h5")
    write_pde_file(path, simulate(num=8, steps=10, size=16, seed=0))
    vivit = str(root / "mae_vivit.pt")
    released_checkpoint(vivit, dim=16, depth=1, heads=2, patch=4, frames=4, size=16)
    return path, vivit


def pde_cfg(tmp_path, pde_file, **kw):
    path, vivit = pde_file
    return from_flat({**PDE_RUN, "data_dir": path, "enc_type": "vivit", "enc_path": vivit,
                      "output_dir": str(tmp_path), **kw})


def test_flags_pair_the_method_with_its_model_and_encoder(tmp_path, pde_file):
    cfg = pde_cfg(tmp_path, pde_file)
    assert (cfg.objective.proj_coeff, cfg.model.encoder_depth) == (1e-4, 1)
    base = dict(exp_name="x", method="fourierflow", model="PDE-DiT-XL/8")
    dflt = from_flat(base)  # FourierFlow's defaults: the ViViT, 1e-4, spatial block 4
    assert (dflt.objective.enc_type, dflt.objective.proj_coeff, dflt.model.encoder_depth) == ("vivit", 1e-4, 4)
    assert from_flat(dict(exp_name="x")).objective.enc_type == "dinov2-vit-b"  # images keep REPA's
    with pytest.raises(ConfigError, match="--model.*PDE-DiT model for --method fourierflow"):
        from_flat(dict(exp_name="x", method="fourierflow"))
    with pytest.raises(ConfigError, match="--model.*image backbone.*--method repa"):
        from_flat(dict(exp_name="x", model="PDE-DiT-S/8"))
    with pytest.raises(ConfigError, match="--enc-type.*vivit"):
        from_flat({**base, "enc_type": "dinov2-vit-b"})
    with pytest.raises(ConfigError, match="--encoder-depth"):
        from_flat({**base, "encoder_depth": 7})  # XL has 6 spatial blocks
    with pytest.raises(ConfigError, match="--test-fraction"):
        from_flat({**base, "test_fraction": 1.0})


def test_trains_records_split_and_normaliser_and_resumes_exactly(tmp_path, pde_file):
    full = train(pde_cfg(tmp_path / "a", pde_file))
    assert full["method"] == "fourierflow" and full["last_loss"] < full["first_loss"]
    assert full["first_proj_loss"] > 0  # the ViViT target is aligned
    assert os.path.isfile(full["sample_grid"])  # a forecast plot, not a VAE grid
    ckpt = load_checkpoint_file(full["checkpoint"])
    data = ckpt["data"]
    split = Split.make(8, 0.25, 0)
    assert (data["split"]["train"], data["split"]["test"]) == (split.train, split.test)
    assert not set(data["split"]["train"]) & set(data["split"]["test"])
    # the normaliser is the train trajectories' alone
    from fastrepa.data.pde import Normalizer, PDEData
    fields = PDEData.open(pde_file[0]).fields
    assert data["normalizer"] == Normalizer.fit(fields, split.train).state_dict()
    assert data["normalizer"] != Normalizer.fit(fields, range(8)).state_dict()
    half = pde_cfg(tmp_path / "b", pde_file, max_train_steps=3)
    train(half)
    resumed = train(pde_cfg(tmp_path / "b", pde_file))
    assert resumed["resumed_from"] == 3
    assert_same_run(full, resumed, ("loss", "proj_loss"))
    # the same run on another split is refused, naming what differs
    with pytest.raises(PDEDataError, match="split.*--test-fraction"):
        train(pde_cfg(tmp_path / "b", pde_file, max_train_steps=9, test_fraction=0.5))


def test_bad_input_is_named_before_training(tmp_path, pde_file):
    with pytest.raises(ValueError, match=r"--input-size 16"):
        train(pde_cfg(tmp_path, pde_file, input_size=32))
    with pytest.raises(PDEDataError, match="not divisible by the reduction 3"):
        train(pde_cfg(tmp_path, pde_file, pde_reduce=3))
    with pytest.raises(PDEDataError, match="too few for 8 condition"):
        train(pde_cfg(tmp_path, pde_file, num_frames=8))
    with pytest.raises(ValueError, match="--enc-type vivit needs --enc-path"):
        train(pde_cfg(tmp_path, pde_file, enc_path=""))
    bad = tmp_path / "wrong.pt"
    torch.save({"model_state_dict": {"decoder.w": torch.zeros(1)}}, bad)
    with pytest.raises(ValueError, match="wrong.pt.*encoder"):
        train(pde_cfg(tmp_path, pde_file, enc_path=str(bad)))
    assert not os.path.exists(tmp_path / "pde" / "checkpoints" / "step-000000003")


def test_eval_cli_scores_the_recorded_test_split(tmp_path, pde_file, capsys):
    report = train(pde_cfg(tmp_path, pde_file, enc_type="none", enc_path="", max_train_steps=3))
    out = tmp_path / "eval"
    assert pde_eval.main(["--ckpt", str(tmp_path / "pde"), "--out", str(out), "--rollout", "1",
                          "--num-steps", "2"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["trajectories"] == Split.make(8, 0.25, 0).test  # the held-back trajectories, as recorded
    assert rep["checkpoint"] == os.path.abspath(report["checkpoint"])
    for units in ("normalised", "physical"):
        for who in ("model", "persistence"):
            assert set(rep[units][who]["density"]) >= {"rmse", "nrmse", "max_err", "brmse", "csv", "fourier_low"}
    assert os.path.getsize(out / "fields.png") > 0 and os.path.getsize(out / "error_curve.png") > 0
    assert "nRMSE" in capsys.readouterr().out
    # a test split smaller than one batch, a rollout longer than the trajectories, an image checkpoint
    assert pde_eval.main(["--ckpt", report["checkpoint"], "--batch-size", "3", "--out", str(out)]) == 2
    assert "fewer than one --batch-size of 3" in capsys.readouterr().err
    assert pde_eval.main(["--ckpt", report["checkpoint"], "--rollout", "3", "--out", str(out)]) == 2
    assert "--rollout 3" in capsys.readouterr().err
    plain = tmp_path / "plain.pt"
    torch.save({"ema": {}, "args": {}}, plain)
    assert pde_eval.main(["--ckpt", str(plain)]) == 2
    assert "records no PDE data" in capsys.readouterr().err


def test_dry_run_counts_the_encoder(tmp_path):
    from fastrepa.train.flops import counts
    c = counts(from_flat(dict(exp_name="x", method="fourierflow", model="PDE-DiT-XL/8")))
    assert c["params"] == 169_072_649  # FourierFlow's ~169M
    # the ViViT target costs ~4x the student's forward (the note's estimate), counted once per sample
    assert 3.5 < c["encoder_forward_gflop_per_image"] / c["sit_forward_gflop_per_image"] < 5
    assert c["train_gflop_per_image"] == pytest.approx(3 * c["sit_forward_gflop_per_image"]
                                                       + c["encoder_forward_gflop_per_image"], abs=2e-3)


def test_forward_flops_match_the_flop_counter():
    """PDE-DiT's analytic count equals torch's FLOP counter on the matmuls it counts (linear, attention,
    AFNO einsums, gate conv); the counter counts no FFT either."""
    from torch.utils.flop_counter import FlopCounterMode
    from fastrepa.models import build_model
    torch.manual_seed(0)
    m = build_model("PDE-DiT-S/4", input_size=16, hidden_size=32, num_heads=2, depth=2, tem_depth=1,
                    afno_depth=1, z_dims=[16], projector_dim=32, encoder_depth=1, attn_backend="math")
    x = torch.randn(1, *m.latent_shape)
    with FlopCounterMode(display=False) as fc:
        m(x, torch.rand(1), torch.randn_like(x))
    assert m.forward_flops() == pytest.approx(fc.get_total_flops(), rel=0.02)


def test_demo_forecast_beats_persistence_on_held_back_windows(tmp_path, capsys):
    """The README's CPU demo (`--preset pde-demo` on the synthetic shallow-water file), trained for its
    1200 steps: the EMA forecast's nRMSE, in normalised units and averaged over the variables, is below the
    persistence baseline's (the last condition frame repeated) on the test trajectories the run held back;
    density and pressure, which move most between frames, beat it one by one."""
    from fastrepa.config import from_args, build_parser
    data = str(tmp_path / "CFD_demo.h5")
    write_pde_file(data, simulate(num=48, steps=21, size=16, seed=0))
    cfg = from_args(build_parser().parse_args(["--preset", "pde-demo", "--data-dir", data, "--output-dir",
                                               str(tmp_path), "--checkpointing-steps", "1200", "--sampling-steps",
                                               "1200", "--log-every", "600"]))
    report = train(cfg)
    assert report["last_loss"] < 0.5 * report["first_loss"]
    out = tmp_path / "eval"
    assert pde_eval.main(["--ckpt", report["checkpoint"], "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())["normalised"]
    model, persistence = ({v: rep[who][v]["nrmse"] for v in ("density", "pressure", "Vx", "Vy")}
                          for who in ("model", "persistence"))
    assert sum(model.values()) < 0.85 * sum(persistence.values()), (model, persistence)
    assert model["density"] < persistence["density"] and model["pressure"] < persistence["pressure"]


def test_generate_forecasts_a_pde_checkpoint_and_refuses_to_sample_images(tmp_path, pde_file, capsys):
    """`python generate.py forecast ...` is `python -m fastrepa.eval.pde ...`; image sampling names it."""
    import generate as generate_cli
    report = train(pde_cfg(tmp_path, pde_file, enc_type="none", enc_path="", max_train_steps=3))
    out = tmp_path / "fc"
    assert generate_cli.main(["forecast", "--ckpt", report["checkpoint"], "--out", str(out), "--num-steps", "2"]) == 0
    assert json.loads((out / "report.json").read_text())["trajectories"] == Split.make(8, 0.25, 0).test
    with pytest.raises(SystemExit):
        generate_cli.main(["--ckpt", report["checkpoint"], "--sample-dir", str(tmp_path / "s")])
    assert "python generate.py forecast --ckpt" in capsys.readouterr().err
