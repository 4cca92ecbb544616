"""The trainer under torchrun on CPU processes (gloo): FSDP2 equals one process, exact kill-and-rerun,
2 -> 1 resume, SIGTERM preemption, the exported .pt, --dry-run."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import train as train_cli
from fastrepa.config import from_flat
from fastrepa.generation import model_from_checkpoint
from fastrepa.train import dcp
from fastrepa.train import train
from faults import LAUNCHER, launch_env, sigterm_at_step
from test_train import TINY_RUN, data16, losses  # noqa: F401 (data16 is a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# max_grad_norm 0.2: every step clips (the norms here are 0.35-0.6), so a clip that used a rank's local
# norm instead of the global one would show as a difference from the single process
RUN = dict(TINY_RUN, max_train_steps=6, checkpointing_steps=2, sampling_steps=100, exp_name="run", max_grad_norm=0.2)


def fsdp2_works_on_cpu():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        return torch.distributed.is_available() and torch.distributed.is_gloo_available()
    except ImportError:
        return False


pytestmark = pytest.mark.skipif(not fsdp2_works_on_cpu(), reason="needs torch.distributed with gloo and FSDP2")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flags(out, data_dir, **kw):
    values = {**RUN, "data_dir": data_dir, "output_dir": str(out), **kw}
    argv = []
    for k, v in values.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def launch(argv, nproc=2, faults=None, timeout=150):
    """train.py (under torchrun when nproc > 1), with `faults` injected from outside (tests/faults.py)."""
    env = launch_env({**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}, faults)
    script = [LAUNCHER, "train.py"] if faults else ["train.py"]
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", *script]
    return subprocess.run(cmd + argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def ok(r):
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data16):  # noqa: F811
    """One process in-process, 2-process FSDP2 uninterrupted, 2-process killed after step 5 (checkpoint 4)."""
    base = tmp_path_factory.mktemp("dist")
    single = train(from_flat({**RUN, "data_dir": data16, "output_dir": str(base / "single")}))
    ok(launch(flags(base / "fsdp", data16)))
    killed = launch(flags(base / "killed", data16), faults={"exit_after_step": 5})
    assert killed.returncode != 0
    shutil.copytree(base / "killed", base / "killed_copy")  # for the 2 -> 1 resume
    return {"base": base, "single": single, "data": data16}


def column(exp_dir, key):
    with open(os.path.join(exp_dir, "metrics.jsonl")) as f:
        return [json.loads(line)[key] for line in f]


def test_fsdp2_two_processes_equal_one(runs):
    one = losses(runs["single"]["exp_dir"])
    two = losses(str(runs["base"] / "fsdp" / "run"))
    assert len(one) == len(two) == 6
    np.testing.assert_allclose(two, one, rtol=1e-5)
    norms = column(runs["single"]["exp_dir"], "grad_norm")
    assert min(norms) > RUN["max_grad_norm"]  # every step was clipped
    np.testing.assert_allclose(column(str(runs["base"] / "fsdp" / "run"), "grad_norm"), norms, rtol=1e-5)
    rep = json.load(open(runs["base"] / "fsdp" / "run" / "report.json"))
    assert rep["world_size"] == 2 and rep["parallel"] == "fsdp"
    step, path = dcp.latest(str(runs["base"] / "fsdp" / "run" / "checkpoints"))
    files = json.load(open(os.path.join(path, "COMMITTED")))["files"]
    assert {"model/__0_0.distcp", "model/__1_0.distcp", "ema/__1_0.distcp"} <= set(files)  # really sharded
    # the EMA (sharded fp32, updated on the local shards) ends where the single process's does
    a = torch.load(runs["single"]["checkpoint"], weights_only=True)["ema"]
    b = torch.load(str(runs["base"] / "fsdp" / "run" / "checkpoints" / "0000006.pt"), weights_only=True)["ema"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_ddp_two_processes_equal_one(runs):
    # with 2 micro-batches per step: the first accumulates locally (no_sync), the second all-reduces
    ok(launch(flags(runs["base"] / "ddp", runs["data"], parallel="ddp", gradient_accumulation_steps=2)))
    exp = str(runs["base"] / "ddp" / "run")
    assert json.load(open(os.path.join(exp, "report.json")))["parallel"] == "ddp"
    for key in ("loss", "proj_loss", "grad_norm"):
        np.testing.assert_allclose(column(exp, key), column(runs["single"]["exp_dir"], key), rtol=1e-5, atol=1e-7)
    a = torch.load(runs["single"]["checkpoint"], weights_only=True)
    b = torch.load(os.path.join(exp, "checkpoints", "0000006.pt"), weights_only=True)
    assert set(a["model"]) == set(b["model"])  # no `module.` prefix from the DDP wrapper
    for k in a["ema"]:
        torch.testing.assert_close(b["ema"][k], a["ema"][k], rtol=1e-4, atol=1e-5)


def test_parallel_none_is_refused_under_torchrun():
    from fastrepa.train.parallel import resolve_mode
    assert resolve_mode("none", 1) == resolve_mode("fsdp", 1) == "none"
    assert resolve_mode("ddp", 2) == "ddp"
    with pytest.raises(ValueError, match="--parallel none with 2 processes"):
        resolve_mode("none", 2)


def test_kill_and_rerun_is_bit_identical(runs):
    exp = runs["base"] / "killed" / "run"
    assert dcp.latest(str(exp / "checkpoints"))[0] == 4
    assert len(losses(str(exp))) == 5  # step 5 was logged, then the run died before its checkpoint
    r = ok(launch(flags(runs["base"] / "killed", runs["data"])))
    assert "resuming from" in r.stdout and "step 4" in r.stdout
    assert losses(str(exp)) == losses(str(runs["base"] / "fsdp" / "run"))  # bit-identical, 6 rows


def test_resume_two_processes_onto_one(runs):
    exp = runs["base"] / "killed_copy" / "run"
    report = train(from_flat({**RUN, "data_dir": runs["data"], "output_dir": str(runs["base"] / "killed_copy")}))
    assert report["resumed_from"] == 4 and report["steps"] == 6
    ref = losses(str(runs["base"] / "fsdp" / "run"))
    got = losses(str(exp))
    assert got[:4] == ref[:4]
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_exported_pt_and_safetensors_load_strict(runs):
    ckpt_dir = runs["base"] / "fsdp" / "run" / "checkpoints"
    model, args = model_from_checkpoint(str(ckpt_dir / "0000006.pt"))
    assert args["hidden_size"] == 32 and args["parallel"] == "fsdp"
    ck = torch.load(ckpt_dir / "0000006.pt", weights_only=True)
    assert set(ck) == {"model", "ema", "opt", "args", "steps"} and ck["steps"] == 6
    for k, v in model.state_dict().items():
        assert torch.equal(v, ck["ema"][k]), k
    from safetensors.torch import load_file
    sd = load_file(str(ckpt_dir / "ema-0000006.safetensors"))
    assert set(sd) == set(ck["ema"]) and all(torch.equal(sd[k], ck["ema"][k]) for k in sd)
    assert sorted(s for s, _ in dcp.list_complete(str(ckpt_dir))) == [2, 4, 6]


def test_nan_on_one_rank_stops_both_before_the_update(runs):
    """A NaN loss on rank 1 alone at step 3: both ranks agree, neither updates, the good weights of step 3
    are checkpointed, the run fails with a clear message; the fixed rerun ends bit-identical."""
    out = runs["base"] / "nan"
    r = launch(flags(out, runs["data"]), faults={"nan_loss_at": [3, 1]})
    assert r.returncode != 0
    assert "step 3: loss nan" in r.stderr and "the weights were not updated" in r.stderr
    assert [s for s, _ in dcp.list_complete(str(out / "run" / "checkpoints"))] == [2, 3]
    r = ok(launch(flags(out, runs["data"])))
    assert "resuming from" in r.stdout and "step 3" in r.stdout
    assert losses(str(out / "run")) == losses(str(runs["base"] / "fsdp" / "run"))


def test_crash_during_a_save_leaves_the_previous_one_and_resumes(runs):
    out = runs["base"] / "crash"
    r = launch(flags(out, runs["data"]), faults={"crash_in_save": ["after_shards", 4]})
    assert r.returncode != 0 and "SimulatedCrash: crash injected after_shards" in r.stderr
    ckpts = out / "run" / "checkpoints"
    assert (ckpts / "step-000000004.partial").is_dir() and dcp.latest(str(ckpts))[0] == 2
    r = ok(launch(flags(out, runs["data"])))
    assert "resuming from" in r.stdout and "step 2" in r.stdout
    assert not (ckpts / "step-000000004.partial").exists()
    assert losses(str(out / "run")) == losses(str(runs["base"] / "fsdp" / "run"))


def test_one_rank_dying_does_not_hang_the_other(tmp_path, data16):  # noqa: F811
    # rank 1 exits after step 2 while rank 0 waits in the next step's collective: the launcher ends
    # the job (and --dist-timeout bounds any wait) instead of hanging until the test's timeout
    r = launch(flags(tmp_path, data16, dist_timeout=60), faults={"exit_after_step": [2, 1]}, timeout=120)
    assert r.returncode != 0


HUNG_RANK = """
import os, sys, time
import torch
import torch.distributed as dist
from fastrepa.distributed import setup
env = setup(timeout_s=float(sys.argv[1]))
if env.rank == 1:
    time.sleep(120)  # hung: never joins the collective
