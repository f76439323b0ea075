"""Reusable Lightning callbacks: quantization schedule, pruning, distillation, the best
checkpoint among final models, RNG state in checkpoints, run guards, step timing, progress lines,
opt-in torch.compile."""

from ..distill.callback import DistillationCallback
from ..prune.callback import PruningCallback
from .best import BestCheckpoint, Scheduled, schedules_waiting
from .compile import CompileModel
from .guard import MidEpochResume, NonFiniteError, NonFiniteGuard, SigtermCheckpoint
from .progress import LineProgressBar, progress_bar
from .quantization import QuantizationCallback
from .rng import RNGStateCallback
from .timing import StepTimer

__all__ = ["QuantizationCallback", "PruningCallback", "DistillationCallback",
           "RNGStateCallback", "NonFiniteGuard", "NonFiniteError", "SigtermCheckpoint",
           "MidEpochResume", "StepTimer", "LineProgressBar", "progress_bar", "CompileModel",
           "BestCheckpoint", "Scheduled", "schedules_waiting"]
