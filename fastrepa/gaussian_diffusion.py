"""DDPM Gaussian diffusion as DiT (facebookresearch/DiT, diffusion/) trains and samples with it.

Semantics of the official code (itself from OpenAI's IDDPM / ADM), written anew:
- `linear_betas(T)`: `get_named_beta_schedule("linear", T)`, betas = linspace(s * 1e-4, s * 0.02, T) in
  float64 with s = 1000 / T.
- `GaussianDiffusion`: EPSILON mean prediction; variance LEARNED_RANGE when `learn_sigma` (the model's
  output has 2C channels: eps, then v in [-1, 1] interpolating the log variance between the clipped
  posterior variance and beta), else FIXED_LARGE (official `sigma_small=False`). The schedule tables
  are float64 numpy arrays as official; a value gathered for a batch of timesteps comes out shaped
  [N, 1, ...] on the input's device, in the input's dtype (float32 for half / bfloat16 inputs: the
  official `_extract_into_tensor` always gives float32).
- Unlike the official methods, `p_mean_variance`, `p_sample` and `training_losses` take the model's
  OUTPUT, not the model: the caller runs the model on `diffusion.model_timesteps(t)` (see below).
- `training_losses`: official `LossType.MSE` with a learned sigma, which is what DiT's
  `create_diffusion` picks by default: mse = mean_flat((noise - eps)^2); vb = the variational-bound
  term in bits per dimension, computed with eps detached (the bound trains only the variance), the
  decoder NLL at t == 0 and KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) elsewhere; loss = mse + vb.
  `rescale_vb=True` is official `LossType.RESCALED_MSE` (`rescale_learned_sigmas=True`): vb times
  num_timesteps / 1000 (1 for DiT's 1000 training steps anyway).
- Respacing (`space_timesteps`, `respaced`: official `SpacedDiffusion`): the kept steps' betas are
  recomputed from their alphas_cumprod, and `timestep_map` holds their indices in the original
  process. The model always receives those ORIGINAL indices (official `_WrappedModel`, whose
  `rescale_timesteps` is commented out in DiT): `model_timesteps(t)` maps them.
- `p_sample_loop`: ancestral sampling from T - 1 down to 0, no noise added at t == 0 (official
  `p_sample`'s nonzero_mask); DiT's sample.py / sample_ddp.py use 250 respaced steps, clip_denoised=False.
- `forward_with_cfg` / `cfg_model_fn` / `apply_cfg`: DiT's `forward_with_cfg`, guiding only the first
  3 eps channels by default (see `apply_cfg`).
"""
from __future__ import annotations

import math
import operator

import numpy as np
import torch

DIT_GUIDED_CHANNELS = 3  # DiT's forward_with_cfg guides model_out[:, :3] "for exact reproducibility"


# ---------------------------------------------------------------- schedules and respacing

def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """DiT's linear schedule (official `get_named_beta_schedule("linear", T)`): float64
    linspace(scale * 1e-4, scale * 0.02, T) with scale = 1000 / T (Ho et al., extended to any T)."""
    from fastrepa.sampling import positive_int  # not at the top: sampling -> objectives -> this module
    num_timesteps = positive_int("num_timesteps", num_timesteps)
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """The steps of a `num_timesteps` process that a respaced process keeps (official `space_timesteps`).

    `section_counts` is a list of step counts (or a comma-separated string of them, or one int, our
    convenience): the process is cut into len(section_counts) equal sections (the first
    num_timesteps % len sections one step longer) and section i keeps section_counts[i] steps at the
    fractional stride (size - 1) / (count - 1) from its start, each rounded with Python's round()
    (half to even; a count of 1 keeps the section's first step). "ddimN" keeps range(0, T, k) for the
    first integer stride k giving exactly N steps. "250" of 1000 gives 0, 4, 8, ..., 164, 169, ...,
    999. Returns a set, as official.
    """
    from fastrepa.sampling import positive_int  # not at the top: sampling -> objectives -> this module
    num_timesteps = positive_int("num_timesteps", num_timesteps)
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"section_counts={section_counts!r}: cannot take exactly {desired} of "
                             f"{num_timesteps} steps with an integer stride")
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"section_counts={section_counts!r}: expected 'ddimN' or comma-separated "
                             "integers") from None
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    section_counts = [int(c) for c in section_counts]
    if not section_counts or any(c < 1 for c in section_counts):
        raise ValueError(f"section_counts={section_counts!r}: expected one or more counts >= 1")
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"section_counts={section_counts!r}: cannot take {count} steps from a "
                             f"section of {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))
            position += stride  # accumulated, as official (not k * stride)
        start += size
    return set(steps)


