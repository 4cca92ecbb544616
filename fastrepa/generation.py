"""Sampling from a checkpoint: build the model the checkpoint describes, draw per-index noise and labels,
run a sampler, decode, and write PNGs and the ADM-style .npz (arr_0 uint8 [N, H, W, 3]).

The sampler follows the backbone's prediction (`sample_latents`): a velocity model (SiT) samples with the
official REPA samplers (Euler / Heun ODE, Euler-Maruyama SDE, CFG on a guidance interval); an epsilon model
with learned sigma (DiT) with DDPM ancestral sampling respaced to `num_steps` (DiT's sample_ddp.py:
--num-sampling-steps 250) and DiT's CFG (guidance on the first 3 latent channels by default, the
learned variance from the conditional half; fastrepa.gaussian_diffusion).

Sample i's initial noise and class label come from a generator seeded by (seed, STREAM_INIT, i), and
the SDE's per-step noise of sample i from its own generator seeded by (seed, STREAM_SDE, i), so sample
i is the same whatever the batch size, the batch it falls in, the number of processes and the resume
point (ODE and SDE alike). The global batches are fixed by (N, batch size) alone (`batch_plan`) and
dealt round-robin to the processes (`rank_batches`). Each batch is written as one shard file
(`write_shard`, atomic: images, and with scoring their Inception features, complete or absent), which
makes runs resumable; `assemble_shards` and `assemble_features` read them back in index order.
"""
import contextlib
import datetime
import math
import os
import re
import time

import numpy as np
import torch
from PIL import Image

from fastrepa.official_ckpt import CheckpointError, load_checkpoint_file, load_weights, normalize_keys, select_weights
from fastrepa.io import atomic_open
from fastrepa.models import PDE_FAMILY, PDE_OVERRIDES, build_model, erw_rope, family_of, overrides_of, unwrap
from fastrepa.sampling import euler_maruyama_sampler, euler_sampler
from fastrepa.rng import index_generator, index_generators
from fastrepa.vae import decode_to_uint8

MODES = ("ode", "sde", "ddpm")
MODES_OF = {"velocity": ("ode", "sde"), "epsilon": ("ddpm",)}  # model.prediction -> its sampling modes
# The per-sample streams: step_seed(seed, stream, sample index); stream 1 is reserved.
STREAM_INIT, STREAM_SDE, STREAM_CLS = 0, 2, 3
CLS_CFG_SCALE = 1.5  # official REG generate.py --cls-cfg-scale


def projector_options(state_dict: dict) -> dict:
    """The projector model options read off the `projectors.K.*` weights, so no --projector-embed-dims is
    needed: z_dims, and projector_dim (REPA's MLP) or projector_type conv with its kernel (iREPA's)."""
    outs, opts = {}, {}
    for k, v in state_dict.items():
        m = re.fullmatch(r"projectors\.(\d+)\.(4|projection_layer)\.weight", k)
        if m:
            outs[int(m.group(1))] = v.shape[0]
            if m.group(2) == "projection_layer":
                opts.update(projector_type="conv", projector_kernel=v.shape[-1])
        if re.fullmatch(r"projectors\.\d+\.0\.weight", k):
            opts["projector_dim"] = v.shape[0]
    return {"z_dims": [outs[i] for i in sorted(outs)], **opts}


