"""bench/data_suite.py in --quick mode on the CPU: real rows (images/s > 0, the images read equal the
images asked, the sampler's order), the skipped GPU rows, the JPEG vs raw verdict, the photo-like data."""
import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402
import data_suite as ds  # noqa: E402


def quick_args(**kw):
    return argparse.Namespace(**{"quick": True, "dtype": None, "repeats": None, "batch_sizes": None, **kw})


@pytest.fixture(scope="module")
def quick_result():
    args = quick_args()
    return ds.run(args, common.Context(args, torch.device("cpu")))


def test_quick_rows_are_real(quick_result):
    r = quick_result
    rows = {(x["loader"], x["layout"], x["image_format"]): x for x in r["rows"]}
    assert set(rows) == {(s.loader, s.layout, s.image_format) for s in ds.ROWS}
    n, B = ds.QUICK["num_images"], ds.QUICK_BATCH_SIZES[0]
    steps = n // B
    from fastrepa.data.dali import dali_available
    must_run = [("torch", "official", "png"), ("torch", "packed", "raw"), ("torch", "packed", "jpeg")]
    if dali_available():
        must_run += [("dali-cpu", "packed", "raw"), ("dali-cpu", "packed", "jpeg")]
    for key in must_run:
        row = rows[key]
        assert row["status"] == "ok", row
        assert row["images_per_s"] > 0 and row["images_per_s_min"] <= row["images_per_s"] <= row["images_per_s_max"]
        assert row["B"] == B and row["steps_per_epoch"] == steps and row["timed_steps"] == steps * r["repeats"]
        assert row["images_read"] == row["images_asked"] == steps * r["repeats"] * B
        assert row["order_ok"] is True and row["batch_shape"] == [B, 3, 64, 64]
        assert row["images_per_s"] == pytest.approx(B * steps / row["epoch_s"], rel=1e-9)  # odd repeats: one median
    base = rows[("torch", "official", "png")]["images_per_s"]
    assert rows[("torch", "packed", "raw")]["speedup_vs_torch_official"] == pytest.approx(
        rows[("torch", "packed", "raw")]["images_per_s"] / base)
    # bytes per image: raw is exactly H*W*3 plus the .npy header share; JPEG far less
    assert rows[("torch", "packed", "raw")]["bytes_per_image"] == round((64 * 64 * 3 * n + 128) / n)
    assert rows[("torch", "packed", "jpeg")]["bytes_per_image"] < 64 * 64 * 3 / 2
    for key in [("dali-gpu", "packed", "raw"), ("dali-gpu", "packed", "jpeg")]:
        assert rows[key]["status"] == "skipped" and "needs CUDA" in rows[key]["reason"]
        assert rows[key]["images_per_s"] is None
    assert r["reduced"] is True and "--quick" in r["reduced_reason"] and r["repeats"] == 3
    assert any("torch, B=16:" in note and "is faster on this machine" in note for note in r["notes"])
    assert len(r["table"]["rows"]) == len(ds.ROWS) and len(r["table"]["headers"]) == len(r["table"]["rows"][0])


def test_batch_size_larger_than_the_data_is_a_usage_error():
    args = quick_args(batch_sizes=[1000])
    with pytest.raises(common.BenchUsageError, match="holds 64 images"):
        ds.run(args, common.Context(args, torch.device("cpu")))


def test_photo_like_images_are_deterministic_and_compressible():
    a = ds.photo_like(np.random.default_rng(3), 64)
    b = ds.photo_like(np.random.default_rng(3), 64)
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3) and np.array_equal(a, b)
    assert a.std() > 5  # not flat
    from fastrepa.data.pack import encode_jpeg
    assert len(encode_jpeg(a, 95)) < a.nbytes / 3