def respaced(base_betas, use_timesteps, *, learn_sigma: bool = True, rescale_vb: bool = False) -> "GaussianDiffusion":
    """The process that keeps only `use_timesteps` of the one with `base_betas` (official
    `SpacedDiffusion`): for the kept steps i_0 < i_1 < ..., beta_k = 1 - abar[i_k] / abar[i_{k-1}]
    (abar[i_{-1}] = 1), so the kept alphas_cumprod are the base ones; `timestep_map` = [i_0, i_1, ...]."""
    base = GaussianDiffusion(base_betas, learn_sigma=learn_sigma)
    keep = sorted({operator.index(i) for i in use_timesteps})
    if not keep:
        raise ValueError("use_timesteps: empty, keep at least 2 steps")
    if keep[0] < 0 or keep[-1] >= base.num_timesteps:
        raise ValueError(f"use_timesteps: steps must lie in [0, {base.num_timesteps}), got "
                         f"{keep[0]}..{keep[-1]}")
    kept = base.alphas_cumprod[keep]
    betas = 1.0 - kept / np.append(1.0, kept[:-1])
    return GaussianDiffusion(betas, learn_sigma=learn_sigma, timestep_map=keep, rescale_vb=rescale_vb)


def create_diffusion(timestep_respacing="", *, diffusion_steps: int = 1000, learn_sigma: bool = True,
                     rescale_vb: bool = False) -> "GaussianDiffusion":
    """Official `create_diffusion` with DiT's defaults (linear schedule, EPSILON, LEARNED_RANGE, MSE loss):
    "" or None = all `diffusion_steps` (training), "250" = DiT's sampling; `rescale_vb` is
    `rescale_learned_sigmas` (LossType.RESCALED_MSE)."""
    betas = linear_betas(diffusion_steps)
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    return respaced(betas, space_timesteps(diffusion_steps, timestep_respacing), learn_sigma=learn_sigma,
                    rescale_vb=rescale_vb)


# ---------------------------------------------------------------- likelihood helpers

