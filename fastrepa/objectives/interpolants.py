"""Stochastic interpolants x_t = alpha_t x + sigma_t eps (t = 0 data, t = 1 noise), as in official REPA.

- "linear":  alpha = 1 - t,          sigma = t,           alpha' = -1,                 sigma' = 1
- "cosine":  alpha = cos(pi t / 2),  sigma = sin(pi t/2), alpha' = -pi/2 sin(pi t/2),  sigma' = pi/2 cos(pi t/2)

The velocity target is alpha' x + sigma' eps. `score_from_velocity` is the official samplers.py
`get_score_from_velocity`, used by the Euler-Maruyama sampler.
"""
import math

import torch

PATH_TYPES = ("linear", "cosine")


def check_path_type(path_type: str) -> None:
    if path_type not in PATH_TYPES:
        raise ValueError(f"path_type={path_type!r} is not one of {PATH_TYPES}")


def interpolant(t, path_type: str = "linear"):
    """(alpha_t, sigma_t, d_alpha_t, d_sigma_t) at time(s) t, each a tensor shaped and typed like t.

    t may be a tensor of any shape (it is broadcast by the caller) or a python float (then the four
    values are python floats).
    """
    check_path_type(path_type)
    if not torch.is_tensor(t):
        t = float(t)
        if path_type == "linear":
            return 1 - t, t, -1.0, 1.0
        h = t * math.pi / 2
        return math.cos(h), math.sin(h), -math.pi / 2 * math.sin(h), math.pi / 2 * math.cos(h)
    if path_type == "linear":
        return 1 - t, t, torch.full_like(t, -1.0), torch.ones_like(t)
    h = t * math.pi / 2
    return torch.cos(h), torch.sin(h), -math.pi / 2 * torch.sin(h), math.pi / 2 * torch.cos(h)


def score_coefficients(t, path_type: str = "linear"):
    """(reverse_alpha_ratio, var) with score = (reverse_alpha_ratio * v - x) / var.

    reverse_alpha_ratio = alpha / alpha'; var = sigma^2 - reverse_alpha_ratio * sigma' * sigma
    (the official formula, same operation order). For "linear" this is -(1 - t) and t.
    """
    alpha, sigma, d_alpha, d_sigma = interpolant(t, path_type)
    ratio = alpha / d_alpha
    var = sigma ** 2 - ratio * d_sigma * sigma
    return ratio, var


def score_from_velocity(v, x, t, path_type: str = "linear"):
    """The score of x_t implied by the velocity prediction v (official `get_score_from_velocity`).

    v, x: [B, ...]; t: [B] tensor (broadcast over x's trailing dims) or a python float.
    """
    if torch.is_tensor(t):
        if t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"score_from_velocity: t must have shape [{x.shape[0]}] (one time per sample of x "
                             f"{tuple(x.shape)}), got {tuple(t.shape)}")
        t = t.view(t.shape[0], *([1] * (x.dim() - 1)))
    ratio, var = score_coefficients(t, path_type)
    return (ratio * v - x) / var


__all__ = ["PATH_TYPES", "check_path_type", "interpolant", "score_coefficients", "score_from_velocity"]
