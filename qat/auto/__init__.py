"""Compression to a budget: per-layer sensitivity, exact width allocation, a readable config.

:func:`autoquant` (also ``qat.autoquant``) measures how much each quantizable layer group's
output quality suffers at each candidate format, chooses the formats of least total sensitivity
that fit a budget (bytes, average bits or bit-operations), and returns a ``quant`` config with
name-pattern overrides. :class:`AutoQuantCallback` does the same inside ``qat-train``
(``quant=auto_per_channel_lsq quant.budget=0.10``) before quantization-aware training starts.
"""

from .allocate import KINDS, InfeasibleBudget, Problem, brute_force, solve
from .api import AutoQuantReport, GroupRow, autoquant
from .callback import AutoQuantCallback, allocate_for_run, expected_sparsity, restore_allocation
from .layers import Candidate, Group, Layer, find_layers, group_layers

__all__ = ["autoquant", "AutoQuantReport", "GroupRow", "AutoQuantCallback", "allocate_for_run",
           "restore_allocation", "expected_sparsity", "KINDS", "Problem", "solve",
           "brute_force", "InfeasibleBudget", "Candidate", "Group", "Layer", "find_layers",
           "group_layers"]