def model_from_checkpoint(path: str, weights: str = "ema", overrides: dict | None = None, ckpt: dict | None = None):
    """(model in eval mode, checkpoint args as a dict). `overrides` (model option -> value) win over the
    checkpoint's args; z_dims and projector_dim come from the weights themselves. `ckpt`: the file's
    contents (`load_checkpoint_file(path)`) when the caller has read them already."""
    ckpt = load_checkpoint_file(path) if ckpt is None else ckpt
    args = dict(ckpt.get("args") or {})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    name = overrides.pop("model", None) or args.get("model")
    if name and family_of(name) == PDE_FAMILY:  # PDE-DiT: its own options, no family check by weights
        kw = {k: args[k] for k in PDE_OVERRIDES if k != "attn_backend" and args.get(k) is not None}
        kw.update(overrides)
        sd = normalize_keys(select_weights(ckpt, weights, source=path), 0)
        kw["z_dims"] = projector_options(sd)["z_dims"]
        kw.update({k: v for k, v in projector_options(sd).items() if k == "projector_dim"})
        model = build_model(name, **kw)
        load_weights(model, sd, source=f"{path} [{weights}]")
        return model.eval(), args
    # The attention backend and the fused-op implementation are this machine's choice (overrides), not
    # the training run's.
    kw = {k: args[k] for k in overrides_of(name or "SiT-XL/2") if k not in ("attn_backend", "kernels")
          and args.get(k) is not None}
    if "input_size" not in kw and args.get("resolution"):
        kw["input_size"] = int(args["resolution"]) // 8
    if args.get("use_rope"):  # ERW's args: its RoPE, with EVA-02's interleaved pairs
        kw["rope"], kw["rope_pairs"] = erw_rope(kw.get("rope"), kw.get("rope_pairs"), True)
    kw.update(overrides)
    sd = normalize_keys(select_weights(ckpt, weights, source=path), kw.get("encoder_depth", 8))
    name = check_family(name, sd, path)
    kw.update(projector_options(sd))
    kw["ap_head"] = any(k.startswith("ap_head.") for k in sd)  # an SRA checkpoint's training-only head
    cls = sd.get("cls_projectors2.weight")  # a REG checkpoint's class token
    kw["cls_token_dim"] = int(cls.shape[1]) if cls is not None else 0
    model = build_model(name, **kw)
    load_weights(model, sd, source=f"{path} [{weights}]")
    return model.eval(), args


def learns_sigma(state_dict: dict) -> bool | None:
    """Whether the weights' final layer outputs 2C channels (DiT's learned sigma) rather than C (SiT); None
    when the keys do not tell."""
    w, emb = state_dict.get("final_layer.linear.weight"), state_dict.get("x_embedder.proj.weight")
    if w is None or emb is None:
        return None
    channels, patch = emb.shape[1], emb.shape[-1]
    return w.shape[0] == 2 * channels * patch * patch


def check_family(name: str | None, state_dict: dict, path: str) -> str:
    """The registry name to build: `name` (--model or the checkpoint's args) checked against what the weights
    are (a learned-sigma final layer is a DiT, a plain one a SiT); without a name, SiT-XL/2 or DiT-XL/2 by
    the weights (an official DiT-XL-2-256x256.pt is a bare state dict without args)."""
    dit = learns_sigma(state_dict)
    if name is None:
        return "DiT-XL/2" if dit else "SiT-XL/2"
    family = family_of(name)
    if dit is not None and dit != (family == "DiT"):
        what = "a DiT (its final layer predicts eps and the variance: 2C channels)" if dit else \
            "a SiT (its final layer predicts C channels)"
        raise CheckpointError(f"{path} holds {what}, but the model is {name}: pass --model "
                              f"{'DiT' if dit else 'SiT'}-{name.split('-', 1)[1]} (or leave --model out)")
    return name


def default_mode(model) -> str:
    """The sampling mode of a backbone when none is asked: REPA's default ODE for SiT, DDPM for DiT."""
    return MODES_OF[model.prediction][0]


def check_mode(model, mode: str) -> None:
    """ValueError naming --mode unless `mode` samples this backbone's prediction."""
    allowed = MODES_OF.get(model.prediction, ())
    if mode not in allowed:
        raise ValueError(f"--mode {mode}: a model that predicts {model.prediction!r} samples with --mode "
                         f"{' / '.join(allowed)}")


def class_token_velocity(denoise, latent_shape, n: int, cfg_scale: float, cls_cfg_scale: float = CLS_CFG_SCALE):
    """REG's model as a velocity of one state [n, C*H*W + d] = (flattened latents, class token), so the
    flow samplers integrate both without knowing of the token: `denoise(x, t, y, cls_token=c)` gives
    (v, v_cls), returned packed the same way.

    Official REG guides the class token with its own scale (`--cls-cfg-scale`; 0 or less: the conditional
    velocity alone). Where the sampler doubles the batch for CFG (2n rows: conditional, then unconditional)
    the class token's conditional velocity becomes v_u + (s_cls / s)(v_c - v_u), so the sampler's
    d_u + s (d_c - d_u) is d_u + s_cls (d_c - d_u) for it: both samplers' drifts are affine in v with the same
    coefficients in both halves (the halves share x), so this is exact for the ODE and the SDE alike."""
    size = math.prod(latent_shape)
    s_cls = cls_cfg_scale if cls_cfg_scale > 0 else 1.0
    k = s_cls / cfg_scale if cfg_scale > 1.0 else 1.0

    def velocity(state, t, y):
        x, c = state[:, :size].reshape(-1, *latent_shape), state[:, size:]
        v, v_cls = denoise(x, t, y, cls_token=c)
        if state.shape[0] == 2 * n and k != 1.0:
            cond, uncond = v_cls.chunk(2)
            v_cls = torch.cat([uncond + k * (cond - uncond), uncond])
        return torch.cat([v.flatten(1), v_cls.to(v.dtype)], dim=1)
    return velocity


