"""The packed layout: python -m fastrepa.data.pack from an official folder, PackedDataset equal to
REPAFolderDataset item by item (raw: bit for bit; JPEG: the stored JPEG, verbatim for JPEG sources),
open_dataset by layout, crash + resume of the packer, and bad packs (truncated, count mismatch, checksum,
missing file, wrong dtype) with errors that name the file."""
import hashlib
import json
import os
import pickle
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastrepa.data import (PackedDataset, PackedFormatError, REPAFolderDataset, StepSampler, build_loader,
                           check_labels, open_dataset)
from fastrepa.data import pack as pack_mod
from fastrepa.data.pack import PackError, encode_jpeg, main, pack
from fastrepa.data.packed import decode_jpeg
from fastrepa.data.synthetic import write_dataset

N = 30


def jpeg_folder(root, n=12, subsampling=2, quality=90):
    """An official-layout folder whose images are JPEG files (4:2:0 by default), from the synthetic set."""
    src = write_dataset(os.path.join(root, "png"), n, seed=1)
    out = os.path.join(root, "jpg")
    shutil.copytree(os.path.join(src, "vae-sd"), os.path.join(out, "vae-sd"))
    for dirpath, _, names in os.walk(os.path.join(src, "images")):
        for name in names:
            if name.endswith(".png"):
                rel = os.path.relpath(os.path.join(dirpath, name), os.path.join(src, "images"))
                dst = os.path.join(out, "images", rel[:-4] + ".jpg")
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                Image.open(os.path.join(dirpath, name)).save(dst, quality=quality, subsampling=subsampling)
    return out


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    base = tmp_path_factory.mktemp("packed")
    src = write_dataset(str(base / "src"), N, seed=0)
    raw = str(base / "raw")
    jpeg = str(base / "jpeg")
    pack(src, raw, "raw", chunk=7, progress=False)
    pack(src, jpeg, "jpeg", jpeg_quality=95, chunk=7, progress=False)
    return {"base": base, "src": src, "raw": raw, "jpeg": jpeg}


def copy_pack(packs, fmt, tmp_path):
    dst = str(tmp_path / fmt)
    shutil.copytree(packs[fmt], dst)
    return dst


def test_raw_pack_equals_the_folder_bit_for_bit(packs):
    folder, packed = REPAFolderDataset(packs["src"]), open_dataset(packs["raw"], verify=True)
    assert isinstance(packed, PackedDataset) and isinstance(open_dataset(packs["src"]), REPAFolderDataset)
    assert len(packed) == N and packed.labels.tolist() == folder.labels.tolist()
    for i in range(N):
        a, b = folder[i], packed[i]
        for u, v in zip(a, b):
            assert u.dtype == v.dtype and u.shape == v.shape and torch.equal(u, v), i
    assert packed[-1][2].item() == folder[N - 1][2].item()
    with pytest.raises(IndexError, match="out of range"):
        packed[N]
    m = json.load(open(os.path.join(packs["raw"], "manifest.json")))
    assert (m["format"], m["version"], m["count"], m["image_format"]) == ("fastrepa-packed", 1, N, "raw")
    assert m["image_shape"] == [3, 32, 32] and m["moments_shape"] == [6, 32, 32] and m["moments_dtype"] == "float32"
    assert m["num_classes"] == 10 and m["files"]["images"]["shape"] == [N, 32, 32, 3]
    for entry in m["files"].values():
        data = open(os.path.join(packs["raw"], entry["path"]), "rb").read()
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert not os.path.exists(os.path.join(packs["raw"], ".pack"))  # the state folder is gone once complete


def test_jpeg_pack_holds_the_encoded_images(packs):
    folder, packed = REPAFolderDataset(packs["src"]), PackedDataset(packs["jpeg"], verify=True)
    m = packed.manifest
    assert m["jpeg"]["encoded"] == N and m["jpeg"]["copied_verbatim"] == 0 and m["jpeg"]["quality"] == 95
    off = np.load(os.path.join(packs["jpeg"], "image_offsets.npy"))
    assert off[0] == 0 and off[-1] == os.path.getsize(os.path.join(packs["jpeg"], "images.jpeg"))
    errs = []
    for i in range(N):
        img, moments, label = packed[i]
        f_img, f_moments, f_label = folder[i]
        want = encode_jpeg(np.ascontiguousarray(f_img.numpy().transpose(1, 2, 0)), 95)
        assert packed.jpeg_bytes(i).tobytes() == want  # sample i is the JPEG of folder image i
        assert torch.equal(img, torch.from_numpy(decode_jpeg(want).transpose(2, 0, 1).copy()))
        assert torch.equal(moments, f_moments) and label.item() == f_label.item()
        errs.append((img.float() - f_img.float()).abs().mean().item())
    # lossy: q95 4:4:4 on these noisy 32x32 shapes is a few grey levels off on average, never far
    assert 0 < max(errs) < 5


