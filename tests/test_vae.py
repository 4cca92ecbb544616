"""fastrepa.vae: SD-VAE (a tiny random diffusers AutoencoderKL saved to disk) loading, moments as REPA's
preprocessing stores them, REPA's posterior sampling, batched decode, and the missing-VAE error."""
import copy
import os

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from conftest import make_tiny_vae  # noqa: E402

from fastrepa.vae import (LATENTS_SCALE, IdentityVAE, SDVAE, VAENotFoundError, decode_to_uint8, load_vae,  # noqa: E402
                          sample_posterior)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny-vae"))
    return path, make_tiny_vae(path)


def reference_moments(ae, images_uint8):
    """REPA's encode: x / 127.5 - 1 in fp32, then cat[mean, std] of the diagonal Gaussian, written out."""
    x = images_uint8.float() / 127.5 - 1
    with torch.no_grad():
        h = ae.quant_conv(ae.encoder(x))
    mean, logvar = h.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return torch.cat([mean, std], dim=1)


def test_load_from_directory_is_frozen_and_identical(tiny):
    path, ae = tiny
    vae = load_vae(path)
    assert isinstance(vae, SDVAE) and vae.latent_channels == 4 and vae.downsample == 2
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.vae.training
    vae.train()
    assert not vae.vae.training
    ref = ae.state_dict()
    for k, v in vae.vae.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_moments_posterior_and_decode(tiny):
    path, ae = tiny
    vae = load_vae(path, batch_size=2)  # 3 images: batches of 2 and 1
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (3, 3, 16, 24), generator=g, dtype=torch.uint8)
    moments = vae.encode_moments(imgs)
    assert moments.shape == (3, 8, 8, 12) and moments.dtype == torch.float32
    ref = reference_moments(ae, imgs)
    torch.testing.assert_close(moments, ref, atol=1e-5, rtol=1e-5)
    assert (moments[:, 4:] > 0).all()  # the second half is the std
    # float input in [-1, 1] is the same thing
    torch.testing.assert_close(vae.encode_moments(imgs.float() / 127.5 - 1), moments)

    # REPA train.py sample_posterior: z = (mean + std * eps) * 0.18215 + 0, eps from the generator
    z = sample_posterior(moments, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(3, 4, 8, 12, generator=torch.Generator().manual_seed(7))
    mean, std = ref[:, :4], ref[:, 4:]
    torch.testing.assert_close(z, (mean + std * eps) * 0.18215, atol=1e-5, rtol=1e-5)
    # per-channel vectors
    scale, bias = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([1.0, 0.0, -1.0, 2.0])
    z2 = sample_posterior(moments, scale, bias, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z2, (mean + std * eps) * scale.view(1, 4, 1, 1) + bias.view(1, 4, 1, 1),
                               atol=1e-5, rtol=1e-5)
    # unscaled sample
    torch.testing.assert_close(vae.encode(imgs, generator=torch.Generator().manual_seed(7)), mean + std * eps,
                               atol=1e-5, rtol=1e-5)

    # decode: unscaled latents, batched, fp32 on the CPU, equal to the plain decoder
    x = vae.decode(z / LATENTS_SCALE)
    assert x.shape == (3, 3, 16, 24) and x.dtype == torch.float32
    with torch.no_grad():
        ref_x = ae.decode(z / LATENTS_SCALE).sample
    torch.testing.assert_close(x, ref_x, atol=1e-5, rtol=1e-5)
    u8 = decode_to_uint8(vae, z, LATENTS_SCALE, 0.0)
    assert u8.shape == (3, 16, 24, 3) and u8.dtype == torch.uint8
    expect = torch.clamp(255.0 * (ref_x + 1) / 2, 0, 255).permute(0, 2, 3, 1).to(torch.uint8)  # truncation
    assert (u8.int() - expect.int()).abs().max() <= 1  # fp32 round-off at integer boundaries only
    with pytest.raises(ValueError, match="4, h, w"):
        vae.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="multiple of the VAE's downsampling factor 2"):
        vae.encode_moments(torch.zeros(1, 3, 15, 16, dtype=torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decode_is_bf16_and_close(tiny):
    path, ae = tiny
    vae = load_vae(path).cuda()
    z = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x = vae.decode(z.cuda())
    assert x.dtype == torch.float32 and x.is_cuda
    with torch.no_grad():
        ref = ae.decode(z).sample
    assert (x.cpu() - ref).abs().max() < 0.1  # bf16 autocast
    imgs = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    torch.testing.assert_close(vae.encode_moments(imgs.cuda()).cpu(), reference_moments(ae, imgs),
                               atol=1e-3, rtol=1e-3)  # encode stays fp32 (TF32 convs at most)


def test_missing_vae_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = str(tmp_path / "hf-cache")
    with pytest.raises(VAENotFoundError) as e:
        load_vae("ema", cache_dir=cache)
    msg = str(e.value)
    assert "stabilityai/sd-vae-ft-ema" in msg and cache in msg and "hf download" in msg and "--vae DIR" in msg
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, NotImplementedError)
    with pytest.raises(VAENotFoundError, match="sd-vae-ft-mse"):
        load_vae("mse", cache_dir=cache)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(VAENotFoundError, match="has no config.json"):
        load_vae(str(tmp_path / "empty"))
    with pytest.raises(VAENotFoundError, match="not a known name"):
        load_vae("sd-vae")


def test_identity_vae_moments_and_decode():
    vae = load_vae("identity")
    assert isinstance(vae, IdentityVAE)
    imgs = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    m = vae.encode_moments(imgs)
    torch.testing.assert_close(m[:, :3], imgs.float() / 127.5 - 1)
    assert m[:, 3:].abs().max() == 0
    u8 = decode_to_uint8(vae, sample_posterior(m, 1.0, 0.0), 1.0, 0.0)
    assert u8.shape == (2, 4, 4, 3) and (u8.permute(0, 3, 1, 2).int() - imgs.int()).abs().max() <= 1


def test_decode_to_uint8_truncates_and_clamps_exactly():
    """generate.py's conversion (decode_to_uint8, as the official generate.py): (x + 1) / 2, clamp(255 x, 0, 255),
    then .to(uint8), which truncates: 127.9 -> 127, 0.99 -> 0, 254.6 -> 254, 1.5 -> 1 (rounding would give 128,
    1, 255, 2); out of range clamps to 0 and 255; the ends -1 and 1 are exactly 0 and 255."""
    levels = torch.tensor([127.9, 0.99, 254.6, 1.5, 200.2, 255.0, 0.0, -40.0, 300.0], dtype=torch.float64)
    want = [127, 0, 254, 1, 200, 255, 0, 0, 255]
    x = (2 * levels / 255 - 1).float()  # the decoder output of each level, off any integer by >= 0.01
    latents = torch.stack([x, x.flip(0), x]).view(1, 3, 3, 3)  # channels: the levels, reversed, the levels
    u8 = decode_to_uint8(IdentityVAE(), latents, 1.0, 0.0)
    assert u8.dtype == torch.uint8 and u8.shape == (1, 3, 3, 3)
    assert u8[0, ..., 0].flatten().tolist() == want and u8[0, ..., 2].flatten().tolist() == want
    assert u8[0, ..., 1].flatten().tolist() == want[::-1]


def test_decode_dtype_is_the_callers_choice_and_fp32_ignores_an_outer_autocast(tiny):
    """decode_dtype=None (generate.py --precision fp32) decodes in fp32 even inside the sampler's autocast; the
    default bf16 applies on CUDA only."""
    path, ae = tiny
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = ae.decode(z).sample
    fp32 = load_vae(path, decode_dtype=None)
    assert fp32.decode_dtype is None and fp32.decode_autocast_dtype is None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what sample_batch runs the decode under with bf16
        x = fp32.decode(z)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, ref, rtol=1e-6, atol=1e-6)
    bf16 = load_vae(path)
    assert bf16.decode_dtype == torch.bfloat16 and bf16.decode_autocast_dtype is None  # the CPU decodes in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(bf16.decode(z), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp32_decode_has_no_autocast(tiny):
    path, ae = tiny
    vae = load_vae(path, decode_dtype=None).cuda()
    assert vae.decode_autocast_dtype is None and load_vae(path).cuda().decode_autocast_dtype == torch.bfloat16
    z = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = copy.deepcopy(ae).cuda().decode(z.cuda()).sample  # fp32, no autocast
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the sampler's autocast does not reach the decode
        torch.testing.assert_close(vae.decode(z.cuda()), ref, rtol=1e-4, atol=1e-4)  # bf16 would be ~1e-2 off
