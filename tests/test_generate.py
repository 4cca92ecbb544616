"""generate.py: samples that depend neither on the batch size nor on the number of processes (torchrun, gloo
CPU processes), resume after a kill, bad input, and the metrics computed from Inception features streamed
while sampling (equal to scoring the finished .npz). A tiny SiT on 8x8 RGB "latents" with the identity VAE
and a randomly initialised FID Inception keep every run cheap."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import generate as generate_cli
from conftest import TINY, tiny_model
from faults import EXIT_CODE as FAULT_EXIT_CODE
from faults import LAUNCHER, exit_after_shards, launch_env
from fastrepa.eval.cli import METRIC_KEYS
from fastrepa.eval.cli import main as eval_main
from fastrepa.generation import (ProgressLog, assemble_features, batch_plan, list_shards, noise_and_labels,
                                 rank_batches, read_shard, shard_features_id, write_shard)
from fastrepa.rng import step_seed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, B = 7, 3  # N is a multiple neither of the batch size nor of the process count


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = tiny_model(in_channels=3)
    sd = model.state_dict()
    ema = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in sd.items()}
    args = {**{k: v for k, v in TINY.items() if k != "z_dims"}, "in_channels": 3, "model": "SiT-S/2",
            "vae": "identity", "latents_scale": 1.0, "latents_bias": 0.0, "path_type": "linear"}
    path = tmp_path_factory.mktemp("ckpt") / "0000010.pt"
    torch.save({"model": sd, "ema": ema, "opt": {}, "args": args, "steps": 10}, path)
    return str(path)


def common(ckpt, out, *extra):
    return ["--ckpt", ckpt, "--sample-dir", str(out), "--num-fid-samples", str(N), "--per-proc-batch-size",
            str(B), "--mode", "sde", "--num-steps", "2", "--cfg-scale", "2.0", "--guidance-high", "0.7",
            "--global-seed", "3", *map(str, extra)]


def final(out):
    [npz] = [p for p in out.glob("*.npz")]
    arr = np.load(npz)["arr_0"]
    return arr, json.loads((out / "generate.json").read_text())


def _inception_file(path):
    from fastrepa.eval import FIDInceptionV3
    torch.manual_seed(0)
    m = FIDInceptionV3()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    torch.save(m.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def scoring(tmp_path_factory):
    """The scoring flags: a random FID Inception in the standard format and a 6-image reference batch."""
    d = tmp_path_factory.mktemp("scoring")
    inc = _inception_file(d / "pt_inception-2015-12-05-6726825d.pth")
    ref = d / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    return ["--ref", ref, "--inception", inc, "--fd-method", "eigh", "--eval-batch-size", "4"]


@pytest.fixture(scope="module")
def reference_run(ckpt, scoring, tmp_path_factory):
    """One uninterrupted single-process run, scored from the features streamed while sampling: the oracle
    for the other tests."""
    out = tmp_path_factory.mktemp("ref_run")
    assert generate_cli.main(common(ckpt, out, *scoring)) == 0
    return final(out) + (out,)


def assert_same_metrics(got, want, rel=1e-5):
    assert set(got) == set(METRIC_KEYS)
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(want[k], rel=rel, abs=1e-6), k


def test_single_process_output_and_report(reference_run):
    arr, rep, _ = reference_run
    assert arr.dtype == np.uint8 and arr.shape == (N, 8, 8, 3)
    assert rep["num_samples"] == N and rep["settings"]["world_size"] == 1
    s = rep["settings"]
    assert (s["mode"], s["num_steps"], s["cfg_scale"], s["guidance_high"], s["global_seed"], s["weights"]) == \
        ("sde", 2, 2.0, 0.7, 3, "ema")
    assert s["num_fid_samples"] == N and s["ckpt"].endswith("0000010.pt") and s["sde_noise"] == "per-sample"
    assert len(np.unique(arr.reshape(N, -1), axis=0)) == N  # distinct samples, not one repeated


def test_batch_plan_split_is_a_partition():
    plan = batch_plan(N, B)
    assert plan == [(0, 3), (3, 6), (6, 7)]
    for w in (1, 2, 3, 5):
        got = sorted(b for r in range(w) for b in rank_batches(plan, r, w))
        assert got == plan


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_one(ckpt, tmp_path, reference_run, scoring):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", os.path.join(ROOT, "generate.py"), *common(ckpt, out, *scoring),
           "--dist-timeout", "120"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    arr, rep = final(out)
    assert rep["settings"]["world_size"] == 2
    np.testing.assert_array_equal(arr, reference_run[0])
    # each process computed the features of its own shards; rank 0 gathered them in index order
    assert "2 process(es)" in rep["eval"]["settings"]["sample_features"]
    assert_same_metrics(rep["metrics"], reference_run[1]["metrics"])


def test_sde_samples_do_not_depend_on_the_batch_size(ckpt, tmp_path, reference_run):
    """Every sample index has its own SDE noise stream: batch 2 and batch 5 give the images of batch 3 (and
    of the 2-process run above), over-sampled last batches included."""
    for b in (2, 5):
        out = tmp_path / f"b{b}"
        assert generate_cli.main(common(ckpt, out, "--per-proc-batch-size", b)) == 0
        arr, rep = final(out)
        assert rep["settings"]["per_proc_batch_size"] == b
        np.testing.assert_array_equal(arr, reference_run[0])


def test_streamed_metrics_equal_scoring_the_npz(reference_run, scoring):
    """The features computed while sampling give the numbers of `python -m fastrepa.eval samples.npz --ref`."""
    _, rep, out = reference_run
    assert rep["settings"]["stream_features"] is True
    assert rep["eval"]["settings"]["num_samples"] == N and rep["eval"]["settings"]["sample_features"].startswith(
        "computed while sampling")
    for k, v in rep["metrics"].items():
        assert v is not None and np.isfinite(v), k
    ref, inc = scoring[1], scoring[3]
    assert rep["eval"]["settings"]["inception_weights"] == str(inc.resolve())
    ev = eval_main([rep["samples"], "--ref", str(ref), "--inception", str(inc), "--fd-method", "eigh",
                    "--batch-size", "4", "--device", "cpu"], quiet=True)
    assert_same_metrics(rep["metrics"], {k: ev[k] for k in METRIC_KEYS})
    assert rep["metrics"]["fid"] > 1e-3  # samples and reference differ: a real comparison, not 0 == 0
    # every shard holds its images and their features, made by these weights and ADM's (tf) preprocessing
    from fastrepa.eval import features_id, file_sha256
    sha = features_id(file_sha256(inc), "tf")
    assert rep["settings"]["inception_preprocess"] == "tf" == rep["eval"]["settings"]["inception_preprocess"]
    shards = list_shards(out / "shards")
    assert sorted(shards) == batch_plan(N, B) and all(shard_features_id(p) == sha for p in shards.values())
    acts = assemble_features(str(out / "shards"), batch_plan(N, B), sha)
    assert acts.pool.shape == (N, 2048) and acts.logits.shape == (N, 1008) and acts.spatial_stats.n == N


def test_no_stream_features_scores_the_npz(ckpt, reference_run, scoring, tmp_path, monkeypatch):
    """--no-stream-features: nothing computed while sampling; rank 0 hands the assembled .npz to
    fastrepa.eval (the call is recorded here; the numbers of that call are tested above)."""
    import shutil

    import fastrepa.eval.cli as eval_cli
    out = tmp_path / "copy"
    shutil.copytree(reference_run[2], out)
    calls = []

    def fake_eval(argv, quiet=False):
        calls.append(list(argv))
        return {**{k: 1.0 for k in METRIC_KEYS}, "settings": {"samples": argv[0]}, "notes": []}

    monkeypatch.setattr(eval_cli, "main", fake_eval)
    ref, inc = scoring[1], scoring[3]
    assert generate_cli.main(common(ckpt, out, *scoring, "--no-stream-features")) == 0  # all shards done
    [argv] = calls
    _, rep = final(out)
    assert argv[0] == rep["samples"] and argv[argv.index("--ref") + 1] == str(ref)
    assert argv[argv.index("--inception") + 1] == str(inc) and argv[argv.index("--fd-method") + 1] == "eigh"
    assert argv[argv.index("--batch-size") + 1] == "4" and argv[argv.index("--inception-preprocess") + 1] == "tf"
    assert rep["settings"]["stream_features"] is False and rep["metrics"]["fid"] == 1.0
    assert rep["timing"]["new_samples"] == 0 and rep["timing"]["features_added_to_shards_rank0"] == 0


def test_other_preprocessing_recomputes_the_shards_features(ckpt, reference_run, scoring, tmp_path):
    """Features streamed under one Inception preprocessing are never scored under the other: a rerun with
    --inception-preprocess pytorch-fid samples nothing, recomputes every shard's features and retags them."""
    import shutil

    from fastrepa.eval import file_sha256
    out = tmp_path / "copy"
    shutil.copytree(reference_run[2], out)
    assert generate_cli.main(common(ckpt, out, *scoring, "--inception-preprocess", "pytorch-fid")) == 0
    _, rep = final(out)
    assert rep["settings"]["inception_preprocess"] == "pytorch-fid" and rep["timing"]["new_samples"] == 0
    assert rep["timing"]["features_added_to_shards_rank0"] == len(batch_plan(N, B))
    sha = file_sha256(scoring[3])  # pytorch-fid: the bare sha256, as earlier versions tagged their shards
    assert all(shard_features_id(p) == sha for p in list_shards(out / "shards").values())
    assert rep["metrics"]["fid"] != pytest.approx(reference_run[1]["metrics"]["fid"], rel=1e-6)


