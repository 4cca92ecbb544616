"""DiT's DDPM Gaussian diffusion (fastrepa.gaussian_diffusion) against plain float64 formulas written here,
facts of the official code (facebookresearch/DiT diffusion/, read and run offline) and hand-unrolled loops."""
import math

import pytest
import torch

import fastrepa.gaussian_diffusion as gd
from fastrepa.gaussian_diffusion import GaussianDiffusion

F64 = torch.float64


# ---------------------------------------------------------------- plain references (python floats)

class Ref:
    """The DDPM tables written out with python floats, one step at a time."""

    def __init__(self, betas):
        self.betas = [float(b) for b in betas]
        self.abar, p = [], 1.0
        for b in self.betas:
            p *= 1.0 - b
            self.abar.append(p)
        self.abar_prev = [1.0] + self.abar[:-1]
        self.post_var = [b * (1 - ap) / (1 - a) for b, a, ap in zip(self.betas, self.abar, self.abar_prev)]
        self.post_logvar = [math.log(self.post_var[1])] + [math.log(v) for v in self.post_var[1:]]
        self.coef1 = [b * math.sqrt(ap) / (1 - a) for b, a, ap in zip(self.betas, self.abar, self.abar_prev)]
        self.coef2 = [(1 - ap) * math.sqrt(1 - b) / (1 - a) for b, a, ap in zip(self.betas, self.abar, self.abar_prev)]

    def col(self, table, t, like):
        return torch.tensor([table[i] for i in t.tolist()], dtype=F64).view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0, t, noise):
        a = self.col(self.abar, t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def posterior(self, x0, xt, t):
        return (self.col(self.coef1, t, xt) * x0 + self.col(self.coef2, t, xt) * xt,
                self.col(self.post_var, t, xt), self.col(self.post_logvar, t, xt))

    def pred_x0(self, xt, t, eps):
        a = self.col(self.abar, t, xt)
        return (xt - (1 - a).sqrt() * eps) / a.sqrt()

    def learned_logvar(self, v, t, like):
        lo = self.col(self.post_logvar, t, like)
        hi = self.col([math.log(b) for b in self.betas], t, like)
        return lo + (v + 1) / 2 * (hi - lo)

    def fixed_large_var(self, t, like):
        return self.col([self.post_var[1]] + self.betas[1:], t, like)


def tanh_cdf(z):
    return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))


