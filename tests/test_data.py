"""The REPA folder layout, the embedded synthetic data, and the restartable step sampler."""
import json
import os

import numpy as np
import pytest
import torch

from fastrepa.data import REPAFolderDataset, StepSampler, check_labels, open_dataset
from fastrepa.data.synthetic import CLASSES, write_dataset
from fastrepa.encoders import load_encoder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("data")), num_images=30, seed=1)


def test_synthetic_layout_is_the_official_one(data_dir):
    assert os.path.isfile(os.path.join(data_dir, "images", "00000", "img00000007.png"))
    assert os.path.isfile(os.path.join(data_dir, "vae-sd", "00000", "img-mean-std-00000007.npy"))
    labels = dict(json.load(open(os.path.join(data_dir, "vae-sd", "dataset.json")))["labels"])
    assert labels["00000/img-mean-std-00000013.npy"] == 13 % len(CLASSES)


def test_folder_dataset_reads_images_moments_labels(data_dir):
    ds = REPAFolderDataset(data_dir)
    assert len(ds) == 30
    img, moments, label = ds[13]
    assert img.dtype == torch.uint8 and label.item() == 3
    mean, std = moments.chunk(2)
    # identity "VAE": the latent mean is the image in [-1, 1] and the std is zero
    torch.testing.assert_close(mean, img.float() / 127.5 - 1)
    assert std.abs().max() == 0


def test_synthetic_is_deterministic_and_classes_differ(tmp_path):
    a = REPAFolderDataset(write_dataset(str(tmp_path / "a"), 20, seed=3))
    b = REPAFolderDataset(write_dataset(str(tmp_path / "b"), 20, seed=3))
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(20))
    assert not torch.equal(a[0][0], a[10][0])  # same class, different draw


def test_folder_errors_name_the_file(tmp_path):
    root = write_dataset(str(tmp_path / "d"), 12, seed=0)
    with pytest.raises(FileNotFoundError, match="images"):
        REPAFolderDataset(str(tmp_path / "nothing"))
    bad = os.path.join(root, "vae-sd", "00000", "img-mean-std-00000004.npy")
    with open(bad, "r+b") as f:
        f.truncate(40)
    with pytest.raises(ValueError, match="img-mean-std-00000004.npy"):
        REPAFolderDataset(root)[4]
    os.remove(os.path.join(root, "images", "00000", "img00000005.png"))
    with pytest.raises(ValueError, match="11 images but .* 12 latent files"):
        REPAFolderDataset(root)


def test_mixed_resolutions_name_the_odd_file(tmp_path):
    from PIL import Image
    root = write_dataset(str(tmp_path / "d"), 12, seed=0)
    odd = os.path.join(root, "images", "00000", "img00000007.png")
    Image.new("RGB", (48, 48)).save(odd)
    ds = REPAFolderDataset(root)
    assert ds[3][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match=r"img00000007.png has shape \(3, 48, 48\) but .*img00000000.png has "
                                         r"\(3, 32, 32\): a dataset must have one resolution"):
        ds[7]
    np.save(os.path.join(root, "vae-sd", "00000", "img-mean-std-00000002.npy"), np.zeros((8, 6, 6), np.float32))
    with pytest.raises(ValueError, match=r"img-mean-std-00000002.npy has shape \(8, 6, 6\)"):
        REPAFolderDataset(root)[2]


def test_label_file_missing_a_key(tmp_path):
    root = write_dataset(str(tmp_path / "d"), 12, seed=0)
    path = os.path.join(root, "vae-sd", "dataset.json")
    labels = json.load(open(path))["labels"][:-1]
    json.dump({"labels": labels}, open(path, "w"))
    with pytest.raises(ValueError, match="no label for 1 latent file"):
        REPAFolderDataset(root)


def _labels(root):
    return os.path.join(root, "vae-sd", "dataset.json")


def test_images_and_latents_pair_by_number(tmp_path):
    root = write_dataset(str(tmp_path / "d"), 12, seed=0)
    # one file gone on each side: the counts agree, the sorted pairs are shifted from sample 5 on
    os.remove(os.path.join(root, "images", "00000", "img00000005.png"))
    os.remove(os.path.join(root, "vae-sd", "00000", "img-mean-std-00000007.npy"))
    with pytest.raises(ValueError, match=r"sample 5 pairs image .*images/00000/img00000006\.png with latent file "
                                         r".*vae-sd/00000/img-mean-std-00000005\.npy, whose numbers differ \(6 vs 5\)"):
        REPAFolderDataset(root)
    # names without the prepare numbering pair by sorted order, as the official CustomDataset does
    other = write_dataset(str(tmp_path / "e"), 12, seed=0)
    for i in range(12):
        os.rename(os.path.join(other, "images", "00000", f"img{i:08d}.png"),
                  os.path.join(other, "images", "00000", f"photo-{i:03d}.png"))
    a, b = REPAFolderDataset(write_dataset(str(tmp_path / "f"), 12, seed=0)), REPAFolderDataset(other)
    assert all(torch.equal(a[i][0], b[i][0]) and a[i][2] == b[i][2] for i in range(12))


