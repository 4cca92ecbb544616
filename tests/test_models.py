"""SiT: state-dict layout, parameter counts, initialisation and forward parity with a plain formula."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, tiny_model
from fastrepa.models import MODEL_NAMES, build_model
from fastrepa.models.embed import TimestepEmbedder, sincos_pos_embed_2d


def meta_model(name, **kw):
    with torch.device("meta"):
        return build_model(name, **kw)


@pytest.mark.parametrize("name,params,proj", [("SiT-B/2", 130_500_112, 7_344_896),
                                              ("SiT-L/2", 458_086_416, 7_869_184),
                                              ("SiT-XL/2", 675_111_184, 8_131_328)])
def test_parameter_counts_match_official(name, params, proj):
    m = meta_model(name)
    total = sum(p.numel() for p in m.parameters())
    in_proj = sum(p.numel() for p in m.projectors.parameters())
    assert (total - in_proj, in_proj) == (params, proj)


def test_xl2_state_dict_has_the_official_298_keys():
    sd = meta_model("SiT-XL/2").state_dict()
    assert len(sd) == 298
    expected = {"x_embedder.proj.weight", "x_embedder.proj.bias", "pos_embed", "t_embedder.mlp.0.weight",
                "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight", "blocks.27.attn.qkv.weight",
                "blocks.0.attn.proj.bias", "blocks.13.mlp.fc1.weight", "blocks.13.mlp.fc2.bias",
                "blocks.5.adaLN_modulation.1.weight", "projectors.0.0.weight", "projectors.0.2.weight",
                "projectors.0.4.bias", "final_layer.linear.weight", "final_layer.adaLN_modulation.1.bias"}
    assert expected <= set(sd)
    assert sd["y_embedder.embedding_table.weight"].shape == (1001, 1152)
    assert sd["projectors.0.4.weight"].shape == (768, 2048)
    assert sd["final_layer.linear.weight"].shape == (2 * 2 * 4, 1152)


def test_every_registry_name_builds_including_the_small_size():
    for name in MODEL_NAMES:
        m = meta_model(name)
        size = name.split("-")[-1].split("/")[0]
        if name.startswith("PDE-DiT"):  # FourierFlow's widths and spatial depths
            assert (m.hidden_size, len(m.spatial_blocks)) == {"S": (128, 4), "B": (256, 6), "XL": (512, 6)}[size]
            continue
        assert m.blocks[0].attn.qkv.in_features == {"S": 384, "B": 768, "L": 1024, "XL": 1152}[size]
    s = meta_model("SiT-S/2")
    assert s.final_layer.linear.in_features == 384 and s.projectors[0][0].in_features == 384


def test_qk_norm_adds_official_keys_only():
    plain = set(meta_model("SiT-B/2").state_dict())
    qk = set(meta_model("SiT-B/2", qk_norm=True).state_dict())
    assert qk - plain == {f"blocks.{i}.attn.{n}_norm.{w}" for i in range(12) for n in "qk" for w in ("weight", "bias")}
    assert not plain - qk


def mae_pos_embed(dim, grid):
    """MAE's numpy formula, written out independently."""
    gh = np.arange(grid, dtype=np.float32)
    gw = np.arange(grid, dtype=np.float32)
    g = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid, grid)

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(dim // 2, g[0]), one(dim // 2, g[1])], axis=1)


def test_pos_embed_is_the_mae_table_with_columns_first():
    ours = sincos_pos_embed_2d(64, 5).numpy()
    np.testing.assert_allclose(ours, mae_pos_embed(64, 5), atol=1e-12)
    # token 1 is (row 0, col 1): the first half (column) changes, the second (row) does not
    assert not np.allclose(ours[1, :32], ours[0, :32]) and np.allclose(ours[1, 32:], ours[0, 32:])
    m = tiny_model()
    np.testing.assert_allclose(m.pos_embed[0].numpy(), mae_pos_embed(64, 4).astype(np.float32), atol=1e-6)


def test_timestep_embedding_cos_first():
    t = torch.tensor([0.0, 0.3, 1.0])
    emb = TimestepEmbedder.timestep_embedding(t, 256)
    k = torch.arange(128, dtype=torch.float32)
    freqs = torch.exp(-math.log(10000) * k / 128)
    want = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, want)