def test_jpeg_source_files_are_stored_verbatim(tmp_path):
    src = jpeg_folder(str(tmp_path))
    dst = str(tmp_path / "packed")
    m = pack(src, dst, "jpeg", chunk=5, progress=False)
    assert m["jpeg"]["copied_verbatim"] == 12 and m["jpeg"]["encoded"] == 0
    folder, packed = REPAFolderDataset(src), PackedDataset(dst)
    for i in range(12):
        raw = open(os.path.join(folder.images_dir, folder.image_fnames[i]), "rb").read()
        assert packed.jpeg_bytes(i).tobytes() == raw
        for u, v in zip(folder[i], packed[i]):
            assert torch.equal(u, v)  # same bytes, same decoder: the folder's items exactly
    # repacking a pack: jpeg -> raw keeps the decoded pixels
    pack(dst, str(tmp_path / "raw"), "raw", progress=False)
    again = PackedDataset(str(tmp_path / "raw"))
    assert all(torch.equal(again[i][0], packed[i][0]) for i in range(12))


def test_torch_loader_batches_packed_equal_official(packs):
    sampler = lambda: StepSampler(N, 8, seed=4, rank=1, world_size=2, start_step=1, num_steps=6)  # noqa: E731
    a = list(build_loader(REPAFolderDataset(packs["src"]), sampler()))
    b = list(build_loader(open_dataset(packs["raw"]), sampler(), num_workers=2))  # workers reopen the maps
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert list(x) == list(y) == ["image", "moments", "label"]
        assert x["image"].shape == (4, 3, 32, 32) and all(torch.equal(x[k], y[k]) for k in x)


def test_pickled_dataset_carries_no_arrays(packs):
    ds = PackedDataset(packs["raw"])
    ds[0]  # opens the memory maps
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000  # the images file alone is 92 KB
    assert torch.equal(pickle.loads(blob)[5][0], ds[5][0])


@pytest.mark.parametrize("fmt", ["raw", "jpeg"])
def test_crash_then_resume_gives_the_same_pack(packs, tmp_path, monkeypatch, fmt):
    dst = str(tmp_path / "out")
    real, calls = pack_mod.write_json, []

    def dying(path, obj):
        calls.append(path)
        if len(calls) == 3:  # the start, chunk 1 committed; killed before chunk 2 is committed
            raise KeyboardInterrupt
        real(path, obj)
    monkeypatch.setattr(pack_mod, "write_json", dying)
    with pytest.raises(KeyboardInterrupt):
        pack(packs["src"], dst, fmt, jpeg_quality=95, chunk=7, progress=False)
    monkeypatch.setattr(pack_mod, "write_json", real)
    assert not os.path.exists(os.path.join(dst, "manifest.json"))
    assert json.load(open(os.path.join(dst, ".pack", "state.json")))["done"] == 7
    with pytest.raises(FileNotFoundError, match="unfinished pack"):
        open_dataset(dst)
    with pytest.raises(PackError, match="image_format"):  # other settings do not resume it
        pack(packs["src"], dst, "jpeg" if fmt == "raw" else "raw", progress=False)
    m = pack(packs["src"], dst, fmt, jpeg_quality=95, chunk=7, progress=False)
    clean = json.load(open(os.path.join(packs[fmt], "manifest.json")))
    assert {k: v["sha256"] for k, v in m["files"].items()} == {k: v["sha256"] for k, v in clean["files"].items()}
    mtime = os.stat(os.path.join(dst, "manifest.json")).st_mtime_ns  # complete: a rerun changes nothing
    assert pack(packs["src"], dst, fmt, jpeg_quality=95, chunk=7, progress=False)["files"] == m["files"]
    assert os.stat(os.path.join(dst, "manifest.json")).st_mtime_ns == mtime


