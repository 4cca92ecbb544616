"""fastrepa.data.prepare end to end on a small generated ImageFolder with a tiny random AutoencoderKL:
the official REPA layout read back by REPAFolderDataset, the ADM center crop recomputed here, latents
equal to encoding those crops, resume by shard markers, bad input, zip sources, the CLI, ranks."""
import io
import json
import os
import shutil
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
from conftest import make_tiny_vae  # noqa: E402

from fastrepa.data import REPAFolderDataset  # noqa: E402
from fastrepa.data.prepare import PrepareError, main, prepare  # noqa: E402
from fastrepa.vae import load_vae  # noqa: E402

RES = 16
# class -> [(file name, (width, height))]; sorted names give labels cat 0, dog 1, emu 2
LAYOUT = {
    "cat": [("a.png", (40, 30)), ("b.jpg", (37, 53)), ("c.png", (64, 64)), ("d.png", (20, 25))],
    "dog": [("x1.png", (33, 70)), ("x2.png", (16, 16)), ("x3.png", (90, 47))],
    "emu": [("e.png", (31, 18)), ("f.png", (50, 50)), ("g.png", (17, 40))],
}


def smooth_image(rng, w, h):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0.05, 0.3, (3, 2))
    img = np.stack([127 + 120 * np.sin(a[c, 0] * xx + a[c, 1] * yy + c) for c in range(3)], -1)
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def make_folder(root, layout=LAYOUT):
    rng = np.random.default_rng(0)
    for cls, files in layout.items():
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for name, (w, h) in files:
            Image.fromarray(smooth_image(rng, w, h)).save(os.path.join(root, cls, name), quality=95)
    with open(os.path.join(root, "cat", "notes.txt"), "w") as f:
        f.write("not an image")  # ignored
    return str(root)


