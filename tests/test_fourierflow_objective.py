"""FourierFlow's objective against a formula written here with fixed draws: flow matching of the target
frames given the condition (target eps - x), and the normalised-MSE alignment to the encoder's tokens."""
import contextlib

import torch

from fastrepa.models.pde_dit import build_pde_model
from fastrepa.objectives import FlowMatching, StepContext
from fastrepa.objectives.fourierflow import FourierFlowObjective


def test_loss_is_the_formula():
    torch.manual_seed(0)
    model = build_pde_model("S", input_size=16, patch_size=4, hidden_size=32, num_heads=2, spa_depth=2, tem_depth=1,
                            afno_depth=1, encoder_depth=1, z_dims=[12], projector_dim=16, head_dim=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer" in name:
                p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, 16, 12, generator=g)
    objective = FourierFlowObjective(model, FlowMatching(), [lambda target: z], proj_coeff=0.3)
    batch = {"cond": torch.randn(3, 4, 4, 16, 16, generator=g), "target": torch.randn(3, 4, 4, 16, 16, generator=g)}
    draws = [objective.draw(g) for _ in range(3)]
    draws = {k: torch.stack([d[k] for d in draws]) for k in draws[0]}
    assert set(draws) == {"time", "noise"} and draws["noise"].shape == (3, 4, 4, 16, 16)
    ctx = StepContext(autocast=contextlib.nullcontext)
    total, terms = objective.loss(model, objective.prepare(batch, draws, ctx), ctx)

    x, t, eps = batch["target"], draws["time"], draws["noise"]
    tv = t.view(-1, 1, 1, 1, 1)
    out, zt = model((1 - tv) * x + tv * eps, t, batch["cond"])
    denoise = ((out - (eps - x)) ** 2).mean(dim=(1, 2, 3, 4)).mean()
    a = z / z.norm(dim=-1, keepdim=True)
    b = zt[0] / zt[0].norm(dim=-1, keepdim=True)
    proj = ((a - b) ** 2).mean()
    torch.testing.assert_close(terms["loss"], denoise)
    torch.testing.assert_close(terms["proj_loss"], proj)
    torch.testing.assert_close(total, denoise + 0.3 * proj)
