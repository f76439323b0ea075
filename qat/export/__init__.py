"""Export: integer checkpoints, ONNX (QDQ) for onnxruntime, and an int8 PyTorch CPU path."""

from .checkpoint import (
    CheckpointSize,
    checkpoint_size,
    float_checkpoint_bytes,
    load_int_checkpoint,
    read_int_weights,
    save_int_checkpoint,
)
from .pack import pack_codes, packed_nbytes, unpack_codes
from .qweight import IntWeight, quantize_weight, weight_quantizers

__all__ = [
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
