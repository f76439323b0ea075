"""Magnitude and movement pruning: schedules, mask buffers applied in place, a Lightning
callback."""

from .callback import PruningCallback
from .groups import STRUCTURES, Target, build_units, match_modules
from .masks import (
    CRITERIA,
    NORMS,
    SCOPES,
    SparsityRow,
    apply_masks,
    compute_masks,
    format_sparsity,
    keep_raw_gradients,
    mask_gradients,
    masked_parameters,
    register_masks,
    remove_masks,
    sparsity_report,
    total_sparsity,
)
from .movement import MovementScores
from .schedule import (
    CubicSchedule,
    LinearSchedule,
    OneShotSchedule,
    SparsitySchedule,
    make_schedule,
)
from .sensitivity import SensitivityRow, format_sensitivity, layer_groups, prune_sensitivity

__all__ = [
    "PruningCallback",
    "Target",
    "STRUCTURES",
    "SCOPES",
    "NORMS",
    "CRITERIA",
    "MovementScores",
    "keep_raw_gradients",
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
    "SensitivityRow",
    "layer_groups",
    "prune_sensitivity",
    "format_sensitivity",
]