def test_initial_noise_and_labels_come_from_per_index_streams():
    z, y = noise_and_labels([4, 1], (3, 2, 2), 10, seed=3, device="cpu")
    for row, i in enumerate([4, 1]):  # stream 0 of (seed, index): noise, then the label
        g = torch.Generator().manual_seed(step_seed(3, 0, i))
        assert torch.equal(z[row], torch.randn((3, 2, 2), generator=g))
        assert int(y[row]) == int(torch.randint(0, 10, (1,), generator=g))


def test_ode_samples_do_not_depend_on_the_batch_size(ckpt, tmp_path):
    base = ["--ckpt", ckpt, "--num-fid-samples", "5", "--mode", "ode", "--num-steps", "2", "--cfg-scale", "1.5"]
    assert generate_cli.main(base + ["--sample-dir", str(tmp_path / "a"), "--per-proc-batch-size", "2"]) == 0
    assert generate_cli.main(base + ["--sample-dir", str(tmp_path / "b"), "--per-proc-batch-size", "5",
                                     "--png"]) == 0
    a, b = final(tmp_path / "a")[0], final(tmp_path / "b")[0]
    np.testing.assert_array_equal(a, b)
    assert not (tmp_path / "a" / next((tmp_path / "a").glob("*.npz")).stem).exists()  # PNGs only if asked
    pngs = sorted(p.name for p in (tmp_path / "b").glob("*/*.png"))
    assert pngs == [f"{i:06d}.png" for i in range(5)]


