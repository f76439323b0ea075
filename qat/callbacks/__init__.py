"""Reusable Lightning callbacks: quantization schedule, RNG state in checkpoints, run guards,
step timing."""

from .guard import MidEpochResume, NonFiniteError, NonFiniteGuard, SigtermCheckpoint
from .quantization import QuantizationCallback
from .rng import RNGStateCallback
from .timing import StepTimer

__all__ = ["QuantizationCallback", "RNGStateCallback", "NonFiniteGuard", "NonFiniteError",
           "SigtermCheckpoint", "MidEpochResume", "StepTimer"]
