"""Reusable Lightning callbacks: quantization schedule, pruning, distillation, RNG state in
checkpoints, run guards, step timing, progress lines."""

from ..distill.callback import DistillationCallback
from ..prune.callback import PruningCallback
from .guard import MidEpochResume, NonFiniteError, NonFiniteGuard, SigtermCheckpoint
from .progress import LineProgressBar, progress_bar
from .quantization import QuantizationCallback
from .rng import RNGStateCallback
from .timing import StepTimer

__all__ = ["QuantizationCallback", "PruningCallback", "DistillationCallback",
           "RNGStateCallback", "NonFiniteGuard", "NonFiniteError", "SigtermCheckpoint",
           "MidEpochResume", "StepTimer", "LineProgressBar", "progress_bar"]