def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first (official `mean_flat`)."""
    return x.mean(dim=list(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats (official `normal_kl`); broadcasts
    (numbers are allowed where one argument is a tensor)."""
    like = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if like is None:
        raise TypeError("normal_kl: at least one argument must be a tensor")
    logvar1, logvar2 = (v if isinstance(v, torch.Tensor) else torch.tensor(v).to(like) for v in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF the official code uses (not erf):
    0.5 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log probability (nats, elementwise) of the 8-bit bin of x under N(means, e^(2 log_scales)), as
    official: x is taken as uint8 values scaled to [-1, 1] (bins of width 2/255; the CDF is
    `approx_standard_normal_cdf`), the edge bins x < -0.999 and x > 0.999 extend to -inf / +inf, and each
    probability is clamped to >= 1e-12 before the log. DiT applies it to VAE latents all the same."""
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(f"discretized_gaussian_log_likelihood: x {tuple(x.shape)}, means "
                         f"{tuple(means.shape)} and log_scales {tuple(log_scales.shape)} must have one shape")
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# ---------------------------------------------------------------- the process

class GaussianDiffusion:
    """A discrete Gaussian diffusion with epsilon prediction (official `GaussianDiffusion`, MSE loss).

    `betas`: 1-D, each in (0, 1], at least 2 (the official tables need a second step); kept as float64
    numpy with every derived table (alphas_cumprod, posterior_variance, ...) under the official names.
    `learn_sigma`: LEARNED_RANGE variance (model output [N, 2C, ...]) or FIXED_LARGE (output [N, C, ...];
    variance beta_t, with the posterior variance at step 1 standing in at t = 0).
    `timestep_map`: the original step index of each step (default 0..T-1); see `model_timesteps`.
    `rescale_vb`: official RESCALED_MSE (vb * num_timesteps / 1000); False is official MSE, DiT's default.
    """

    def __init__(self, betas, learn_sigma: bool = True, timestep_map=None, *, rescale_vb: bool = False):
        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1:
            raise ValueError(f"betas: expected a 1-D array, got shape {betas.shape}")
        if betas.shape[0] < 2:
            raise ValueError(f"betas: {betas.shape[0]} step(s); need at least 2 (the clipped posterior "
                             "log variance at t = 0 is taken from step 1, as official)")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas: every beta must lie in (0, 1]")
        self.betas = betas
        self.learn_sigma = bool(learn_sigma)
        self.rescale_vb = bool(rescale_vb)
        self.num_timesteps = T = int(betas.shape[0])
        if timestep_map is None:
            timestep_map = range(T)
        self.timestep_map = [operator.index(i) for i in timestep_map]
        if len(self.timestep_map) != T:
            raise ValueError(f"timestep_map: {len(self.timestep_map)} entries for {T} steps")

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # posterior_variance[0] = 0: its log is clipped to step 1's value, as official
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        # FIXED_LARGE: beta_t, with posterior_variance[1] at t = 0 "to get a better decoder log likelihood"
        self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self._tables: dict = {}

    # -- gathering

    def _gather(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table `name` at timesteps t, shaped [N, 1, ...] for `like`, on its device in its dtype
        (float32 if that is a half type: official gathers float32)."""
        key = (name, t.device)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = torch.from_numpy(getattr(self, name)).to(t.device)
        dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
        return table[t].to(dtype).view(-1, *([1] * (like.dim() - 1)))

    def _check_t(self, t, x, name="t"):
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"{name}: expected an integer tensor of timestep indices, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"{name}: shape {tuple(t.shape)}, expected [{x.shape[0]}] (one per sample)")

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The ORIGINAL timestep indices (int64, t's device) the model sees for steps t of this process
        (official `_WrappedModel`: timestep_map[t]; without rescale_timesteps, as DiT)."""
        key = ("timestep_map", t.device)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = torch.tensor(self.timestep_map, dtype=torch.int64, device=t.device)
        return table[t.long()]

    # -- forward process

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (official `q_sample`)."""
        self._check_t(t, x0)
        if noise.shape != x0.shape:
            raise ValueError(f"noise: shape {tuple(noise.shape)}, expected x0's {tuple(x0.shape)}")
        return (self._gather("sqrt_alphas_cumprod", t, x0) * x0
                + self._gather("sqrt_one_minus_alphas_cumprod", t, x0) * noise)

    def q_posterior_mean_variance(self, x0, x_t, t):
        """(mean, variance, clipped log variance) of q(x_{t-1} | x_t, x_0) (official
        `q_posterior_mean_variance`): mean = coef1_t x0 + coef2_t x_t; variance and log variance [N, 1, ...]."""
        self._check_t(t, x_t)
        if x0.shape != x_t.shape:
            raise ValueError(f"x0: shape {tuple(x0.shape)}, expected x_t's {tuple(x_t.shape)}")
        mean = self._gather("posterior_mean_coef1", t, x_t) * x0 + self._gather("posterior_mean_coef2", t, x_t) * x_t
        return (mean, self._gather("posterior_variance", t, x_t),
                self._gather("posterior_log_variance_clipped", t, x_t))

    # -- reverse process

    def split_output(self, model_output: torch.Tensor, x_t: torch.Tensor):
        """(eps, var_values or None): the model's [N, 2C, ...] output split at C with learn_sigma."""
        c = x_t.shape[1]
        want = (x_t.shape[0], 2 * c if self.learn_sigma else c, *x_t.shape[2:])
        if tuple(model_output.shape) != want:
            raise ValueError(f"model_output: shape {tuple(model_output.shape)}, expected {want} for x_t "
                             f"{tuple(x_t.shape)} (learn_sigma={self.learn_sigma})")
        if self.learn_sigma:
            return model_output[:, :c], model_output[:, c:]
        return model_output, None

    def p_mean_variance(self, model_output, x_t, t, clip_denoised: bool = False):
        """p(x_{t-1} | x_t) from the model's output at x_t (official `p_mean_variance`, EPSILON mean).

        Returns {"mean", "variance", "log_variance", "pred_xstart"}: pred_xstart = sqrt(1/abar_t) x_t -
        sqrt(1/abar_t - 1) eps (clamped to [-1, 1] with `clip_denoised`; DiT samples without), mean the
        posterior mean at pred_xstart. LEARNED_RANGE: frac = (v + 1) / 2, log_variance = frac log(beta_t)
        + (1 - frac) posterior_log_variance_clipped_t; FIXED_LARGE: `fixed_large_variance`.
        """
        self._check_t(t, x_t)
        eps, var_values = self.split_output(model_output, x_t)
        if var_values is not None:
            min_log = self._gather("posterior_log_variance_clipped", t, x_t)
            max_log = self._gather("log_betas", t, x_t)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            variance = self._gather("fixed_large_variance", t, x_t).expand_as(x_t)
            log_variance = self._gather("fixed_large_log_variance", t, x_t).expand_as(x_t)
        pred_xstart = (self._gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                       - self._gather("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_sample(self, model_output, x_t, t, noise, clip_denoised: bool = False):
        """One ancestral step (official `p_sample`): {"sample": mean + [t != 0] exp(log_variance / 2) noise,
        "pred_xstart"}; no noise is added where t == 0."""
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
        nonzero = (t != 0).to(out["mean"].dtype).view(-1, *([1] * (x_t.dim() - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise.to(out["mean"].dtype)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    # -- training

    def vb_terms_bpd(self, model_output, x0, x_t, t):
        """The variational-bound term for step t in bits per dimension, per sample (official
        `_vb_terms_bpd`, clip_denoised=False): the decoder NLL -log p(x0 | x_1) (8-bit discretized) where
        t == 0, KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) elsewhere; mean over dims / log 2. Both are
        computed for every sample and selected, as official."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, means=out["mean"], log_scales=0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model_output, x0, x_t, t, noise) -> dict:
        """Per-sample losses of official `training_losses` with LossType.MSE (DiT's default) or
        RESCALED_MSE (`rescale_vb`), for the model's output at (x_t, model_timesteps(t)) where
        x_t = q_sample(x0, t, noise).

        Returns {"mse", "vb", "loss"} ([N] each; without "vb" when not learn_sigma, loss = mse):
        mse = mean_flat((noise - eps)^2); vb = `vb_terms_bpd` on cat([eps.detach(), var_values]), so its
        gradient reaches only the variance values and mse's only eps; times num_timesteps / 1000 with
        `rescale_vb`; loss = mse + vb.
        """
        self._check_t(t, x_t)
        if not x0.shape == x_t.shape == noise.shape:
            raise ValueError(f"x0 {tuple(x0.shape)}, x_t {tuple(x_t.shape)} and noise {tuple(noise.shape)} "
                             "must have one shape")
        eps, var_values = self.split_output(model_output, x_t)
        terms = {"mse": mean_flat((noise - eps) ** 2)}
        if var_values is None:
            terms["loss"] = terms["mse"]
            return terms
        frozen = torch.cat([eps.detach(), var_values], dim=1)
        vb = self.vb_terms_bpd(frozen, x0, x_t, t)
        if self.rescale_vb:
            vb = vb * (self.num_timesteps / 1000.0)
        terms["vb"] = vb
        terms["loss"] = terms["mse"] + vb
        return terms

    # -- sampling

    @torch.no_grad()
    def p_sample_loop(self, model_fn, noise: torch.Tensor, *, generators=None, clip_denoised: bool = False,
                      progress=None) -> torch.Tensor:
        """Ancestral sampling from x_{T-1} = `noise` down to t = 0 (official `p_sample_loop`); returns x_0.

        At step i (T-1, ..., 0) `model_fn(x, t_model)` is called with t_model = model_timesteps(i)
        repeated per row (int64, the ORIGINAL indices) and returns the model output (a tuple gives its
        element 0); then the step noise is drawn (after the model, as official) and `p_sample` applied:
        T draws, the last one unused (t = 0 adds no noise). Noise: with `generators` (a list of
        torch.Generator, one per row) row b's draws come from generator b alone (float64
        `fastrepa.sampling.row_noise`, cast to the state's dtype), so a sample does not depend on its
        batch; otherwise torch.randn_like(x) from the global RNG, as official. `progress`: None/False,
        True (a tqdm bar) or a callable wrapping the step iterable.
        """
        x = noise
        n = x.shape[0]
        steps = list(range(self.num_timesteps))[::-1]
        if progress is True:
            from tqdm.auto import tqdm
            steps = tqdm(steps)
        elif callable(progress):
            steps = progress(steps)
        elif progress not in (None, False):
            raise TypeError(f"progress: expected None, a bool or a callable, got {type(progress).__name__}")
        row_draws = None
        if generators is not None:
            from fastrepa.sampling import row_noise
            generators = list(generators)
            if len(generators) != n:
                raise ValueError(f"generators: {len(generators)} for a batch of {n}; need one per row")
            row_draws = row_noise(generators, x.shape[1:], self.num_timesteps, x.device)
        try:
            for i in steps:
                t = torch.full((n,), i, dtype=torch.int64, device=x.device)
                out = model_fn(x, self.model_timesteps(t))
                if isinstance(out, (tuple, list)):
                    out = out[0]
                z = next(row_draws).to(x.dtype) if row_draws is not None else torch.randn_like(x)
                x = self.p_sample(out, x, t, z, clip_denoised=clip_denoised)["sample"]
        finally:
            if row_draws is not None:
                row_draws.close()
        return x


# ---------------------------------------------------------------- classifier-free guidance

def apply_cfg(model_output: torch.Tensor, cfg_scale: float, guided_channels: int | None = DIT_GUIDED_CHANNELS,
              in_channels: int | None = None) -> torch.Tensor:
    """DiT's `forward_with_cfg` combination of a doubled batch's output [2N, K, ...] (rows cat([cond,
    uncond])): eps_g = uncond + cfg_scale (cond - uncond) on channels [:guided_channels], written to both
    halves; every other channel (the rest of eps and the learned variance) stays as each half computed it.

    guided_channels: 3 is DiT's default ("for exact reproducibility", NOT all 4 latent channels: channel
    3 of eps then stays the conditional one in the first half); None (or `in_channels`) guides all
    `in_channels` eps channels, the standard CFG DiT leaves commented out. It must not exceed
    `in_channels` when that is given (guiding variance channels would be meaningless).
    """
    if model_output.shape[0] % 2:
        raise ValueError(f"model_output: {model_output.shape[0]} rows, expected a doubled batch (cond, uncond)")
    if guided_channels is None:
        if in_channels is None:
            raise ValueError("guided_channels=None (all channels) needs in_channels")
        guided_channels = in_channels
    guided_channels = operator.index(guided_channels)
    limit = in_channels if in_channels is not None else model_output.shape[1]
    if not 1 <= guided_channels <= limit:
        raise ValueError(f"guided_channels={guided_channels}: expected 1..{limit}")
    eps, rest = model_output[:, :guided_channels], model_output[:, guided_channels:]
    cond, uncond = eps.chunk(2)
    guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([guided, guided]), rest], dim=1)


def forward_with_cfg(model, x, t, y, cfg_scale: float, guided_channels: int | None = DIT_GUIDED_CHANNELS):
    """DiT's `DiT.forward_with_cfg` for any model(x, t, y): x, t, y are the doubled batch (y =
    cat([labels, null labels])); the model runs on cat([x[:N], x[:N]]) (the second half of x is
    ignored, as official) and the output is `apply_cfg`'s ([2N, ...], both halves' guided eps equal)."""
    half = x[: len(x) // 2]
    out = model(torch.cat([half, half]), t, y)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return apply_cfg(out, cfg_scale, guided_channels, in_channels=x.shape[1])


def cfg_model_fn(model, y: torch.Tensor, cfg_scale: float, null_class: int, *,
                 guided_channels: int | None = DIT_GUIDED_CHANNELS, doubled: bool = False):
    """A `model_fn(x, t_model)` for `GaussianDiffusion.p_sample_loop` that samples class `y` ([N]) with
    DiT's classifier-free guidance (`forward_with_cfg`, null label `null_class`, 1000 for ImageNet).

    doubled=False: the loop runs on the N rows; each call runs the model on cat([x, x]) with labels
    cat([y, null]) and returns the conditional half of `apply_cfg`'s output ([N, ...]), i.e. exactly
    the rows official sampling keeps. doubled=True: the loop runs on the official doubled batch
    (noise = cat([z, z]), 2N rows, `forward_with_cfg` as is; keep the first N rows of the result), which
    with the global RNG draws the same step noise as DiT's sample.py. DiT's sample_ddp.py runs the
    plain conditional model instead when cfg_scale <= 1; that choice is the caller's.
    """
    if y.dim() != 1:
        raise ValueError(f"y: shape {tuple(y.shape)}, expected [N] class labels")
    y2 = torch.cat([y, torch.full_like(y, int(null_class))])

    def guided_doubled(x, t):
        return forward_with_cfg(model, x, t, y2, cfg_scale, guided_channels)

    def guided(x, t):
        return forward_with_cfg(model, torch.cat([x, x]), torch.cat([t, t]), y2, cfg_scale,
                                guided_channels)[: x.shape[0]]

    return guided_doubled if doubled else guided


__all__ = ["DIT_GUIDED_CHANNELS", "GaussianDiffusion", "apply_cfg", "approx_standard_normal_cdf",
           "cfg_model_fn", "create_diffusion", "discretized_gaussian_log_likelihood", "forward_with_cfg",
           "linear_betas", "mean_flat", "normal_kl", "respaced", "space_timesteps"]
