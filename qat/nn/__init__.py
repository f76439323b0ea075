"""Quantized layers (drop-in subclasses of the torch modules) and their per-layer config.

The Hugging Face wrappers live in :mod:`qat.nn.hf` (imported on demand: it imports transformers).
"""

from .attention import QuantMultiheadAttention, QuantTransformerEncoderLayer, attn_prob_spec
from .config import W8A8, LayerQuantConfig, default_act_spec, default_weight_spec
from .linear import QuantConv1d, QuantEmbedding, QuantLinear
from .lstm import QuantLSTM

__all__ = [
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