def test_labels_naming_no_file_and_unlabelled_data(tmp_path):
    root = write_dataset(str(tmp_path / "d"), 12, seed=0)
    path = _labels(root)
    good = json.load(open(path))["labels"]
    json.dump({"labels": good + [["00000/img-mean-std-00000099.npy", 1]]}, open(path, "w"))
    with pytest.raises(ValueError, match=rf"label file {path} has labels for 1 name\(s\) that are no latent file "
                                         r".*img-mean-std-00000099\.npy"):
        REPAFolderDataset(root)
    json.dump({"labels": None}, open(path, "w"))  # what dataset_tools writes for an unlabelled source
    with pytest.raises(ValueError, match=rf"label file {path} has \"labels\": null .*class-conditional training "
                                         r"needs an integer class label"):
        REPAFolderDataset(root)
    for bad, shown in ((None, "null \\(no label\\)"), (2.5, "2.5"), (-1, "-1"), ([0, 1], r"\[0, 1\]")):
        labels = [list(e) for e in good]
        labels[4][1] = bad
        json.dump({"labels": labels}, open(path, "w"))
        with pytest.raises(ValueError, match=rf"label file {path}: the label of 00000/img-mean-std-00000004\.npy is "
                                             rf"{shown}; expected an integer class index >= 0"):
            REPAFolderDataset(root)
    labels = [list(e) for e in good]
    labels[4][1] = 4.0  # an integral float reads as the integer (as the official np.int64 cast)
    json.dump({"labels": labels}, open(path, "w"))
    ds = REPAFolderDataset(root)
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [i % len(CLASSES) for i in range(12)]
    json.dump([["a", 1]], open(path, "w"))
    with pytest.raises(ValueError, match=r"is not \{\"labels\": \[\[fname, label\]"):
        REPAFolderDataset(root)


def test_check_labels_against_num_classes(data_dir):
    ds = REPAFolderDataset(data_dir)
    assert ds.num_classes == len(CLASSES) == 10 and ds.label_file == _labels(data_dir)
    check_labels(ds, 10)
    check_labels(ds, 1000)
    i = int(np.argmax(ds.labels))
    with pytest.raises(ValueError, match=rf"labels in {ds.label_file} go up to 9 \(sample {i}, .*img-mean-std-"
                                         rf"{i:08d}\.npy\) but --num-classes is 9, so the model knows labels 0\.\.8 "
                                         r"only \(label 9 is its unconditional class\): pass --num-classes 10"):
        check_labels(ds, 9)


def test_corrupt_png_names_the_file(tmp_path):
    root = write_dataset(str(tmp_path / "d"), 12, seed=0)
    bad = os.path.join(root, "images", "00000", "img00000004.png")
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[: len(data) // 2])  # truncated mid-stream
    ds = REPAFolderDataset(root)
    assert ds[3][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match=rf"cannot read image {bad}: "):
        ds[4]
    open(bad, "wb").write(b"not a png at all")
    with pytest.raises(ValueError, match=rf"cannot read image {bad}: .*cannot identify image file"):
        ds[4]


def test_open_dataset_names_the_missing_part(tmp_path):
    root = write_dataset(str(tmp_path / "d"), 12, seed=0)
    os.remove(_labels(root))
    with pytest.raises(FileNotFoundError, match=rf"label file {_labels(root)} is missing"):
        open_dataset(root)
    import shutil
    shutil.rmtree(os.path.join(root, "vae-sd"))
    with pytest.raises(FileNotFoundError, match=rf"dataset folder {root}/vae-sd does not exist \(the SD-VAE latents"):
        open_dataset(root)
    shutil.rmtree(os.path.join(root, "images"))
    os.makedirs(os.path.join(root, "vae-sd"))
    with pytest.raises(FileNotFoundError, match=rf"dataset folder {root}/images does not exist \(the raw images"):
        open_dataset(root)


def test_step_sampler_restarts_exactly():
    full = list(StepSampler(50, 8, seed=5, num_steps=20))
    tail = list(StepSampler(50, 8, seed=5, start_step=13, num_steps=7))
    assert full[13:] == tail
    # each epoch (6 steps of 8 out of 50) is a permutation without repeats; epochs differ
    first = sum(full[:6], [])
    assert len(set(first)) == 48 and full[:6] != full[6:12]


def test_step_sampler_ranks_partition_the_global_batch():
    r0 = list(StepSampler(40, 8, seed=1, rank=0, world_size=2, num_steps=5))
    r1 = list(StepSampler(40, 8, seed=1, rank=1, world_size=2, num_steps=5))
    one = list(StepSampler(40, 8, seed=1, num_steps=5))
    assert [a + b for a, b in zip(r0, r1)] == one
    with pytest.raises(ValueError, match="not divisible"):
        StepSampler(40, 9, seed=1, world_size=2)


def test_patch_pixel_encoder_tokens(tmp_path, monkeypatch):
    enc = load_encoder("patch-pixels", resolution=8, grid=2)
    img = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(1, 3, 8, 8).to(torch.uint8)
    z = enc(img)
    assert z.shape == (1, 4, 48)
    x = img.float() / 127.5 - 1
    tok1 = x[0, :, 0:4, 4:8].reshape(-1)  # row 0, column 1
    torch.testing.assert_close(z[0, 1], tok1 - tok1.mean())
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # no cached weights to find
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="dinov2-vit-b"):
        load_encoder("dinov2-vit-b")
    with pytest.raises(ValueError, match="unknown encoder 'dino'"):
        load_encoder("dino")