def initial_noise(model, n: int, generator: torch.Generator, device=None) -> dict:
    """{"z": [n, *latent_shape]} of standard normals from `generator`, and for a REG model "cls_z" [n, d] after
    them: the keyword arguments of `sample_latents` besides the labels."""
    out = {"z": torch.randn(n, *model.latent_shape, generator=generator).to(device)}
    cls_dim = getattr(unwrap(model), "cls_token_dim", 0)
    if cls_dim:
        out["cls_z"] = torch.randn(n, cls_dim, generator=generator).to(device)
    return out


def sample_latents(model, z, y, *, mode: str = "ode", num_steps: int = 50, cfg_scale: float = 1.0,
                   guidance_low: float = 0.0, guidance_high: float = 1.0, heun: bool = False,
                   path_type: str = "linear", generators=None, denoise=None, guided_channels: int | None = 3,
                   cls_z=None, cls_cfg_scale: float = CLS_CFG_SCALE):
    """Latents from initial noise z [N, C, H, W] and labels y [N] with the backbone's sampler (module
    docstring). `denoise` replaces `model.denoise` (e.g. its compiled version); `generators` (one per row)
    give the SDE's / DDPM's per-step noise. DDPM: `num_steps` respaced steps of the 1000 (DiT: 250), CFG
    when cfg_scale > 1 on `guided_channels` eps channels (3: DiT's; None: all), on every step (the guidance
    interval is a flow-sampler option). REG's model (cls_token_dim > 0) also takes the class token's
    initial noise `cls_z` [N, d]: it is integrated alongside (`class_token_velocity`) and discarded."""
    check_mode(model, mode)
    denoise = denoise or model.denoise
    cls_dim = getattr(unwrap(model), "cls_token_dim", 0)
    if cls_dim and cls_z is not False:  # (False: the packed state of the call below)
        if cls_z is None or tuple(cls_z.shape) != (z.shape[0], cls_dim):
            raise ValueError(f"a REG model samples its class token too: cls_z must be [{z.shape[0]}, {cls_dim}], "
                             f"got {None if cls_z is None else tuple(cls_z.shape)}")
        denoise = class_token_velocity(denoise, z.shape[1:], z.shape[0], cfg_scale, cls_cfg_scale)
        shape, z = z.shape, torch.cat([z.flatten(1), cls_z.to(device=z.device, dtype=z.dtype)], dim=1)
        x = sample_latents(model, z, y, mode=mode, num_steps=num_steps, cfg_scale=cfg_scale,
                           guidance_low=guidance_low, guidance_high=guidance_high, heun=heun, path_type=path_type,
                           generators=generators, denoise=denoise, cls_z=False)
        return x[:, :math.prod(shape[1:])].reshape(shape)
    if mode == "ddpm":
        from fastrepa.gaussian_diffusion import cfg_model_fn, create_diffusion
        diffusion = create_diffusion(str(num_steps))
        if cfg_scale > 1.0:
            fn = cfg_model_fn(denoise, y, cfg_scale, model.null_class, guided_channels=guided_channels)
        else:
            def fn(x, t):
                return denoise(x, t, y)
        return diffusion.p_sample_loop(fn, z, generators=generators)
    kwargs = dict(num_steps=num_steps, cfg_scale=cfg_scale, guidance_low=guidance_low,
                  guidance_high=guidance_high, path_type=path_type, null_class=model.null_class)
    if mode == "ode":
        return euler_sampler(denoise, z, y, heun=heun, **kwargs)
    return euler_maruyama_sampler(denoise, z, y, generator=generators, **kwargs)


