"""Training objectives: interpolants, time samplers and the REPA loss (official loss.py semantics)."""
from fastrepa.objectives.interpolants import (
    PATH_TYPES,
    check_path_type,
    interpolant,
    score_coefficients,
    score_from_velocity,
)
from fastrepa.objectives.repa import (
    PREDICTIONS,
    WEIGHTINGS,
    check_prediction,
    check_weighting,
    label_dropout_prob,
    repa_loss,
    sample_time,
    total_loss,
)

__all__ = [
    "PATH_TYPES",
    "PREDICTIONS",
    "WEIGHTINGS",
    "check_path_type",
    "check_prediction",
    "check_weighting",
    "interpolant",
    "label_dropout_prob",
    "repa_loss",
    "sample_time",
    "score_coefficients",
    "score_from_velocity",
    "total_loss",
]
