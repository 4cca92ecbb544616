"""Pretrained REPA encoders from official-format weight files (random weights, written here).

Each test writes a state dict with the key names and shapes of the official checkpoint (DINOv2 torch
hub file, MoCo v3 .pth.tar, MAE pretrain file, DINO v1 hub file, I-JEPA training checkpoint, OpenAI
CLIP TorchScript archive), loads it through `load_encoder`, and compares the
tokens with an independent forward written below from that state dict, with REPA's preprocessing
(train.py preprocess_raw_image) and REPA's pos-embed resampling (timm.resample_abs_pos_embed).
"""
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastrepa.encoders as E
from fastrepa.encoders import check_grid, load_encoder, load_encoders

import timm.layers.pos_embed as timm_pos  # noqa: E402  (the independent reference REPA itself calls; dev extra)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# ------------------------------------------------------------------ official-format random weights

def vit_keys(dim, depth, hidden, *, layerscale, swiglu=False):
    g = torch.Generator().manual_seed(dim * 31 + depth)

    def r(*shape, s=0.02):
        return torch.randn(*shape, generator=g) * s

    sd = {"patch_embed.proj.bias": r(dim), "norm.weight": 1 + r(dim, s=0.1), "norm.bias": r(dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd |= {b + "norm1.weight": 1 + r(dim, s=0.1), b + "norm1.bias": r(dim),
               b + "attn.qkv.weight": r(3 * dim, dim, s=dim ** -0.5), b + "attn.qkv.bias": r(3 * dim),
               b + "attn.proj.weight": r(dim, dim, s=dim ** -0.5), b + "attn.proj.bias": r(dim),
               b + "norm2.weight": 1 + r(dim, s=0.1), b + "norm2.bias": r(dim)}
        if swiglu:
            sd |= {b + "mlp.w12.weight": r(2 * hidden, dim, s=dim ** -0.5), b + "mlp.w12.bias": r(2 * hidden),
                   b + "mlp.w3.weight": r(dim, hidden, s=hidden ** -0.5), b + "mlp.w3.bias": r(dim)}
        else:
            sd |= {b + "mlp.fc1.weight": r(hidden, dim, s=dim ** -0.5), b + "mlp.fc1.bias": r(hidden),
                   b + "mlp.fc2.weight": r(dim, hidden, s=hidden ** -0.5), b + "mlp.fc2.bias": r(dim)}
        if layerscale:
            sd |= {b + "ls1.gamma": 0.5 + r(dim, s=0.1), b + "ls2.gamma": 0.5 + r(dim, s=0.1)}
    return sd, r


def dinov2_hub_sd(dim=384, depth=12, reg=False, swiglu=False):
    """The key set of dinov2_vit{s}14[_reg4]_pretrain.pth: pos-embed for the 518px (37x37) grid; vit-g has
    SwiGLUFFNFused (w12/w3) with hidden (int(4*dim*2/3) + 7) // 8 * 8."""
    hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8 if swiglu else 4 * dim
    sd, r = vit_keys(dim, depth, hidden, layerscale=True, swiglu=swiglu)
    sd |= {"cls_token": r(1, 1, dim, s=1.0), "pos_embed": r(1, 1 + 37 * 37, dim, s=1.0),
           "mask_token": r(1, dim), "patch_embed.proj.weight": r(dim, 3, 14, 14, s=0.05)}
    if reg:
        sd["register_tokens"] = r(1, 4, dim, s=1.0)
    return sd


# ------------------------------------------------------------------ the independent forward

def ref_vit(sd, x, heads, patch, registers=0, final_norm=True):
    grid = x.shape[-1] // patch
    w = {k: v.double() for k, v in sd.items()}
    x = F.conv2d(x.double(), w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    B, _, C = x.shape
    npre = 1 if "cls_token" in w else 0  # I-JEPA has no class token
    pos = timm_pos.resample_abs_pos_embed(sd["pos_embed"].float(), [grid, grid], num_prefix_tokens=npre).double()
    if npre:
        x = torch.cat([w["cls_token"].expand(B, -1, -1), x], 1)
    x = x + pos
    if registers:
        x = torch.cat([x[:, :1], w["register_tokens"].expand(B, -1, -1), x[:, 1:]], 1)
    ln = lambda t, n: F.layer_norm(t, (C,), w[n + ".weight"], w[n + ".bias"], eps=1e-6)  # noqa: E731
    i = 0
    while f"blocks.{i}.norm1.weight" in w:
        b = f"blocks.{i}."
        h = ln(x, b + "norm1") @ w[b + "attn.qkv.weight"].T + w[b + "attn.qkv.bias"]
        q, k, v = h.reshape(B, -1, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // heads), -1) @ v
        a = a.transpose(1, 2).reshape(B, -1, C) @ w[b + "attn.proj.weight"].T + w[b + "attn.proj.bias"]
        x = x + a * w.get(b + "ls1.gamma", 1.0)
        h = ln(x, b + "norm2") @ w[b + "mlp.fc1.weight"].T + w[b + "mlp.fc1.bias"]
        h = F.gelu(h) @ w[b + "mlp.fc2.weight"].T + w[b + "mlp.fc2.bias"]
        x = x + h * w.get(b + "ls2.gamma", 1.0)
        i += 1
    if final_norm:
        x = ln(x, "norm")
    return x[:, npre + registers:].float()


def images(b=2, res=256, seed=0):
    return torch.randint(0, 256, (b, 3, res, res), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def assert_frozen(enc):
    assert not enc.training and all(not m.training for m in enc.modules())
    enc.train()
    assert not enc.training and all(not m.training for m in enc.modules())
    assert all(not p.requires_grad for p in enc.parameters())
    out = enc(images(1, enc.resolution))
    assert not out.requires_grad


# ------------------------------------------------------------------ DINOv2

@pytest.mark.parametrize("reg", [False, True])
def test_dinov2_matches_reference(tmp_path, reg):
    sd = dinov2_hub_sd(reg=reg)
    f = tmp_path / "w.pth"
    torch.save(sd, f)
    name = "dinov2-vit-s-reg" if reg else "dinov2-vit-s"
    enc = load_encoder(name, path=f, resolution=256)
    # strict: every file tensor is a parameter, and only they
    own = enc.vit.state_dict()
    assert set(own) == set(sd)
    assert own["pos_embed"].shape == (1, 1 + 16 * 16, 384)
    img = images()
    z = enc(img)
    assert z.shape == (2, 256, 384) and z.dtype == torch.float32
    # REPA preprocessing written here: /255, ImageNet norm, bicubic resize to 224
    x = F.interpolate((img.float() / 255 - MEAN) / STD, 224, mode="bicubic")
    torch.testing.assert_close(enc.preprocess(img), x)
    torch.testing.assert_close(z, ref_vit(sd, x, heads=6, patch=14, registers=4 if reg else 0), atol=2e-4, rtol=2e-4)
    assert_frozen(enc)


def test_dinov2_512_grid_and_resampling_semantics(tmp_path, monkeypatch):
    sd = dinov2_hub_sd(dim=64, depth=1)
    f = tmp_path / "w.pth"
    torch.save(sd, f)
    monkeypatch.setitem(E._DINOV2, "s", (64, 1, 4, "mlp"))  # a tiny stand-in width: same code path
    enc = load_encoder("dinov2-vit-s", path=f, resolution=512, grid=32)
    assert enc.resize == 448 and enc.grid == 32 and enc.num_tokens == 1024
    # REPA's timm resample (antialias=True, size-based), not DINOv2's scale-factor interpolation
    want = timm_pos.resample_abs_pos_embed(sd["pos_embed"], [32, 32])
    torch.testing.assert_close(enc.vit.pos_embed.data, want)
    img = images(1, 512)
    x = F.interpolate((img.float() / 255 - MEAN) / STD, 448, mode="bicubic")
    torch.testing.assert_close(enc(img), ref_vit(sd, x, heads=4, patch=14), atol=2e-4, rtol=2e-4)


def test_dinov2_hub_cache_lookup_and_missing_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        load_encoder("dinov2-vit-s")
    msg = str(e.value)
    assert str(tmp_path / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth") in msg
    assert os.path.join("ckpts", "dinov2_vits14_pretrain.pth") in msg
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth" in msg
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(dinov2_hub_sd(reg=True), tmp_path / "hub" / "checkpoints" / "dinov2_vits14_reg4_pretrain.pth")
    enc = load_encoder("dinov2-vit-s-reg")
    assert enc.vit.num_registers == 4 and enc.embed_dim == 384
    # REPA's spelling (utils.py: 'dinov2' and 'reg' in the first of three '-' parts) finds the same file
    alias = load_encoder(" dinov2reg-vit-s")
    assert alias.enc_type == "dinov2-vit-s-reg" == E.canonical_name("dinov2reg-vit-s")
    own, other = enc.vit.state_dict(), alias.vit.state_dict()
    assert set(own) == set(other) and all(torch.equal(own[k], other[k]) for k in own)
    img = images(1)
    assert torch.equal(enc(img), alias(img))
    assert [e.enc_type for e in load_encoders("dinov2reg-vit-s,dinov2-vit-s-reg")] == ["dinov2-vit-s-reg"] * 2
    with pytest.raises(FileNotFoundError, match=r"encoder dinov2-vit-b-reg: .*dinov2_vitb14_reg4_pretrain\.pth"):
        load_encoder("dinov2reg-vit-b")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_encoder("dinov2-vit-s", path=tmp_path / "nowhere.pth")


def test_wrong_keys_are_listed(tmp_path):
    sd = dinov2_hub_sd()
    sd["blocks.0.attn.extra"] = sd.pop("blocks.0.ls1.gamma")
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(E.EncoderWeightsError, match=r"missing keys: blocks\.0\.ls1\.gamma.*unexpected keys: blocks\.0\.attn\.extra"):
        load_encoder("dinov2-vit-s", path=tmp_path / "w.pth")
    # a ViT-B file under the ViT-S name: shapes listed
    torch.save(dinov2_hub_sd(reg=True), tmp_path / "r.pth")
    with pytest.raises(E.EncoderWeightsError, match="unexpected keys: register_tokens"):
        load_encoder("dinov2-vit-s", path=tmp_path / "r.pth")
    sd = dinov2_hub_sd()
    sd["norm.weight"] = torch.ones(385)
    torch.save(sd, tmp_path / "s.pth")
    with pytest.raises(E.EncoderWeightsError, match=r"norm.weight: file \(385,\) vs model \(384,\)"):
        load_encoder("dinov2-vit-s", path=tmp_path / "s.pth")


def test_dinov2_giant_swiglu_hidden_width():
    # vit-g is not built here (1.1B params): check the key layout on the meta device
    with torch.device("meta"):
        vit = E.ViT(patch=14, dim=1536, depth=1, heads=24, grid=16, hidden=(int(6144 * 2 / 3) + 7) // 8 * 8,
                    ffn="swiglu", layerscale=True, mask_token=True)
    sd = vit.state_dict()
    assert sd["blocks.0.mlp.w12.weight"].shape == (8192, 1536) and sd["blocks.0.mlp.w3.weight"].shape == (1536, 4096)


def test_swiglu_block_matches_formula():
    blk = E.vit.Block(32, 4, 48, ffn="swiglu", layerscale=True)
    x = torch.randn(2, 5, 32)
    h = blk.norm2(x)
    x1, x2 = blk.mlp.w12(h).split(48, -1)
    torch.testing.assert_close(blk.mlp(h), blk.mlp.w3(F.silu(x1) * x2))


# ------------------------------------------------------------------ MoCo v3, MAE

def mocov3_ckpt(dim=384, depth=12):
    sd, r = vit_keys(dim, depth, 4 * dim, layerscale=False)
    sd |= {"cls_token": r(1, 1, dim, s=1e-6), "pos_embed": r(1, 1 + 14 * 14, dim, s=1.0),  # 224px pretraining
           "patch_embed.proj.weight": r(dim, 3, 16, 16, s=0.05)}
    full = {f"module.base_encoder.{k}": v for k, v in sd.items()}
    full |= {f"module.momentum_encoder.{k}": v for k, v in sd.items()}
    full |= {"module.base_encoder.head.0.weight": r(4096, dim), "module.predictor.0.weight": r(4096, 256)}
    return {"epoch": 300, "arch": "vit_small", "state_dict": full}, sd


def test_mocov3_matches_reference(tmp_path, monkeypatch):
    ckpt, sd = mocov3_ckpt()
    os.makedirs(tmp_path / "ckpts")
    torch.save(ckpt, tmp_path / "ckpts" / "mocov3_vits.pth")
    monkeypatch.chdir(tmp_path)  # REPA's default place: ./ckpts/mocov3_vit{s}.pth
    enc = load_encoder("mocov3-vit-s", resolution=256, grid=16)
    assert set(enc.vit.state_dict()) == set(sd)
    img = images()
    x = (img.float() / 255 - MEAN) / STD  # no resize: 256px, 16px patches
    z = enc(img)
    assert z.shape == (2, 256, 384)
    torch.testing.assert_close(z, ref_vit(sd, x, heads=12, patch=16), atol=2e-4, rtol=2e-4)
    assert_frozen(enc)


def test_mae_matches_reference(tmp_path, monkeypatch):
    monkeypatch.setitem(E._MAE, "l", (64, 2, 4))  # MAE ViT-L is 300M params: same code at a tiny width
    sd, r = vit_keys(64, 2, 256, layerscale=False)
    sd |= {"cls_token": r(1, 1, 64, s=1.0), "pos_embed": r(1, 197, 64, s=1.0), "patch_embed.proj.weight": r(64, 3, 16, 16)}
    torch.save({"model": sd}, tmp_path / "mae.pth")
    enc = load_encoder("mae-vit-l", path=tmp_path / "mae.pth")
    img = images()
    x = (img.float() / 255 - MEAN) / STD
    # REPA's MAE forward_features: no final norm, tokens 1:
    torch.testing.assert_close(enc(img), ref_vit(sd, x, heads=4, patch=16, final_norm=False), atol=2e-4, rtol=2e-4)
    assert E._MAE["l"][0] == 64


def test_official_widths():
    assert E._DINOV2["b"][0] == 768 and E._DINOV2["l"][0] == 1024 and E._DINOV2["g"][0] == 1536
    assert E._MOCOV3["b"][0] == 768 and E._MAE["l"] == (1024, 24, 16)


# ------------------------------------------------------------------ DINO v1, I-JEPA, CLIP

def plain_vit_sd(dim, depth, patch, n_pos, cls=True):
    sd, r = vit_keys(dim, depth, 4 * dim, layerscale=False)
    sd |= {"pos_embed": r(1, n_pos, dim, s=1.0), "patch_embed.proj.weight": r(dim, 3, patch, patch, s=0.05)}
    if cls:
        sd["cls_token"] = r(1, 1, dim, s=1.0)
    return sd


def test_dinov1_matches_reference_from_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setitem(E._DINOV1, "b", (64, 2, 4))  # ViT-B/16 at a tiny width: same code path
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        load_encoder("dinov1-vit-b")
    msg = str(e.value)
    assert str(tmp_path / "hub" / "checkpoints" / "dino_vitbase16_pretrain.pth") in msg
    assert os.path.join("ckpts", "dinov1_vitb.pth") in msg
    assert "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth" in msg
    sd = plain_vit_sd(64, 2, 16, 197)  # the hub file: backbone only, 224px pretraining (14x14 + cls)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(sd, tmp_path / "hub" / "checkpoints" / "dino_vitbase16_pretrain.pth")
    enc = load_encoder("dinov1-vit-b", grid=16)
    assert set(enc.vit.state_dict()) == set(sd)
    torch.testing.assert_close(enc.vit.pos_embed.data, timm_pos.resample_abs_pos_embed(sd["pos_embed"], [16, 16]))
    img = images()
    x = (img.float() / 255 - MEAN) / STD  # REPA: ImageNet norm, no resize (256px, 16px patches)
    torch.testing.assert_close(enc.preprocess(img), x)
    z = enc(img)
    assert z.shape == (2, 256, 64)
    torch.testing.assert_close(z, ref_vit(sd, x, heads=4, patch=16, final_norm=True), atol=2e-4, rtol=2e-4)
    assert_frozen(enc)


def test_jepa_matches_reference(tmp_path, monkeypatch):
    monkeypatch.setitem(E._JEPA, "h", (64, 2, 4))  # ViT-H/14 (630M) at a tiny width
    sd = plain_vit_sd(64, 2, 14, 256, cls=False)  # no class token, sincos pos-embed for 16x16 patches
    ckpt = {"encoder": {f"module.{k}": v for k, v in sd.items()},
            "target_encoder": {f"module.{k}": v + 1 for k, v in sd.items()},
            "predictor": {"module.predictor_embed.weight": torch.zeros(8, 64)},
            "opt": {"state": {}, "param_groups": []}, "epoch": 300, "loss": 0.1, "batch_size": 2048, "lr": 1e-3}
    os.makedirs(tmp_path / "ckpts")
    torch.save(ckpt, tmp_path / "ckpts" / "ijepa_vith.pth")
    monkeypatch.chdir(tmp_path)  # REPA's place: ./ckpts/ijepa_vit{h}.pth
    enc = load_encoder("jepa-vit-h", grid=16)
    assert set(enc.vit.state_dict()) == set(sd) and enc.embed_dim == 64
    img = images()
    x = F.interpolate((img.float() / 255 - MEAN) / STD, 224, mode="bicubic")  # norm, then 224
    torch.testing.assert_close(enc.preprocess(img), x)
    z = enc(img)
    assert z.shape == (2, 256, 64)
    # context encoder ('encoder'), all tokens after the final norm
    torch.testing.assert_close(z, ref_vit(sd, x, heads=4, patch=14, final_norm=True), atol=2e-4, rtol=2e-4)
    assert_frozen(enc)
    with pytest.raises(ValueError, match="only at 256px"):
        load_encoder("jepa-vit-h", resolution=512)
    torch.save({"target_encoder": ckpt["target_encoder"]}, tmp_path / "t.pth")
    with pytest.raises(E.EncoderWeightsError, match="not an I-JEPA checkpoint.*target_encoder"):
        load_encoder("jepa-vit-h", path=tmp_path / "t.pth")
    ckpt["encoder"]["module.cls_token"] = torch.zeros(1, 1, 64)
    torch.save(ckpt, tmp_path / "c.pth")
    with pytest.raises(E.EncoderWeightsError, match="unexpected keys: cls_token"):
        load_encoder("jepa-vit-h", path=tmp_path / "c.pth")
    os.remove(tmp_path / "ckpts" / "ijepa_vith.pth")
    with pytest.raises(FileNotFoundError, match=r"ijepa_vith\.pth.*IN1K-vit\.h\.14-300e\.pth\.tar"):
        load_encoder("jepa-vit-h")


def clip_visual_sd(width=64, layers=2, out=32, grid=16, patch=14):
    """OpenAI CLIP `model.visual` keys (prefixed 'visual.' in the full file)."""
    g = torch.Generator().manual_seed(7)

    def r(*shape, s=0.02):
        return torch.randn(*shape, generator=g) * s

    d = width
    sd = {"conv1.weight": r(d, 3, patch, patch, s=0.05), "class_embedding": r(d, s=1.0),
          "positional_embedding": r(grid * grid + 1, d, s=1.0), "ln_pre.weight": 1 + r(d, s=0.1),
          "ln_pre.bias": r(d), "ln_post.weight": 1 + r(d, s=0.1), "ln_post.bias": r(d), "proj": r(d, out)}
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        sd |= {b + "attn.in_proj_weight": r(3 * d, d, s=d ** -0.5), b + "attn.in_proj_bias": r(3 * d),
               b + "attn.out_proj.weight": r(d, d, s=d ** -0.5), b + "attn.out_proj.bias": r(d),
               b + "ln_1.weight": 1 + r(d, s=0.1), b + "ln_1.bias": r(d), b + "ln_2.weight": 1 + r(d, s=0.1),
               b + "ln_2.bias": r(d), b + "mlp.c_fc.weight": r(4 * d, d, s=d ** -0.5), b + "mlp.c_fc.bias": r(4 * d),
               b + "mlp.c_proj.weight": r(d, 4 * d, s=(4 * d) ** -0.5), b + "mlp.c_proj.bias": r(d)}
    return sd


def ref_clip(sd, x, heads):
    """REPA's UpdatedVisionTransformer.forward in float64: no ln_post, no proj, class token dropped."""
    w = {k: v.double() for k, v in sd.items()}
    C = w["class_embedding"].shape[0]
    patch = w["conv1.weight"].shape[-1]
    x = F.conv2d(x.double(), w["conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    B = x.shape[0]
    x = torch.cat([w["class_embedding"].expand(B, 1, C), x], 1) + w["positional_embedding"]
    ln = lambda t, n: F.layer_norm(t, (C,), w[n + ".weight"], w[n + ".bias"], eps=1e-5)  # noqa: E731
    x = ln(x, "ln_pre")
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in w:
        b = f"transformer.resblocks.{i}."
        h = ln(x, b + "ln_1") @ w[b + "attn.in_proj_weight"].T + w[b + "attn.in_proj_bias"]
        q, k, v = h.split(C, -1)
        split = lambda t: t.reshape(B, -1, heads, C // heads).transpose(1, 2)  # noqa: E731
        a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(C // heads), -1) @ split(v)
        x = x + a.transpose(1, 2).reshape(B, -1, C) @ w[b + "attn.out_proj.weight"].T + w[b + "attn.out_proj.bias"]
        h = ln(x, b + "ln_2") @ w[b + "mlp.c_fc.weight"].T + w[b + "mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + h @ w[b + "mlp.c_proj.weight"].T + w[b + "mlp.c_proj.bias"]
        i += 1
    return x[:, 1:].float()


def torchscript_archive(sd, f):
    """A TorchScript archive holding `sd` under its dotted names, as OpenAI's ViT-L-14.pt does."""
    class Holder(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Holder()
    for key, v in sd.items():
        *mods, name = key.split(".")
        m = root
        for part in mods:
            if not hasattr(m, part):
                m.add_module(part, torch.nn.Module())
            m = getattr(m, part)
        m.register_parameter(name, torch.nn.Parameter(v, requires_grad=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(root), f)


CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def test_clip_matches_reference_from_torchscript_archive(tmp_path, monkeypatch):
    monkeypatch.setitem(E._CLIP, "L", (64, 2, 4, 32))  # ViT-L/14 at a tiny width
    monkeypatch.setenv("HOME", str(tmp_path))  # clip.load's default place: ~/.cache/clip/ViT-L-14.pt
    with pytest.raises(FileNotFoundError) as e:
        load_encoder("clip-vit-L")
    assert str(tmp_path / ".cache" / "clip" / "ViT-L-14.pt") in str(e.value)
    assert "https://openaipublic.azureedge.net/clip/models/" in str(e.value) and "ViT-L-14.pt" in str(e.value)
    vis = {k: v.half() for k, v in clip_visual_sd().items()}  # OpenAI's archive holds fp16 weights
    full = {f"visual.{k}": v for k, v in vis.items()}
    full |= {"positional_embedding": torch.zeros(77, 48).half(), "token_embedding.weight": torch.zeros(10, 48).half(),
             "transformer.resblocks.0.ln_1.weight": torch.ones(48).half(), "logit_scale": torch.tensor(4.6)}
    (tmp_path / ".cache" / "clip").mkdir(parents=True)
    torchscript_archive(full, tmp_path / ".cache" / "clip" / "ViT-L-14.pt")
    enc = load_encoder("clip-vit-L", grid=16)
    own = enc.vit.state_dict()
    assert set(own) == set(vis) and all(v.dtype == torch.float32 for v in own.values())
    assert enc.embed_dim == 64  # transformer width, as REPA's encoder.embed_dim
    img = images()
    x = (F.interpolate(img.float() / 255, 224, mode="bicubic") - CLIP_MEAN) / CLIP_STD  # resize, then CLIP norm
    torch.testing.assert_close(enc.preprocess(img), x)
    z = enc(img)
    assert z.shape == (2, 256, 64)
    want = ref_clip(vis, x, heads=4)
    torch.testing.assert_close(z, want, atol=2e-4, rtol=2e-4)
    assert_frozen(enc)
    # a plain state dict (visual keys only) saved with torch.save gives the same encoder
    torch.save({k: v.float() for k, v in vis.items()}, tmp_path / "v.pth")
    torch.testing.assert_close(load_encoder("clip-vit-L", path=tmp_path / "v.pth")(img), want, atol=2e-4, rtol=2e-4)
    with pytest.raises(ValueError, match="only at 256px"):
        load_encoder("clip-vit-L", resolution=512)
    bad = dict(vis)
    bad["attn_pool.weight"] = bad.pop("proj")
    torch.save(bad, tmp_path / "b.pth")
    with pytest.raises(E.EncoderWeightsError, match="missing keys: proj; unexpected keys: attn_pool.weight"):
        load_encoder("clip-vit-L", path=tmp_path / "b.pth")


def test_new_official_widths():
    assert E._DINOV1["b"] == (768, 12, 12) and E._JEPA["h"] == (1280, 32, 16) and E._CLIP["L"] == (1024, 24, 16, 768)
    with torch.device("meta"):
        vis = E.vit.CLIPVisual(patch=14, width=1024, layers=24, heads=16, grid=16, output_dim=768)
    assert sum(p.numel() for p in vis.parameters()) == 303_966_208  # CLIP ViT-L/14 visual tower


# ------------------------------------------------------------------ every name, strict, from its official file

TINY = (32, 1, 2)  # width, depth, heads: every architecture at a stand-in size, same code path


def official_file(name):
    """(where the official tools save the weights, relative to a fake home / cwd, the file's content, the
    backbone state dict REPA loads strictly from it), written here from the official layouts."""
    kind, _, size = name.split("-")[:3]
    dim, depth, _ = TINY
    if kind == "dinov2":
        reg = name.endswith("-reg")
        sd = dinov2_hub_sd(dim, depth, reg=reg, swiglu=size == "g")
        return f"hub/checkpoints/dinov2_vit{size}14{'_reg4' if reg else ''}_pretrain.pth", sd, sd
    if kind == "mocov3":
        ckpt, sd = mocov3_ckpt(dim, depth)
        return f"ckpts/mocov3_vit{size}.pth", ckpt, sd
    if kind == "mae":
        sd = plain_vit_sd(dim, depth, 16, 197)
        return f"ckpts/mae_vit{size}.pth", {"model": sd, "optimizer": {}, "epoch": 1599}, sd
    if kind == "dinov1":
        sd = plain_vit_sd(dim, depth, 16, 197)
        return "hub/checkpoints/dino_vitbase16_pretrain.pth", sd, sd
    if kind == "jepa":
        sd = plain_vit_sd(dim, depth, 14, 256, cls=False)
        return (f"ckpts/ijepa_vit{size}.pth", {"encoder": {f"module.{k}": v for k, v in sd.items()},
                                               "target_encoder": {}, "epoch": 300}, sd)
    assert kind == "clip", name
    sd = {k: v.half() for k, v in clip_visual_sd(dim, depth, out=16).items()}  # OpenAI's weights are fp16
    full = {f"visual.{k}": v for k, v in sd.items()} | {"logit_scale": torch.ones(())}
    return f".cache/clip/ViT-{size}-14.pt", full, sd


@pytest.mark.parametrize("name", E.SUPPORTED + tuple(E.ALIASES))
def test_every_encoder_loads_strict_from_its_official_file(name, tmp_path, monkeypatch):
    canon = E.canonical_name(name)
    for table in (E._DINOV2, E._MOCOV3, E._MAE, E._DINOV1, E._JEPA):
        for size, arch in list(table.items()):
            monkeypatch.setitem(table, size, TINY + tuple(arch[3:]))
    monkeypatch.setitem(E._CLIP, "L", TINY + (16,))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    rel, content, sd = official_file(canon)
    os.makedirs(os.path.dirname(tmp_path / rel))
    torch.save(content, tmp_path / rel)
    enc = load_encoder(name, resolution=256, grid=16)  # default lookup finds the file; strict load
    assert enc.enc_type == canon and enc.num_tokens == 256 and enc.grid == 16
    own = enc.vit.state_dict()
    assert set(own) == set(sd), name  # every file tensor is used, and nothing else is needed
    pos = "positional_embedding" if canon.startswith("clip") else "pos_embed"
    for k, v in sd.items():
        if k == pos and canon.startswith(("dinov2", "mocov3", "mae", "dinov1")):  # resampled once, to 16x16
            v = timm_pos.resample_abs_pos_embed(v, [16, 16])
        assert torch.equal(own[k], v.float()), (name, k)
    z = enc(images(1))
    assert z.shape == (1, 256, TINY[0]) and torch.isfinite(z).all()


# ------------------------------------------------------------------ several, names, grid, patch-pixels

def test_load_encoders_list_and_grid_check(tmp_path):
    torch.save(dinov2_hub_sd(), tmp_path / "d.pth")
    torch.save(mocov3_ckpt()[0], tmp_path / "m.pth")
    encs = load_encoders("dinov2-vit-s, mocov3-vit-s", paths=f"{tmp_path / 'd.pth'},{tmp_path / 'm.pth'}")
    assert [e.enc_type for e in encs] == ["dinov2-vit-s", "mocov3-vit-s"] and [e.embed_dim for e in encs] == [384, 384]
    check_grid(encs[0], 256)
    with pytest.raises(ValueError, match=r"dinov2-vit-s gives 256 tokens \(a 16x16 grid\) but the model has 64"):
        check_grid(encs[0], 64)
    with pytest.raises(ValueError, match="gives 256 tokens"):
        load_encoder("dinov2-vit-s", path=tmp_path / "d.pth", grid=8)
    with pytest.raises(ValueError, match="2 encoder names .* but 1 weight paths"):
        load_encoders("dinov2-vit-s,mocov3-vit-s", paths=[None])
    with pytest.raises(ValueError, match="loaded for 256px"):
        encs[0](images(1, 128))


def test_names():
    with pytest.raises(ValueError, match="unknown encoder 'dino'.*patch-pixels.*dinov2-vit-b.*mocov3-vit-b.*jepa-vit-h"
                                         ".*REPA's spellings dinov2reg-vit-s"):
        load_encoder("dino")
    assert set(E.ALIASES.values()) == {n for n in E.SUPPORTED if n.endswith("-reg")}
    assert E.canonical_name("mocov3-vit-b") == "mocov3-vit-b"


def test_patch_pixels_unchanged():
    enc = load_encoder("patch-pixels", resolution=8, grid=2)
    img = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(1, 3, 8, 8).to(torch.uint8)
    z = enc(img)
    x = img.float() / 127.5 - 1
    tok1 = x[0, :, 0:4, 4:8].reshape(-1)
    torch.testing.assert_close(z[0, 1], tok1 - tok1.mean())
    assert enc.embed_dim == 48 and enc.num_tokens == 4
    enc.train()
    assert not enc.training


def test_random_init_builds_every_encoder_without_files(tmp_path, monkeypatch):
    """random_init (for benchmarks) reads no file and has the architecture the FLOP counts assume."""
    from fastrepa.encoders import SUPPORTED, load_encoder
    from fastrepa.train.flops import encoder_dims
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no hub cache: a file read would fail
    monkeypatch.chdir(tmp_path)  # no ckpts/
    for name in SUPPORTED:
        with torch.device("meta"):
            enc = load_encoder(name, resolution=256, grid=16, random_init=True)
        assert enc.embed_dim == encoder_dims(name, 256, 16)[0] and enc.num_tokens == 256, name
        assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