def noise_and_labels(indices, shape, num_classes: int, seed: int, device):
    """Initial noise [n, *shape] and labels [n] of the given sample indices, each from its own generator."""
    zs, ys = [], []
    for i in indices:
        g = index_generator(seed, STREAM_INIT, i)
        zs.append(torch.randn(shape, generator=g))
        ys.append(int(torch.randint(0, num_classes, (1,), generator=g)))
    return torch.stack(zs).to(device), torch.tensor(ys, device=device)


def batch_plan(num_samples: int, batch_size: int) -> list[tuple[int, int]]:
    """The global batches [(start, end)] covering indices 0..num_samples-1; fixed by (N, batch size) only,
    so every process count sees the same batches (and the same shard files)."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples={num_samples} and batch_size={batch_size} must be >= 1")
    return [(s, min(s + batch_size, num_samples)) for s in range(0, num_samples, batch_size)]


def rank_batches(plan, rank: int, world_size: int):
    """Rank r's share of the global batches: r, r + W, r + 2W, ... (deterministic, balanced)."""
    return plan[rank::world_size]


@torch.no_grad()
def sample_batch(model, vae, start: int, end: int, *, batch_size: int, mode: str = "ode", num_steps: int = 50,
                 cfg_scale: float = 1.5, guidance_low: float = 0.0, guidance_high: float = 1.0,
                 heun: bool = False, path_type: str = "linear", seed: int = 0, latents_scale: float = 0.18215,
                 latents_bias: float = 0.0, device=None, velocity=None, autocast_dtype=None,
                 guided_channels: int | None = 3, cls_cfg_scale: float = CLS_CFG_SCALE) -> torch.Tensor:
    """uint8 images [end - start, H, W, 3] of sample indices start..end-1.

    The batch always holds `batch_size` indices (start..start+batch_size-1): a short last batch is
    over-sampled with the following indices (each with its own seeded noise and label, so nothing is
    biased) and truncated, as REPA does; the shapes stay static for torch.compile. `velocity` replaces
    `model.denoise` (e.g. its torch.compile'd version); `autocast_dtype` (e.g. torch.bfloat16) runs the
    model and the VAE decode under autocast on the device. Sample i's SDE / DDPM step noise comes from its
    own generator (seed, STREAM_SDE, i); a REG model's class-token noise from (seed, STREAM_CLS, i).
    """
    if mode not in MODES:
        raise ValueError(f"--mode={mode!r}: expected one of {MODES}")
    if not 0 <= start < end <= start + batch_size:
        raise ValueError(f"batch [{start}, {end}) does not fit batch_size={batch_size}")
    device = device or next(model.parameters()).device
    device = torch.device(device)
    dtype = next(model.parameters()).dtype
    z, y = noise_and_labels(range(start, start + batch_size), model.latent_shape, model.num_classes, seed, device)
    gens = index_generators(seed, STREAM_SDE, range(start, start + batch_size)) if mode != "ode" else None
    cls_dim = getattr(unwrap(model), "cls_token_dim", 0)
    cls_z = (torch.stack([torch.randn(cls_dim, generator=index_generator(seed, STREAM_CLS, i))
                          for i in range(start, start + batch_size)]).to(device) if cls_dim else None)
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with amp:
        x = sample_latents(model, z.to(dtype), y, mode=mode, num_steps=num_steps, cfg_scale=cfg_scale,
                           guidance_low=guidance_low, guidance_high=guidance_high, heun=heun, path_type=path_type,
                           generators=gens, denoise=velocity, guided_channels=guided_channels, cls_z=cls_z,
                           cls_cfg_scale=cls_cfg_scale)
        images = decode_to_uint8(vae, x[: end - start].float(), latents_scale, latents_bias)
    return images


