"""PDE-DiT: FourierFlow's XL preset size, patches round trip, the cross-attention against a float64
formula, each sample its own time (the released repeat-order bug), frames mixed by the temporal blocks, the
projectors after spatial block encoder_depth, and the zero-init output."""
import math

import pytest
import torch

from fastrepa.models.pde_dit import CrossAttention, build_pde_model


def tiny(**kw):
    torch.manual_seed(0)
    m = build_pde_model("S", input_size=16, patch_size=4, hidden_size=32, num_heads=2, spa_depth=2, tem_depth=1,
                        afno_depth=1, encoder_depth=1, z_dims=[12], projector_dim=16, head_dim=8, **kw).double()
    with torch.no_grad():  # the zero-init layers carry signal
        for name, p in m.named_parameters():
            if "adaLN_modulation" in name or "final_layer" in name:
                p.normal_(0, 0.1)
    return m


def test_xl_preset_is_fourierflows_size():
    with torch.device("meta"):
        m = build_pde_model("XL")
    params = sum(p.numel() for p in m.parameters())
    assert 168.5e6 < params < 169.5e6  # 169.07M; the note derives ~169M from the released defaults
    assert m.grid == (16, 16) and m.latent_shape == (4, 4, 128, 128)


def test_patches_round_trip():
    m = tiny()
    x = torch.randn(2, 4, 4, 16, 16, dtype=torch.float64)
    p = m.patchify(x)
    assert p.shape == (2, 4, 16, 64)
    torch.testing.assert_close(p[1, 2, 5], x[1, 2, :, 4:8, 4:8].permute(1, 2, 0).reshape(-1))  # patch (1, 1)
    torch.testing.assert_close(m.unpatchify(p), x)


def test_cross_attention_is_the_formula():
    torch.manual_seed(1)
    ca = CrossAttention(16, heads=2, head_dim=4).double()
    x, ctx = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(3, 7, 16, dtype=torch.float64)
    q, (k, v) = x @ ca.to_q.weight.T, (ctx @ ca.to_kv.weight.T).split(8, dim=-1)
    out = torch.zeros(3, 5, 8, dtype=torch.float64)
    for h in range(2):
        s = slice(4 * h, 4 * h + 4)
        out[..., s] = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(4), -1) @ v[..., s]
    torch.testing.assert_close(ca(x, ctx), out @ ca.to_out.weight.T + ca.to_out.bias)


def test_each_sample_sees_its_own_time_and_frames_mix():
    m = tiny()
    g = torch.Generator().manual_seed(2)
    x, cond = (torch.randn(2, 4, 4, 16, 16, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0.1, 0.9], dtype=torch.float64)
    out, zs = m(x, t, cond)
    for b in range(2):  # batch elements are independent: the time embedding follows the token order
        alone, _ = m(x[b:b + 1], t[b:b + 1], cond[b:b + 1])
        torch.testing.assert_close(out[b:b + 1], alone)
    assert zs[0].shape == (2, 4, 16, 12)
    x2 = x.clone()
    x2[:, 0] += 1.0
    out2 = m(x2, t, cond, return_zs=False)
    assert (out2[:, 3] - out[:, 3]).abs().max() > 1e-6  # frame 0 reaches frame 3 (temporal blocks)
    cond2 = cond.clone()
    cond2[:, 1] += 1.0
    assert (m(x, t, cond2, return_zs=False) - out).abs().max() > 1e-6  # the condition matters


def test_projectors_follow_spatial_block_encoder_depth_and_the_output_starts_at_zero():
    m = tiny()
    x, cond = torch.randn(1, 4, 4, 16, 16, dtype=torch.float64), torch.randn(1, 4, 4, 16, 16, dtype=torch.float64)
    t = torch.tensor([0.5], dtype=torch.float64)
    _, zs = m(x, t, cond)
    with torch.no_grad():
        for p in m.spatial_blocks[1].parameters():
            p.add_(1.0)
    _, zs2 = m(x, t, cond)
    torch.testing.assert_close(zs[0], zs2[0])  # block 2 is past encoder_depth=1
    fresh = build_pde_model("S", input_size=16, patch_size=4, hidden_size=32, num_heads=2, spa_depth=2,
                            tem_depth=1, afno_depth=1, encoder_depth=1, z_dims=[12], projector_dim=16)
    assert fresh(x.float(), t.float(), cond.float(), return_zs=False).abs().max() == 0
    with pytest.raises(ValueError, match="PDE-DiT takes x and cond"):
        fresh(x.float()[:, :3], t.float(), cond.float())
    with pytest.raises(ValueError, match="encoder_depth=3 is outside 1..2"):
        build_pde_model("S", spa_depth=2, encoder_depth=3)