def test_killed_while_renaming_finishes(packs, tmp_path, monkeypatch):
    dst = str(tmp_path / "out")
    real, moved = os.replace, []

    def dying(a, b):
        if a.endswith(".partial"):
            moved.append(a)
            if len(moved) == 2:
                raise KeyboardInterrupt
        real(a, b)
    monkeypatch.setattr(pack_mod.os, "replace", dying)
    with pytest.raises(KeyboardInterrupt):
        pack(packs["src"], dst, "raw", chunk=7, progress=False)
    monkeypatch.setattr(pack_mod.os, "replace", real)
    assert not os.path.exists(os.path.join(dst, "manifest.json"))
    pack(packs["src"], dst, "raw", chunk=7, progress=False)
    assert PackedDataset(dst, verify=True).manifest["files"] == PackedDataset(packs["raw"]).manifest["files"]


def test_cli(packs, tmp_path, capsys):
    dst = str(tmp_path / "cli")
    assert main([packs["src"], dst, "--image-format", "jpeg", "--jpeg-quality", "95", "--workers", "2",
                 "--chunk", "8", "--verify"]) == 0
    assert "packed 30 samples (jpeg images [3, 32, 32]" in capsys.readouterr().out
    assert PackedDataset(dst).manifest["files"] == PackedDataset(packs["jpeg"]).manifest["files"]
    os.makedirs(tmp_path / "full")
    open(tmp_path / "full" / "x", "w").close()
    assert main([packs["src"], str(tmp_path / "full")]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main([str(tmp_path / "nothing"), str(tmp_path / "o")]) == 2
    assert "nothing does not exist" in capsys.readouterr().err


def test_source_image_of_another_size_is_named(tmp_path):
    src = write_dataset(str(tmp_path / "src"), 12, seed=0)
    Image.new("RGB", (32, 40)).save(os.path.join(src, "images", "00000", "img00000009.png"))
    with pytest.raises(PackError, match=r"img00000009\.png is \[3, 40, 32\], expected \[3, 32, 32\]"):
        pack(src, str(tmp_path / "o"), "raw", progress=False)


def test_unreadable_source_image_stops_the_pack_and_a_rerun_resumes(tmp_path):
    src = write_dataset(str(tmp_path / "src"), 12, seed=0)
    bad = os.path.join(src, "images", "00000", "img00000009.png")
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[:60])  # truncated
    dst = str(tmp_path / "o")
    with pytest.raises(PackError, match=rf"cannot read sample 9 \({bad}\): ValueError: cannot read image {bad}"):
        pack(src, dst, "raw", chunk=4, progress=False)
    assert not os.path.exists(os.path.join(dst, "manifest.json"))
    assert json.load(open(os.path.join(dst, ".pack", "state.json")))["done"] == 8  # chunks 0-3, 4-7 kept
    open(bad, "wb").write(data)  # fixed: the rerun writes samples 8.. only and gives the folder's items
    pack(src, dst, "raw", chunk=4, progress=False)
    folder, packed = REPAFolderDataset(src), PackedDataset(dst, verify=True)
    assert all(torch.equal(u, v) for i in range(12) for u, v in zip(folder[i], packed[i]))


def test_corrupt_jpeg_in_a_pack_names_pack_and_sample(packs, tmp_path):
    dst = copy_pack(packs, "jpeg", tmp_path)
    off = np.load(os.path.join(dst, "image_offsets.npy"))
    blob = os.path.join(dst, "images.jpeg")
    with open(blob, "r+b") as f:  # same size (the manifest still matches), garbage inside sample 6's JPEG
        f.seek(int(off[6]))
        f.write(b"\x00" * int(off[7] - off[6]))
    ds = PackedDataset(dst)
    assert torch.equal(ds[5][0], PackedDataset(packs["jpeg"])[5][0])
    with pytest.raises(PackedFormatError, match=rf"cannot decode the JPEG of sample 6 in {blob}: "):
        ds[6]
    with pytest.raises(PackedFormatError, match=r"images\.jpeg: sha256"):  # --verify finds it up front
        PackedDataset(dst, verify=True)


def test_packed_labels_checked(packs, tmp_path):
    ds = PackedDataset(packs["raw"])
    assert ds.num_classes == 10 == ds.manifest["num_classes"] and ds.label_file.endswith("labels.npy")
    check_labels(ds, 10)
    i = int(np.argmax(ds.labels))
    with pytest.raises(ValueError, match=rf"labels in {ds.label_file} go up to 9 \(sample {i}, .*moments\.npy\[{i}\]\) "
                                         r"but --num-classes is 5.*pass --num-classes 10"):
        check_labels(ds, 5)
    dst = copy_pack(packs, "raw", tmp_path)
    path = os.path.join(dst, "labels.npy")
    labels = np.load(path)
    labels[labels == 9] = 8  # same size: the manifest's num_classes (10) no longer agrees
    np.save(path, labels)
    with pytest.raises(PackedFormatError, match=r"labels\.npy: the largest label is 8 \(9 classes\) but manifest\.json "
                                                r"says num_classes 10"):
        PackedDataset(dst)
    labels[labels == 8] = 9
    labels[3] = -1
    np.save(path, labels)
    with pytest.raises(PackedFormatError, match=r"labels\.npy: sample 3 has label -1; expected class indices >= 0"):
        PackedDataset(dst)