def test_resume_after_kill_gives_the_uninterrupted_result(ckpt, tmp_path, monkeypatch, reference_run, scoring):
    out = tmp_path / "killed"
    with pytest.MonkeyPatch.context() as mp:
        exit_after_shards(mp.setattr, 1)
        with pytest.raises(SystemExit) as e:
            generate_cli.main(common(ckpt, out, *scoring))
    assert e.value.code == FAULT_EXIT_CODE
    assert sorted(list_shards(out / "shards")) == [(0, 3)]
    first = out / "shards" / "shard-0000000-0000003.npz"
    assert shard_features_id(str(first)) is not None  # the killed run's shard: its images and features
    assert not list(out.glob("*.npz"))  # nothing assembled yet
    (out / "shards" / "shard-0000003-0000006.npz.tmp999.npz").write_bytes(b"half a file")  # a cut-off write
    before = os.path.getmtime(first)
    assert generate_cli.main(common(ckpt, out)) == 0  # resumed without scoring: no features for the rest
    assert os.path.getmtime(first) == before  # skipped, not redone
    assert sorted(os.listdir(out / "shards")) == ["settings.json", "shard-0000000-0000003.npz",
                                                  "shard-0000003-0000006.npz", "shard-0000006-0000007.npz"]
    arr, rep = final(out)
    np.testing.assert_array_equal(arr, reference_run[0])
    assert rep["timing"]["resumed_samples"] == 3 and rep["timing"]["new_samples"] == 4
    # delete the last shard: only it is regenerated
    os.remove(out / "shards" / "shard-0000006-0000007.npz")
    assert generate_cli.main(common(ckpt, out)) == 0
    np.testing.assert_array_equal(final(out)[0], reference_run[0])
    assert shard_features_id(str(out / "shards" / "shard-0000006-0000007.npz")) is None
    # a scored rerun samples nothing: it adds the missing features from the images on disk (2 shards), keeps
    # the killed run's, and scores what the uninterrupted run scored
    assert generate_cli.main(common(ckpt, out, *scoring)) == 0
    arr, rep = final(out)
    assert rep["timing"]["new_samples"] == 0 and rep["timing"]["features_added_to_shards_rank0"] == 2
    assert os.path.getmtime(first) == before
    np.testing.assert_array_equal(arr, reference_run[0])
    assert_same_metrics(rep["metrics"], reference_run[1]["metrics"])