@torch.no_grad()
def generate(model, vae, *, num_samples: int, batch_size: int, mode: str = "ode", num_steps: int = 50,
             cfg_scale: float = 1.5, guidance_low: float = 0.0, guidance_high: float = 1.0, heun: bool = False,
             path_type: str = "linear", seed: int = 0, latents_scale: float = 0.18215, latents_bias: float = 0.0,
             device=None, progress=None, batches=None, velocity=None, autocast_dtype=None):
    """Yield (first index, uint8 images [n, H, W, 3]) batch by batch for indices 0..num_samples-1
    (or for the given `batches`, a subset of batch_plan(num_samples, batch_size))."""
    if mode not in MODES:
        raise ValueError(f"--mode={mode!r}: expected one of {MODES}")
    for start, end in (batch_plan(num_samples, batch_size) if batches is None else batches):
        images = sample_batch(model, vae, start, end, batch_size=batch_size, mode=mode, num_steps=num_steps,
                              cfg_scale=cfg_scale, guidance_low=guidance_low, guidance_high=guidance_high,
                              heun=heun, path_type=path_type, seed=seed, latents_scale=latents_scale,
                              latents_bias=latents_bias, device=device, velocity=velocity,
                              autocast_dtype=autocast_dtype)
        if progress is not None:
            progress.update(end - start)
        yield start, images


# ---------------------------------------------------------------- compile and progress

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_velocity(model, mode: str = "default"):
    """torch.compile(model.denoise, mode=mode, dynamic=False), as generate.py samples with it
    (reduce-overhead: CUDA graphs). The sampler calls the model at two batch sizes, B outside the
    guidance interval and 2B inside it (CFG): static shapes give each its own graph (and CUDA graph)
    instead of a dynamic-shape recompile once the second size is seen."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: expected one of {COMPILE_MODES}")
    return torch.compile(model.denoise, mode=None if mode == "default" else mode, dynamic=False)


def cudagraph_skips() -> int:
    """How many compiled graphs Inductor has set up without CUDA graphs so far in this process
    (torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]): under mode="reduce-overhead", a
    rise means a graph runs uncaptured."""
    from torch._dynamo.utils import counters
    return int(counters["inductor"]["cudagraph_skips"])


class ProgressLog:
    """Plain progress lines for logs, where a progress bar shows nothing useful (nohup, slurm): `update(done)`
    gives a line each time `done` crosses another `every` fraction of `total`, and at `total`, e.g.
    "sampled 300/1000 images (30%), 12.3 img/s, ETA 0:00:57"; None otherwise. The rate counts the images
    done since the start (`initial`: those already on disk when it began)."""

    def __init__(self, total: int, initial: int = 0, every: float = 0.1, label: str = "sampled", clock=time.monotonic):
        self.total, self.initial, self.every, self.label, self.clock = total, initial, every, label, clock
        self.t0, self._last = clock(), self._step(initial)

    def _step(self, done: int) -> float:
        return float("inf") if done >= self.total else int(done / self.total / self.every)

    def update(self, done: int) -> str | None:
        step = self._step(done)
        if step <= self._last:
            return None
        self._last = step
        rate = (done - self.initial) / max(self.clock() - self.t0, 1e-9)
        eta = datetime.timedelta(seconds=round((self.total - done) / rate)) if rate > 0 else "?"
        return (f"{self.label} {done}/{self.total} images ({100 * done // self.total}%), {rate:.3g} img/s, "
                f"ETA {eta}")


# ---------------------------------------------------------------- resumable shards

SHARD_RE = re.compile(r"shard-(\d{7,})-(\d{7,})\.npz")


def shard_path(folder: str, start: int, end: int) -> str:
    return os.path.join(folder, f"shard-{start:07d}-{end:07d}.npz")


FEATURES_ID_KEY = "features_id"  # which Inception made a shard's features (fastrepa.eval.features_id)


def write_shard(folder: str, start: int, end: int, images, features: dict | None = None,
                features_id: str | None = None) -> str:
    """Samples start..end-1 as arr_0 uint8 [n, H, W, 3] and, when given, their Inception features
    (`fastrepa.eval.image_features`: pool, spatial, logits, n rows each) tagged with `features_id`, in
    one .npz written atomically (fastrepa.io): a shard file is complete or absent, and so
    never holds images without their features or features without their images."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != end - start:
        raise ValueError(f"shard [{start}, {end}): expected uint8 [{end - start}, H, W, 3], got "
                         f"{images.dtype} {images.shape}")
    arrays = {"arr_0": images}
    if features is not None:
        from fastrepa.eval.features import check_features
        if not features_id:
            raise ValueError(f"shard [{start}, {end}): features need a features_id (fastrepa.eval.features_id)")
        arrays.update(check_features(features, end - start, f"shard [{start}, {end})"))
        arrays[FEATURES_ID_KEY] = np.array(str(features_id))
    os.makedirs(folder, exist_ok=True)
    path = shard_path(folder, start, end)
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def list_shards(folder: str) -> dict[tuple[int, int], str]:
    """{(start, end): path} of the complete shard files in `folder` (temp files are ignored)."""
    if not os.path.isdir(folder):
        return {}
    out = {}
    for name in os.listdir(folder):
        m = SHARD_RE.fullmatch(name)
        if m:
            out[(int(m.group(1)), int(m.group(2)))] = os.path.join(folder, name)
    return out


