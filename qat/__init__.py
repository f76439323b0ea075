"""qat: quantization-aware training for text models in PyTorch."""

from .quant import FakeQuantizer, QuantSpec
from .surgery import PrepareReport, QATConfig, convert, prepare  # isort: split

from . import export
from .auto import autoquant
from .export import export_onnx, load_int_checkpoint, save_int_checkpoint, to_int8

__all__ = ["FakeQuantizer", "QuantSpec", "QATConfig", "PrepareReport", "prepare", "convert",
           "export", "save_int_checkpoint", "load_int_checkpoint", "export_onnx", "to_int8",
           "autoquant"]
__version__ = "0.1.0"