def erf_cdf(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def ref_discretized_ll(x, mean, log_scale, cdf=tanh_cdf):
    """Elementwise log P(8-bit bin of x), bins of width 2/255, the edge bins open, probabilities >= 1e-12."""
    out = []
    for xi, mi, si in zip(x.flatten().tolist(), mean.flatten().tolist(), log_scale.flatten().tolist()):
        s = math.exp(si)
        hi, lo = cdf((xi - mi + 1 / 255) / s), cdf((xi - mi - 1 / 255) / s)
        p = hi if xi < -0.999 else (1 - lo if xi > 0.999 else hi - lo)
        out.append(math.log(max(p, 1e-12)))
    return torch.tensor(out, dtype=F64).view(x.shape)


def ref_kl(m1, lv1, m2, lv2):
    """KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2 / s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2."""
    return 0.5 * (lv2 - lv1) + (lv1.exp() + (m1 - m2) ** 2) / (2 * lv2.exp()) - 0.5


def flat_mean(x):
    return x.reshape(x.shape[0], -1).mean(1)


def close(a, b, tol=1e-11):
    torch.testing.assert_close(a, b.to(a.dtype).expand_as(a), rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def dit():
    return GaussianDiffusion(gd.linear_betas(1000))


@pytest.fixture(scope="module")
def ref():
    T = 1000
    return Ref([0.0001 + i * (0.02 - 0.0001) / (T - 1) for i in range(T)])


def batch(n=6, c=4, seed=0, t_values=(0, 0, 1, 17, 500, 999)):
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.rand(n, c, 3, 3, generator=g, dtype=F64) * 2 - 1)
    x0[0, 0, 0, 0], x0[0, 1, 0, 0] = -1.0, 1.0  # the open edge bins of the decoder NLL
    noise = torch.randn(n, c, 3, 3, generator=g, dtype=F64)
    out = torch.randn(n, 2 * c, 3, 3, generator=g, dtype=F64)
    out[:, c:] = torch.tanh(out[:, c:])
    return x0, noise, out, torch.tensor(t_values)


# ---------------------------------------------------------------- schedule and tables

def test_linear_betas():
    for T in (1000, 250, 7):
        s = 1000 / T
        want = [s * 1e-4 + i * (s * 0.02 - s * 1e-4) / (T - 1) for i in range(T)]
        got = gd.linear_betas(T)
        assert got.dtype.name == "float64" and got.shape == (T,)
        assert max(abs(a - b) for a, b in zip(got.tolist(), want)) < 1e-15
    with pytest.raises(ValueError, match="num_timesteps"):
        gd.linear_betas(0)


def test_tables_match_plain_formulas(dit, ref):
    for name, want in [("alphas_cumprod", ref.abar), ("posterior_variance", ref.post_var),
                       ("posterior_log_variance_clipped", ref.post_logvar), ("posterior_mean_coef1", ref.coef1),
                       ("posterior_mean_coef2", ref.coef2)]:
        got = getattr(dit, name).tolist()
        assert max(abs(a - b) / max(abs(b), 1e-300) for a, b in zip(got, want)) < 1e-10, name
    assert ref.post_var[0] == 0.0 and dit.posterior_log_variance_clipped[0] == dit.posterior_log_variance_clipped[1]


def test_q_sample_and_posterior(dit, ref):
    x0, noise, _, t = batch()
    close(dit.q_sample(x0, t, noise), ref.q_sample(x0, t, noise))
    xt = ref.q_sample(x0, t, noise)
    mean, var, logvar = dit.q_posterior_mean_variance(x0, xt, t)
    rm, rv, rl = ref.posterior(x0, xt, t)
    close(mean, rm)
    close(var, rv)
    close(logvar, rl)
    # the posterior variance is the variance of x_{t-1} given (x_t, x_0): beta-weighted, for t >= 1
    a, ap, b = ref.abar[17], ref.abar[16], ref.betas[17]
    assert var[3].item() == pytest.approx((1 - ap) / (1 - a) * b, rel=1e-12)


def test_q_sample_float32_and_device_dtype(dit, ref):
    x0, noise, _, t = batch()
    x32 = dit.q_sample(x0.float(), t, noise.float())
    assert x32.dtype == torch.float32
    close(x32, ref.q_sample(x0, t, noise), tol=1e-6)
    assert dit.q_sample(x0.bfloat16(), t, noise.bfloat16()).dtype == torch.float32  # official gathers float32


# ---------------------------------------------------------------- p(x_{t-1} | x_t)

def test_p_mean_variance_learned_range(dit, ref):
    x0, noise, out, t = batch()
    xt = ref.q_sample(x0, t, noise)
    eps, v = out[:, :4], out[:, 4:]
    p = dit.p_mean_variance(out, xt, t)
    logvar = ref.learned_logvar(v, t, xt)
    close(p["log_variance"], logvar)
    close(p["variance"], logvar.exp())
    px0 = ref.pred_x0(xt, t, eps)
    close(p["pred_xstart"], px0, tol=1e-9)
    close(p["mean"], ref.posterior(px0, xt, t)[0], tol=1e-9)
    # v = -1 is the clipped posterior variance, v = +1 is beta
    lo = dit.p_mean_variance(torch.cat([eps, -torch.ones_like(v)], 1), xt, t)["log_variance"]
    hi = dit.p_mean_variance(torch.cat([eps, torch.ones_like(v)], 1), xt, t)["log_variance"]
    close(lo, ref.col(ref.post_logvar, t, xt))
    close(hi, ref.col([math.log(b) for b in ref.betas], t, xt))
    # clip_denoised clamps pred_xstart to [-1, 1] before the posterior mean
    pc = dit.p_mean_variance(out, xt, t, clip_denoised=True)
    close(pc["pred_xstart"], px0.clamp(-1, 1), tol=1e-9)
    close(pc["mean"], ref.posterior(px0.clamp(-1, 1), xt, t)[0], tol=1e-9)


def test_p_mean_variance_fixed_large(ref):
    diff = GaussianDiffusion(gd.linear_betas(1000), learn_sigma=False)
    x0, noise, out, t = batch()
    xt = ref.q_sample(x0, t, noise)
    p = diff.p_mean_variance(out[:, :4], xt, t)
    close(p["variance"], ref.fixed_large_var(t, xt))
    close(p["log_variance"], ref.fixed_large_var(t, xt).log())
    with pytest.raises(ValueError, match="model_output"):
        diff.p_mean_variance(out, xt, t)  # 2C channels without learn_sigma


# ---------------------------------------------------------------- likelihood helpers

def test_normal_kl():
    g = torch.Generator().manual_seed(1)
    m1, m2, l1, l2 = (torch.randn(50, generator=g, dtype=F64) for _ in range(4))
    close(gd.normal_kl(m1, l1, m2, l2), ref_kl(m1, l1, m2, l2), tol=1e-12)
    want = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * l1).exp()),
                                             torch.distributions.Normal(m2, (0.5 * l2).exp()))
    close(gd.normal_kl(m1, l1, m2, l2), want, tol=1e-12)
    close(gd.normal_kl(m1, l1, 0.0, 0.0), ref_kl(m1, l1, torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64)))