def adm_center_crop(path, size):
    """Written out independently: BOX halving while the short side >= 2 size, BICUBIC, center crop."""
    im = Image.open(path).convert("RGB")
    while min(im.size) >= 2 * size:
        im = im.resize((im.width // 2, im.height // 2), Image.BOX)
    s = size / min(im.size)
    im = im.resize((round(im.width * s), round(im.height * s)), Image.BICUBIC)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    return np.asarray(im)[top:top + size, left:left + size]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("prep")
    vae_dir = str(base / "vae")
    make_tiny_vae(vae_dir)
    src = make_folder(base / "src")
    dest = str(base / "out")
    report = prepare(src, dest, resolution=RES, vae=vae_dir, batch_size=3, shard_size=4, workers=0, progress=False)
    return {"base": base, "vae": vae_dir, "src": src, "dest": dest, "report": report}


def expected_files():
    return [(f"{c}/{n}", label) for label, c in enumerate(sorted(LAYOUT)) for n, _ in sorted(LAYOUT[c])]


def test_official_layout_read_back(env):
    dest, report = env["dest"], env["report"]
    assert report["num_written"] == 10 and report["num_skipped"] == 0 and report["classes"] == ["cat", "dog", "emu"]
    assert os.path.isfile(os.path.join(dest, "images", "00000", "img00000000.png"))
    assert os.path.isfile(os.path.join(dest, "vae-sd", "00000", "img-mean-std-00000009.npy"))
    files = expected_files()
    img_labels = json.load(open(os.path.join(dest, "images", "dataset.json")))["labels"]
    feat_labels = json.load(open(os.path.join(dest, "vae-sd", "dataset.json")))["labels"]
    assert img_labels == [[f"00000/img{i:08d}.png", y] for i, (_, y) in enumerate(files)]
    assert feat_labels == [[f"00000/img-mean-std-{i:08d}.npy", y] for i, (_, y) in enumerate(files)]
    assert json.load(open(os.path.join(dest, "prepare.json")))["num_written"] == 10

    ds = REPAFolderDataset(dest)
    assert len(ds) == 10
    vae = load_vae(env["vae"])
    crops = np.stack([adm_center_crop(os.path.join(env["src"], rel), RES) for rel, _ in files])
    want = vae.encode_moments(torch.from_numpy(crops).permute(0, 3, 1, 2))
    for i, (rel, label) in enumerate(files):
        img, moments, y = ds[i]
        assert y.item() == label, rel
        assert img.shape == (3, RES, RES) and torch.equal(img, torch.from_numpy(crops[i]).permute(2, 0, 1)), rel
        assert moments.shape == (8, RES // 2, RES // 2) and moments.dtype == torch.float32
        torch.testing.assert_close(moments, want[i], atol=1e-5, rtol=1e-5)


def _mtimes(dest):
    out = {}
    for sub in ("images", "vae-sd", ".prepare"):
        for dirpath, _, names in os.walk(os.path.join(dest, sub)):
            for n in names:
                if n != "dataset.json":
                    p = os.path.join(dirpath, n)
                    out[os.path.relpath(p, dest)] = os.stat(p).st_mtime_ns
    return out


def test_resume_redoes_only_the_unfinished_shard(env, tmp_path):
    dest = str(tmp_path / "out")
    shutil.copytree(env["dest"], dest)
    before = _mtimes(dest)
    os.remove(os.path.join(dest, ".prepare", "shard-00001.json"))
    os.remove(os.path.join(dest, "vae-sd", "00000", "img-mean-std-00000005.npy"))  # killed mid-shard
    with open(os.path.join(dest, "images", "00000", "img00000006.png"), "r+b") as f:
        f.truncate(20)
    time.sleep(0.02)
    report = prepare(env["src"], dest, resolution=RES, vae=env["vae"], batch_size=3, shard_size=4, workers=0,
                     progress=False)
    assert report["num_written"] == 10
    after = _mtimes(dest)
    assert set(after) == set(before)
    redone = {k for k in after if after[k] != before.get(k)}
    shard1 = {f"images/00000/img{i:08d}.png" for i in range(4, 8)} | \
             {f"vae-sd/00000/img-mean-std-{i:08d}.npy" for i in range(4, 8)} | {".prepare/shard-00001.json"}
    assert redone == shard1
    a, b = REPAFolderDataset(env["dest"]), REPAFolderDataset(dest)
    for i in range(10):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    # a complete folder: nothing is redone, the VAE is not even needed
    prepare(env["src"], dest, resolution=RES, vae=env["vae"], shard_size=4, workers=0, progress=False)
    assert _mtimes(dest) == after


def test_crash_midway_then_resume(env, tmp_path):
    dest = str(tmp_path / "out")
    vae = load_vae(env["vae"])
    real, calls = vae.encode_moments, []

    def dying(x):
        calls.append(1)
        if len(calls) == 4:  # shard 0 = batches 1, 2; shard 1 dies in its second batch
            raise KeyboardInterrupt
        return real(x)
    vae.encode_moments = dying
    vae.name = env["vae"]
    with pytest.raises(KeyboardInterrupt):
        prepare(env["src"], dest, resolution=RES, vae=vae, batch_size=3, shard_size=4, workers=0, progress=False)
    assert sorted(os.listdir(os.path.join(dest, ".prepare"))) == ["config.json", "shard-00000.json"]
    assert not os.path.exists(os.path.join(dest, "vae-sd", "dataset.json"))
    prepare(env["src"], dest, resolution=RES, vae=env["vae"], batch_size=3, shard_size=4, workers=0, progress=False)
    a, b = REPAFolderDataset(env["dest"]), REPAFolderDataset(dest)
    for i in range(10):
        assert torch.equal(a[i][0], b[i][0])
        torch.testing.assert_close(a[i][1], b[i][1])
    with pytest.raises(PrepareError, match="resolution: 16 there, 32 now"):
        prepare(env["src"], dest, resolution=32, vae=env["vae"], shard_size=4, workers=0, progress=False)


def test_corrupt_image_error_and_skip_bad(env, tmp_path, capsys):
    src = make_folder(tmp_path / "src")
    bad = os.path.join(src, "dog", "x2.png")
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[: len(data) // 2])  # truncated
    with pytest.raises(PrepareError, match=r"dog/x2\.png.*--skip-bad"):
        prepare(src, str(tmp_path / "o1"), resolution=RES, vae=env["vae"], shard_size=4, workers=0, progress=False)
    # the CLI says the same and exits 2
    assert main(["--source", src, "--dest", str(tmp_path / "o2"), "--resolution", str(RES), "--vae", env["vae"],
                 "--workers", "0"]) == 2
    assert "x2.png" in capsys.readouterr().err
    report = prepare(src, str(tmp_path / "o3"), resolution=RES, vae=env["vae"], shard_size=4, skip_bad=True,
                     workers=0, progress=False)
    assert report["num_written"] == 9 and report["num_skipped"] == 1
    assert report["skipped"][0]["file"].endswith(os.path.join("dog", "x2.png")) and report["skipped"][0]["index"] == 5
    assert json.load(open(tmp_path / "o3" / "prepare.json"))["num_skipped"] == 1
    ds = REPAFolderDataset(str(tmp_path / "o3"))
    assert len(ds) == 9 and ds.labels.tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 2]
    assert "00000/img-mean-std-00000005.npy" not in ds.feature_fnames  # a gap in the numbering


def test_empty_class_folder_and_bad_sources(env, tmp_path):
    src = make_folder(tmp_path / "src")
    os.makedirs(os.path.join(src, "bee"))
    with pytest.raises(PrepareError, match=r"class folder .*bee has no images"):
        prepare(src, str(tmp_path / "o"), resolution=RES, vae=env["vae"], workers=0, progress=False)
    with pytest.raises(PrepareError, match="no such directory"):
        prepare(str(tmp_path / "nope"), str(tmp_path / "o"), resolution=RES, vae=env["vae"], workers=0)
    shutil.rmtree(os.path.join(src, "bee"))
    Image.new("RGB", (20, 20)).save(os.path.join(src, "loose.png"))
    with pytest.raises(PrepareError, match="loose.png is not inside a class folder"):
        prepare(src, str(tmp_path / "o"), resolution=RES, vae=env["vae"], workers=0)
    os.remove(os.path.join(src, "loose.png"))
    os.makedirs(tmp_path / "full")
    open(tmp_path / "full" / "x", "w").close()
    with pytest.raises(PrepareError, match="is not empty"):
        prepare(src, str(tmp_path / "full"), resolution=RES, vae=env["vae"], workers=0)
    with pytest.raises(PrepareError, match="multiple of 8"):
        prepare(src, str(tmp_path / "o"), resolution=20, vae=env["vae"], workers=0)


def test_empty_class_folder_inside_a_zip(env, tmp_path):
    zpath = str(tmp_path / "train.zip")
    with zipfile.ZipFile(zpath, "w") as z:
        for rel, _ in expected_files():
            z.write(os.path.join(env["src"], rel), f"train/{rel}")
        z.writestr("train/bee/", "")  # a class folder with nothing in it (would shift emu's label)
        z.writestr("train/bee/.DS_Store", "x")  # hidden files are not images
    with pytest.raises(PrepareError, match=r"class folder .*train\.zip:train/bee has no images; remove it"):
        prepare(zpath, str(tmp_path / "o"), resolution=RES, vae=env["vae"], workers=0, progress=False)
    assert not os.path.exists(tmp_path / "o" / "images")  # nothing written


def test_finalize_again_and_concurrently_keeps_other_ranks_temporaries(env, tmp_path):
    """Finalising twice, or from several processes at once (ranks that all saw every shard marker),
    leaves the same dataset.json files and never removes a dataset.json another rank is writing."""
    import threading
    dest = str(tmp_path / "out")
    shutil.copytree(env["dest"], dest)
    want = {sub: json.load(open(os.path.join(dest, sub, "dataset.json"))) for sub in ("images", "vae-sd")}
    os.remove(os.path.join(dest, "vae-sd", "dataset.json"))
    foreign = os.path.join(dest, "vae-sd", "dataset.json.tmp4242")  # another rank, mid-write
    open(foreign, "w").write('{"labels": [["00000/img-mean')
    stale = os.path.join(dest, "images", "00000", "img00000003.png.tmp4242")  # a killed run's shard temporary
    open(stale, "wb").write(b"\x89PNG")
    kw = dict(resolution=RES, vae=env["vae"], shard_size=4, workers=0, progress=False)
    results, errors = [], []

    def finalize():
        try:
            results.append(prepare(env["src"], dest, **kw))
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(e)
    for _ in range(2):  # twice in a row, each time by four concurrent finalisers
        threads = [threading.Thread(target=finalize) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert len(results) == 8 and all(r["num_written"] == 10 for r in results)
    assert os.path.exists(foreign) and not os.path.exists(stale)
    for sub in ("images", "vae-sd"):
        assert json.load(open(os.path.join(dest, sub, "dataset.json"))) == want[sub]
    temps = [n for _, _, names in os.walk(dest) for n in names if ".tmp" in n]
    assert temps == ["dataset.json.tmp4242"]  # every finaliser's own temporary was renamed away
    ds = REPAFolderDataset(dest)
    assert len(ds) == 10 and ds.labels.tolist() == [y for _, y in expected_files()]


def test_zip_source_via_cli_with_workers(env, tmp_path, capsys):
    zpath = str(tmp_path / "train.zip")
    with zipfile.ZipFile(zpath, "w") as z:  # wrapped in a top folder, as `zip -r train.zip train/`
        for rel, _ in expected_files():
            z.write(os.path.join(env["src"], rel), f"train/{rel}")
        z.writestr("train/cat/notes.txt", "x")
    dest = str(tmp_path / "out")
    assert main(["--source", zpath, "--dest", dest, "--resolution", str(RES), "--vae", env["vae"],
                 "--batch-size", "4", "--shard-size", "6", "--workers", "2"]) == 0
    out = capsys.readouterr().out  # the next step: how to pack it
    assert f"python -m fastrepa.data.pack {dest} {dest}-packed --image-format raw" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "python -m fastrepa.data.pack DEST DEST-packed --image-format raw|jpeg" in capsys.readouterr().out
    a, b = REPAFolderDataset(env["dest"]), REPAFolderDataset(dest)
    assert b.labels.tolist() == a.labels.tolist()
    for i in range(10):
        assert torch.equal(a[i][0], b[i][0])
        torch.testing.assert_close(a[i][1], b[i][1], atol=1e-5, rtol=1e-5)


def test_ranks_split_the_shards(env, tmp_path):
    dest = str(tmp_path / "out")
    kw = dict(resolution=RES, vae=env["vae"], batch_size=3, shard_size=4, workers=0, progress=False)
    assert prepare(env["src"], dest, rank=0, world_size=2, **kw) is None  # shards 0 and 2; rank 1 not done
    assert sorted(os.listdir(os.path.join(dest, ".prepare"))) == ["config.json", "shard-00000.json",
                                                                   "shard-00002.json"]
    report = prepare(env["src"], dest, rank=1, world_size=2, **kw)  # the last rank writes dataset.json
    assert report["num_written"] == 10
    a, b = REPAFolderDataset(env["dest"]), REPAFolderDataset(dest)
    for i in range(10):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
