"""PDE forecasting: the Euler ODE against closed forms, the rollout chaining its forecasts with per-window
noise, persistence, the evaluation report (a model that reproduces persistence scores 1.0 against it), and
the two plots."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("h5py", reason="the PDE reader needs h5py (pip install -e .[pde])")

from fastrepa.data.pde import Normalizer, PDEData, Split, simulate, write_pde_file  # noqa: E402
from fastrepa.eval.pde_forecast import (evaluate, forecast, persistence, plot_error_curve, plot_fields,  # noqa: E402
                                        rollout, window_noise)


class Linear(torch.nn.Module):
    """v = a x + b cond: closed-form Euler steps."""
    def __init__(self, a=1.0, b=0.0):
        super().__init__()
        self.a, self.b = a, b
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, cond, return_zs=True):
        return self.a * x + self.b * cond


class ToPersistence(torch.nn.Module):
    """v = (x - last condition frame) / t: the straight path from the noise to persistence, which Euler follows
    exactly."""
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, cond, return_zs=True):
        return (x - persistence(cond, x.shape[1])) / t.view(-1, 1, 1, 1, 1)


def test_euler_forecast_is_the_closed_form():
    noise = torch.randn(2, 4, 4, 8, 8)
    cond = torch.randn(2, 4, 4, 8, 8)
    torch.testing.assert_close(forecast(Linear(1.0), cond, 3, noise), noise * (2 / 3) ** 3)
    torch.testing.assert_close(forecast(Linear(0.0, 1.0), cond, 4, noise), noise - cond)  # dt sums to -1
    with pytest.raises(ValueError, match="--num-steps=0"):
        forecast(Linear(), cond, 0, noise)


def test_rollout_chains_forecasts_with_each_windows_own_noise():
    cond = torch.randn(3, 4, 4, 8, 8)
    m = Linear(0.5, 0.25)
    out = rollout(m, cond, k=2, num_steps=2, seed=5, windows=[7, 8, 9])
    first = forecast(m, cond, 2, window_noise(cond.shape[1:], 5, [7, 8, 9], 0))
    second = forecast(m, first, 2, window_noise(cond.shape[1:], 5, [7, 8, 9], 1))
    torch.testing.assert_close(out, torch.cat([first, second], 1))
    alone = rollout(m, cond[1:2], k=2, num_steps=2, seed=5, windows=[8])  # a window's noise is its own
    torch.testing.assert_close(alone, out[1:2])


@pytest.fixture(scope="module")
def pde(tmp_path_factory):
    path = write_pde_file(str(tmp_path_factory.mktemp("f") / "cns.h5"), simulate(num=6, steps=12, size=16, seed=2))
    data = PDEData.open(path)
    split = Split.make(6, 0.34, seed=0)
    return data, split, Normalizer.fit(data.fields, split.train)


def test_evaluation_report_and_plots(pde, tmp_path):
    data, split, norm = pde
    report, pred, true = evaluate(ToPersistence(), data, split.test, norm, k=2, num_steps=3, batch_size=1)
    assert report["num_windows"] == len(split.test) and pred.shape == true.shape == (len(split.test), 8, 4, 16, 16)
    for name, ratio in report["nrmse_vs_persistence"].items():
        assert ratio == pytest.approx(1.0, rel=1e-4), name
    assert len(report["normalised"]["model"]["per_step"]["density"]) == 8
    phys = report["physical"]["persistence"]["density"]["rmse"]
    want = (norm.denormalize(persistence(norm.normalize(data.fields[split.test, :4]), 8))
            - data.fields[split.test, 4:12]).double()[:, :, 0].square().mean(dim=(-2, -1)).sqrt().mean()
    assert phys == pytest.approx(float(want), rel=1e-4)
    json.dumps(report)
    a = np.asarray(Image.open(plot_fields(pred, true, str(tmp_path / "fields.png"))))
    b = np.asarray(Image.open(plot_error_curve(report, str(tmp_path / "curve.png"))))
    assert a.shape == (4 * 16 * 2, 3 * 16 * 2, 3) and a.std() > 0 and b.std() > 0
    with pytest.raises(ValueError, match="a rollout of 3 x 4 frames after 4 condition frames needs 16"):
        evaluate(ToPersistence(), data, split.test, norm, k=3)
