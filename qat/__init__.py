"""qat: quantization-aware training for text models in PyTorch."""

from .quant import FakeQuantizer, QuantSpec
from .surgery import PrepareReport, QATConfig, convert, prepare

__all__ = ["FakeQuantizer", "QuantSpec", "QATConfig", "PrepareReport", "prepare", "convert"]
__version__ = "0.1.0"
