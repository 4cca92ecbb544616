"""The FourierFlow encoder-feature cache (`python -m fastrepa.data.pde features`, `--feature-cache`): the
cached tokens are the encoder's on every train window, training on them equals training with the encoder
(which is then not loaded), and a cache for other data, another encoder or a damaged file is refused."""
import os

import numpy as np
import pytest
import torch

from fastrepa.config import ConfigError
from fastrepa.data import pde
from fastrepa.data.pde import PDEDataError, PDETrainWindows
from fastrepa.data.pde_features import FeatureCache, FeatureCacheError
from fastrepa.encoders.vivit import load_vivit
from fastrepa.train.loop import train

from test_fourierflow_train import PDE_RUN, pde_cfg, pde_file  # noqa: F401 (pde_file is a fixture)
from test_train_dist import column


def write_cache(out, pde_file, *extra):  # noqa: F811
    path, vivit = pde_file
    return pde.main(["features", path, "--enc-path", vivit, "--out", str(out), "--test-fraction", "0.25",
                     "--batch-size", "5", *extra])


@pytest.fixture(scope="module")
def caches(tmp_path_factory, pde_file):  # noqa: F811
    root = tmp_path_factory.mktemp("cache")
    assert write_cache(root / "fp32", pde_file, "--dtype", "fp32") == 0
    assert write_cache(root / "bf16", pde_file) == 0
    return root


def test_cache_holds_the_encoders_tokens_of_every_train_window(caches, pde_file):  # noqa: F811
    windows = PDETrainWindows.open(pde_file[0], test_fraction=0.25)
    enc = load_vivit(pde_file[1]).eval()
    with torch.no_grad():
        want = enc(torch.stack([windows[k]["target"] for k in range(len(windows))]))
    fp32, bf16 = FeatureCache.open(str(caches / "fp32")), FeatureCache.open(str(caches / "bf16"))
    man = fp32.manifest
    assert man["shape"] == [len(windows), *want.shape[1:]] and man["data"] == windows.state_dict()
    assert man["encoder"]["bytes"] == os.path.getsize(pde_file[1]) and len(man["encoder"]["sha256"]) == 64
    got = torch.stack([fp32[k] for k in range(len(fp32))])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    b = torch.stack([bf16[k] for k in range(len(bf16))])
    assert b.dtype == torch.bfloat16 and not torch.equal(b.float(), got)  # 16 bits, read back as bf16
    torch.testing.assert_close(b.float(), want, rtol=3e-2, atol=3e-2)
    assert not os.path.exists(str(caches / "fp32") + ".partial")


@pytest.fixture(scope="module")
def cached_run(caches, pde_file, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("cached_run")
    return train(pde_cfg(out, pde_file, enc_path="", feature_cache=str(caches / "fp32"), max_grad_norm=0.2))


def test_training_on_the_cache_equals_training_with_the_encoder(caches, cached_run, pde_file, tmp_path):  # noqa: F811
    full = train(pde_cfg(tmp_path / "enc", pde_file, max_grad_norm=0.2))
    cached = cached_run
    for key in ("loss", "proj_loss", "grad_norm"):
        np.testing.assert_allclose(column(cached["exp_dir"], key), column(full["exp_dir"], key), rtol=1e-5, atol=1e-8)
    assert cached["first_proj_loss"] > 0
    # the cached encoder costs no FLOPs in the step's count
    assert cached["train_flop_per_image"] < full["train_flop_per_image"]
    # with --enc-path too, the file is checked against the cache: the same file passes
    train(pde_cfg(tmp_path / "both", pde_file, feature_cache=str(caches / "bf16"), max_train_steps=1))


def test_fsdp2_two_processes_on_the_cache_equal_one(caches, cached_run, pde_file, tmp_path):  # noqa: F811
    """torchrun, 2 CPU processes: the PDE windows and their cached tokens split over the ranks by the
    StepSampler, the global grad clip (0.2: every step clips), the forecast plot from the sharded EMA."""
    from test_train_dist import fsdp2_works_on_cpu, launch, ok
    if not fsdp2_works_on_cpu():
        pytest.skip("needs torch.distributed with gloo and FSDP2")
    values = {**PDE_RUN, "data_dir": pde_file[0], "enc_type": "vivit", "enc_path": "", "max_grad_norm": 0.2,
              "feature_cache": str(caches / "fp32"), "output_dir": str(tmp_path)}
    argv = [a for k, v in values.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    ok(launch(argv))
    two = str(tmp_path / PDE_RUN["exp_name"])
    for key in ("loss", "proj_loss", "grad_norm"):
        np.testing.assert_allclose(column(two, key), column(cached_run["exp_dir"], key), rtol=1e-5, atol=1e-7)
    assert os.path.isfile(os.path.join(two, "checkpoints", "0000006.pt"))


def test_a_cache_for_other_data_or_another_encoder_is_refused(caches, pde_file, tmp_path):  # noqa: F811
    with pytest.raises(PDEDataError, match="cannot use --feature-cache.*split.*--test-fraction"):
        train(pde_cfg(tmp_path, pde_file, test_fraction=0.5, feature_cache=str(caches / "fp32")))
    other = tmp_path / "other_vivit.pt"  # the same layout, one weight changed
    ckpt = torch.load(pde_file[1], weights_only=True)
    key = next(iter(ckpt["model_state_dict"]))
    ckpt["model_state_dict"][key] = ckpt["model_state_dict"][key] + 1
    torch.save(ckpt, other)
    with pytest.raises(FeatureCacheError, match="not --enc-path .*other_vivit.pt"):
        train(pde_cfg(tmp_path, pde_file, enc_path=str(other), feature_cache=str(caches / "fp32")))
    with pytest.raises(ConfigError, match="--feature-cache"):
        pde_cfg(tmp_path, pde_file, enc_type="none", enc_path="", feature_cache=str(caches / "fp32"))
    with pytest.raises(FeatureCacheError, match="no manifest.json"):
        FeatureCache.open(str(tmp_path / "nothing"))


def test_a_damaged_cache_or_an_existing_folder_is_named(caches, pde_file, tmp_path, capsys):  # noqa: F811
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(caches / "fp32", bad)
    with open(bad / "features.npy", "r+b") as f:  # truncated: the shape no longer fits the file
        f.truncate(os.path.getsize(bad / "features.npy") // 2)
    with pytest.raises(FeatureCacheError, match="features.npy"):
        FeatureCache.open(str(bad))
    # an existing cache is never overwritten: the prepare stops before the encoder runs
    before = (caches / "fp32" / "manifest.json").read_text()
    assert write_cache(caches / "fp32", pde_file) == 2
    assert "already exists" in capsys.readouterr().err
    assert (caches / "fp32" / "manifest.json").read_text() == before
    # a wrong encoder file is named
    wrong = tmp_path / "wrong.pt"
    torch.save({"model_state_dict": {"decoder.w": torch.zeros(1)}}, wrong)
    assert pde.main(["features", pde_file[0], "--enc-path", str(wrong), "--out", str(tmp_path / "c")]) == 2
    assert "wrong.pt" in capsys.readouterr().err and not os.path.exists(tmp_path / "c")
