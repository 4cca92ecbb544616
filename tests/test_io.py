"""fastrepa.io: a published file is the old one or the new one, never a part, and no temporary stays."""
import json
import os

import numpy as np
import pytest

from fastrepa import io


def _names(folder):
    return sorted(os.listdir(folder))


def test_write_json_publishes_and_replaces(tmp_path):
    p = tmp_path / "a" / "state.json"
    io.write_json(p, {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert p.read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=1, sort_keys=True) + "\n"
    io.write_json(p, {"step": 2})
    assert json.loads(p.read_text()) == {"step": 2}
    assert _names(p.parent) == ["state.json"]


def test_an_error_mid_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with io.atomic_open(p, "w") as f:
            f.write("new, half written")
            raise RuntimeError("disk full")
    assert p.read_text() == "old" and _names(tmp_path) == ["x.txt"]


def test_atomic_path_for_writers_that_take_a_name(tmp_path):
    p = tmp_path / "arr.npy"
    with io.atomic_path(p) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and io.TEMP_MARK in tmp
        with open(tmp, "wb") as f:
            np.save(f, np.arange(5))
    np.testing.assert_array_equal(np.load(p), np.arange(5))
    assert _names(tmp_path) == ["arr.npy"]


def test_a_writer_that_renames_its_file_is_an_error_not_a_silent_loss(tmp_path):
    p = tmp_path / "samples.npz"
    with pytest.raises(FileNotFoundError, match="did not create its temporary"):
        with io.atomic_path(p) as tmp:
            np.savez(tmp, a=np.zeros(1))  # writes tmp + ".npz"
    assert not p.exists()
    os.remove(next(tmp_path.iterdir()))


def test_binary_mode_and_bad_modes(tmp_path):
    p = tmp_path / "b.bin"
    with io.atomic_open(p, "wb") as f:
        f.write(b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    with pytest.raises(ValueError, match="mode must be"):
        with io.atomic_open(p, "a"):
            pass


def test_temporaries_are_unique_per_call(tmp_path):
    names = {io.temp_name(tmp_path / "f") for _ in range(100)}
    assert len(names) == 100 and all(str(os.getpid()) in n for n in names)
