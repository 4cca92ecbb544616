"""PDEBench's forecast metrics against hand cases: one Fourier mode lands in its band with the RMSE it
carries (Parseval), nRMSE, max and boundary errors, the conserved-quantity error, and the summary."""
import math

import pytest
import torch

from fastrepa.eval.pde_metrics import band_index, field_metrics, summarize


def wave(kx, ky, n=32, amp=1.0):
    i = torch.arange(n, dtype=torch.float64)
    return amp * torch.cos(2 * math.pi * (kx * i[:, None] + ky * i[None, :]) / n)


@pytest.mark.parametrize("k, band", [((2, 0), "low"), ((3, 2), "low"), ((5, 0), "mid"), ((8, 8), "mid"),
                                     ((13, 0), "high"), ((10, 9), "high")])
def test_one_mode_lands_in_its_band_with_all_the_rmse(k, band):
    e = wave(*k, amp=0.7)
    true = torch.ones(1, 1, 1, 32, 32, dtype=torch.float64)
    m = field_metrics(true + e, true)
    torch.testing.assert_close(m["rmse"][0, 0, 0], torch.tensor(0.7 / math.sqrt(2), dtype=torch.float64))
    for name in ("low", "mid", "high"):
        want = 0.7 / math.sqrt(2) if name == band else 0.0
        assert float(m[f"fourier_{name}"][0, 0, 0]) == pytest.approx(want, abs=1e-12), name


def test_band_index_is_the_integer_radius():
    k = band_index(8, 8)
    assert k[0, 0] == 0 and k[1, 0] == 1 and k[7, 0] == 1 and k[3, 4] == 5 and k[4, 4] == 5 and k[2, 2] == 2


def test_pointwise_metrics_are_their_formulas():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(2, 3, 2, 8, 8, generator=g, dtype=torch.float64) + 2
    pred = true + 0.1 * torch.randn(2, 3, 2, 8, 8, generator=g, dtype=torch.float64)
    m = field_metrics(pred, true)
    e = pred - true
    b, t, c = 1, 2, 1
    torch.testing.assert_close(m["nrmse"][b, t, c], e[b, t, c].norm() / true[b, t, c].norm())
    torch.testing.assert_close(m["max_err"][b, t, c], e[b, t, c].abs().max())
    edge = torch.cat([e[b, t, c, 0], e[b, t, c, -1], e[b, t, c, 1:-1, 0], e[b, t, c, 1:-1, -1]])
    torch.testing.assert_close(m["brmse"][b, t, c], edge.square().mean().sqrt())
    # an interior-only error leaves the boundary RMSE at 0; a constant offset is all conserved-quantity error
    inner = true.clone()
    inner[..., 3, 4] += 1.0
    assert float(field_metrics(inner, true)["brmse"].abs().max()) == 0.0
    shifted = field_metrics(true + 0.25, true)
    torch.testing.assert_close(shifted["csv"], torch.full((2, 3, 2), 0.25, dtype=torch.float64))
    torch.testing.assert_close(field_metrics(true + wave(1, 0, 8)[None, None, None], true)["csv"],
                               torch.zeros(2, 3, 2, dtype=torch.float64), atol=1e-12, rtol=0)


def test_summary_per_variable_and_per_step():
    true = torch.ones(2, 3, 2, 8, 8)
    pred = true.clone()
    pred[:, 1, 0] += 0.5  # variable a, frame 1
    s = summarize(pred, true, ["a", "b"])
    assert s["b"]["rmse"] == 0 and s["a"]["max_err"] == 0.5
    assert s["a"]["rmse"] == pytest.approx(0.5 / 3)
    assert s["per_step"]["a"] == pytest.approx([0.0, 0.5, 0.0]) and s["per_step"]["b"] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="3 variable names for 2 channels"):
        summarize(pred, true, ["a", "b", "c"])
