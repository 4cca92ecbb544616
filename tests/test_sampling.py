"""The Euler / Heun ODE and Euler-Maruyama SDE samplers against hand-unrolled loops and recorded calls."""
import math

import pytest
import torch

from conftest import hand_interpolant

import fastrepa.sampling as sampling
from fastrepa.models import build_model
from fastrepa.sampling import euler_maruyama_sampler, euler_sampler, row_noise


class Recorder(torch.nn.Module):
    """v = a x + b[y] (1 + t): analytic, label-dependent (null label included); records every call."""

    def __init__(self, a=0.3, num_classes=5, as_tuple=True):
        super().__init__()
        self.a = a
        self.num_classes = num_classes
        self.b = torch.linspace(-1.0, 1.0, num_classes + 1)
        self.as_tuple = as_tuple
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append(dict(n=x.shape[0], t=t.clone(), y=y.clone(), x_dtype=x.dtype, t_dtype=t.dtype))
        tb = t.view(-1, 1, 1, 1)
        out = self.a * x + (self.b[y].view(-1, 1, 1, 1) * (1 + tb)).to(x.dtype)
        return (out, []) if self.as_tuple else out


def make_inputs(n=2, dtype=torch.float32, seed=0, num_classes=5):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 2, 3, 3, generator=g).to(dtype)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return latents, y


# Hand-unrolled loops written from the official samplers.py description (float64 state, model input
# in latents.dtype, CFG on [guidance_low, guidance_high] judged at t_cur).

def _call(model, x, t, y, y_null, dtype, guided):
    if guided:
        x_in, y_in = torch.cat([x, x]), torch.cat([y, y_null])
    else:
        x_in, y_in = x, y
    time = torch.ones(x_in.shape[0], dtype=torch.float64, device=x.device) * t
    out = model(x_in.to(dtype), time.to(dtype), y_in)
    out = out[0] if isinstance(out, tuple) else out
    return out.to(torch.float64), x_in, time


def _cfg(d, scale):
    cond, uncond = d.chunk(2)
    return uncond + scale * (cond - uncond)


def ref_euler(model, latents, y, num_steps, heun, cfg, lo, hi, null):
    y_null = torch.full_like(y, null)
    ts = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x = latents.to(torch.float64)
    for i in range(num_steps):
        t_cur, t_next = ts[i], ts[i + 1]
        guided = cfg > 1 and lo <= t_cur <= hi
        d, _, _ = _call(model, x, t_cur, y, y_null, latents.dtype, guided)
        if guided:
            d = _cfg(d, cfg)
        x_next = x + (t_next - t_cur) * d
        if heun and i < num_steps - 1:
            d2, _, _ = _call(model, x_next, t_next, y, y_null, latents.dtype, guided)
            if guided:
                d2 = _cfg(d2, cfg)
            x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x


def ref_score(v, x, t, path):
    a, s, da, ds = hand_interpolant(t.view(-1, 1, 1, 1), path)
    r = a / da
    return (r * v - x) / (s ** 2 - r * ds * s)


def ref_sde(model, latents, y, num_steps, cfg, lo, hi, null, path, gen):
    y_null = torch.full_like(y, null)
    ts = torch.cat([torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64),
                    torch.tensor([0.0], dtype=torch.float64)])
    x = latents.to(torch.float64)
    for i in range(num_steps):
        t_cur, t_next = ts[i], ts[i + 1]
        dt = t_next - t_cur
        guided = cfg > 1 and lo <= t_cur <= hi
        last = i == num_steps - 1
        if not last and isinstance(gen, list):  # one generator per row: row b's own next randn
            eps = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float64) for g in gen])
        elif not last:
            eps = torch.randn(x.shape, generator=gen, dtype=torch.float64, device=gen.device).to(x.device)
        v, x_in, time = _call(model, x, t_cur, y, y_null, latents.dtype, guided)
        d = v - 0.5 * (2 * t_cur) * ref_score(v, x_in, time, path)
        if guided:
            d = _cfg(d, cfg)
        if last:
            x = x + dt * d
        else:
            x = x + d * dt + torch.sqrt(2 * t_cur) * (eps * torch.sqrt(dt.abs()))
    return x


