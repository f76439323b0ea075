"""Moved to :mod:`qat.quant.calibrate` (this path keeps old imports working)."""

from ..quant.calibrate import calibrate

__all__ = ["calibrate"]
