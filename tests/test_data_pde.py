"""PDE data: the shallow-water solver (conservation, motion), the PDEBench-format reader on files written
here (subsampling, and a missing variable, mismatched shapes, a truncated file, a size the reduction or
patch does not divide), the split (seeded, disjoint, recorded and reused), the normalisation fitted on the
train split only, and the windows in a seeded order that resumes exactly."""
import os

import numpy as np
import pytest
import torch

pytest.importorskip("h5py", reason="the PDE reader needs h5py (pip install -e .[pde])")

from fastrepa.data.loader import StepSampler  # noqa: E402
from fastrepa.data.pde import (VARIABLES, Normalizer, PDEData, PDEDataError, PDEWindows, Split, _step,  # noqa: E402
                               main, simulate, write_pde_file)


@pytest.fixture(scope="module")
def sim():
    return simulate(num=6, steps=10, size=16, seed=1)


@pytest.fixture(scope="module")
def pde_file(tmp_path_factory, sim):
    return write_pde_file(str(tmp_path_factory.mktemp("pde") / "cns.h5"), sim)


def test_the_solver_conserves_mass_and_momentum_and_moves(sim):
    rng = np.random.default_rng(0)
    U = np.stack([1 + 0.2 * rng.random((2, 8, 8)), 0.1 * rng.normal(size=(2, 8, 8)), 0.1 * rng.normal(size=(2, 8, 8))], 1)
    after = _step(U, 0.01, 1 / 8)
    np.testing.assert_allclose(after.sum(axis=(2, 3)), U.sum(axis=(2, 3)), rtol=1e-12, atol=1e-12)
    assert np.abs(after - U).max() > 1e-4
    h, u, v = sim["density"].astype(np.float64), sim["Vx"].astype(np.float64), sim["Vy"].astype(np.float64)
    for q in (h, h * u, h * v):  # the box sums of h, hu, hv stay put, frame after frame (float32 storage)
        sums = q.sum(axis=(2, 3))
        np.testing.assert_allclose(sums, sums[:, :1].repeat(sums.shape[1], 1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(sim["pressure"], 0.5 * sim["density"] ** 2, rtol=1e-6)
    assert np.abs(h[:, -1] - h[:, 0]).max() > 0.01 and (h > 0).all()  # the waves travel; the depth stays positive
    assert sim["density"].shape == (6, 10, 16, 16) and sim["density"].dtype == np.float32


def test_reader_loads_every_variable_subsampled(pde_file, sim):
    data = PDEData.open(pde_file, reduce=2, patch=4)
    assert tuple(data.fields.shape) == (6, 10, 4, 8, 8) and data.size == (8, 8)
    for c, name in enumerate(VARIABLES):
        np.testing.assert_array_equal(data.fields[:, :, c].numpy(), sim[name][:, :, ::2, ::2])


def test_reader_names_the_file_and_dataset_of_bad_input(tmp_path, sim, pde_file):
    bad = {k: v for k, v in sim.items() if k != "Vy"}
    path = write_pde_file(str(tmp_path / "missing.h5"), bad)
    with pytest.raises(PDEDataError, match=r"missing.h5: missing dataset\(s\) \['Vy'\]"):
        PDEData.open(path)
    path = write_pde_file(str(tmp_path / "shapes.h5"), {**sim, "pressure": sim["pressure"][:, :5]})
    with pytest.raises(PDEDataError, match=r"shapes.h5: dataset 'pressure' has shape \(6, 5, 16, 16\)"):
        PDEData.open(path)
    with pytest.raises(PDEDataError, match="spatial size X=16 is not divisible by the reduction 3"):
        PDEData.open(pde_file, reduce=3)
    with pytest.raises(PDEDataError, match="by the reduction 2 and then the patch 16"):
        PDEData.open(pde_file, reduce=2, patch=16)
    truncated = tmp_path / "truncated.h5"
    blob = open(pde_file, "rb").read()
    truncated.write_bytes(blob[:len(blob) // 2])
    with pytest.raises(PDEDataError, match="truncated.h5: .*truncated"):
        PDEData.open(str(truncated))
    with pytest.raises(PDEDataError, match="no such PDE file"):
        PDEData.open(str(tmp_path / "nope.h5"))
    data = PDEData.open(pde_file)
    with pytest.raises(PDEDataError, match="10 time steps are too few for 6 condition \\+ 5 target frames"):
        PDEWindows(data, [0], Normalizer([0] * 4, [1] * 4), cond=6, target=5)


def test_split_is_seeded_disjoint_and_reused():
    a, b = Split.make(50, 0.1, seed=3), Split.make(50, 0.1, seed=3)
    assert a.train == b.train and a.test == b.test and len(a.test) == 5
    assert sorted(a.train + a.test) == list(range(50))
    assert Split.make(50, 0.1, seed=4).test != a.test
    again = Split.from_state_dict(a.state_dict(), num=50)
    assert again.train == a.train and again.test == a.test
    with pytest.raises(PDEDataError, match="covers 50 trajectories but the file has 40"):
        Split.from_state_dict(a.state_dict(), num=40)
    with pytest.raises(PDEDataError, match="1 trajectories cannot give 1 test"):
        Split.make(1, 0.5)


def test_normalisation_is_fitted_on_the_train_split_only(pde_file):
    data = PDEData.open(pde_file)
    split = Split.make(data.num_trajectories, 0.34, seed=0)
    norm = Normalizer.fit(data.fields, split.train)
    changed = data.fields.clone()
    changed[split.test] *= 10  # what the test trajectories hold does not move the statistics
    other = Normalizer.fit(changed, split.train)
    torch.testing.assert_close(other.mean, norm.mean)
    torch.testing.assert_close(other.std, norm.std)
    z = norm.normalize(data.fields[split.train]).double()
    for c in range(4):
        assert abs(z[:, :, c].mean()) < 1e-5 and abs(z[:, :, c].std(unbiased=False) - 1) < 1e-5
    torch.testing.assert_close(norm.denormalize(norm.normalize(data.fields)), data.fields, rtol=1e-5, atol=1e-5)
    back = Normalizer.from_state_dict(norm.state_dict())
    torch.testing.assert_close(back.mean, norm.mean)


def test_windows_cover_the_split_in_a_seeded_order_that_resumes(pde_file):
    data = PDEData.open(pde_file)
    split = Split.make(data.num_trajectories, 0.34, seed=0)
    norm = Normalizer.fit(data.fields, split.train)
    ds = PDEWindows(data, split.train, norm, cond=4, target=4)
    assert len(ds) == len(split.train) * 3  # starts 0, 1, 2 of 10 steps
    item = ds[4]
    traj, start = split.train[1], 1
    assert (item["trajectory"], item["start"]) == (traj, start)
    want = norm.normalize(data.fields[traj, start:start + 8])
    torch.testing.assert_close(item["cond"], want[:4])
    torch.testing.assert_close(item["target"], want[4:])
    full = StepSampler(len(ds), 4, seed=7, start_step=0, num_steps=6)
    batches = list(full)
    resumed = list(StepSampler(len(ds), 4, seed=7, start_step=3, num_steps=3))
    assert batches[3:] == resumed
    ranks = [list(StepSampler(len(ds), 4, seed=7, rank=r, world_size=2, num_steps=6)) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == batches
    seen = {ds.window(k)[0] for b in batches for k in b}
    assert seen <= set(split.train)  # never a test trajectory


def test_cli_synthesises_and_checks(tmp_path, capsys):
    out = str(tmp_path / "demo.h5")
    assert main(["synth", out, "--num", "3", "--steps", "8", "--size", "16"]) == 0
    assert main(["check", out, "--reduce", "2"]) == 0
    assert "3 trajectories x 8 steps" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "none.h5")]) == 2
    assert "no such PDE file" in capsys.readouterr().err
    assert os.path.getsize(out) > 0