# ------------------------------------------------------------------------------------------------ ODE

def test_euler_closed_form():
    # v = a x + c (no label or time dependence): x_N = r^N x0 + (c / a)(r^N - 1), r = 1 - a / N
    a, c, n_steps = 0.7, 0.25, 9

    def model(x, t, y):
        return a * x + c

    latents = torch.randn(3, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = euler_sampler(model, latents, torch.zeros(3, dtype=torch.long), num_steps=n_steps)
    r = (1 - a / n_steps) ** n_steps
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, r * latents + (c / a) * (r - 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("heun", [False, True])
@pytest.mark.parametrize("cfg,lo,hi", [(1.0, 0.0, 1.0), (4.0, 0.0, 1.0), (1.8, 0.25, 0.75)])
def test_euler_matches_hand_loop(heun, cfg, lo, hi):
    latents, y = make_inputs(n=3)
    out = euler_sampler(Recorder(), latents, y, num_steps=8, heun=heun, cfg_scale=cfg, guidance_low=lo,
                        guidance_high=hi)
    ref = ref_euler(Recorder(), latents, y, 8, heun, cfg, lo, hi, null=5)
    assert torch.equal(out, ref)  # bit-identical to the official loop
    # a non-trivial result: guidance changes it
    if cfg > 1:
        plain = euler_sampler(Recorder(), latents, y, num_steps=8, heun=heun)
        assert (out - plain).abs().max() > 1e-3


def test_heun_not_on_last_step():
    latents, y = make_inputs()
    model = Recorder()
    euler_sampler(model, latents, y, num_steps=5, heun=True)
    assert len(model.calls) == 2 * 5 - 1
    seen = [c["t"][0].item() for c in model.calls]
    grid = torch.linspace(1, 0, 6, dtype=torch.float64).float().tolist()
    # predictor at t_cur, corrector at t_next, for steps 0..3; step 4 (the last) predictor only
    expected = [v for i in range(4) for v in (grid[i], grid[i + 1])] + [grid[4]]
    assert seen == expected
    assert 0.0 not in seen


def test_euler_heun_single_step_is_euler():
    latents, y = make_inputs()
    a = euler_sampler(Recorder(), latents, y, num_steps=1, heun=True)
    b = euler_sampler(Recorder(), latents, y, num_steps=1, heun=False)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ CFG

@pytest.mark.parametrize("sampler", [euler_sampler, euler_maruyama_sampler])
def test_guidance_interval_doubles_exactly_inside(sampler):
    latents, y = make_inputs(n=3)
    model = Recorder(num_classes=5)
    kw = {"generator": torch.Generator().manual_seed(0)}
    sampler(model, latents, y, num_steps=10, cfg_scale=4.0, guidance_low=0.25, guidance_high=0.75, **kw)
    assert len(model.calls) == 10
    for call in model.calls:
        t = call["t"][0].item()
        assert bool((call["t"] == t).all())
        if 0.25 <= t <= 0.75:
            assert call["n"] == 6
            assert call["y"][:3].tolist() == y.tolist()
            assert call["y"][3:].tolist() == [5, 5, 5]  # the null class = model.num_classes
        else:
            assert call["n"] == 3 and call["y"].tolist() == y.tolist()
    # ODE grid: 0.7 .. 0.3 inside; SDE grid linspace(1, 0.04, 10): 0.68 .. 0.253 inside
    assert sum(c["n"] == 6 for c in model.calls) == 5


def test_guidance_interval_is_inclusive_and_null_class_override():
    latents, y = make_inputs(n=2)
    grid = torch.linspace(1, 0, 11, dtype=torch.float64).tolist()
    model = Recorder(num_classes=5)
    euler_sampler(model, latents, y, num_steps=10, cfg_scale=2.0, guidance_low=grid[3], guidance_high=grid[3],
                  null_class=4)
    doubled = [i for i, c in enumerate(model.calls) if c["n"] == 4]
    assert doubled == [3]
    assert model.calls[3]["y"][2:].tolist() == [4, 4]


def test_null_class_default_without_num_classes_is_1000():
    seen = []

    def model(x, t, y):
        seen.append(y.clone())
        return x

    latents, y = make_inputs(n=2)
    euler_sampler(model, latents, y, num_steps=2, cfg_scale=1.5)
    assert seen[0][2:].tolist() == [1000, 1000]


@pytest.mark.parametrize("cfg", [1.0, 0.5])
def test_cfg_scale_at_most_one_never_doubles(cfg):
    latents, y = make_inputs(n=3)
    for sampler in (euler_sampler, euler_maruyama_sampler):
        model = Recorder()
        sampler(model, latents, y, num_steps=6, heun=True, cfg_scale=cfg, guidance_low=0.0, guidance_high=1.0)
        assert {c["n"] for c in model.calls} == {3}


# ------------------------------------------------------------------------------------------------ SDE

def test_sde_time_grid_and_draw_count():
    latents, y = make_inputs(n=2, dtype=torch.float64)
    model = Recorder()
    gen = torch.Generator().manual_seed(3)
    euler_maruyama_sampler(model, latents, y, num_steps=7, generator=gen)
    seen = torch.stack([c["t"][0] for c in model.calls])
    assert torch.equal(seen, torch.linspace(1.0, 0.04, 7, dtype=torch.float64))
    # 7 steps, 6 noise draws: the last step (0.04 -> 0) draws none
    check = torch.Generator().manual_seed(3)
    for _ in range(6):
        torch.randn(latents.shape, generator=check, dtype=torch.float64)
    assert torch.equal(gen.get_state(), check.get_state())


def test_sde_two_steps_by_hand():
    # grid [1, 0.04, 0]; linear path: score = (-(1 - t) v - x) / t, drift d = v - t * score
    a = 0.3
    latents, y = make_inputs(n=2, dtype=torch.float64)
    model = Recorder(a=a)
    b = model.b[y].double().view(-1, 1, 1, 1)
    out = euler_maruyama_sampler(model, latents, y, num_steps=2, generator=torch.Generator().manual_seed(4))
    eps = torch.randn(latents.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def drift(x, t):
        v = a * x + b * (1 + t)
        score = (-(1 - t) * v - x) / t
        return v - t * score

    x1 = latents + drift(latents, 1.0) * (0.04 - 1.0) + math.sqrt(2.0) * eps * math.sqrt(0.96)
    x2 = x1 + (0.0 - 0.04) * drift(x1, 0.04)  # mean only: no noise on the last step
    torch.testing.assert_close(out, x2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ["linear", "cosine"])
@pytest.mark.parametrize("cfg,lo,hi", [(1.0, 0.0, 1.0), (1.8, 0.0, 0.7)])
def test_sde_matches_hand_loop(path, cfg, lo, hi):
    latents, y = make_inputs(n=3)
    out = euler_maruyama_sampler(Recorder(), latents, y, num_steps=12, cfg_scale=cfg, guidance_low=lo,
                                 guidance_high=hi, path_type=path, generator=torch.Generator().manual_seed(6))
    ref = ref_sde(Recorder(), latents, y, 12, cfg, lo, hi, 5, path, torch.Generator().manual_seed(6))
    assert torch.equal(out, ref)  # bit-identical to the official loop


def test_sde_reproducible():
    latents, y = make_inputs(n=2)
    a = euler_maruyama_sampler(Recorder(), latents, y, num_steps=5, generator=torch.Generator().manual_seed(1))
    b = euler_maruyama_sampler(Recorder(), latents, y, num_steps=5, generator=torch.Generator().manual_seed(1))
    c = euler_maruyama_sampler(Recorder(), latents, y, num_steps=5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # without a generator: the global RNG
    torch.manual_seed(8)
    d = euler_maruyama_sampler(Recorder(), latents, y, num_steps=5)
    torch.manual_seed(8)
    e = euler_maruyama_sampler(Recorder(), latents, y, num_steps=5)
    assert torch.equal(d, e)


def _row_gens(indices, seed=11):
    return [torch.Generator().manual_seed(seed * 1000 + i) for i in indices]


@pytest.mark.parametrize("cfg,lo,hi", [(1.0, 0.0, 1.0), (1.8, 0.0, 0.7)])
def test_sde_per_row_generators_match_hand_loop(cfg, lo, hi):
    latents, y = make_inputs(n=3)
    out = euler_maruyama_sampler(Recorder(), latents, y, num_steps=6, cfg_scale=cfg, guidance_low=lo,
                                 guidance_high=hi, generator=_row_gens(range(3)))
    ref = ref_sde(Recorder(), latents, y, 6, cfg, lo, hi, 5, "linear", _row_gens(range(3)))
    assert torch.equal(out, ref)
    # and not the one-generator stream: rows really draw from their own generators
    other = euler_maruyama_sampler(Recorder(), latents, y, num_steps=6, cfg_scale=cfg, guidance_low=lo,
                                   guidance_high=hi, generator=_row_gens(range(3), seed=12))
    assert not torch.allclose(out, other)


def test_sde_per_row_samples_do_not_depend_on_the_batch():
    """Sample i with its own generator: the same whether sampled alone, in a batch of 5, or split 2 + 3."""
    latents, y = make_inputs(n=5)
    kw = dict(num_steps=5, cfg_scale=2.0, guidance_high=0.7)
    whole = euler_maruyama_sampler(Recorder(), latents, y, generator=_row_gens(range(5)), **kw)
    split = torch.cat([euler_maruyama_sampler(Recorder(), latents[a:b], y[a:b], generator=_row_gens(range(a, b)),
                                              **kw) for a, b in ((0, 2), (2, 5))])
    alone = torch.cat([euler_maruyama_sampler(Recorder(), latents[i:i + 1], y[i:i + 1],
                                              generator=_row_gens([i]), **kw) for i in range(5)])
    assert torch.equal(whole, split) and torch.equal(whole, alone)
    assert len({round(float(r.sum()), 6) for r in whole}) == 5  # five different samples


def test_row_noise_values_do_not_depend_on_threads(monkeypatch):
    shape = (2, 3, 3)
    want = []
    gens = _row_gens(range(7))
    for _ in range(3):  # row b of draw k: generator b's k-th randn(shape)
        want.append(torch.stack([torch.randn(shape, generator=g, dtype=torch.float64) for g in gens]))
    for threads in (1, 3, 7):
        monkeypatch.setattr(sampling, "_noise_threads", lambda rows, t=threads: t)
        got = list(row_noise(_row_gens(range(7)), shape, 3))
        assert len(got) == 3 and all(g.dtype == torch.float64 for g in got)
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    assert list(row_noise(_row_gens(range(2)), shape, 0)) == []


def test_sde_per_row_generator_errors():
    latents, y = make_inputs(n=3)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        euler_maruyama_sampler(Recorder(), latents, y, num_steps=3, generator=_row_gens(range(2)))
    with pytest.raises(TypeError, match="torch.Generator"):
        euler_maruyama_sampler(Recorder(), latents, y, num_steps=3, generator=[1, 2, 3])


def test_sde_single_step_is_one_mean_step_from_one():
    latents, y = make_inputs(n=2, dtype=torch.float64)
    model = Recorder(a=0.5)
    out = euler_maruyama_sampler(model, latents, y, num_steps=1)
    v = 0.5 * latents + model.b[y].double().view(-1, 1, 1, 1) * 2
    # t = 1: score = -x, drift = v + x, x_0 = x - (v + x) = -v
    torch.testing.assert_close(out, -v, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------ dtypes

@pytest.mark.parametrize("sampler", [euler_sampler, euler_maruyama_sampler])
def test_state_float64_model_sees_latent_dtype(sampler):
    latents, y = make_inputs(n=2, dtype=torch.bfloat16)
    model = Recorder(as_tuple=False)
    out = sampler(model, latents, y, num_steps=4, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float64
    assert {c["x_dtype"] for c in model.calls} == {torch.bfloat16}
    assert {c["t_dtype"] for c in model.calls} == {torch.bfloat16}
    if sampler is euler_sampler:
        ref = ref_euler(Recorder(), latents, y, 4, False, 2.0, 0.0, 1.0, 5)
    else:
        ref = ref_sde(Recorder(), latents, y, 4, 2.0, 0.0, 1.0, 5, "linear", torch.Generator().manual_seed(0))
    assert torch.equal(out, ref)  # bit-identical to the official loop


# ------------------------------------------------------------------------------------------------ real SiT

@pytest.fixture(scope="module")
def tiny_sit():
    torch.manual_seed(0)
    model = build_model("SiT-S/2", input_size=8, depth=2, hidden_size=64, num_heads=2, z_dims=[16],
                        encoder_depth=1, projector_dim=32, num_classes=10, in_channels=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_real_sit_euler(tiny_sit):
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    y = torch.tensor([3, 7])
    a = euler_sampler(tiny_sit, latents, y, num_steps=4, heun=True, cfg_scale=3.0, guidance_high=0.6)
    b = euler_sampler(tiny_sit.velocity, latents, y, num_steps=4, heun=True, cfg_scale=3.0, guidance_high=0.6)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    ref = ref_euler(tiny_sit, latents, y, 4, True, 3.0, 0.0, 0.6, null=10)
    assert torch.equal(a, ref)
    assert (a - latents.double()).abs().max() > 1e-2


def test_real_sit_sde(tiny_sit):
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    y = torch.tensor([1, 9])
    kw = dict(num_steps=4, cfg_scale=1.8, guidance_high=0.7)
    a = euler_maruyama_sampler(tiny_sit, latents, y, **kw, generator=torch.Generator().manual_seed(4))
    b = euler_maruyama_sampler(tiny_sit.velocity, latents, y, **kw, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    ref = ref_sde(tiny_sit, latents, y, 4, 1.8, 0.0, 0.7, 10, "linear", torch.Generator().manual_seed(4))
    assert torch.equal(a, ref)
    assert torch.isfinite(a).all()


def test_samplers_leave_no_autograd_graph(tiny_sit):
    latents = torch.randn(1, 4, 8, 8)
    out = euler_sampler(tiny_sit, latents, torch.tensor([0]), num_steps=2)
    assert not out.requires_grad


# ------------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("sampler", [euler_sampler, euler_maruyama_sampler])
def test_sampler_validation(sampler):
    latents, y = make_inputs(n=2)
    model = Recorder()
    with pytest.raises(ValueError, match="num_steps=0"):
        sampler(model, latents, y, num_steps=0)
    with pytest.raises(ValueError, match="num_steps must be an integer"):
        sampler(model, latents, y, num_steps=2.5)
    with pytest.raises(ValueError, match="'spiral'"):
        sampler(model, latents, y, path_type="spiral")
    with pytest.raises(ValueError, match="guidance_low=0.8 must be <= guidance_high=0.2"):
        sampler(model, latents, y, guidance_low=0.8, guidance_high=0.2)
    with pytest.raises(ValueError, match=r"labels y of shape \(3,\)"):
        sampler(model, latents, torch.zeros(3, dtype=torch.long))
    assert model.calls == []
