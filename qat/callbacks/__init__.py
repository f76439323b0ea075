"""Reusable Lightning callbacks: quantization schedule, RNG state in checkpoints, run guards."""

from .guard import MidEpochResume, NonFiniteError, NonFiniteGuard, SigtermCheckpoint
from .quantization import QuantizationCallback
from .rng import RNGStateCallback

__all__ = ["QuantizationCallback", "RNGStateCallback", "NonFiniteGuard", "NonFiniteError",
           "SigtermCheckpoint", "MidEpochResume"]