def test_discretized_gaussian_log_likelihood():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (400,), generator=g).to(F64) / 127.5 - 1  # 8-bit values in [-1, 1]
    x[:3] = torch.tensor([-1.0, 1.0, 0.0], dtype=F64)
    mean = x + 0.05 * torch.randn(400, generator=g, dtype=F64)
    log_scale = torch.log(torch.rand(400, generator=g, dtype=F64) * 0.1 + 0.01)
    got = gd.discretized_gaussian_log_likelihood(x, means=mean, log_scales=log_scale)
    close(got, ref_discretized_ll(x, mean, log_scale), tol=1e-10)  # the official tanh CDF
    # and close to the exact (erf) bin probabilities: the tanh CDF is an approximation
    exact = ref_discretized_ll(x, mean, log_scale, cdf=erf_cdf)
    keep = exact > -6  # bins within ~3 std: the tanh approximation's relative error grows in the tails
    assert keep.sum() > 300
    assert (got[keep] - exact[keep]).abs().max() < 0.05
    # far-away bins are clamped at 1e-12
    far = gd.discretized_gaussian_log_likelihood(torch.zeros(1, dtype=F64), means=torch.full((1,), 0.9, dtype=F64),
                                                 log_scales=torch.full((1,), math.log(0.01), dtype=F64))
    assert far.item() == pytest.approx(math.log(1e-12))
    zs = torch.linspace(-4, 4, 81, dtype=F64)
    assert (gd.approx_standard_normal_cdf(zs) - torch.special.ndtr(zs)).abs().max() < 2e-4
    with pytest.raises(ValueError, match="means"):
        gd.discretized_gaussian_log_likelihood(x, means=mean[:3], log_scales=log_scale)


# ---------------------------------------------------------------- training losses