def test_different_settings_are_refused_unless_overwrite(ckpt, tmp_path, capsys):
    out = tmp_path / "s"
    assert generate_cli.main(common(ckpt, out)) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        generate_cli.main(common(ckpt, out, "--cfg-scale", "1.5"))
    err = capsys.readouterr().err
    assert "cfg_scale" in err and "--overwrite" in err
    with pytest.raises(SystemExit):
        generate_cli.main(common(ckpt, out, "--num-fid-samples", "5"))
    assert "num_fid_samples" in capsys.readouterr().err
    assert generate_cli.main(common(ckpt, out, "--cfg-scale", "1.5", "--overwrite")) == 0
    assert final(out)[1]["settings"]["cfg_scale"] == 1.5
    assert len(list_shards(out / "shards")) == 3


def test_bad_input(ckpt, tmp_path, capsys):
    no_ema = tmp_path / "no_ema.pt"
    c = torch.load(ckpt, weights_only=False)
    del c["ema"]
    torch.save(c, no_ema)
    base = ["--sample-dir", str(tmp_path / "x"), "--num-fid-samples", "2", "--num-steps", "2"]
    with pytest.raises(SystemExit):
        generate_cli.main(["--ckpt", str(no_ema)] + base)
    err = capsys.readouterr().err
    assert "'ema'" in err and "--weights model" in err
    assert generate_cli.main(["--ckpt", str(no_ema), "--weights", "model"] + base) == 0
    for bad in ("0", "-3"):
        with pytest.raises(SystemExit):
            generate_cli.main(["--ckpt", ckpt, "--num-fid-samples", bad])
        assert "--num-fid-samples" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate_cli.main(["--ckpt", ckpt, "--inception-preprocess", "tf"])
    assert "--inception-preprocess are used with --ref only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate_cli.main(["--ckpt", ckpt, "--per-proc-batch-size", "0"])
    assert "--per-proc-batch-size" in capsys.readouterr().err
    # metric inputs are checked before any sampling
    bad_ref = tmp_path / "bad_ref.npz"
    np.savez(bad_ref, something=np.zeros(3))
    with pytest.raises(SystemExit):
        generate_cli.main(["--ckpt", ckpt, "--ref", str(bad_ref), "--inception", str(tmp_path / "none.pth")]
                          + ["--sample-dir", str(tmp_path / "y")])
    assert "bad_ref.npz" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
    # so is the Inception file itself: a file that is not the FID Inception fails before sampling
    good_ref = tmp_path / "ref.npz"
    np.savez(good_ref, arr_0=np.zeros((4, 8, 8, 3), dtype=np.uint8))
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pth")
    with pytest.raises(SystemExit):
        generate_cli.main(["--ckpt", ckpt, "--ref", str(good_ref), "--inception", str(tmp_path / "wrong.pth")]
                          + ["--sample-dir", str(tmp_path / "z")])
    err = capsys.readouterr().err
    assert "wrong.pth" in err and "missing keys" in err
    assert not (tmp_path / "z").exists()


