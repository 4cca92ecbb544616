"""The fused ops inside the model: a SiT block and a whole tiny SiT with Triton kernels (on DEVICE:
compiled on CUDA, interpreted on CPU) against the same weights on the PyTorch reference path, outputs
and every parameter gradient; the cross-block deferred residual; torch.compile(fullgraph) of a block.
Models are built and inputs drawn on the CPU (the same values everywhere), then moved to DEVICE."""
import copy

import pytest
import torch

from conftest import TINY, tiny_model
from fastrepa.models import build_model
from fastrepa.objectives.repa import repa_loss
from kernel_checks import DEVICE, assert_within_rule


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """fp32 means fp32 on CUDA too: no TF32 in cuBLAS or cuDNN (the patch-embed conv allows it by
    default), whatever another test left set; restored afterwards. No effect on the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _with_kernels(model, kernels, dtype=torch.float32):
    m = copy.deepcopy(model).to(device=DEVICE, dtype=dtype)
    for mod in m.modules():
        if hasattr(mod, "kernels"):
            mod.kernels = kernels
    return m


def _block_run(block, x, c, cot):
    x = x.detach().clone().requires_grad_(True)
    c = c.detach().clone().requires_grad_(True)
    out = block(x, c)
    (out * cot).sum().backward()
    return out.detach(), [x.grad, c.grad] + [p.grad for p in block.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", [dict(), dict(qk_norm=True, rope=True),
                                  dict(qk_norm=True, rope=True, rope_pairs="interleaved")],
                         ids=["plain", "qknorm-rope", "qknorm-rope-interleaved"])
def test_block_triton_equals_torch(dtype, opts):
    model = tiny_model(**opts)
    block = model.blocks[1]
    with torch.no_grad():  # non-trivial qk-norm affine parameters
        for p in block.attn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 64, generator=g).to(DEVICE)
    c = torch.randn(2, 64, generator=g).to(DEVICE)
    cot = torch.randn(2, 16, 64, generator=g).to(DEVICE)
    runs = {}
    for tag, kernels, dt in (("kernel", "triton", dtype), ("torch", "torch", dtype), ("oracle", "torch", torch.float64)):
        b = _with_kernels(block, kernels, dt)
        runs[tag] = _block_run(b, x.to(dt), c.to(dt), cot.to(dt))
    assert_within_rule(f"block out {dtype}", runs["kernel"][0], runs["torch"][0], runs["oracle"][0])
    names = ["x", "c"] + [n for n, _ in block.named_parameters()]
    for name, gk, gt, go in zip(names, runs["kernel"][1], runs["torch"][1], runs["oracle"][1]):
        assert gk is not None, f"no grad for {name}"
        # Gradients pass through several matmuls after the fused ops: allow the bf16 tolerance of the
        # chain (the rule still bounds the kernel by twice the torch path's own error).
        assert_within_rule(f"block grad {name} {dtype}", gk, gt, go, atol=1e-4 if dtype == torch.float32 else 5e-2)


def test_whole_model_and_loss_triton_equals_torch():
    """Every block boundary (including the deferred residual), the projectors and the alignment loss."""
    model = tiny_model(qk_norm=True)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=g).to(DEVICE)
    y = torch.tensor([1, 7], device=DEVICE)
    zs = [torch.randn(2, 16, 16, generator=g).to(DEVICE), torch.randn(2, 16, 24, generator=g).to(DEVICE)]
    time, noise = torch.rand(2, generator=g).to(DEVICE), torch.randn(2, 4, 8, 8, generator=g).to(DEVICE)
    results = {}
    for kernels in ("triton", "torch"):
        m = _with_kernels(model, kernels).train()
        den, proj = repa_loss(m, x, y, zs, time=time, noise=noise,
                              force_drop_ids=torch.zeros(2, dtype=torch.long, device=DEVICE))
        (den.mean() + 0.5 * proj).backward()
        results[kernels] = (den.detach(), proj.detach(), {n: p.grad for n, p in m.named_parameters()})
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["triton"][1], results["torch"][1], rtol=1e-5, atol=1e-6)
    for name, grad in results["torch"][2].items():
        if grad is None:  # pos_embed (fixed) and the label embedder rows nobody used
            assert results["triton"][2][name] is None, name
            continue
        assert results["triton"][2][name] is not None, name
        torch.testing.assert_close(results["triton"][2][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_deferred_residual_equals_plain_blocks():
    """run_blocks (residuals deferred into the next block's norm) == blocks called one by one (on DEVICE,
    so kernels='auto' runs the Triton kernels on CUDA and the reference on the CPU)."""
    model = tiny_model().eval().to(DEVICE)
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 4, 8, 8, generator=g).to(DEVICE), torch.rand(2, generator=g).to(DEVICE)
    y = torch.tensor([0, 3], device=DEVICE)
    h0, c = model.embed(x, t, y)
    plain, h = [], h0
    for block in model.blocks:
        h = block(h, c)
        plain.append(h)
    fused = model.hidden_states(x, t, y, depths=[1, 2, 3, 4])
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    out, zs = model(x, t, y)
    torch.testing.assert_close(zs[0], model.projectors[0](plain[TINY["encoder_depth"] - 1]))


def test_compile_fullgraph_block_reference_path():
    """Inductor, fullgraph, on the CPU through the reference path (kernels='auto' on CPU tensors), on any
    machine: the block and its inputs stay on the CPU explicitly."""
    block = tiny_model().blocks[0].to("cpu")
    g = torch.Generator().manual_seed(6)
    x, c = torch.randn(2, 16, 64, generator=g, device="cpu"), torch.randn(2, 64, generator=g, device="cpu")
    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(x, c), block(x, c), rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_block_triton_ops_stay_in_graph():
    """With kernels='triton' the custom ops trace into one graph (aot_eager runs them on DEVICE: compiled
    on CUDA, interpreted on CPU)."""
    block = _with_kernels(tiny_model(qk_norm=True, rope=True).blocks[0], "triton")
    g = torch.Generator().manual_seed(7)
    x, c = torch.randn(2, 16, 64, generator=g).to(DEVICE), torch.randn(2, 64, generator=g).to(DEVICE)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_e, out_c = block(xe, c, None, True), compiled(xc, c, None, True)
    torch.testing.assert_close(out_c[0], out_e[0])
    (out_e[0].sum() + out_e[1][1].sum()).backward()
    (out_c[0].sum() + out_c[1][1].sum()).backward()
    torch.testing.assert_close(xc.grad, xe.grad)


def test_kernels_option_is_validated():
    with pytest.raises(ValueError, match="kernels="):
        build_model("SiT-S/2", **{**TINY, "kernels": "cuda"})
    with pytest.raises(ValueError, match="head_dim"):
        build_model("SiT-S/2", **{**TINY, "num_heads": 2, "hidden_size": 36, "rope": True})


def test_rope_pairs_come_back_from_a_checkpoints_args(tmp_path):
    """A checkpoint whose args say rope_pairs=interleaved, or ERW's use_rope, samples with that pairing;
    an official REPA file (no such key) gets ours; the weights are the same keys either way."""
    from fastrepa.generation import model_from_checkpoint
    from fastrepa.official_ckpt import save_checkpoint_file
    model = tiny_model(rope=True)
    path = str(tmp_path / "0000001.pt")
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.rand(2), torch.tensor([1, 2])
    outs = {}
    base = {"model": "SiT-S/2", **{k: v for k, v in TINY.items() if k != "z_dims"}}
    for tag, extra, want in (("pairs", {"rope": True, "rope_pairs": "interleaved"}, "interleaved"),
                             ("erw", {"use_rope": True}, "interleaved"), ("ours", {"rope": True}, "half")):
        save_checkpoint_file(path, {"model": model.state_dict(), "ema": model.state_dict(), "args": {**base, **extra},
                                    "steps": 1})
        loaded, _ = model_from_checkpoint(path, overrides={"kernels": "torch"})
        assert {(b.attn.rope_grid, b.attn.rope_pairs) for b in loaded.blocks} == {((4, 4), want)}, tag
        with torch.no_grad():
            outs[tag] = loaded(x, t, y)[0]
    assert torch.equal(outs["pairs"], outs["erw"]) and not torch.allclose(outs["pairs"], outs["ours"])
