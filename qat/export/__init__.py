"""Export: integer checkpoints, ONNX (QDQ) for onnxruntime, and an int8 PyTorch CPU path."""

from .agreement import Agreement, compare_predictions, ort_predict, torch_predict
from .checkpoint import (
    CheckpointSize,
    checkpoint_size,
    float_checkpoint_bytes,
    load_int_checkpoint,
    read_int_weights,
    save_int_checkpoint,
)
from .int8 import Int8Conv1d, Int8Embedding, Int8Linear
from .int8_model import int8_summary, to_int8
from .onnx import export_onnx, fold_weight_transposes, make_session, onnx_mode
from .pack import pack_codes, packed_nbytes, unpack_codes
from .qweight import IntWeight, quantize_weight, weight_quantizers

__all__ = [
    "Agreement",
    "Int8Conv1d",
    "Int8Embedding",
    "Int8Linear",
    "compare_predictions",
    "export_onnx",
    "fold_weight_transposes",
    "int8_summary",
    "make_session",
    "onnx_mode",
    "ort_predict",
    "to_int8",
    "torch_predict",
    "CheckpointSize",
    "IntWeight",
    "checkpoint_size",
    "float_checkpoint_bytes",
    "load_int_checkpoint",
    "pack_codes",
    "packed_nbytes",
    "quantize_weight",
    "read_int_weights",
    "save_int_checkpoint",
    "unpack_codes",
    "weight_quantizers",
]
