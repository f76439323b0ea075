"""qat: quantization-aware training for text models in PyTorch."""

from .quant import FakeQuantizer, QuantSpec

__all__ = ["FakeQuantizer", "QuantSpec"]
__version__ = "0.1.0"
