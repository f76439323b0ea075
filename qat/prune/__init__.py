"""Magnitude and movement pruning: schedules, mask buffers applied in place, a Lightning
callback."""

from .callback import PruningCallback
from .groups import STRUCTURES, Target, build_units, match_modules
from .masks import (
    CRITERIA,
    NORMS,
    SCOPES,
    MovementScores,
    SparsityRow,
    apply_masks,
    compute_masks,
    format_sparsity,
    mask_gradients,
    masked_parameters,
    register_masks,
    remove_masks,
    sparsity_report,
    total_sparsity,
)
from .schedule import (
    CubicSchedule,
    LinearSchedule,
    OneShotSchedule,
    SparsitySchedule,
    make_schedule,
)

__all__ = [
    "PruningCallback",
    "Target",
    "STRUCTURES",
    "SCOPES",
    "NORMS",
    "CRITERIA",
    "MovementScores",
    "match_modules",
    "build_units",
    "compute_masks",
    "register_masks",
    "apply_masks",
    "mask_gradients",
    "masked_parameters",
    "remove_masks",
    "SparsityRow",
    "sparsity_report",
    "format_sparsity",
    "total_sparsity",
    "SparsitySchedule",
    "OneShotSchedule",
    "LinearSchedule",
    "CubicSchedule",
    "make_schedule",
]
