"""The official REPA samplers (samplers.py): Euler / Heun ODE and Euler-Maruyama SDE, with CFG on a
guidance interval. Same signatures and semantics, plus keyword-only `null_class` and `generator`.
The SDE's `generator` may also be a list of generators, one per row of the batch: row b's noise then
comes from generator b alone, so a sample's trajectory does not depend on the batch it is sampled in
(generate.py seeds one per sample index; `row_noise` below).

Shared semantics (official):
- the state is float64; the model sees it cast to `latents.dtype`, with time = t_cur (a [batch] tensor
  in `latents.dtype`); its output is cast back to float64 (a tuple output such as SiT's
  `(out, zs)` gives element 0, so both `model` and `model.velocity` work; `model.velocity` skips the
  projectors and is the faster choice);
- classifier-free guidance only when cfg_scale > 1 and guidance_low <= t_cur <= guidance_high: the
  model runs once on cat([x, x]) with labels cat([y, y_null]) and d = d_uncond + cfg (d_cond - d_uncond);
  outside the interval it runs on the N conditional samples only;
- y_null is `null_class`, by default the model's `num_classes` (REPA hard-codes 1000 = ImageNet).
The samplers do not change the model's mode: put it in eval() first (in train mode SiT drops labels).

Speed: the time grid, the per-step time tensors, the doubled labels and the SDE score coefficients are
built once before the loop; each step compares python floats, so nothing in the loop waits for the GPU.
"""
import contextlib
import operator
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from fastrepa.models import unwrap
from fastrepa.objectives.interpolants import check_path_type, score_coefficients

SDE_LAST_T = 0.04  # the SDE grid runs linspace(1, 0.04, num_steps) and then a noise-free step to 0


def positive_int(what: str, value) -> int:
    """`value` as an int >= 1, or a ValueError naming `what` (a step or timestep count)."""
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{what}={value} must be >= 1")
    return value


def _check(name, latents, y, num_steps, guidance_low, guidance_high, path_type):
    num_steps = positive_int(f"{name}: num_steps", num_steps)
    check_path_type(path_type)
    if not guidance_low <= guidance_high:
        raise ValueError(f"{name}: guidance_low={guidance_low} must be <= guidance_high={guidance_high} "
                         "(CFG applies where guidance_low <= t <= guidance_high)")
    if y.dim() != 1 or y.shape[0] != latents.shape[0]:
        raise ValueError(f"{name}: labels y of shape {tuple(y.shape)} must be [{latents.shape[0]}], one per "
                         f"latent of shape {tuple(latents.shape)}")
    return num_steps


class _Velocity:
    """Calls the model at grid point i on the float64 state x, with or without the CFG doubling."""

    def __init__(self, model, latents, y, t_steps, cfg_scale, null_class):
        self.model = model
        self.dtype = latents.dtype
        self.n = latents.shape[0]
        self.y = y
        self.cfg_scale = cfg_scale
        guided_ever = cfg_scale > 1.0
        if guided_ever:
            if null_class is None:
                null_class = getattr(unwrap(model), "num_classes", 1000)
            self.y_cfg = torch.cat([y, torch.full_like(y, int(null_class))])
        width = 2 * self.n if guided_ever else self.n
        # Official: ones(batch, float64) * t_cur, then cast to latents.dtype on the device.
        t = t_steps.to(device=latents.device).to(self.dtype)
        self.times = t[:, None].expand(-1, width).contiguous()  # row i: the time input at grid point i

    def __call__(self, x, i, guided):
        x_in = x.to(self.dtype)
        if guided:
            out = self.model(torch.cat([x_in, x_in]), self.times[i], self.y_cfg)
        else:
            out = self.model(x_in, self.times[i, :self.n], self.y)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.to(torch.float64)

    def combine(self, d):
        """CFG on a doubled drift: d_uncond + cfg (d_cond - d_uncond)."""
        d_cond, d_uncond = d.chunk(2)
        return d_uncond + self.cfg_scale * (d_cond - d_uncond)


