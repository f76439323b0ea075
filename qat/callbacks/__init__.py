"""Reusable Lightning callbacks: quantization schedule, RNG state in checkpoints."""

from .quantization import QuantizationCallback
from .rng import RNGStateCallback

__all__ = ["QuantizationCallback", "RNGStateCallback"]
