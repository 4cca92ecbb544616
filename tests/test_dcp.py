"""DCP training checkpoints: round trip, keep-last-K, crash mid-save, clear errors, exports, 2 -> 1 resharding."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from conftest import TINY, tiny_model
from faults import SimulatedCrash, crash_in_save
from fastrepa.official_ckpt import CheckpointError, load_checkpoint_file, load_weights
from fastrepa.models import build_model
from fastrepa.train import dcp
from fastrepa.train.ema import make_ema, update_ema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


def train_steps(model, ema, opt, n, seed=1):
    """n AdamW steps on a loss that reaches every trained parameter, and the EMA update."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(2, 4, 8, 8, generator=g)
        t = torch.rand(2, generator=g)
        y = torch.randint(0, 10, (2,), generator=g)
        out, zs = model(x, t, y)
        loss = out.pow(2).mean() + sum(z.pow(2).mean() for z in zs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_ema(ema, model, 0.9)


def trained(seed=1, steps=2):
    model = tiny_model()
    ema = make_ema(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    train_steps(model, ema, opt, steps, seed)
    return model, ema, opt


def fresh():
    """Same architecture, different weights, an optimizer that never stepped."""
    torch.manual_seed(123)
    model = build_model("SiT-S/2", **TINY)
    ema = make_ema(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.zero_()
    return model, ema, torch.optim.AdamW(model.parameters(), lr=5.0, weight_decay=0.5)


def assert_same(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_opt(a: dict, b: dict):
    """torch optimizer.state_dict() layouts (integer ids) equal, tensors exactly."""
    assert sorted(a["state"]) == sorted(b["state"])
    for i in a["state"]:
        sa, sb = a["state"][i], b["state"][i]
        assert sorted(sa) == sorted(sb), i
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), (i, k)
    for ga, gb in zip(a["param_groups"], b["param_groups"], strict=True):
        for k in ("lr", "betas", "eps", "weight_decay", "params"):
            assert tuple(ga[k]) == tuple(gb[k]) if k in ("betas", "params") else ga[k] == gb[k], k


EXTRA = {"step": 2, "images_seen": 4, "data_position": 17, "seeds": {"global": 0},
         "scheduler": {"last_epoch": 2, "base_lrs": [0.001]}, "config": {"model": "SiT-S/2", "lr": 1e-3}}


def test_round_trip_single_process(tmp_path):
    model, ema, opt = trained()
    path = dcp.save(str(tmp_path), 2, model=model, ema=ema, optimizer=opt, extra=EXTRA)
    assert os.path.basename(path) == "step-000000002"
    assert sorted(os.listdir(path)) == ["COMMITTED", "ema", "model", "optim", "train_state.json"]
    marker = json.load(open(os.path.join(path, "COMMITTED")))
    assert marker["step"] == 2 and marker["world_size"] == 1 and "model/.metadata" in marker["files"]
    assert dcp.latest(str(tmp_path)) == (2, path) and dcp.find(str(tmp_path), 2) == path

    m2, e2, o2 = fresh()
    extra = dcp.load(path, model=m2, ema=e2, optimizer=o2)
    assert extra == EXTRA
    assert_same(model.state_dict(), m2.state_dict())
    assert_same(ema.state_dict(), e2.state_dict())
    assert_same_opt(opt.state_dict(), o2.state_dict())
    assert int(o2.state_dict()["state"][1]["step"]) == 2
    # and training goes on identically
    train_steps(model, ema, opt, 1, seed=5)
    train_steps(m2, e2, o2, 1, seed=5)
    assert_same(model.state_dict(), m2.state_dict())
    assert_same(ema.state_dict(), e2.state_dict())


def test_keep_last_k_and_resave_same_step(tmp_path):
    model, ema, opt = trained(steps=1)
    root = str(tmp_path / "ck")
    for s in (1, 2, 3, 4):
        dcp.save(root, s, model=model, ema=ema, optimizer=opt, extra={"step": s}, keep_last=2)
    assert [s for s, _ in dcp.list_complete(root)] == [3, 4]
    dcp.save(root, 4, model=model, ema=ema, optimizer=opt, extra={"step": 4, "again": True}, keep_last=2)
    assert [s for s, _ in dcp.list_complete(root)] == [3, 4]
    assert dcp.read_extra(dcp.find(root, 4)) == {"step": 4, "again": True}
    assert sorted(os.listdir(root)) == ["step-000000003", "step-000000004"]
    # an older step saved after newer ones (a user resumed further back) is kept: it was just written
    dcp.save(root, 2, model=model, ema=ema, optimizer=opt, extra={"step": 2}, keep_last=1)
    assert [s for s, _ in dcp.list_complete(root)] == [2, 4]
    all_root = str(tmp_path / "all")
    for s in (1, 2, 3):
        dcp.save(all_root, s, model=model, extra={})
    assert [s for s, _ in dcp.list_complete(all_root)] == [1, 2, 3]
    with pytest.raises(ValueError, match="keep_last"):
        dcp.save(all_root, 4, model=model, keep_last=0)


@pytest.mark.parametrize("point", ["after_shards", "after_marker"])
def test_crash_mid_save_keeps_previous(tmp_path, monkeypatch, point):
    model, ema, opt = trained()
    root = str(tmp_path)
    good = dcp.save(root, 10, model=model, ema=ema, optimizer=opt, extra={"step": 10}, keep_last=1)
    train_steps(model, ema, opt, 1, seed=3)
    with pytest.MonkeyPatch.context() as mp:
        crash_in_save(mp.setattr, point)
        with pytest.raises(SimulatedCrash):
            dcp.save(root, 20, model=model, ema=ema, optimizer=opt, extra={"step": 20}, keep_last=1)
    assert os.path.isdir(os.path.join(root, "step-000000020.partial"))
    assert dcp.latest(root) == (10, good)
    with pytest.raises(CheckpointError, match=r"step-000000020\.partial.*complete steps available: \[10\]"):
        dcp.find(root, 20)
    with pytest.raises(CheckpointError, match="not complete"):
        dcp.load(os.path.join(root, "step-000000020.partial"), model=fresh()[0])
    m2, e2, o2 = fresh()
    assert dcp.load(good, model=m2, ema=e2, optimizer=o2) == {"step": 10}
    # the next successful save removes the partial directory, and keep_last=1 the older one
    dcp.save(root, 30, model=model, ema=ema, optimizer=opt, extra={"step": 30}, keep_last=1)
    assert sorted(os.listdir(root)) == ["step-000000030"]


def test_find_and_incomplete_errors(tmp_path):
    root = str(tmp_path)
    with pytest.raises(CheckpointError, match=rf"step 5 in {root}.*complete steps available: none"):
        dcp.find(root, 5)
    assert dcp.latest(root) is None and dcp.latest(str(tmp_path / "nothing")) is None
    model, ema, opt = trained(steps=1)
    p1 = dcp.save(root, 1, model=model, ema=ema, optimizer=opt)
    p2 = dcp.save(root, 2, model=model, ema=ema, optimizer=opt)
    os.remove(os.path.join(p2, "COMMITTED"))  # looks like a save that did not finish
    assert dcp.latest(root) == (1, p1)
    with pytest.raises(CheckpointError, match=r"no readable COMMITTED.*complete steps available: \[1\]"):
        dcp.find(root, 2)
    with open(os.path.join(p1, "model", "__0_0.distcp"), "r+b") as f:  # truncated shard
        f.truncate(10)
    assert dcp.latest(root) is None
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp has 10 bytes"):
        dcp.find(root, 1)
    with pytest.raises(CheckpointError, match="not complete"):
        dcp.load(p1, model=model)
    # an unrelated directory is never touched by cleanup; incomplete ones are
    os.makedirs(os.path.join(root, "mine"))
    dcp.save(root, 3, model=model, keep_last=1)
    assert sorted(os.listdir(root)) == ["mine", "step-000000003"]


def test_strict_load_lists_keys(tmp_path):
    model, ema, opt = trained(steps=1)
    path = dcp.save(str(tmp_path), 1, model=model, ema=ema, optimizer=opt)
    other = build_model("SiT-S/2", **{**TINY, "depth": 3})
    with pytest.raises(CheckpointError, match=r"does not match the model \(SiT\); missing keys: blocks\.4\.attn"):
        dcp.load(path, model=build_model("SiT-S/2", **{**TINY, "depth": 5}))
    with pytest.raises(CheckpointError, match=r"unexpected keys: blocks\.3\.[^;]*blocks\.3\.mlp"):
        dcp.load(path, model=other)
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*projectors\.0\.0\.weight"):
        dcp.load(path, model=build_model("SiT-S/2", **{**TINY, "projector_dim": 16}))
    sub = dcp.save(str(tmp_path), 3, model=model, optimizer=torch.optim.AdamW(model.blocks.parameters()))
    m2, _, o2 = fresh()
    with pytest.raises(CheckpointError, match=r"does not match the optimizer; missing keys: state\.x_embedder"):
        dcp.load(sub, model=m2, optimizer=o2)
    p0 = dcp.save(str(tmp_path), 2, model=model)
    with pytest.raises(CheckpointError, match=r"has no optim state"):
        dcp.load(p0, model=model, optimizer=opt)


def test_extra_must_be_plain_json(tmp_path):
    model = tiny_model()
    with pytest.raises(CheckpointError, match="plain JSON"):
        dcp.save(str(tmp_path), 1, model=model, extra={"rng": torch.zeros(3)})
    assert os.listdir(tmp_path) == []


def check_official(pt, model, ema, opt, args, steps):
    ckpt = load_checkpoint_file(pt)  # weights_only=True: plain types only
    assert sorted(ckpt) == ["args", "ema", "model", "opt", "steps"]
    assert ckpt["args"] == args and ckpt["steps"] == steps
    for key, ref in (("model", model), ("ema", ema)):
        dst = build_model("SiT-S/2", **TINY)
        load_weights(dst, ckpt[key], source=f"{pt} [{key}]")
        assert_same(ref.state_dict(), dst.state_dict())
    dst = build_model("SiT-S/2", **TINY)
    o = torch.optim.AdamW(dst.parameters(), lr=7.0)
    o.load_state_dict(ckpt["opt"])  # what the official train.py does
    assert_same_opt(opt.state_dict(), o.state_dict())


def check_safetensors(f, ema, config):
    dst = build_model("SiT-S/2", **TINY)
    load_weights(dst, load_file(f), source=f)
    assert_same(ema.state_dict(), dst.state_dict())
    with safe_open(f, "pt") as sf:
        assert json.loads(sf.metadata()["config"]) == config


def test_exports_load_strict(tmp_path):
    model, ema, opt = trained()
    args = {"model": "SiT-S/2", "learning_rate": 1e-3, "encoder_depth": 2}
    pt = dcp.export_official_pt(out_file=str(tmp_path / "live.pt"), model=model, ema=ema, optimizer=opt,
                              args=args, steps=2)
    check_official(pt, model, ema, opt, args, 2)
    path = dcp.save(str(tmp_path / "ck"), 2, model=model, ema=ema, optimizer=opt, extra={"config": args})
    check_official(dcp.export_official_pt(path, str(tmp_path / "fromdir.pt")), model, ema, opt, args, 2)
    st = dcp.export_ema_safetensors(ema, str(tmp_path / "ema.safetensors"), config=args)
    check_safetensors(st, ema, args)
    check_safetensors(dcp.export_ema_safetensors(path, str(tmp_path / "ema2.safetensors")), ema, args)
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


SCRIPT = textwrap.dedent("""
    import os, sys
    import pytest, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP
    from conftest import tiny_model
    from faults import SimulatedCrash, crash_in_save
    from test_dcp import train_steps
    from fastrepa.train import dcp
    from fastrepa.train.ema import make_ema

    out, from1 = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def shard(m):
        for b in m.blocks:
            fully_shard(b)
        return fully_shard(m)

    def build(mode):
        model = tiny_model()
        ema = make_ema(model)
        if mode == "fsdp2":
            shard(model), shard(ema)
        else:
            model = DDP(model)
        return model, ema, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

    def full(model, ema, opt):
        return {{"model": get_model_state_dict(model, options=FULL), "ema": get_model_state_dict(ema, options=FULL),
                "optim": get_optimizer_state_dict(model, opt, options=FULL)}}

    for mode in ("fsdp2", "ddp"):
        model, ema, opt = build(mode)
        train_steps(model, ema, opt, 2, seed=10 + rank)  # each rank its own data
        root = os.path.join(out, mode)
        dcp.save(root, 2, model=model, ema=ema, optimizer=opt, extra={{"step": 2, "world": 2}}, keep_last=2)
        state = full(model, ema, opt)
        if rank == 0:
            torch.save(state, os.path.join(out, mode + "_full.pt"))
        if mode == "fsdp2":
            # a crash injected mid-save on every rank: the step-2 checkpoint stays the latest
            with pytest.MonkeyPatch.context() as mp:
                crash_in_save(mp.setattr, "after_shards")
                try:
                    dcp.save(root, 3, model=model, ema=ema, optimizer=opt, extra={{"step": 3}})
                    raise SystemExit("the injected crash did not happen")
                except SimulatedCrash:
                    pass
            assert dcp.resume_point(root)[0] == 2
            dcp.export_official_pt(out_file=os.path.join(out, "official.pt"), model=model, ema=ema, optimizer=opt,
                                 args={{"model": "SiT-S/2"}}, steps=2)
            dcp.export_ema_safetensors(ema, os.path.join(out, "ema.safetensors"), config={{"model": "SiT-S/2"}})
            # 2 -> 2: a fresh sharded model gets exactly the same state back
            m2, e2, o2 = build(mode)
            step, path = dcp.resume_point(root)
            assert dcp.load(path, model=m2, ema=e2, optimizer=o2) == {{"step": 2, "world": 2}}
            again = full(m2, e2, o2)
            if rank == 0:
                for part in ("model", "ema"):
                    for k, v in state[part].items():
                        assert torch.equal(v, again[part][k]), (part, k)
            # 1 -> 2: the checkpoint the single process wrote, loaded sharded
            m3, e3, o3 = build(mode)
            dcp.load(from1, model=m3, ema=e3, optimizer=o3)
            got = full(m3, e3, o3)
            if rank == 0:
                torch.save(got, os.path.join(out, "from1_full.pt"))
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        print("DIST-OK")
""")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp2_works_on_cpu():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        return torch.distributed.is_available() and torch.distributed.is_gloo_available()
    except ImportError:
        return False


@pytest.mark.skipif(not fsdp2_works_on_cpu(), reason="needs torch.distributed with gloo and FSDP2 fully_shard")
def test_two_process_fsdp2_and_ddp_reshard(tmp_path):
    # a single-process checkpoint, to be loaded by 2 sharded processes (1 -> 2)
    m1, e1, o1 = trained(seed=7)
    from1 = dcp.save(str(tmp_path / "single"), 2, model=m1, ema=e1, optimizer=o1, extra={"step": 2})
    script = tmp_path / "dist_ckpt.py"
    script.write_text(SCRIPT.format(tests=TESTS))
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(script), str(out), from1]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and "DIST-OK" in r.stdout, (r.stdout[-4000:], r.stderr[-6000:])

    for mode in ("fsdp2", "ddp"):
        root = str(out / mode)
        step, path = dcp.latest(root)
        assert step == 2 and json.load(open(os.path.join(path, "COMMITTED")))["world_size"] == 2
        if mode == "fsdp2":
            assert sorted(os.listdir(root)) == ["step-000000002", "step-000000003.partial"]
            assert {"model/__0_0.distcp", "model/__1_0.distcp"} <= set(json.load(
                open(os.path.join(path, "COMMITTED")))["files"])
        ref = torch.load(out / f"{mode}_full.pt", weights_only=True)
        # 2 -> 1: a plain single-process model gets the full weights the 2 ranks held
        m, e, o = fresh()
        assert dcp.load(path, model=m, ema=e, optimizer=o) == {"step": 2, "world": 2}
        assert_same(ref["model"], m.state_dict())
        assert_same(ref["ema"], e.state_dict())
        mine = get_optimizer_state_dict(m, o)
        assert sorted(mine["state"]) == sorted(ref["optim"]["state"])
        for name, s in ref["optim"]["state"].items():
            for k, v in s.items():
                assert torch.equal(v, mine["state"][name][k]), (mode, name, k)
        if mode == "fsdp2":  # training really moved the weights, and the exports of the sharded run load strict
            assert not torch.equal(ref["model"]["blocks.0.attn.qkv.weight"], tiny_model().blocks[0].attn.qkv.weight)
            check_official(str(out / "official.pt"), m, e, o, {"model": "SiT-S/2"}, 2)
            check_safetensors(str(out / "ema.safetensors"), e, {"model": "SiT-S/2"})

    got = torch.load(out / "from1_full.pt", weights_only=True)  # 1 -> 2
    assert_same(m1.state_dict(), got["model"])
    assert_same(e1.state_dict(), got["ema"])
    ref_opt = get_optimizer_state_dict(m1, o1)
    for name, s in ref_opt["state"].items():
        for k, v in s.items():
            assert torch.equal(v, got["optim"]["state"][name][k]), (name, k)
