"""Latent <-> image conversion: the SD-VAE (diffusers AutoencoderKL) and the pixel-space identity.

`load_vae(name)` gives a module with
- `encode_moments(images)`: images (uint8 [N,3,H,W], or float in [-1, 1]) -> moments float32
  [N, 2C, H/f, W/f] = cat[mean, std] along channels, exactly what the official REPA preprocessing
  (preprocessing/dataset_tools.py encode) stores as `img-mean-std-*.npy`: the encoder runs in fp32 on
  x / 127.5 - 1 and keeps `latent_dist.mean` and `latent_dist.std`;
- `encode(images, generator=None)`: one unscaled posterior sample mean + std * eps;
- `decode(latents)`: unscaled latents -> images float32 in about [-1, 1], in batches of `batch_size`;
  on CUDA under autocast to `decode_dtype` (bf16 by default; None: fp32, no autocast), fp32 on the CPU.
  The decode sets its own autocast state, so a caller's autocast (generate.py's sampler) never leaks in.

Names: `identity` (the demo's pixel space: latents are the images in [-1, 1], moments = [x, 0]),
`ema` / `mse` (stabilityai/sd-vae-ft-ema / sd-vae-ft-mse from the Hugging Face cache, never downloaded),
a Hugging Face repo id that is in the cache, or a local directory written by `save_pretrained` (a
`config.json` plus weights, or a pipeline folder with a `vae/` subfolder).

The model sees latents z = (mean + std * eps) * latents_scale + latents_bias with REPA's per-channel
vectors (0.18215 and 0 for every channel): `sample_posterior`. Decoding to uint8 follows the official
protocol: (x + 1) / 2, clamp(255 x, 0, 255), then truncation (not rounding).
"""
import os

import numpy as np
import torch
from PIL import Image

SD_VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
LATENTS_SCALE = 0.18215  # REPA train.py: torch.tensor([0.18215] * 4).view(1, 4, 1, 1)
LATENTS_BIAS = 0.0


class VAENotFoundError(FileNotFoundError, NotImplementedError):
    """The requested VAE is not on this machine (or diffusers is missing). A FileNotFoundError; also a
    NotImplementedError so that callers written for the identity-only version keep reporting it."""


def _to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 x / 127.5 - 1 (as REPA); a float tensor is taken as already in [-1, 1]."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 127.5 - 1
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 in [0, 255] or float in [-1, 1], got {images.dtype}")
    return images.to(torch.float32)