t0 = time.time()
try:
    dist.all_reduce(torch.ones(1))
except Exception as e:  # the collective gives up instead of waiting forever
    print(f"rank 0 gave up after {time.time() - t0:.1f} s: {type(e).__name__}", flush=True)
    os._exit(7)
"""


def test_a_hung_rank_does_not_hold_the_others_past_the_timeout(tmp_path):
    """--dist-timeout reaches the process group: rank 0 waiting on a rank that hangs gives up after the
    timeout, fails, and torchrun ends the job (instead of both waiting forever)."""
    import time
    script = tmp_path / "hung.py"
    script.write_text(HUNG_RANK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                        f"--master_port={free_port()}", str(script), "3"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=100)
    assert r.returncode != 0 and "rank 0 gave up after" in r.stdout, (r.stdout[-2000:], r.stderr[-3000:])
    waited = float(r.stdout.split("gave up after ")[1].split(" s")[0])
    assert 2.5 <= waited < 30 and time.time() - t0 < 90


def test_sigterm_two_processes_checkpoints_and_exits_0(tmp_path, data16):  # noqa: F811
    # rank 0 alone gets the signal during step 2; both ranks agree, finish it, checkpoint, exit 0
    r = ok(launch(flags(tmp_path, data16, checkpointing_steps=100), faults={"sigterm_at_step": 1}))
    assert "SIGTERM: stopped after step 2" in r.stdout
    ckpts = str(tmp_path / "run" / "checkpoints")
    assert [s for s, _ in dcp.list_complete(ckpts)] == [2]
    assert not any(n.endswith(".pt") for n in os.listdir(ckpts))  # not the end of training: no export
    assert json.load(open(tmp_path / "run" / "report.json"))["stopped_by"] == "SIGTERM"


def test_sigterm_to_the_launcher_checkpoints_and_exits(tmp_path, data16):  # noqa: F811
    """What a scheduler does on preemption (scancel, spot reclaim): SIGTERM to torchrun itself. The launcher
    passes it to both workers, which finish the step, write one checkpoint and leave before its grace
    period ends; a rerun resumes from that checkpoint."""
    import signal
    import time
    argv = flags(tmp_path, data16, max_train_steps=100000, checkpointing_steps=100000)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "train.py"]
    proc = subprocess.Popen(cmd + argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert "SIGTERM: stopped after step" in out, (out[-2000:], err[-4000:])
    saved = dcp.list_complete(str(tmp_path / "run" / "checkpoints"))
    assert len(saved) == 1 and saved[0][0] >= 2
    assert json.load(open(tmp_path / "run" / "report.json"))["stopped_by"] == "SIGTERM"
    r = ok(launch(flags(tmp_path, data16, max_train_steps=saved[0][0] + 1, checkpointing_steps=100000)))
    assert f"step {saved[0][0]}" in r.stdout and "resuming from" in r.stdout


def test_sigterm_one_process_and_keep_last(tmp_path, data16, monkeypatch):  # noqa: F811
    with pytest.MonkeyPatch.context() as mp:
        sigterm_at_step(mp.setattr, 4)
        report = train(from_flat({**RUN, "data_dir": data16, "output_dir": str(tmp_path), "keep_last": 1}))
    assert report["stopped_by"] == "SIGTERM" and report["steps"] == 5
    assert [s for s, _ in dcp.list_complete(str(tmp_path / "run" / "checkpoints"))] == [5]
    report = train(from_flat({**RUN, "data_dir": data16, "output_dir": str(tmp_path), "keep_last": 1}))
    assert report["resumed_from"] == 5 and report["steps"] == 6


def test_kill_and_rerun_one_process(tmp_path, data16):  # noqa: F811
    full = train(from_flat({**RUN, "data_dir": data16, "output_dir": str(tmp_path / "full")}))
    assert launch(flags(tmp_path / "k", data16), nproc=1, faults={"exit_after_step": 3}).returncode == 3
    rerun = train(from_flat({**RUN, "data_dir": data16, "output_dir": str(tmp_path / "k")}))
    assert rerun["resumed_from"] == 2
    assert losses(str(tmp_path / "k" / "run")) == losses(full["exp_dir"])


def test_dry_run_prints_counts_and_writes_nothing(tmp_path, capsys):
    assert train_cli.main(["--preset", "demo", "--dry-run", "--output-dir", str(tmp_path / "o"),
                           "--data-dir", str(tmp_path / "missing")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] > 0 and out["train_gflop_per_image"] > 0 and out["config"]["model"] == "SiT-S/4"
    assert not (tmp_path / "o").exists()
    # SiT-XL/2 + DINOv2-B: ~770 GFLOP per trained image (docs/design.md, "Performance discipline")
    train_cli.main(["--exp-name", "x", "--dry-run"])
    xl = json.loads(capsys.readouterr().out)
    assert 740 < xl["train_gflop_per_image"] < 800 and 670e6 < xl["params"] < 700e6


def test_export_command_equals_the_end_of_training_export(runs, tmp_path, capsys):
    from safetensors.torch import load_file

    from fastrepa.train import export
    exp = runs["base"] / "fsdp" / "run"  # sharded over 2 ranks
    assert export.main([str(exp), "--pt", str(tmp_path / "a.pt"), "--safetensors", str(tmp_path / "e.st")]) == 0
    assert "step 6" in capsys.readouterr().out
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(exp / "checkpoints" / "0000006.pt", weights_only=True)
    assert a["steps"] == b["steps"] == 6 and a["args"] == b["args"]
    for key in ("model", "ema"):
        assert set(a[key]) == set(b[key]) and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert a["opt"]["param_groups"] == b["opt"]["param_groups"]
    for pid, state in b["opt"]["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(a["opt"]["state"][pid][n])) for n, v in state.items())
    sd = load_file(str(tmp_path / "e.st"))
    assert all(torch.equal(sd[k], b["ema"][k]) for k in b["ema"])
    # an older step, by --step, into the default place beside the checkpoints
    assert export.main([str(exp), "--step", "4", "--only", "pt"]) == 0
    model, _ = model_from_checkpoint(str(exp / "checkpoints" / "0000004.pt"))  # strict load
    # bad input names what it expected
    assert export.main([str(exp), "--step", "5"]) == 2
    assert "no complete checkpoint of step 5" in capsys.readouterr().err
    assert export.main([str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err
