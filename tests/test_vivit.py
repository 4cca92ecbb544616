"""FourierFlow's ViViT target encoder: a checkpoint in the released layout (model_state_dict, module. and
encoder. prefixes, the decoder beside it) loads with its sizes read off the weights, the forward equals a
float64 formula written from the state dict, and other layouts fail naming the file."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastrepa.encoders import EncoderWeightsError
from fastrepa.encoders.vivit import ViViTEncoder, load_vivit


def released_checkpoint(path, dim=16, depth=2, heads=2, patch=4, frames=3, size=8):
    torch.manual_seed(0)
    enc = ViViTEncoder(patch=patch, channels=4, frames=frames, num_patches=(size // patch) ** 2, dim=dim,
                       depth=depth, heads=heads)
    sd = {k: torch.randn_like(v) * 0.3 for k, v in enc.state_dict().items()}
    full = {f"module.encoder.{k}": v for k, v in sd.items()}
    full["module.decoder.head.weight"] = torch.zeros(3, 3)
    torch.save({"model_state_dict": full, "epoch": 7}, path)
    return sd


def transformer(x, sd, prefix, depth, heads, dim):
    for i in range(depth):
        p = f"{prefix}.layers.{i}"
        h = F.layer_norm(x, (dim,), sd[f"{p}.0.norm.weight"], sd[f"{p}.0.norm.bias"])
        q, k, v = (h @ sd[f"{p}.0.fn.to_qkv.weight"].T).chunk(3, -1)
        outs = []
        for head in range(heads):
            s = slice(head * dim, (head + 1) * dim)
            a = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(dim), -1)
            outs.append(a @ v[..., s])
        x = x + torch.cat(outs, -1) @ sd[f"{p}.0.fn.to_out.0.weight"].T + sd[f"{p}.0.fn.to_out.0.bias"]
        h = F.layer_norm(x, (dim,), sd[f"{p}.1.norm.weight"], sd[f"{p}.1.norm.bias"])
        h = F.gelu(h @ sd[f"{p}.1.fn.net.0.weight"].T + sd[f"{p}.1.fn.net.0.bias"])
        x = x + h @ sd[f"{p}.1.fn.net.3.weight"].T + sd[f"{p}.1.fn.net.3.bias"]
    return F.layer_norm(x, (dim,), sd[f"{prefix}.norm.weight"], sd[f"{prefix}.norm.bias"])


def test_released_layout_loads_and_is_the_formula(tmp_path):
    path = str(tmp_path / "mae.pt")
    sd = {k: v.double() for k, v in released_checkpoint(path).items()}
    enc = load_vivit(path).double()
    assert (enc.patch, enc.frames, enc.num_tokens, enc.embed_dim) == (4, 3, 4, 16)
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.train().training
    x = torch.randn(2, 3, 4, 8, 8, dtype=torch.float64)
    patches = x.reshape(2, 3, 4, 2, 4, 2, 4).permute(0, 1, 3, 5, 4, 6, 2).reshape(2, 3, 4, 64)  # (p1 p2 c)
    h = patches @ sd["to_patch_embedding.1.weight"].T + sd["to_patch_embedding.1.bias"] + sd["pos_embedding"]
    ln = lambda t: F.layer_norm(t, (16,), sd["layer_norm.weight"], sd["layer_norm.bias"])  # noqa: E731
    h = ln(transformer(h.reshape(6, 4, 16), sd, "space_transformer", 2, 2, 16))
    h = h.reshape(2, 3, 4, 16).transpose(1, 2).reshape(8, 3, 16)
    h = ln(transformer(h, sd, "temporal_transformer", 2, 2, 16)).reshape(2, 4, 3, 16).transpose(1, 2)
    torch.testing.assert_close(enc(x), h)
    with pytest.raises(ValueError, match="built for"):
        enc(x[:, :2])


def test_other_layouts_fail_naming_the_file(tmp_path):
    bad = tmp_path / "vit.pt"
    torch.save({"model_state_dict": {"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}}, bad)
    with pytest.raises(EncoderWeightsError, match=r"vit.pt: no 'encoder.\*' keys"):
        load_vivit(str(bad))
    path = str(tmp_path / "mae.pt")
    released_checkpoint(path)
    ck = torch.load(path, weights_only=True)
    del ck["model_state_dict"]["module.encoder.layer_norm.weight"]
    torch.save(ck, tmp_path / "cut.pt")
    with pytest.raises(EncoderWeightsError, match=r"cut.pt: the ViViT encoder keys do not match: missing \['layer_norm"):
        load_vivit(str(tmp_path / "cut.pt"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_vivit(str(tmp_path / "none.pt"))
