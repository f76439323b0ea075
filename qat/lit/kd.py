"""Moved to :mod:`qat.distill.config` (this path keeps old imports and configs working)."""

from ..distill.config import KDConfig, build_distiller

__all__ = ["KDConfig", "build_distiller"]
