"""The REPA alignment projector: Linear-SiLU-Linear-SiLU-Linear (keys `projectors.K.0/2/4`).

Design envelope (for the Triton epilogue fusion to come): x [B, T, D], hidden 2048, out z_dim; the
matmuls stay on cuBLAS where it wins, the bias+SiLU epilogues are the fusion target.
"""
import torch.nn.functional as F


def projector_reference(x, w0, b0, w1, b1, w2, b2):
    h = F.silu(F.linear(x, w0, b0))
    h = F.silu(F.linear(h, w1, b1))
    return F.linear(h, w2, b2)


def projector(x, w0, b0, w1, b1, w2, b2):
    return projector_reference(x, w0, b0, w1, b1, w2, b2)