def ref_losses(ref, out, x0, xt, t, noise, c=4):
    eps, v = out[:, :c], out[:, c:]
    mse = flat_mean((noise - eps) ** 2)
    logvar = ref.learned_logvar(v, t, xt)
    mean = ref.posterior(ref.pred_x0(xt, t, eps), xt, t)[0]
    tm, _, tl = ref.posterior(x0, xt, t)
    vb = []
    for b in range(x0.shape[0]):
        if t[b] == 0:
            nll = -ref_discretized_ll(x0[b], mean[b], 0.5 * logvar[b].expand_as(x0[b]))
            vb.append(nll.mean().item() / math.log(2))
        else:
            vb.append(ref_kl(tm[b], tl[b], mean[b], logvar[b]).mean().item() / math.log(2))
    vb = torch.tensor(vb, dtype=F64)
    return mse, vb


def test_training_losses_values(dit, ref):
    x0, noise, out, t = batch()
    xt = ref.q_sample(x0, t, noise)
    terms = dit.training_losses(out, x0, xt, t, noise)
    mse, vb = ref_losses(ref, out, x0, xt, t, noise)
    assert set(terms) == {"mse", "vb", "loss"}
    close(terms["mse"], mse)
    close(terms["vb"], vb, tol=1e-8)
    close(terms["loss"], mse + vb, tol=1e-8)
    assert (t == 0).any() and (t > 0).any()
    # t = 0 is the decoder NLL: not the KL that the t > 0 rows use
    tm, _, tl = ref.posterior(x0, xt, t)
    p = dit.p_mean_variance(out, xt, t)
    kl0 = flat_mean(ref_kl(tm, tl, p["mean"], p["log_variance"]))[0] / math.log(2)
    assert abs(terms["vb"][0] - kl0) > 1e-3


def test_training_losses_without_learn_sigma(ref):
    diff = GaussianDiffusion(gd.linear_betas(1000), learn_sigma=False)
    x0, noise, out, t = batch()
    xt = ref.q_sample(x0, t, noise)
    terms = diff.training_losses(out[:, :4], x0, xt, t, noise)
    assert set(terms) == {"mse", "loss"}
    close(terms["loss"], flat_mean((noise - out[:, :4]) ** 2))


def test_vb_gradient_reaches_only_the_variance(dit, ref):
    x0, noise, out, t = batch()
    xt = ref.q_sample(x0, t, noise)
    out = out.clone().requires_grad_(True)
    terms = dit.training_losses(out, x0, xt, t, noise)
    g_vb, = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    assert torch.all(g_vb[:, :4] == 0) and (g_vb[:, 4:].abs() > 0).float().mean() > 0.9
    g_mse, = torch.autograd.grad(terms["mse"].sum(), out)
    assert torch.all(g_mse[:, 4:] == 0)
    close(g_mse[:, :4], -2 * (noise - out[:, :4].detach()) / 36)  # d/d eps of mean over C*H*W = 36


def test_rescale_vb():
    betas = gd.linear_betas(1000)
    keep = gd.space_timesteps(1000, "250")
    plain, scaled = gd.respaced(betas, keep), gd.respaced(betas, keep, rescale_vb=True)
    assert gd.create_diffusion("250").rescale_vb is False  # DiT's default: LossType.MSE
    x0, noise, out, _ = batch()
    t = torch.tensor([0, 1, 5, 100, 200, 249])
    xt = plain.q_sample(x0, t, noise)
    a, b = plain.training_losses(out, x0, xt, t, noise), scaled.training_losses(out, x0, xt, t, noise)
    close(b["vb"], a["vb"] * 0.25, tol=1e-12)
    close(b["mse"], a["mse"], tol=0)


# ---------------------------------------------------------------- respacing

def ref_space(T, counts):
    """Plain reading of the official rule: equal sections, fractional stride, python round()."""
    per, extra = divmod(T, len(counts))
    steps, start = [], 0
    for i, c in enumerate(counts):
        size = per + (i < extra)
        stride = 1 if c <= 1 else (size - 1) / (c - 1)
        pos = 0.0
        for _ in range(c):
            steps.append(start + round(pos))
            pos += stride
        start += size
    return set(steps)