def _bad_shard(path: str, what: str) -> ValueError:
    return ValueError(f"shard {path}: {what} (delete it and rerun to regenerate it)")


def read_shard(path: str, start: int, end: int) -> np.ndarray:
    """The images arr_0 uint8 [end - start, H, W, 3] of one shard; errors name the file."""
    try:
        with np.load(path) as z:
            arr = z["arr_0"]
    except Exception as e:  # noqa: BLE001 - name the file
        raise _bad_shard(path, f"cannot read it: {e}") from None
    if arr.dtype != np.uint8 or arr.ndim != 4 or len(arr) != end - start or arr.shape[-1] != 3:
        raise _bad_shard(path, f"expected uint8 [{end - start}, H, W, 3], got {arr.dtype} {arr.shape}")
    return arr


def shard_features_id(path: str) -> str | None:
    """The features_id of the features stored in a shard, or None when it has none (or is unreadable)."""
    try:
        with np.load(path) as z:
            return str(z[FEATURES_ID_KEY]) if FEATURES_ID_KEY in z.files else None
    except Exception:  # noqa: BLE001 - unreadable: no usable features; read_shard reports the file
        return None


def assemble_shards(folder: str, plan) -> np.ndarray:
    """arr_0 uint8 [N, H, W, 3] in index order from the shards of `plan`; errors name what is missing or
    wrong."""
    have = list_shards(folder)
    missing = [b for b in plan if b not in have]
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} shard(s) missing, first {shard_path(folder, *missing[0])}")
    chunks = []
    for start, end in plan:
        path = have[(start, end)]
        arr = read_shard(path, start, end)
        if chunks and arr.shape[1:] != chunks[0].shape[1:]:
            raise _bad_shard(path, f"image shape {arr.shape[1:]} differs from {chunks[0].shape[1:]}")
        chunks.append(arr)
    return np.concatenate(chunks)


def assemble_features(folder: str, plan, features_id: str):
    """`fastrepa.eval.Activations` of samples 0..N-1 from the features stored in the shards of `plan`,
    in index order (the rows of the assembled .npz, nothing past N): what `compute_activations` of that
    .npz gives, without reading an image. Every shard must carry features made by `features_id`."""
    from fastrepa.eval.features import FEATURE_KEYS, FeatureAccumulator, check_features
    from fastrepa.eval.inception import short_features_id

    have = list_shards(folder)
    acc = FeatureAccumulator()
    for start, end in plan:
        path = have.get((start, end))
        if path is None:
            raise FileNotFoundError(f"{folder}: shard {shard_path(folder, start, end)} is missing")
        try:
            with np.load(path) as z:
                got = str(z[FEATURES_ID_KEY]) if FEATURES_ID_KEY in z.files else None
                feats = {k: z[k] for k in FEATURE_KEYS if k in z.files} if got == features_id else None
        except Exception as e:  # noqa: BLE001 - name the file
            raise _bad_shard(path, f"cannot read it: {e}") from None
        if feats is None:
            has = "none" if got is None else f"those of {short_features_id(got)}"
            raise _bad_shard(path, f"no Inception features of {short_features_id(features_id)} (it has {has})")
        try:
            feats = check_features(feats, end - start, "stored features")
        except ValueError as e:
            raise _bad_shard(path, str(e)) from None
        acc.add(feats["pool"], feats["spatial"], feats["logits"])
    return acc.result()


def write_pngs(images: torch.Tensor, start: int, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for j, img in enumerate(np.asarray(images)):
        Image.fromarray(img).save(os.path.join(folder, f"{start + j:06d}.png"))


def write_npz(images: np.ndarray, path: str) -> None:
    """The ADM evaluator's input: arr_0 uint8 [N, H, W, 3]; written atomically."""
    with atomic_open(path, "wb") as f:
        np.savez(f, arr_0=images)
