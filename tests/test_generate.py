"""generate.py: rank-count invariance under torchrun (gloo CPU processes), resume after a kill, bad input,
and the metrics report. A tiny SiT on 8x8 RGB "latents" with the identity VAE keeps every run cheap."""
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
from fastrepa.generation import batch_plan, list_shards, rank_batches

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


@pytest.fixture(scope="module")
def reference_run(ckpt, tmp_path_factory):
    """One uninterrupted single-process run: the oracle for the other tests."""
    out = tmp_path_factory.mktemp("ref_run")
    assert generate_cli.main(common(ckpt, out)) == 0
    return final(out)


def test_single_process_output_and_report(reference_run):
    arr, rep = reference_run
    assert arr.dtype == np.uint8 and arr.shape == (N, 8, 8, 3)
    assert rep["num_samples"] == N and rep["settings"]["world_size"] == 1
    s = rep["settings"]
    assert (s["mode"], s["num_steps"], s["cfg_scale"], s["guidance_high"], s["global_seed"], s["weights"]) == \
        ("sde", 2, 2.0, 0.7, 3, "ema")
    assert s["num_fid_samples"] == N and s["ckpt"].endswith("0000010.pt")
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


def test_torchrun_two_processes_match_one(ckpt, tmp_path, reference_run):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", os.path.join(ROOT, "generate.py"), *common(ckpt, out),
           "--dist-timeout", "120"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    arr, rep = final(out)
    assert rep["settings"]["world_size"] == 2
    np.testing.assert_array_equal(arr, reference_run[0])


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


def test_resume_after_kill_gives_the_uninterrupted_result(ckpt, tmp_path, monkeypatch, reference_run):
    out = tmp_path / "killed"
    monkeypatch.setenv(generate_cli.TEST_EXIT_AFTER_SHARDS_ENV, "1")
    with pytest.raises(SystemExit) as e:
        generate_cli.main(common(ckpt, out))
    assert e.value.code == generate_cli.TEST_EXIT_CODE
    assert sorted(list_shards(out / "shards")) == [(0, 3)]
    assert not list(out.glob("*.npz"))  # nothing assembled yet
    (out / "shards" / "shard-0000003-0000006.npz.tmp999.npz").write_bytes(b"half a file")  # a cut-off write
    monkeypatch.delenv(generate_cli.TEST_EXIT_AFTER_SHARDS_ENV)
    before = os.path.getmtime(out / "shards" / "shard-0000000-0000003.npz")
    assert generate_cli.main(common(ckpt, out)) == 0
    assert os.path.getmtime(out / "shards" / "shard-0000000-0000003.npz") == before  # skipped, not redone
    assert sorted(os.listdir(out / "shards")) == ["settings.json", "shard-0000000-0000003.npz",
                                                  "shard-0000003-0000006.npz", "shard-0000006-0000007.npz"]
    arr, rep = final(out)
    np.testing.assert_array_equal(arr, reference_run[0])
    assert rep["timing"]["resumed_samples"] == 3 and rep["timing"]["new_samples"] == 4
    # delete the last shard: only it is regenerated
    os.remove(out / "shards" / "shard-0000006-0000007.npz")
    assert generate_cli.main(common(ckpt, out)) == 0
    np.testing.assert_array_equal(final(out)[0], reference_run[0])


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


def test_metrics_in_report(ckpt, tmp_path):
    inc = _inception_file(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    out = tmp_path / "m"
    assert generate_cli.main(common(ckpt, out, "--ref", ref, "--inception", inc, "--fd-method", "eigh",
                                    "--eval-batch-size", "4")) == 0
    rep = final(out)[1]
    assert set(rep["metrics"]) == {"fid", "sfid", "inception_score", "precision", "recall"}
    for k, v in rep["metrics"].items():
        assert v is not None and np.isfinite(v), k
    assert rep["eval"]["settings"]["num_samples"] == N
    assert rep["eval"]["settings"]["inception_weights"] == str(inc.resolve())
