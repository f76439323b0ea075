"""Quantized layers (drop-in subclasses of the torch modules) and their per-layer config.

The Hugging Face wrappers live in :mod:`qat.nn.hf` (imported on demand: it imports transformers).
"""

from .attention import QuantMultiheadAttention, QuantTransformerEncoderLayer, attn_prob_spec
from .base import (
    QuantModule,
    layer_quantizers,
    quant_class_for,
    quant_layers,
    register_quant_module,
    weight_quantizers,
)
from .config import W8A8, LayerQuantConfig, default_act_spec, default_weight_spec
from .linear import QuantConv1d, QuantEmbedding, QuantLinear
from .lstm import QuantLSTM

__all__ = [
    "QuantModule",
    "register_quant_module",
    "quant_class_for",
    "quant_layers",
    "weight_quantizers",
    "layer_quantizers",
    "LayerQuantConfig",
    "W8A8",
    "default_weight_spec",
    "default_act_spec",
    "QuantLinear",
    "QuantConv1d",
    "QuantEmbedding",
    "QuantLSTM",
    "QuantMultiheadAttention",
    "QuantTransformerEncoderLayer",
    "attn_prob_spec",
]
