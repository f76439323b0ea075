"""Reusable Lightning callbacks: quantization schedule, RNG state in checkpoints, run guards,
step timing, progress lines."""

from .guard import MidEpochResume, NonFiniteError, NonFiniteGuard, SigtermCheckpoint
from .progress import LineProgressBar, progress_bar
from .quantization import QuantizationCallback
from .rng import RNGStateCallback
from .timing import StepTimer

__all__ = ["QuantizationCallback", "RNGStateCallback", "NonFiniteGuard", "NonFiniteError",
           "SigtermCheckpoint", "MidEpochResume", "StepTimer", "LineProgressBar", "progress_bar"]
