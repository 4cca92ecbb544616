"""The DALI loader against the torch loader: the same batches (order, ranks, resume step) from packed
data. Raw images and moments/labels: bit for bit. JPEG on the CPU: DALI's decoder and PIL are both
libjpeg-turbo (islow IDCT, fancy upsampling), checked bit for bit for 4:4:4 and 4:2:0 files. JPEG on the
GPU ("mixed", nvJPEG): a tolerance, CUDA only. Skipped without DALI (pip install fastrepa[dali])."""
import os

import pytest
import torch

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install fastrepa[dali])")

from fastrepa.data import REPAFolderDataset, StepSampler, build_loader, open_dataset  # noqa: E402
from fastrepa.data.dali import DALILoader  # noqa: E402
from fastrepa.data.pack import pack  # noqa: E402
from fastrepa.data.synthetic import write_dataset  # noqa: E402
from test_data_packed import jpeg_folder  # noqa: E402

N = 30


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dali")
    src = write_dataset(str(base / "src"), N, seed=2)
    out = {"src": src}
    for fmt in ("raw", "jpeg"):
        out[fmt] = str(base / fmt)
        pack(src, out[fmt], fmt, chunk=16, progress=False)
    jsrc = jpeg_folder(str(base / "j420"), n=N, subsampling=2, quality=85)  # 4:2:0 files, stored verbatim
    out["jpeg420"] = str(base / "jpeg420")
    pack(jsrc, out["jpeg420"], "jpeg", progress=False)
    return out


def assert_same_batches(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert list(x) == list(y) == ["image", "moments", "label"]
        for u, v in zip(x.values(), y.values()):
            assert u.dtype == v.dtype and u.shape == v.shape and u.device == v.device
            assert torch.equal(u, v)


@pytest.mark.parametrize("fmt", ["raw", "jpeg", "jpeg420"])
def test_dali_cpu_equals_torch_loader(packs, fmt):
    ds = open_dataset(packs[fmt])
    for rank in (0, 1):
        sampler = lambda rank=rank: StepSampler(N, 8, seed=7, rank=rank, world_size=2, start_step=0, num_steps=9)  # noqa: E731
        torch_batches = list(build_loader(ds, sampler()))
        dali_batches = list(DALILoader(ds, sampler(), device="cpu", num_threads=2))
        assert_same_batches(torch_batches, dali_batches)
        images, moments, labels = dali_batches[0].values()
        assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8
        assert moments.dtype == torch.float32 and labels.dtype == torch.int64
        assert labels.tolist() == ds.labels[sampler().batch(0)].tolist()


def test_dali_raw_equals_the_official_folder_and_resumes(packs):
    folder, packed = REPAFolderDataset(packs["src"]), open_dataset(packs["raw"])
    full = list(DALILoader(packed, StepSampler(N, 6, seed=1, num_steps=12), device="cpu"))
    assert_same_batches(list(build_loader(folder, StepSampler(N, 6, seed=1, num_steps=12))), full)
    tail = build_loader(packed, StepSampler(N, 6, seed=1, start_step=7, num_steps=5), backend="dali", device="cpu")
    assert len(tail) == 5
    assert_same_batches(full[7:], list(tail))
    assert_same_batches(full[7:], list(tail))  # iterating again starts again at the sampler's start step


def test_dali_refuses_the_folder_layout(packs):
    with pytest.raises(ValueError, match="reads the packed layout.*fastrepa.data.pack"):
        DALILoader(REPAFolderDataset(packs["src"]), StepSampler(N, 6, seed=1), device="cpu")
    with pytest.raises(ValueError, match="indexes 40 items"):
        DALILoader(packs["raw"], StepSampler(40, 6, seed=1), device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: DALI's mixed (nvJPEG) decoder")
@pytest.mark.parametrize("fmt", ["raw", "jpeg"])
def test_dali_gpu_matches_torch_loader(packs, fmt):
    ds = open_dataset(packs[fmt])
    sampler = lambda: StepSampler(N, 8, seed=7, num_steps=6)  # noqa: E731
    ref = list(build_loader(ds, sampler()))
    got = list(DALILoader(ds, sampler(), device="cuda"))
    assert len(ref) == len(got)
    for (ri, rm, rl), (gi, gm, gl) in ((r.values(), g.values()) for r, g in zip(ref, got)):
        assert gi.is_cuda and gm.is_cuda and gl.is_cuda
        assert torch.equal(rm, gm.cpu()) and torch.equal(rl, gl.cpu())
        if fmt == "raw":
            assert torch.equal(ri, gi.cpu())
        else:  # nvJPEG vs libjpeg-turbo: a different IDCT; a few levels at most, ~0 on average
            diff = (ri.float() - gi.cpu().float()).abs()
            assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean().item(), diff.max().item())


def test_dali_tests_ran_with_a_real_pipeline(packs):
    # guard against a silently empty comparison: the packs hold what the test thinks
    assert os.path.getsize(os.path.join(packs["jpeg420"], "images.jpeg")) > 1000
    assert open_dataset(packs["jpeg420"]).manifest["jpeg"]["copied_verbatim"] == N