def test_initialisation_as_official():
    m = build_model("SiT-S/2", **TINY)
    for b in m.blocks:
        assert b.adaLN_modulation[1].weight.abs().sum() == 0 and b.adaLN_modulation[1].bias.abs().sum() == 0
    fl = m.final_layer
    assert fl.linear.weight.abs().sum() == 0 and fl.adaLN_modulation[1].weight.abs().sum() == 0
    w = m.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert m.blocks[0].attn.qkv.bias.abs().sum() == 0
    assert abs(m.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.005
    assert not m.pos_embed.requires_grad
    pw = m.x_embedder.proj.weight
    assert pw.abs().max() <= math.sqrt(6 / (pw.shape[0] + pw[0].numel()))


def plain_sit_forward(m, x, t, y, qk_norm=False):
    """SiT written out with plain torch ops from the weights (independent of the model's code path)."""
    sd = {k: v.double() for k, v in m.state_dict().items()}
    p = m.patch_size
    x = x.double()
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    h = h + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    tf = torch.cat([torch.cos(t.double()[:, None] * freqs), torch.sin(t.double()[:, None] * freqs)], 1)
    te = F.linear(F.silu(F.linear(tf, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                  sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = te + sd["y_embedder.embedding_table.weight"][y]
    N, T, D = h.shape
    H = m.num_heads
    zs = None

    def ln(v, eps=1e-6):
        mu = v.mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt(((v - mu) ** 2).mean(-1, keepdim=True) + eps)

    for i in range(m.depth):
        pre = f"blocks.{i}."
        mod = F.linear(F.silu(c), sd[pre + "adaLN_modulation.1.weight"], sd[pre + "adaLN_modulation.1.bias"])
        s1, sc1, g1, s2, sc2, g2 = [u[:, None] for u in mod.chunk(6, dim=1)]
        a = ln(h) * (1 + sc1) + s1
        qkv = F.linear(a, sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"]).reshape(N, T, 3, H, D // H)
        q, k, v = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        if qk_norm:
            q = F.layer_norm(q, (D // H,), sd[pre + "attn.q_norm.weight"], sd[pre + "attn.q_norm.bias"], 1e-5)
            k = F.layer_norm(k, (D // H,), sd[pre + "attn.k_norm.weight"], sd[pre + "attn.k_norm.bias"], 1e-5)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), dim=-1)
        o = (w @ v).transpose(1, 2).reshape(N, T, D)
        h = h + g1 * F.linear(o, sd[pre + "attn.proj.weight"], sd[pre + "attn.proj.bias"])
        a = ln(h) * (1 + sc2) + s2
        f = F.gelu(F.linear(a, sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"]), approximate="tanh")
        h = h + g2 * F.linear(f, sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"])
        if i + 1 == m.encoder_depth:
            zs = []
            for j in range(len(m.projectors)):
                pj = f"projectors.{j}."
                z = F.silu(F.linear(h, sd[pj + "0.weight"], sd[pj + "0.bias"]))
                z = F.silu(F.linear(z, sd[pj + "2.weight"], sd[pj + "2.bias"]))
                zs.append(F.linear(z, sd[pj + "4.weight"], sd[pj + "4.bias"]))
    shift, scale = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    out = F.linear(ln(h) * (1 + scale[:, None]) + shift[:, None], sd["final_layer.linear.weight"],
                   sd["final_layer.linear.bias"])
    g = int(T ** 0.5)
    C = out.shape[-1] // (p * p)  # the latent channels (SiT), twice that with a learned sigma (DiT)
    out = out.reshape(N, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(N, C, g * p, g * p)
    return out, zs


@pytest.mark.parametrize("qk_norm", [False, True])
def test_forward_matches_plain_formula(qk_norm):
    m = tiny_model(qk_norm=qk_norm).eval()
    if qk_norm:
        with torch.no_grad():
            for b in m.blocks:
                b.attn.q_norm.weight.normal_(1, 0.2), b.attn.k_norm.bias.normal_(0, 0.2)
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0.1, 0.5, 0.9])
    y = torch.tensor([1, 7, 10])  # 10 = the null class
    out, zs = m(x, t, y)
    ref, ref_zs = plain_sit_forward(m, x, t, y, qk_norm)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    assert len(zs) == 2
    for z, rz in zip(zs, ref_zs):
        torch.testing.assert_close(z.double(), rz, atol=1e-5, rtol=1e-4)
    assert out.abs().mean() > 1e-3
    torch.testing.assert_close(m.velocity(x, t, y), out)


def test_math_backend_equals_sdpa():
    m = tiny_model().eval()
    m2 = tiny_model(attn_backend="math").eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 3])
    torch.testing.assert_close(m(x, t, y)[0], m2(x, t, y)[0], atol=1e-5, rtol=1e-5)


def test_hidden_states_stop_early_and_match_projector_input():
    m = tiny_model().eval()
    calls = []
    for i, b in enumerate(m.blocks):
        b.register_forward_hook(lambda mod, inp, out, i=i: calls.append(i))
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 3])
    h3, h1 = m.hidden_states(x, t, y, [3, 1])
    assert calls == [0, 1, 2]  # block 4 never ran
    calls.clear()
    _, zs = m(x, t, y)
    h2 = m.hidden_states(x, t, y, [2])[0]
    torch.testing.assert_close(zs[0], m.projectors[0](h2))
    assert not torch.allclose(h1, h3)
    with pytest.raises(ValueError, match="outside 1..4"):
        m.hidden_states(x, t, y, [5])


def test_label_dropout_train_mode_and_forced():
    m = tiny_model()
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.tensor([1, 2, 3, 4])
    m.eval()
    dropped = m(x, t, torch.full((4,), 10), return_zs=False)
    forced = m(x, t, y, force_drop_ids=torch.ones(4, dtype=torch.long), return_zs=False)
    torch.testing.assert_close(forced, dropped)
    kept = m(x, t, y, force_drop_ids=torch.zeros(4, dtype=torch.long), return_zs=False)
    torch.testing.assert_close(kept, m(x, t, y, return_zs=False))


@pytest.mark.parametrize("kw,msg", [(dict(encoder_depth=0), "encoder_depth=0 is outside 1..4"),
                                    (dict(encoder_depth=5), "encoder_depth=5 is outside 1..4"),
                                    (dict(num_heads=3), "divisible by num_heads"),
                                    (dict(bogus=1), "unknown model option"),
                                    (dict(attn_backend="cuda"), "attn_backend")])
def test_bad_model_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        build_model("SiT-S/2", **{**TINY, **kw})


def test_unknown_model_name_lists_known():
    with pytest.raises(ValueError, match="SiT-XL/2"):
        build_model("SiT-XXL/2")