def test_space_timesteps_official_values():
    s = sorted(gd.space_timesteps(1000, "250"))
    # recorded from the official space_timesteps(1000, "250")
    assert len(s) == 250 and s[:5] == [0, 4, 8, 12, 16] and s[-1] == 999 and sum(s) == 124875
    assert s[41:43] == [164, 169] and s[124:126] == [497, 502] and s[207:209] == [830, 835]
    assert {b - a for a, b in zip(s, s[1:])} == {4, 5}
    assert gd.space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert gd.space_timesteps(10, "5") == {0, 2, 4, 7, 9}  # 4.5 rounds to 4 (half to even)
    assert gd.space_timesteps(1000, "1000") == set(range(1000))
    for T, counts in [(1000, [250]), (300, [10, 15, 20]), (1000, [100]), (999, [7, 30, 2])]:
        assert gd.space_timesteps(T, counts) == ref_space(T, counts)
        assert gd.space_timesteps(T, ",".join(map(str, counts))) == ref_space(T, counts)
    with pytest.raises(ValueError, match="section_counts"):
        gd.space_timesteps(10, "11")
    with pytest.raises(ValueError, match="section_counts"):
        gd.space_timesteps(1000, "ddim3000")


def test_respaced_keeps_alphas_cumprod(ref):
    betas = gd.linear_betas(1000)
    keep = gd.space_timesteps(1000, "250")
    sp = gd.respaced(betas, keep)
    order = sorted(keep)
    assert sp.num_timesteps == 250 and sp.timestep_map == order
    assert max(abs(a - ref.abar[i]) for a, i in zip(sp.alphas_cumprod.tolist(), order)) < 1e-14
    # beta_k = 1 - abar[i_k] / abar[i_{k-1}]
    assert sp.betas[1] == pytest.approx(1 - ref.abar[4] / ref.abar[0], rel=1e-12)
    t = torch.tensor([0, 1, 42, 249])
    assert sp.model_timesteps(t).tolist() == [0, 4, 169, 999] and sp.model_timesteps(t).dtype == torch.int64
    # a respaced q_sample at step k is the base one at step timestep_map[k]
    x0, noise, _, _ = batch(n=4)
    base = GaussianDiffusion(betas)
    close(sp.q_sample(x0, t, noise), base.q_sample(x0, sp.model_timesteps(t), noise), tol=1e-12)
    with pytest.raises(ValueError, match="use_timesteps"):
        gd.respaced(betas, [0, 1000])
    with pytest.raises(ValueError, match="betas"):
        gd.respaced(betas, [5])  # one step: official's tables are empty there


# ---------------------------------------------------------------- sampling

def analytic_model(calls=None, c=2):
    """out = [0.3 x + t/1000 (eps), tanh(x - 0.5) (variance values)], row by row; records t."""
    def fn(x, t):
        if calls is not None:
            calls.append(t.clone())
        tb = t.to(x.dtype).view(-1, 1, 1, 1) / 1000
        return torch.cat([0.3 * x + tb, torch.tanh(x - 0.5)], dim=1)
    return fn


def ref_loop(sp, ref, fn, z, draw):
    """The ancestral loop written out: model at the original index, then noise, then the step (any number
    of latent channels C: the model returns 2C, eps then the variance values)."""
    x = z
    for k in reversed(range(sp.num_timesteps)):
        orig = sp.timestep_map[k]
        out = fn(x, torch.full((x.shape[0],), orig, dtype=torch.int64))
        noise = draw(x)
        eps, v = out.chunk(2, dim=1)
        a, ap = ref.abar[orig], (ref.abar[sp.timestep_map[k - 1]] if k else 1.0)
        beta = 1 - a / ap
        post_var = beta * (1 - ap) / (1 - a)
        if k == 0:  # clipped: step 1's posterior variance
            a1, a0 = ref.abar[sp.timestep_map[1]], ref.abar[sp.timestep_map[0]]
            post_var = (1 - a1 / a0) * (1 - a0) / (1 - a1)
        logvar = math.log(post_var) + (v + 1) / 2 * (math.log(beta) - math.log(post_var))
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        mean = beta * math.sqrt(ap) / (1 - a) * x0 + (1 - ap) * math.sqrt(1 - beta) / (1 - a) * x
        x = mean + (k > 0) * torch.exp(0.5 * logvar) * noise
    return x