def test_damaged_shard_is_named(ckpt, tmp_path, capsys):
    """A shard damaged on disk (not by generate.py, whose writes are atomic) stops the run with its name."""
    out = tmp_path / "d"
    assert generate_cli.main(common(ckpt, out)) == 0
    shard = out / "shards" / "shard-0000003-0000006.npz"
    np.savez(shard, arr_0=np.zeros((3, 8, 8, 3), dtype=np.float32))
    capsys.readouterr()
    assert generate_cli.main(common(ckpt, out)) == 2
    err = capsys.readouterr().err
    assert str(shard) in err and "float32" in err and "delete it and rerun" in err
    shard.write_bytes(b"not an npz")
    assert generate_cli.main(common(ckpt, out)) == 2
    assert str(shard) in capsys.readouterr().err
    shard.unlink()
    assert generate_cli.main(common(ckpt, out)) == 0  # as it says: deleted, rerun, regenerated


def _features(n, seed):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal((n, d)).astype(np.float32)
            for k, d in (("pool", 2048), ("spatial", 2023), ("logits", 1008))}


def test_shard_features_round_trip_in_index_order(tmp_path):
    plan = batch_plan(5, 2)  # (0, 2), (2, 4), (4, 5): the last shard holds only index 4
    feats = {b: _features(b[1] - b[0], b[0]) for b in plan}
    for b in reversed(plan):  # written in any order (by any process) ...
        imgs = np.full((b[1] - b[0], 4, 4, 3), b[0], dtype=np.uint8)
        write_shard(str(tmp_path), *b, imgs, feats[b], "sha-a")
    acts = assemble_features(str(tmp_path), plan, "sha-a")  # ... gathered in index order, N rows exactly
    want = {k: np.concatenate([feats[b][k] for b in plan]) for k in ("pool", "spatial", "logits")}
    np.testing.assert_array_equal(acts.pool, want["pool"])
    np.testing.assert_array_equal(acts.logits, want["logits"])
    np.testing.assert_allclose(acts.pool_stats.mu, want["pool"].astype(np.float64).mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(acts.spatial_stats.sigma, np.cov(want["spatial"].astype(np.float64), rowvar=False),
                               rtol=1e-9, atol=1e-12)
    assert read_shard(list_shards(str(tmp_path))[(4, 5)], 4, 5).tolist() == np.full((1, 4, 4, 3), 4).tolist()
    # features of other weights, no features, wrong shapes: refused, naming the shard
    with pytest.raises(ValueError, match=r"shard-0000000-0000002\.npz: no Inception features of sha-b"):
        assemble_features(str(tmp_path), plan, "sha-b")
    write_shard(str(tmp_path), 2, 4, np.zeros((2, 4, 4, 3), np.uint8))
    assert shard_features_id(str(tmp_path / "shard-0000002-0000004.npz")) is None
    with pytest.raises(ValueError, match=r"shard-0000002-0000004\.npz: no Inception features"):
        assemble_features(str(tmp_path), plan, "sha-a")
    with pytest.raises(ValueError, match=r"'pool' features are float32 \(3, 2048\), expected float \[2, 2048\]"):
        write_shard(str(tmp_path), 2, 4, np.zeros((2, 4, 4, 3), np.uint8), _features(3, 0), "sha-a")
    with pytest.raises(ValueError, match="features_id"):
        write_shard(str(tmp_path), 2, 4, np.zeros((2, 4, 4, 3), np.uint8), _features(2, 0))


def test_progress_is_logged_when_output_is_not_a_terminal(ckpt, tmp_path, capsys):
    """Under nohup / slurm (captured output here) rank 0 shows the bar anyway and logs plain lines: each 10%
    crossed (every shard of 3 or 1 images here) and the end."""
    assert generate_cli.main(common(ckpt, tmp_path / "p")) == 0
    out, err = capsys.readouterr()
    lines = [ln for ln in out.splitlines() if ln.startswith("sampled ")]
    assert [ln.split(",")[0] for ln in lines] == ["sampled 3/7 images (42%)", "sampled 6/7 images (85%)",
                                                  "sampled 7/7 images (100%)"]
    assert all(" img/s, ETA " in ln for ln in lines) and lines[-1].endswith("ETA 0:00:00")
    assert "sampling (1 proc)" in err and "7/7" in err  # the tqdm bar, on stderr


def test_progress_log_lines():
    now = [0.0]
    log = ProgressLog(1000, initial=200, every=0.25, clock=lambda: now[0])
    now[0] = 10.0
    assert log.update(240) is None  # 24%: still in the first quarter (the 200 resumed ones count there)
    assert log.update(300) == "sampled 300/1000 images (30%), 10 img/s, ETA 0:01:10"  # 100 new in 10 s
    assert log.update(400) is None  # the same quarter
    now[0] = 20.0
    assert log.update(900) == "sampled 900/1000 images (90%), 35 img/s, ETA 0:00:03"  # jumped two quarters
    assert log.update(1000) == "sampled 1000/1000 images (100%), 40 img/s, ETA 0:00:00"
    assert log.update(1000) is None


@pytest.fixture(scope="module")
def sd_vae(tmp_path_factory):
    """A tiny random SD-VAE folder (4 latent channels, downsampling 2)."""
    pytest.importorskip("diffusers")
    from conftest import make_tiny_vae
    path = str(tmp_path_factory.mktemp("sd-vae"))
    make_tiny_vae(path)
    return path


def test_bare_state_dict_is_sampled_with_a_warning_and_recorded(tmp_path, sd_vae):
    """A .pt holding only a state dict (no 'ema' / 'model', no args): sampled as it is, with a warning, and
    generate.json says "state_dict", not "ema"; the images are those of the same tensors in a checkpoint."""
    from fastrepa.models import build_model
    torch.manual_seed(1)
    model = build_model("SiT-S/2", input_size=4, num_classes=10, encoder_depth=2, z_dims=[16], projector_dim=32)
    sd = {k: v + 0.02 * torch.randn_like(v) for k, v in model.state_dict().items()}  # every layer carries signal
    torch.save(sd, tmp_path / "bare.pt")
    torch.save({"ema": sd, "model": {k: 0 * v for k, v in sd.items()}, "args": {}}, tmp_path / "full.pt")
    flags = ["--model", "SiT-S/2", "--num-classes", "10", "--encoder-depth", "2", "--resolution", "32", "--vae",
             sd_vae, "--num-fid-samples", "3", "--per-proc-batch-size", "3", "--num-steps", "2"]
    with pytest.warns(UserWarning, match=r"bare\.pt is a bare state dict.*whatever --weights says, here 'ema'"):
        assert generate_cli.main(["--ckpt", str(tmp_path / "bare.pt"), "--sample-dir", str(tmp_path / "b"),
                                  *flags]) == 0
    arr, rep = final(tmp_path / "b")
    assert rep["settings"]["weights"] == "state_dict" and arr.shape == (3, 8, 8, 3)
    assert generate_cli.main(["--ckpt", str(tmp_path / "full.pt"), "--sample-dir", str(tmp_path / "f"), *flags]) == 0
    full, rep = final(tmp_path / "f")
    assert rep["settings"]["weights"] == "ema"
    np.testing.assert_array_equal(arr, full)
    assert len(np.unique(arr.reshape(3, -1), axis=0)) == 3


def test_compile_mode_reaches_torch_compile_and_resume_settings(ckpt, tmp_path, monkeypatch, capsys):
    calls = []

    def fake_compile(fn, **kw):  # records the call; runs eagerly (compiling on this CPU is for bench/)
        calls.append(kw)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    out = tmp_path / "c"
    assert generate_cli.main(common(ckpt, out, "--compile-mode", "reduce-overhead")) == 0
    assert calls == [{"mode": "reduce-overhead", "dynamic": False}]
    s = final(out)[1]["settings"]
    assert (s["compile"], s["compile_mode"], s["kernels"], s["kernels_flag"], s["tf32"]) == \
        ("default", "reduce-overhead", "torch", "auto", None)  # CPU: the reference ops, no TF32
    assert final(out)[1]["cudagraph_skips_rank0"] == 0
    # default mode compiles the same kernels (no CUDA graphs): the shards are reused
    assert generate_cli.main(common(ckpt, out, "--compile")) == 0 and calls[-1] == {"mode": None, "dynamic": False}
    assert final(out)[1]["timing"]["new_samples"] == 0
    capsys.readouterr()
    for flags, diff in ((["--compile-mode", "max-autotune"], "compile: 'default' there, 'max-autotune' now"),
                        (["--no-compile"], "compile: 'default' there, None now"),
                        (["--kernels", "triton"], "kernels: 'torch' there, 'triton' now")):
        with pytest.raises(SystemExit):
            generate_cli.main(common(ckpt, out, *flags))
        assert diff in capsys.readouterr().err, flags
    with pytest.raises(SystemExit):
        generate_cli.main(common(ckpt, tmp_path / "x", "--no-compile", "--compile-mode", "default"))
    assert "--compile-mode default needs compiling" in capsys.readouterr().err


def test_vae_decode_follows_precision(tmp_path, monkeypatch, sd_vae):
    """--precision fp32 decodes the SD-VAE without autocast (bf16 only with --precision bf16, on CUDA)."""
    import fastrepa.vae
    args = {**{k: v for k, v in TINY.items() if k != "z_dims"}, "model": "SiT-S/2", "vae": sd_vae}
    torch.save({"ema": tiny_model().state_dict(), "args": args}, tmp_path / "sd.pt")
    loaded = []
    real_load = fastrepa.vae.load_vae
    monkeypatch.setattr(fastrepa.vae, "load_vae", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    base = ["--ckpt", tmp_path / "sd.pt", "--num-fid-samples", "2", "--per-proc-batch-size", "2", "--num-steps", "1"]
    for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        out = tmp_path / precision
        assert generate_cli.main([*map(str, base), "--sample-dir", str(out), "--precision", precision]) == 0
        assert loaded[-1].decode_dtype == dtype
        arr, rep = final(out)
        assert arr.shape == (2, 16, 16, 3) and rep["settings"]["vae_decode"] == "fp32"  # the CPU decodes in fp32
        assert json.loads((out / "shards" / "settings.json").read_text()).get("vae_decode") == (
            "fp32" if precision == "fp32" else None)


def test_resume_with_another_process_count(ckpt, tmp_path, reference_run):
    """Two processes write some shards and are killed; one process resumes: the uninterrupted run's samples."""
    out = tmp_path / "two-then-one"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", LAUNCHER, os.path.join(ROOT, "generate.py"), *common(ckpt, out),
           "--dist-timeout", "120"]
    env = launch_env({**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
                      "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}, {"exit_after_shards": 1})
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0, r.stdout[-3000:] + r.stderr[-3000:]
    left = sorted(list_shards(out / "shards"))  # each process stops after its first shard; torchrun may stop the
    assert 1 <= len(left) <= 2 and set(left) <= set(batch_plan(N, B)), left  # other before it writes one
    assert generate_cli.main(common(ckpt, out)) == 0
    arr, rep = final(out)
    assert rep["settings"]["world_size"] == 1 and rep["timing"]["resumed_samples"] == sum(e - s for s, e in left)
    np.testing.assert_array_equal(arr, reference_run[0])