def _noise_threads(rows: int) -> int:
    """Threads that fill the per-row noise: one per 16 rows, at most 8 and the usable CPUs."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus, -(-rows // 16)))


def row_noise(generators, row_shape, count: int, device=None):
    """Yield `count` float64 standard-normal tensors [len(generators), *row_shape] (on `device`, default
    the generators' device) whose row b is generator b's next `torch.randn(row_shape, dtype=float64)`.

    Row b depends on generator b alone: the same seeded generator gives the same rows whatever the
    batch around it. CPU generators are drawn by a few threads (torch's RNG releases the GIL; each
    generator is touched by one thread at a time, so the values do not depend on the thread count), and
    draw k+1 starts as soon as draw k is handed out, so it overlaps the caller's work (the model call).
    Generators on an accelerator are drawn in the calling thread, on its current stream.
    """
    gens = list(generators)
    if not gens:
        raise ValueError("row_noise: no generators")
    for g in gens:
        if not isinstance(g, torch.Generator):
            raise TypeError(f"row_noise: expected torch.Generator objects, got {type(g).__name__}")
    gdev = gens[0].device
    if any(g.device != gdev for g in gens):
        raise ValueError(f"row_noise: generators on different devices {sorted({str(g.device) for g in gens})}")
    device = torch.device(device) if device is not None else gdev
    row_shape = tuple(row_shape)

    def fill(out, rows):
        for b in rows:
            out[b].normal_(generator=gens[b])  # == torch.randn(row_shape, generator=gens[b], dtype=float64)

    def empty():
        return torch.empty((len(gens), *row_shape), dtype=torch.float64, device=gdev)

    if gdev.type != "cpu":
        for _ in range(count):
            out = empty()
            fill(out, range(len(gens)))
            yield out.to(device)
        return
    threads = _noise_threads(len(gens))
    bounds = [len(gens) * k // threads for k in range(threads + 1)]
    chunks = [range(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    with ThreadPoolExecutor(max_workers=len(chunks), thread_name_prefix="row_noise") as pool:
        def submit():
            out = empty()
            return out, [pool.submit(fill, out, rows) for rows in chunks]

        pending = submit() if count > 0 else None
        for k in range(count):
            out, futures = pending
            for f in futures:
                f.result()
            pending = submit() if k + 1 < count else None  # every generator is idle again: start the next
            yield out.to(device)


def _guided(t_list, cfg_scale, guidance_low, guidance_high):
    return [cfg_scale > 1.0 and guidance_low <= t <= guidance_high for t in t_list]


def euler_sampler(model, latents, y, num_steps=20, heun=False, cfg_scale=1.0, guidance_low=0.0,
                  guidance_high=1.0, path_type="linear", *, null_class=None, generator=None):
    """Deterministic probability-flow ODE from t=1 (noise `latents`) to t=0; returns the float64 state.

    Grid t = linspace(1, 0, num_steps + 1) (float64). Each step is Euler x += (t_next - t_cur) v; with
    `heun`, every step but the last adds Heun's corrector (the model at t_next on the Euler point, steps
    averaged), whose CFG on/off follows t_cur as in the official code. `path_type` is accepted for
    compatibility (the velocity ODE does not depend on it) and `generator` is unused (no randomness).
    """
    num_steps = _check("euler_sampler", latents, y, num_steps, guidance_low, guidance_high, path_type)
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    ts = t_steps.tolist()
    guided = _guided(ts, cfg_scale, guidance_low, guidance_high)
    velocity = _Velocity(model, latents, y, t_steps, cfg_scale, null_class)
    x = latents.to(torch.float64)
    with torch.no_grad():
        for i in range(num_steps):
            dt = ts[i + 1] - ts[i]
            d = velocity(x, i, guided[i])
            if guided[i]:
                d = velocity.combine(d)
            x_next = x + dt * d
            if heun and i < num_steps - 1:
                d_prime = velocity(x_next, i + 1, guided[i])
                if guided[i]:
                    d_prime = velocity.combine(d_prime)
                x_next = x + dt * (0.5 * d + 0.5 * d_prime)
            x = x_next
    return x


def euler_maruyama_sampler(model, latents, y, num_steps=20, heun=False, cfg_scale=1.0, guidance_low=0.0,
                           guidance_high=1.0, path_type="linear", *, null_class=None, generator=None):
    """Reverse SDE with diffusion 2t from t=1 (noise `latents`) to t=0; returns the float64 state.

    Grid t = linspace(1, 0.04, num_steps) then 0. For each step but the last: eps ~ N(0, I) is drawn
    (float64, before the model call; from `generator` on its device when given, else the global RNG;
    with a list of generators, one per row, row b of every step's eps is generator b's next
    randn(latents.shape[1:]), see `row_noise`),
    score = score_from_velocity(v, x, t_cur, path_type), drift d = v - 0.5 * 2 t_cur * score (CFG
    combines the drifts), x += d dt + sqrt(2 t_cur) eps sqrt(|dt|). The last step (0.04 -> 0) is the
    mean only, without noise. So num_steps model evaluations (twice the batch where CFG applies) and
    num_steps - 1 noise draws; num_steps=1 is one noise-free step from 1 to 0. `heun` is unused, as in
    the official code.
    """
    num_steps = _check("euler_maruyama_sampler", latents, y, num_steps, guidance_low, guidance_high, path_type)
    t_steps = torch.cat([torch.linspace(1.0, SDE_LAST_T, num_steps, dtype=torch.float64),
                         torch.zeros(1, dtype=torch.float64)])
    ts = t_steps.tolist()
    guided = _guided(ts, cfg_scale, guidance_low, guidance_high)
    # Bit-for-bit with the official loop: the score coefficients are computed on the latents' device
    # (as official, from the device time tensor) and divided by as tensors (CUDA turns division by a
    # python scalar into a reciprocal multiply); sqrt(diffusion) and sqrt(|dt|) use torch's CPU float64
    # sqrt like the official CPU time grid (it can differ from math.sqrt in the last bit).
    ratio, var = score_coefficients(t_steps.to(latents.device), path_type)
    sqrt_diffusion = torch.sqrt(2 * t_steps).tolist()
    sqrt_abs_dt = torch.sqrt((t_steps[1:] - t_steps[:-1]).abs()).tolist()
    velocity = _Velocity(model, latents, y, t_steps, cfg_scale, null_class)
    x = latents.to(torch.float64)
    per_row = isinstance(generator, (list, tuple))
    if per_row and len(generator) != latents.shape[0]:
        raise ValueError(f"euler_maruyama_sampler: {len(generator)} generators for a batch of "
                         f"{latents.shape[0]} latents; a list needs one generator per row")

    def drift(x, i):
        v = velocity(x, i, guided[i])
        if guided[i]:
            v = v.reshape(2, *x.shape)  # the doubled input is cat([x, x]): broadcast x over the halves
        score = (ratio[i] * v - x) / var[i]
        d = v - 0.5 * (2 * ts[i]) * score
        return velocity.combine(d.flatten(0, 1)) if guided[i] else d

    noise = row_noise(generator, x.shape[1:], num_steps - 1, x.device) if per_row else None
    with torch.no_grad(), contextlib.closing(noise) if per_row else contextlib.nullcontext():
        for i in range(num_steps - 1):
            dt = ts[i + 1] - ts[i]
            if per_row:
                eps = next(noise)
            elif generator is None:
                eps = torch.randn_like(x)
            else:
                eps = torch.randn(x.shape, generator=generator, dtype=torch.float64,
                                  device=generator.device).to(x.device)
            deps = eps * sqrt_abs_dt[i]
            x = x + drift(x, i) * dt + sqrt_diffusion[i] * deps
        i = num_steps - 1
        dt = ts[i + 1] - ts[i]
        x = x + dt * drift(x, i)
    return x


SAMPLERS = {"ode": euler_sampler, "sde": euler_maruyama_sampler}

__all__ = ["SAMPLERS", "SDE_LAST_T", "euler_maruyama_sampler", "euler_sampler", "row_noise"]