def test_p_sample_loop_matches_direct_loop(ref):
    sp = gd.create_diffusion("10")
    z = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    calls = []
    torch.manual_seed(7)
    got = sp.p_sample_loop(analytic_model(calls), z)
    torch.manual_seed(7)
    want = ref_loop(sp, ref, analytic_model(), z, torch.randn_like)
    close(got, want, tol=1e-10)
    assert [c.tolist() for c in calls] == [[i] * 3 for i in sorted(sp.timestep_map, reverse=True)]
    assert all(c.dtype == torch.int64 for c in calls) and calls[0][0] == 999 and calls[-1][0] == 0


def test_p_sample_loop_per_row_generators(ref):
    sp = gd.create_diffusion("10")
    z = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(3), dtype=F64)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    got = sp.p_sample_loop(analytic_model(), z, generators=gens([10, 11, 12]))
    g = gens([10, 11, 12])
    want = ref_loop(sp, ref, analytic_model(), z,
                    lambda x: torch.stack([torch.randn(x.shape[1:], generator=gb, dtype=F64) for gb in g]))
    close(got, want, tol=1e-10)
    # row 1 alone, or in another batch, with its own generator: the same sample
    alone = sp.p_sample_loop(analytic_model(), z[1:2], generators=gens([11]))
    other = sp.p_sample_loop(analytic_model(), torch.cat([z[1:2], -z]), generators=gens([11, 1, 2, 3]))
    assert torch.equal(alone[0], got[1]) and torch.equal(other[0], got[1])
    # float32 state stays float32
    assert sp.p_sample_loop(analytic_model(), z.float(), generators=gens([1, 2, 3])).dtype == torch.float32
    with pytest.raises(ValueError, match="generators"):
        sp.p_sample_loop(analytic_model(), z, generators=gens([1]))


def test_p_sample_last_step_adds_no_noise(dit):
    _, noise, out, _ = batch()
    xt = noise.clone()
    t = torch.tensor([0, 0, 3, 3, 0, 9])
    s = dit.p_sample(out, xt, t, noise)["sample"]
    mean = dit.p_mean_variance(out, xt, t)["mean"]
    assert torch.equal(s[t == 0], mean[t == 0]) and not torch.allclose(s[t > 0], mean[t > 0])


# ---------------------------------------------------------------- classifier-free guidance

class Labelled(torch.nn.Module):
    """out = [a x + e[y] (C eps channels), tanh(x + e[y]) (C variance channels)], with t added to eps."""

    def __init__(self, c=4, classes=5):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.e = torch.randn(classes + 1, c, dtype=F64, generator=g)
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((x.clone(), t.clone(), y.clone()))
        ey = self.e[y].view(*y.shape, -1, 1, 1)
        return torch.cat([0.5 * x + ey + t.view(-1, 1, 1, 1) / 1000, torch.tanh(x + ey)], dim=1)


