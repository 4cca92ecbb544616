"""Flags: official names, presets, one parser, clear errors before any work."""
import pytest

from fastrepa.config import ConfigError, build_parser, flag_names, from_args, from_flat, to_flat

OFFICIAL = ["--model", "--enc-type", "--proj-coeff", "--encoder-depth", "--path-type", "--prediction", "--weighting",
            "--batch-size", "--learning-rate", "--max-train-steps", "--checkpointing-steps", "--output-dir",
            "--exp-name", "--resume-step", "--seed", "--data-dir", "--resolution", "--num-classes", "--qk-norm",
            "--fused-attn", "--mixed-precision", "--allow-tf32", "--epochs", "--gradient-accumulation-steps",
            "--adam-beta1", "--adam-beta2", "--adam-weight-decay", "--adam-epsilon", "--max-grad-norm",
            "--num-workers", "--cfg-prob", "--sampling-steps", "--report-to", "--logging-dir"]


def parse(*argv):
    return from_args(build_parser().parse_args(list(argv)))


def test_official_flags_are_accepted():
    opts = {o for a in build_parser()._actions for o in a.option_strings}
    assert set(OFFICIAL) <= opts
    cfg = parse("--model", "SiT-B/2", "--enc-type", "dinov2-vit-b", "--proj-coeff", "0.7", "--encoder-depth", "4",
                "--exp-name", "e", "--batch-size", "32", "--no-fused-attn", "--qk-norm")
    assert cfg.model.model == "SiT-B/2" and cfg.objective.proj_coeff == 0.7 and cfg.model.encoder_depth == 4
    assert cfg.model.backend() == "math" and cfg.model.qk_norm and cfg.batch_size == 32


def test_preset_then_flags_win():
    cfg = parse("--preset", "demo", "--batch-size", "8")
    assert cfg.batch_size == 8 and cfg.model.num_classes == 10 and cfg.objective.enc_type == "patch-pixels"


def test_flat_round_trip():
    cfg = parse("--preset", "demo")
    flat = to_flat(cfg)
    assert set(flat) == set(flag_names())
    assert from_flat(flat) == cfg


@pytest.mark.parametrize("argv,msg", [
    (["--proj-coeff", "-1"], "--proj-coeff=-1"),
    (["--vae", "no-such-vae"], "--vae='no-such-vae'"),
    (["--batch-size", "0"], "--batch-size=0"),
    (["--batch-size", "10", "--gradient-accumulation-steps", "4"], "multiple of --gradient-accumulation-steps"),
    (["--learning-rate", "0"], "--learning-rate"),
    (["--enc-type", " "], "--enc-type"),
])
def test_bad_values_name_the_flag(argv, msg):
    with pytest.raises(ConfigError, match=msg):
        parse("--exp-name", "e", *argv)


def test_missing_exp_name():
    with pytest.raises(ConfigError, match="--exp-name"):
        parse()


@pytest.mark.parametrize("argv", [["--path-type", "vp"], ["--weighting", "edm"], ["--model", "SiT-H/2"],
                                  ["--prediction", "eps"]])
def test_choices_are_enforced_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert "invalid choice" in capsys.readouterr().err


def test_unknown_flat_key():
    with pytest.raises(ConfigError, match="bogus"):
        from_flat({"exp_name": "e", "bogus": 1})


@pytest.mark.parametrize("argv,msg", [(["--model", "SiT-B/2", "--encoder-depth", "13"], "--encoder-depth"),
                                      (["--model", "SiT-B/2", "--encoder-depth", "0"], "--encoder-depth"),
                                      (["--model", "SiT-B/2", "--num-heads", "5"], "--num-heads")])
def test_model_options_checked_at_parse_time(argv, msg):
    with pytest.raises(ConfigError, match=msg):
        parse("--exp-name", "e", *argv)


def test_train_cli_reports_bad_flag_without_traceback(capsys):
    import train
    with pytest.raises(SystemExit) as e:
        train.main(["--exp-name", "e", "--model", "SiT-B/2", "--encoder-depth", "13"])
    assert e.value.code == 2
    assert "--encoder-depth" in capsys.readouterr().err


def test_kernels_and_rope_flags_reach_the_model():
    cfg = parse("--preset", "demo", "--kernels", "torch", "--rope", "--qk-norm")
    kw = cfg.model_overrides()
    assert kw["kernels"] == "torch" and kw["rope"] is True and kw["qk_norm"] is True
    assert kw["rope_pairs"] == "half"
    assert parse("--preset", "demo", "--rope", "--rope-pairs", "interleaved").model_overrides()["rope_pairs"] == \
        "interleaved"
    assert parse("--preset", "demo").model.kernels == "auto"
    with pytest.raises(SystemExit):  # argparse refuses a value outside the choices, naming the flag
        parse("--kernels", "cuda")
