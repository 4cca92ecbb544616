"""Interpolants, time sampling and the REPA loss against hand-written computations."""
import math

import pytest
import torch

from conftest import hand_interpolant
import torch.nn.functional as F

from fastrepa.models import build_model
from fastrepa.objectives import (
    PATH_TYPES,
    PREDICTIONS,
    WEIGHTINGS,
    interpolant,
    repa_loss,
    sample_time,
    score_from_velocity,
    total_loss,
)


def tiny_model(z_dims=(16,), seed=0):
    torch.manual_seed(seed)
    model = build_model("SiT-S/2", input_size=8, depth=2, hidden_size=64, num_heads=2, z_dims=list(z_dims),
                        encoder_depth=1, projector_dim=32, num_classes=10, in_channels=4)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # the zero-initialised adaLN / final layers would make the output 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def batch(n=3, z_dims=(16,), seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    zs = [torch.randn(n, 16, d, generator=g) for d in z_dims]  # 16 tokens = (8/2)^2
    return x, y, zs


# ----------------------------------------------------------------------------------------- interpolants

@pytest.mark.parametrize("t", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_interpolant_values(t):
    tt = torch.tensor([t], dtype=torch.float64)
    a, s, da, ds = (v.item() for v in interpolant(tt, "linear"))
    assert (a, s, da, ds) == (1 - t, t, -1.0, 1.0)
    a, s, da, ds = (v.item() for v in interpolant(tt, "cosine"))
    h = math.pi * t / 2
    assert a == pytest.approx(math.cos(h), abs=1e-15)
    assert s == pytest.approx(math.sin(h), abs=1e-15)
    assert da == pytest.approx(-math.pi / 2 * math.sin(h), abs=1e-15)
    assert ds == pytest.approx(math.pi / 2 * math.cos(h), abs=1e-15)
    # python floats give the same numbers
    assert interpolant(t, "cosine") == pytest.approx((math.cos(h), math.sin(h), -math.pi / 2 * math.sin(h),
                                                      math.pi / 2 * math.cos(h)), abs=1e-15)


def test_interpolant_specific_numbers():
    a, s, da, ds = interpolant(torch.tensor([0.5], dtype=torch.float64), "cosine")
    r = math.sqrt(0.5)
    assert a.item() == pytest.approx(r) and s.item() == pytest.approx(r)
    assert da.item() == pytest.approx(-math.pi / 2 * r) and ds.item() == pytest.approx(math.pi / 2 * r)
    a, s, da, ds = interpolant(torch.tensor([0.25]), "linear")
    assert a.item() == 0.75 and s.item() == 0.25 and da.item() == -1 and ds.item() == 1


@pytest.mark.parametrize("path", PATH_TYPES)
def test_interpolant_derivatives_match_finite_differences(path):
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    h = 1e-6
    a1, s1, _, _ = interpolant(t + h, path)
    a0, s0, _, _ = interpolant(t - h, path)
    _, _, da, ds = interpolant(t, path)
    torch.testing.assert_close(da, (a1 - a0) / (2 * h), rtol=0, atol=1e-8)
    torch.testing.assert_close(ds, (s1 - s0) / (2 * h), rtol=0, atol=1e-8)


def test_interpolant_unknown_path():
    with pytest.raises(ValueError, match="quadratic") as e:
        interpolant(torch.zeros(2), "quadratic")
    assert "linear" in str(e.value) and "cosine" in str(e.value)


def test_score_from_velocity_linear_formula():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, 3, 2, 2, dtype=torch.float64, generator=g)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, generator=g)
    t = torch.tensor([0.1, 0.4, 0.7, 1.0], dtype=torch.float64)
    tb = t.view(4, 1, 1, 1)
    torch.testing.assert_close(score_from_velocity(v, x, t, "linear"), (-(1 - tb) * v - x) / tb,
                               rtol=1e-14, atol=0)
    # a python float time
    torch.testing.assert_close(score_from_velocity(v, x, 0.4, "linear"), (-(0.6) * v - x) / 0.4, rtol=1e-14, atol=0)