def test_apply_cfg_guides_first_three_channels_by_default():
    g = torch.Generator().manual_seed(5)
    out = torch.randn(4, 8, 2, 2, generator=g, dtype=F64)  # 2 cond rows, 2 uncond rows, C = 4
    cond, uncond = out[:2], out[2:]
    s = 4.0
    got = gd.apply_cfg(out, s)
    guided = uncond + s * (cond - uncond)
    close(got[:2, :3], guided[:, :3], tol=1e-12)
    close(got[2:, :3], guided[:, :3], tol=1e-12)
    assert torch.equal(got[:, 3:], out[:, 3:])  # eps channel 3 and the variance: each half's own
    every = gd.apply_cfg(out, s, guided_channels=None, in_channels=4)
    close(every[:2, :4], guided[:, :4], tol=1e-12)
    assert torch.equal(every[:, 4:], out[:, 4:])
    assert torch.equal(gd.apply_cfg(out, s, guided_channels=4, in_channels=4), every)
    with pytest.raises(ValueError, match="guided_channels"):
        gd.apply_cfg(out, s, guided_channels=5, in_channels=4)
    with pytest.raises(ValueError, match="guided_channels"):
        gd.apply_cfg(out[:, :4], s, guided_channels=3, in_channels=2)


def test_cfg_model_fn_single_and_doubled():
    model = Labelled()
    y = torch.tensor([1, 3])
    x = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(6), dtype=F64)
    t = torch.tensor([999, 999])
    fn = gd.cfg_model_fn(model, y, 1.5, null_class=5)
    out = fn(x, t)
    xc, tc, yc = model.calls[-1]
    assert torch.equal(xc, torch.cat([x, x])) and yc.tolist() == [1, 3, 5, 5] and tc.tolist() == [999] * 4
    full = model(torch.cat([x, x]), torch.cat([t, t]), yc)
    cond, uncond = full[:2], full[2:]
    close(out[:, :3], uncond[:, :3] + 1.5 * (cond[:, :3] - uncond[:, :3]), tol=1e-12)
    assert torch.equal(out[:, 3:], cond[:, 3:])
    # doubled: official forward_with_cfg on the 2N batch; its second half of x is ignored
    fn2 = gd.cfg_model_fn(model, y, 1.5, null_class=5, doubled=True)
    out2 = fn2(torch.cat([x, x + 100.0]), torch.cat([t, t]))
    assert torch.equal(model.calls[-1][0], torch.cat([x, x]))
    assert torch.equal(out2[:2], out) and torch.equal(out2[2:, :3], out[:, :3])
    every = gd.cfg_model_fn(model, y, 1.5, null_class=5, guided_channels=None)(x, t)
    close(every[:, :4], uncond[:, :4] + 1.5 * (cond[:, :4] - uncond[:, :4]), tol=1e-12)


def test_cfg_sampling_single_equals_doubled_first_half():
    sp = gd.create_diffusion("5")
    model = Labelled()
    y = torch.tensor([0, 2, 4])
    z = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(8), dtype=F64)
    seeds = [20, 21, 22]
    single = sp.p_sample_loop(gd.cfg_model_fn(model, y, 4.0, 5), z,
                              generators=[torch.Generator().manual_seed(s) for s in seeds])
    doubled = sp.p_sample_loop(gd.cfg_model_fn(model, y, 4.0, 5, doubled=True), torch.cat([z, z]),
                               generators=[torch.Generator().manual_seed(s) for s in seeds + [1, 2, 3]])
    close(single, doubled[:3], tol=1e-12)


# ---------------------------------------------------------------- argument errors

def test_errors_name_the_argument(dit):
    x0, noise, out, t = batch()
    with pytest.raises(ValueError, match="model_output"):
        dit.p_mean_variance(out[:, :4], x0, t)
    with pytest.raises(TypeError, match="t:"):
        dit.q_sample(x0, t.float(), noise)
    with pytest.raises(ValueError, match="t:"):
        dit.q_sample(x0, t[:2], noise)
    with pytest.raises(ValueError, match="noise"):
        dit.q_sample(x0, t, noise[:, :2])
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion([0.1, 0.0, 0.2])
    with pytest.raises(ValueError, match="timestep_map"):
        GaussianDiffusion([0.1, 0.2], timestep_map=[0])
    with pytest.raises(TypeError, match="progress"):
        gd.create_diffusion("2").p_sample_loop(analytic_model(), torch.zeros(1, 2, 1, 1), progress="yes")