def _channel_vector(value, channels: int, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-channel sequence/tensor -> [1, C, 1, 1] on like's device and dtype."""
    v = torch.as_tensor(value, dtype=like.dtype, device=like.device).reshape(-1)
    if v.numel() == 1:
        v = v.expand(channels)
    if v.numel() != channels:
        raise ValueError(f"latents scale/bias has {v.numel()} values for {channels} latent channels")
    return v.view(1, channels, 1, 1)


def sample_posterior(moments: torch.Tensor, latents_scale=LATENTS_SCALE, latents_bias=LATENTS_BIAS,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """REPA's train.py sample_posterior: mean, std = moments.chunk(2, dim=1);
    z = (mean + std * eps) * scale + bias, scale and bias scalars or per-channel vectors.
    eps ~ N(0, 1) is drawn from `generator` (on the generator's device) when given."""
    mean, std = torch.chunk(moments, 2, dim=1)
    if generator is None:
        eps = torch.randn_like(mean)
    else:
        eps = torch.randn(mean.shape, generator=generator, device=generator.device,
                          dtype=mean.dtype).to(mean.device)
    z = mean + std * eps
    c = mean.shape[1]
    return z * _channel_vector(latents_scale, c, z) + _channel_vector(latents_bias, c, z)


class IdentityVAE(torch.nn.Module):
    """Latents are the images themselves, scaled to [-1, 1]; moments = [x, 0]."""
    latent_channels = 3
    downsample = 1

    def encode_moments(self, images):
        x = _to_unit_range(images)
        return torch.cat([x, torch.zeros_like(x)], dim=1)

    def encode(self, images, generator=None):
        return _to_unit_range(images) if images.dtype == torch.uint8 else images

    def decode(self, latents):
        return latents


class SDVAE(torch.nn.Module):
    """A frozen diffusers AutoencoderKL with REPA's encode-to-moments and batched decode (on CUDA under
    autocast to `decode_dtype`, bf16 by default, None for fp32; fp32 on the CPU)."""

    def __init__(self, autoencoder, name: str = "sd-vae", batch_size: int = 32,
                 decode_dtype: torch.dtype | None = torch.bfloat16):
        super().__init__()
        self.vae = autoencoder.eval().requires_grad_(False)
        self.name = name
        self.batch_size = int(batch_size)
        self.decode_dtype = decode_dtype  # the autocast dtype of the decode on CUDA; None: fp32
        cfg = autoencoder.config
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def decode_autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype decode() runs under on this device (None: fp32): `decode_dtype` on CUDA,
        None on the CPU."""
        return self.decode_dtype if self.device.type == "cuda" else None

    def train(self, mode: bool = True):  # always frozen, always eval
        return super().train(False)

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """images uint8 [N,3,H,W] (or float in [-1,1]) -> float32 cat[mean, std] [N, 2C, H/f, W/f] (fp32)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W], got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"image size {h}x{w} is not a multiple of the VAE's downsampling factor "
                             f"{self.downsample}")
        out = []
        for batch in images.split(self.batch_size):
            x = _to_unit_range(batch.to(self.device))
            with torch.autocast(self.device.type, enabled=False):
                dist = self.vae.encode(x.to(next(self.vae.parameters()).dtype)).latent_dist
            out.append(torch.cat([dist.mean, dist.std], dim=1).float())
        return torch.cat(out)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One unscaled posterior sample mean + std * eps (scale 1, bias 0)."""
        return sample_posterior(self.encode_moments(images), 1.0, 0.0, generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents [N, C, h, w] -> float32 images [N, 3, f h, f w] in about [-1, 1]."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"the {self.name} VAE decodes [N, {self.latent_channels}, h, w] latents, got "
                             f"{tuple(latents.shape)}: the model's latents do not fit this VAE (--vae)")
        dev, dtype = self.device, self.decode_autocast_dtype
        out = []
        for batch in latents.split(self.batch_size):
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):  # replaces any outer autocast
                x = self.vae.decode(batch.to(dev, torch.float32)).sample
            out.append(x.float())
        return torch.cat(out)


def _hf_cache_dir(cache_dir: str | None) -> str:
    if cache_dir:
        return cache_dir
    try:
        from huggingface_hub import constants
        return constants.HF_HUB_CACHE
    except ImportError:
        return os.path.join(os.path.expanduser(os.environ.get("HF_HOME", "~/.cache/huggingface")), "hub")


def _load_kwargs() -> dict:
    import importlib.util
    # without accelerate, diffusers warns at every load unless told to skip its low-memory path
    return {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}


def _import_autoencoder(name):
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise VAENotFoundError(f"the SD-VAE ({name!r}) needs the diffusers package: pip install diffusers "
                               f"({e})") from None
    return AutoencoderKL


def load_vae(name: str, *, cache_dir: str | None = None, batch_size: int = 32,
             decode_dtype: torch.dtype | None = torch.bfloat16) -> torch.nn.Module:
    """`identity`, `ema`, `mse`, a Hugging Face repo id in the local cache, or a local directory.

    Nothing is downloaded (local_files_only=True; HF_HUB_OFFLINE, HF_HOME and HF_HUB_CACHE apply as
    usual to where the cache is). A VAE that is not on disk raises VAENotFoundError saying where it
    looked and how to get it. The module is frozen, in eval mode, on the CPU; move it with .to(device).
    `decode_dtype`: the SD-VAE's decode autocast dtype on CUDA (None: fp32).
    """
    if name == "identity":
        return IdentityVAE()
    if os.path.isdir(name):
        AutoencoderKL = _import_autoencoder(name)
        sub = None
        if not os.path.isfile(os.path.join(name, "config.json")) and \
                os.path.isfile(os.path.join(name, "vae", "config.json")):
            sub = "vae"  # a whole Stable Diffusion pipeline folder
        if not os.path.isfile(os.path.join(name, sub or "", "config.json")):
            raise VAENotFoundError(f"VAE directory {name} has no config.json (nor vae/config.json): expected a "
                                   f"folder written by AutoencoderKL.save_pretrained (config.json + "
                                   f"diffusion_pytorch_model.safetensors)")
        try:
            ae = AutoencoderKL.from_pretrained(name, subfolder=sub, local_files_only=True, **_load_kwargs())
        except (OSError, ValueError) as e:
            raise VAENotFoundError(f"cannot load the SD-VAE from directory {name}: {e}") from None
        return SDVAE(ae, name=name, batch_size=batch_size, decode_dtype=decode_dtype)

    repo = SD_VAES.get(name, name)
    if name not in SD_VAES and repo.count("/") != 1:
        raise VAENotFoundError(f"VAE {name!r}: not a known name (identity, {', '.join(SD_VAES)}), nor an existing "
                               f"directory, nor a Hugging Face repo id (owner/name)")
    where = _hf_cache_dir(cache_dir)
    how = (f"get it on a machine with internet (`hf download {repo}` or "
           f"`python -c \"from diffusers import AutoencoderKL; AutoencoderKL.from_pretrained('{repo}')\"`) and "
           f"copy {os.path.join(where, 'models--' + repo.replace('/', '--'))} here (HF_HOME / HF_HUB_CACHE "
           f"choose the cache), or pass a local directory with config.json and diffusion_pytorch_model."
           f"safetensors as --vae DIR")
    AutoencoderKL = _import_autoencoder(name)
    try:
        ae = AutoencoderKL.from_pretrained(repo, cache_dir=cache_dir, local_files_only=True, **_load_kwargs())
    except (OSError, ValueError, EnvironmentError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VAENotFoundError(f"SD-VAE {name!r} ({repo}) is not in the Hugging Face cache {where} and nothing is "
                               f"downloaded at run time; {how}. ({first})") from None
    return SDVAE(ae, name=repo, batch_size=batch_size, decode_dtype=decode_dtype)


def decode_to_uint8(vae, latents, latents_scale, latents_bias) -> torch.Tensor:
    """Latents [N, C, h, w] -> uint8 images [N, H, W, 3] on the CPU, as the official generate.py.
    latents_scale / latents_bias: scalars or per-channel vectors."""
    c = latents.shape[1]
    x = vae.decode((latents - _channel_vector(latents_bias, c, latents)) / _channel_vector(latents_scale, c, latents))
    if x.shape[1] != 3:
        raise ValueError(f"the {type(vae).__name__} decoder gave {x.shape[1]}-channel images, expected RGB: "
                         f"the model's latents ({latents.shape[1]} channels) do not fit this VAE (--vae)")
    x = (x.float() + 1) / 2
    return torch.clamp(255.0 * x, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)


def save_grid(images: torch.Tensor, path: str, nrow: int | None = None, pad: int = 2) -> None:
    """uint8 [N, H, W, 3] -> one PNG grid with `nrow` images per row."""
    n, h, w, c = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images.numpy()):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    Image.fromarray(grid).save(path)
