"""Float text classifiers (quantized versions come from ``qat.prepare``).

Every model: ``Model(vocab_size, num_labels, pad_id=0, **hyperparameters)``;
``forward(**batch)`` (keys it does not use are ignored; pass the batch without ``labels``)
returns logits ``(B, num_labels)``; the output layer is named ``classifier``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .bilstm import BiLSTMClassifier
from .embbag import EmbeddingBagMLP
from .pretrained import PretrainedClassifier
from .textcnn import TextCNN
from .transformer import TransformerClassifier

__all__ = [
    "MODELS",
    "BiLSTMClassifier",
    "EmbeddingBagMLP",
    "PretrainedClassifier",
    "TextCNN",
    "TransformerClassifier",
    "build_model",
]

MODELS: dict[str, type[nn.Module]] = {
    "textcnn": TextCNN,
    "bilstm": BiLSTMClassifier,
    "transformer": TransformerClassifier,
    "pretrained": PretrainedClassifier,
    "embbag": EmbeddingBagMLP,
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate a model by registry name (``textcnn``, ``bilstm``, ``transformer``,
    ``pretrained``, ``embbag``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {sorted(MODELS)}")
    return MODELS[name](**kwargs)