def test_open_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_dataset(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="neither a packed dataset"):
        open_dataset(str(tmp_path))


# ------------------------------------------------------------------------------------- bad packs

def test_truncated_latent_file(packs, tmp_path):
    dst = copy_pack(packs, "raw", tmp_path)
    path = os.path.join(dst, "moments.npy")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(PackedFormatError, match=r"moments\.npy is \d+ bytes but manifest\.json says \d+ \(truncated"):
        PackedDataset(dst)


def test_manifest_count_mismatch(packs, tmp_path):
    dst = copy_pack(packs, "raw", tmp_path)
    path = os.path.join(dst, "manifest.json")
    m = json.load(open(path))
    m["count"] = N + 1
    json.dump(m, open(path, "w"))
    with pytest.raises(PackedFormatError, match=rf"\.npy has shape \[{N}.*\({N} samples\); expected \[{N + 1}"):
        PackedDataset(dst)


def test_checksum_mismatch_only_with_verify(packs, tmp_path):
    dst = copy_pack(packs, "jpeg", tmp_path)
    path = os.path.join(dst, "labels.npy")
    labels = np.load(path)
    labels[3] = 7 - labels[3]
    np.save(path, labels)  # same size, other content
    assert PackedDataset(dst).labels[3] == labels[3]  # sizes and headers are fine
    with pytest.raises(PackedFormatError, match=r"labels\.npy: sha256 .* does not match manifest\.json"):
        PackedDataset(dst, verify=True)
    with pytest.raises(PackedFormatError, match=r"labels\.npy: sha256"):
        open_dataset(dst, verify=True)


def test_missing_file(packs, tmp_path):
    dst = copy_pack(packs, "jpeg", tmp_path)
    os.remove(os.path.join(dst, "image_offsets.npy"))
    with pytest.raises(FileNotFoundError, match=r"image_offsets\.npy is missing \(the image_offsets file"):
        PackedDataset(dst)
    os.remove(os.path.join(dst, "manifest.json"))
    with pytest.raises(FileNotFoundError, match=r"manifest\.json is missing"):
        PackedDataset(dst)


def test_wrong_dtype_and_bad_offsets(packs, tmp_path):
    dst = copy_pack(packs, "jpeg", tmp_path)
    m = json.load(open(os.path.join(dst, "manifest.json")))
    moments = np.load(os.path.join(dst, "moments.npy"))
    np.save(os.path.join(dst, "moments.npy"), moments.view(np.int32))  # same bytes, wrong dtype
    with pytest.raises(PackedFormatError, match=r"moments\.npy holds int32, expected float32"):
        PackedDataset(dst)
    np.save(os.path.join(dst, "moments.npy"), moments)
    off = np.load(os.path.join(dst, "image_offsets.npy"))
    off[5] = off[4]
    np.save(os.path.join(dst, "image_offsets.npy"), off)
    with pytest.raises(PackedFormatError, match=r"image_offsets\.npy: expected increasing byte offsets"):
        PackedDataset(dst)
    m["version"] = 9
    json.dump(m, open(os.path.join(dst, "manifest.json"), "w"))
    with pytest.raises(PackedFormatError, match="version 9"):
        PackedDataset(dst)


def test_dali_missing_says_how_to_install(monkeypatch, packs):
    from fastrepa.data import dali
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali -> ImportError
    with pytest.raises(ImportError, match=r"pip install fastrepa\[dali\]"):
        dali.DALILoader(open_dataset(packs["raw"]), StepSampler(N, 8, seed=0, num_steps=1))
    with pytest.raises(ImportError, match=r"pip install fastrepa\[dali\]"):
        build_loader(open_dataset(packs["raw"]), StepSampler(N, 8, seed=0), backend="dali")
    assert not dali.dali_available()
    with pytest.raises(ValueError, match="backend 'jax'"):
        build_loader(open_dataset(packs["raw"]), StepSampler(N, 8, seed=0), backend="jax")