@pytest.mark.parametrize("path", PATH_TYPES)
def test_score_from_velocity_is_minus_eps_over_sigma(path):
    # x_t = a x0 + s eps and v = a' x0 + s' eps  =>  score = -eps / s
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=g)
    eps = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=g)
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    tb = t.view(3, 1, 1, 1)
    if path == "linear":
        a, s, da, ds = 1 - tb, tb, -1.0, 1.0
    else:
        a, s = torch.cos(tb * math.pi / 2), torch.sin(tb * math.pi / 2)
        da, ds = -math.pi / 2 * s, math.pi / 2 * a
    score = score_from_velocity(da * x0 + ds * eps, a * x0 + s * eps, t, path)
    torch.testing.assert_close(score, -eps / s, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------- time sampling

def test_sample_time_uniform_reproducible():
    t = sample_time(6, "uniform", "linear", generator=torch.Generator().manual_seed(3))
    ref = torch.rand(6, generator=torch.Generator().manual_seed(3))
    assert t.dtype == torch.float32
    assert torch.equal(t, ref)
    assert torch.equal(t, sample_time(6, "uniform", "cosine", generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(t, sample_time(6, "uniform", generator=torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("path", PATH_TYPES)
def test_sample_time_lognormal(path):
    t = sample_time(8, "lognormal", path, generator=torch.Generator().manual_seed(5), device="cpu")
    draws = torch.randn(8, generator=torch.Generator().manual_seed(5)).tolist()
    expected = []
    for r in draws:
        sigma = math.exp(r)
        expected.append(sigma / (1 + sigma) if path == "linear" else 2 / math.pi * math.atan(sigma))
    assert t.dtype == torch.float32
    torch.testing.assert_close(t, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=1e-7)
    assert bool(((t > 0) & (t < 1)).all())


def test_sample_time_global_rng_and_errors():
    torch.manual_seed(9)
    a = sample_time(4, "uniform")
    torch.manual_seed(9)
    assert torch.equal(a, torch.rand(4))
    with pytest.raises(ValueError, match="'beta'") as e:
        sample_time(4, "beta")
    assert all(w in str(e.value) for w in WEIGHTINGS)
    with pytest.raises(ValueError, match="'spiral'"):
        sample_time(4, "lognormal", "spiral")


# ----------------------------------------------------------------------------------------- REPA loss

def hand_loss(model, x, y, zs, time, noise, path, force_drop_ids=None):
    """The REPA loss written out plainly (fp64 where it matters)."""
    a, s, da, ds = hand_interpolant(time.view(-1, 1, 1, 1), path)
    x_t = a * x + s * noise
    target = da * x + ds * noise
    kw = {} if force_drop_ids is None else {"force_drop_ids": force_drop_ids}
    out, zs_tilde = model(x_t, time, y, **kw)
    mse = ((out.double() - target.double()) ** 2).flatten(1).mean(1)
    total, n = 0.0, x.shape[0]
    for z, zt in zip(zs, zs_tilde):
        cos = F.cosine_similarity(z.double(), zt.double(), dim=-1)  # [N, T]
        total = total + (-cos.mean(dim=1)).sum()
    proj = total / (len(zs) * n) if zs else torch.tensor(0.0)
    return mse, proj


@pytest.mark.parametrize("path", PATH_TYPES)
def test_repa_loss_matches_hand_computation(path):
    model = tiny_model().eval()
    x, y, zs = batch()
    time = torch.tensor([0.1, 0.5, 0.93])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    den, proj = repa_loss(model, x, y, zs, time=time, noise=noise, path_type=path)
    mse, proj_ref = hand_loss(model, x, y, zs, time, noise, path)
    assert den.dtype == torch.float32 and proj.dtype == torch.float32 and proj.dim() == 0
    torch.testing.assert_close(den.double(), mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(proj.double(), proj_ref, rtol=1e-5, atol=1e-6)
    assert mse.min() > 0.1 and abs(proj_ref.item()) > 1e-3  # a non-trivial case
    tot = total_loss(den, proj, 0.5)
    torch.testing.assert_close(tot.double(), mse.mean() + 0.5 * proj_ref, rtol=1e-5, atol=1e-6)


def test_repa_loss_multiple_encoders():
    model = tiny_model(z_dims=(16, 8, 12)).eval()
    x, y, zs = batch(n=4, z_dims=(16, 8, 12))
    time = torch.tensor([0.05, 0.3, 0.6, 0.99])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    den, proj = repa_loss(model, x, y, zs, time=time, noise=noise)
    mse, proj_ref = hand_loss(model, x, y, zs, time, noise, "linear")
    torch.testing.assert_close(den.double(), mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(proj.double(), proj_ref, rtol=1e-5, atol=1e-6)
    # the mean over encoders of per-encoder means, i.e. official sum / (len(zs) * bsz)
    _, zs_tilde = model((1 - time.view(-1, 1, 1, 1)) * x + time.view(-1, 1, 1, 1) * noise, time, y)
    per = [-F.cosine_similarity(z, zt, dim=-1).mean() for z, zt in zip(zs, zs_tilde)]
    torch.testing.assert_close(proj, sum(per) / 3, rtol=1e-5, atol=1e-6)


def test_repa_loss_empty_zs():
    model = tiny_model(z_dims=()).eval()
    x, y, _ = batch()
    time = torch.tensor([0.2, 0.4, 0.6])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    den, proj = repa_loss(model, x, y, [], time=time, noise=noise)
    mse, _ = hand_loss(model, x, y, [], time, noise, "linear")
    assert proj.item() == 0.0 and proj.dtype == torch.float32
    torch.testing.assert_close(den.double(), mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total_loss(den, proj, 0.5), den.mean())


class FixedOutput(torch.nn.Module):
    """Returns a fixed output and fixed projector features (to control their dtype)."""

    def __init__(self, out, zs_tilde):
        super().__init__()
        self.out, self.zs_tilde = out, zs_tilde
        self.training = False

    def forward(self, x, t, y, force_drop_ids=None):
        return self.out, self.zs_tilde


def test_projection_loss_in_fp32_for_bf16_features():
    g = torch.Generator().manual_seed(11)
    n, tok, c = 4, 64, 96
    z = (torch.randn(n, tok, c, generator=g) * 3).bfloat16()
    zt = (z.float() + 0.7 * torch.randn(n, tok, c, generator=g)).bfloat16()
    x = torch.randn(n, 4, 8, 8, generator=g)
    model = FixedOutput(torch.zeros_like(x).bfloat16(), [zt])
    den, proj = repa_loss(model, x, torch.zeros(n, dtype=torch.long), [z], time=torch.full((n,), 0.5),
                          noise=torch.zeros_like(x))
    ref = -F.cosine_similarity(z.double(), zt.double(), dim=-1).mean()
    assert proj.dtype == torch.float32 and den.dtype == torch.float32
    assert abs(proj.double() - ref).item() < 2e-6  # a bf16 computation would be off by ~1e-3
    # out = 0 and noise = 0: target = -x, so the loss is mean(x^2)
    torch.testing.assert_close(den, (x ** 2).flatten(1).mean(1))


def test_repa_loss_under_bf16_autocast():
    model = tiny_model().eval()
    x, y, zs = batch()
    zs = [z.bfloat16() for z in zs]
    time = torch.tensor([0.1, 0.5, 0.9])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        den, proj = repa_loss(model, x, y, zs, time=time, noise=noise)
        tb = time.view(-1, 1, 1, 1)
        out, zs_tilde = model((1 - tb) * x + tb * noise, time, y)
    assert zs_tilde[0].dtype == torch.bfloat16
    assert den.dtype == torch.float32 and proj.dtype == torch.float32
    ref = -F.cosine_similarity(zs[0].double(), zs_tilde[0].double(), dim=-1).mean()
    assert abs(proj.double() - ref).item() < 2e-6
    torch.testing.assert_close(den.double(), ((out.double() - (noise - x).double()) ** 2).flatten(1).mean(1),
                               rtol=1e-5, atol=1e-6)


def test_repa_loss_shape_errors():
    model = tiny_model().eval()
    x, y, zs = batch()
    time = torch.tensor([0.1, 0.5, 0.9])
    with pytest.raises(ValueError, match=r"encoder 0.*\(3, 9, 16\).*\(3, 16, 16\)"):
        repa_loss(model, x, y, [torch.randn(3, 9, 16)], time=time)
    with pytest.raises(ValueError, match=r"encoder 0.*\(3, 16, 5\).*\(3, 16, 16\)"):
        repa_loss(model, x, y, [torch.randn(3, 16, 5)], time=time)
    with pytest.raises(ValueError, match="2 encoder feature tensor.*1 projector"):
        repa_loss(model, x, y, zs + zs, time=time)
    with pytest.raises(ValueError, match="0 encoder feature tensor.*1 projector"):
        repa_loss(model, x, y, [], time=time)
    with pytest.raises(ValueError, match=r"time must have shape \[3\]"):
        repa_loss(model, x, y, zs, time=torch.rand(4))
    with pytest.raises(ValueError, match="noise shape"):
        repa_loss(model, x, y, zs, noise=torch.randn(3, 4, 8, 4))


def test_repa_loss_unknown_flags():
    model = tiny_model().eval()
    x, y, zs = batch()
    with pytest.raises(ValueError, match="'sigmoid'") as e:
        repa_loss(model, x, y, zs, path_type="sigmoid")
    assert "linear" in str(e.value)
    with pytest.raises(ValueError, match="'logit'") as e:
        repa_loss(model, x, y, zs, weighting="logit")
    assert "lognormal" in str(e.value)
    with pytest.raises(ValueError, match="'eps'") as e:
        repa_loss(model, x, y, zs, prediction="eps")
    assert all(p in str(e.value) for p in PREDICTIONS)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_repa_loss_generator_draws(weighting):
    model = tiny_model().train()
    model.y_embedder.dropout_prob = 0.5
    x, y, zs = batch(n=8)
    torch.manual_seed(0)
    global_state = torch.random.get_rng_state()
    den1, proj1 = repa_loss(model, x, y, zs, weighting=weighting, generator=torch.Generator().manual_seed(21))
    # every draw (time, noise, label dropout) came from the generator, none from the global RNG
    assert torch.equal(torch.random.get_rng_state(), global_state)
    den2, proj2 = repa_loss(model, x, y, zs, weighting=weighting, generator=torch.Generator().manual_seed(21))
    assert torch.equal(den1, den2) and torch.equal(proj1, proj2)
    den3, _ = repa_loss(model, x, y, zs, weighting=weighting, generator=torch.Generator().manual_seed(22))
    assert not torch.equal(den1, den3)

    # the same draws by hand: time, then noise, then the drop mask, in that order
    g = torch.Generator().manual_seed(21)
    if weighting == "uniform":
        time = torch.rand(8, generator=g)
    else:
        sigma = torch.randn(8, generator=g).exp()
        time = sigma / (1 + sigma)
    noise = torch.randn(x.shape, generator=g)
    drop = (torch.rand(8, generator=g) < 0.5).long()
    assert 0 < drop.sum() < 8  # some labels dropped, some kept
    mse, proj_ref = hand_loss(model, x, y, zs, time, noise, "linear", force_drop_ids=drop)
    torch.testing.assert_close(den1.double(), mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(proj1.double(), proj_ref, rtol=1e-5, atol=1e-6)
    # without the drop the loss differs: the mask really reached the model
    mse_nodrop, _ = hand_loss(model, x, y, zs, time, noise, "linear", force_drop_ids=torch.zeros(8, dtype=torch.long))
    assert not torch.allclose(den1.double(), mse_nodrop, rtol=1e-4, atol=1e-6)


def test_repa_loss_no_generator_eval_uses_global_rng():
    model = tiny_model().eval()
    x, y, zs = batch()
    torch.manual_seed(5)
    a = repa_loss(model, x, y, zs)
    torch.manual_seed(5)
    b = repa_loss(model, x, y, zs)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # an explicit force_drop_ids is passed through even in eval mode (all labels -> null class 10)
    time = torch.tensor([0.3, 0.6, 0.9])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    den, _ = repa_loss(model, x, y, zs, time=time, noise=noise, force_drop_ids=torch.ones(3, dtype=torch.long))
    mse, _ = hand_loss(model, x, torch.full_like(y, 10), zs, time, noise, "linear")
    torch.testing.assert_close(den.double(), mse, rtol=1e-5, atol=1e-6)
