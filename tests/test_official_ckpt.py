"""Official REPA checkpoint files: round trip, legacy layout, Namespace args, clear mismatch errors."""
import argparse
import pickle
import warnings

import pytest
import torch

from conftest import tiny_model
from fastrepa.official_ckpt import (CheckpointError, convert_legacy, load_checkpoint_file, load_weights,
                                 save_checkpoint_file, select_weights, weights_name)


def official_file(tmp_path, model, **extra):
    """A file laid out as the official train.py writes it: args is an argparse.Namespace."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ckpt = {"model": model.state_dict(), "ema": model.state_dict(), "opt": opt.state_dict(),
            "args": argparse.Namespace(model="SiT-S/2", encoder_depth=2, qk_norm=False), "steps": 50000, **extra}
    path = tmp_path / "0050000.pt"
    torch.save(ckpt, path)
    return str(path)


def test_official_file_loads_strict_with_weights_only(tmp_path):
    src = tiny_model()
    ckpt = load_checkpoint_file(official_file(tmp_path, src))
    assert ckpt["args"] == {"model": "SiT-S/2", "encoder_depth": 2, "qk_norm": False}
    assert ckpt["steps"] == 50000
    dst = tiny_model()
    with torch.no_grad():
        for p in dst.parameters():
            p.zero_()
    load_weights(dst, select_weights(ckpt, "ema"))
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k


def test_save_round_trip_is_plain_and_atomic(tmp_path):
    m = tiny_model()
    path = str(tmp_path / "ck" / "0000001.pt")
    save_checkpoint_file(path, {"model": m.state_dict(), "args": {"lr": 1e-4}, "steps": 1})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["0000001.pt"]
    back = torch.load(path, weights_only=True)
    assert back["args"] == {"lr": 1e-4} and back["steps"] == 1


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "0000001.pt")
    save_checkpoint_file(path, {"steps": 1})

    def boom(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint_file(path, {"steps": 2})
    monkeypatch.undo()
    assert load_checkpoint_file(path)["steps"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["0000001.pt"]


def test_legacy_layout_converts(tmp_path):
    src = tiny_model()  # depth 4, encoder_depth 2
    legacy = {}
    for k, v in src.state_dict().items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            if i >= 2:
                k = f"decoder_blocks.{i - 2}." + k.split(".", 2)[2]
        legacy[k] = v
    assert "decoder_blocks.1.attn.qkv.weight" in legacy
    assert set(convert_legacy(legacy, 2)) == set(src.state_dict())
    dst = tiny_model(class_dropout_prob=0.2)
    load_weights(dst, legacy)
    assert torch.equal(dst.blocks[3].mlp.fc2.weight, src.blocks[3].mlp.fc2.weight)


def test_mismatch_lists_missing_unexpected_and_shapes():
    src = tiny_model().state_dict()
    src.pop("blocks.1.attn.qkv.bias")
    src["extra.weight"] = torch.zeros(1)
    src["final_layer.linear.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as e:
        load_weights(tiny_model(), src, source="x.pt")
    msg = str(e.value)
    assert "x.pt" in msg and "missing keys: blocks.1.attn.qkv.bias" in msg
    assert "unexpected keys: extra.weight" in msg and "final_layer.linear.bias: checkpoint (3,)" in msg


def test_missing_ema_and_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="no 'ema' weights"):
        select_weights({"model": {"a": 1}, "steps": 3}, "ema")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint_file(str(tmp_path / "nope.pt"))
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match="trunc.pt"):
        load_checkpoint_file(str(bad))


def test_bare_state_dict_is_used_with_a_warning():
    sd = tiny_model().state_dict()
    with pytest.warns(UserWarning, match=r"bare\.pt is a bare state dict, not a checkpoint with ema / model weights.*"
                                         r"here 'ema'"):
        got = select_weights(sd, "ema", source="bare.pt")
    assert got is sd and weights_name(sd, "ema") == weights_name(sd, "model") == "state_dict"
    ckpt = {"ema": sd, "model": {k: v + 1 for k, v in sd.items()}, "steps": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a full checkpoint: no warning
        assert select_weights(ckpt, "model") is ckpt["model"] and weights_name(ckpt, "model") == "model"


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_arbitrary_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "args": Evil()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint_file(str(path))
