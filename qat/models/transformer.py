"""Transformer encoder classifier trained from scratch."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .common import make_embedding, mask_from, masked_mean

__all__ = ["TransformerClassifier"]


class TransformerClassifier(nn.Module):
    """Token + learned position (+ segment) embeddings -> LayerNorm -> ``nn.TransformerEncoder``
    (``batch_first``, key padding mask) -> ``cls`` (position 0) or masked ``mean`` pooling ->
    ``classifier``. Pairs use the concatenated ``input_ids`` and ``token_type_ids``.

    ``embed_dim`` (default ``d_model``) is the width of the token table, e.g. 50 for GloVe
    6B-50d rows (``pretrained_embeddings``); a narrower table is mapped to ``d_model`` by the
    linear ``embed_proj``. Position and segment embeddings start at N(0, 0.02) (BERT's init),
    so they do not drown pretrained word vectors.
    """

    def __init__(
        self,
        vocab_size: int,
        num_labels: int,
        pad_id: int = 0,
        d_model: int = 128,
        nhead: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 512,
        dropout: float = 0.1,
        max_len: int = 512,
        pooling: str = "cls",
        type_vocab_size: int = 2,
        activation: str = "gelu",
        norm_first: bool = False,
        pretrained_embeddings: Tensor | None = None,
        freeze_embeddings: bool = False,
        embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling={pooling!r} is invalid: allowed ('cls', 'mean')")
        if d_model % nhead:
            raise ValueError(f"d_model={d_model} must be divisible by nhead={nhead}")
        self.pad_id, self.pooling, self.max_len = pad_id, pooling, max_len
        embed_dim = embed_dim or d_model
        self.embedding = make_embedding(vocab_size, embed_dim, pad_id, pretrained_embeddings,
                                        freeze_embeddings)
        self.embed_proj = nn.Linear(embed_dim, d_model) if embed_dim != d_model else None
        self.position_embedding = nn.Embedding(max_len, d_model)
        self.type_embedding = nn.Embedding(type_vocab_size, d_model) if type_vocab_size else None
        for table in (self.position_embedding, self.type_embedding):
            if table is not None:
                nn.init.normal_(table.weight, std=0.02)
        self.embed_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout,
                                           activation=activation, batch_first=True,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False,
                                             norm=nn.LayerNorm(d_model) if norm_first else None)
        self.classifier = nn.Linear(d_model, num_labels)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """``input_ids`` (B, T) -> logits (B, num_labels)."""
        t = input_ids.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len={self.max_len}")
        mask = mask_from(input_ids, attention_mask, self.pad_id)  # (B, T)
        pos = torch.arange(t, device=input_ids.device)
        x = self.embedding(input_ids)  # (B, T, E)
        if self.embed_proj is not None:
            x = self.embed_proj(x)  # (B, T, E) -> (B, T, D)
        x = x + self.position_embedding(pos)[None]  # (B, T, D)
        if self.type_embedding is not None:  # no token_type_ids: every token is segment 0
            if token_type_ids is None:
                x = x + self.type_embedding.weight[0]
            else:
                x = x + self.type_embedding(token_type_ids)
        x = self.dropout(self.embed_norm(x))
        h = self.encoder(x, src_key_padding_mask=~mask)  # (B, T, D)
        pooled = h[:, 0] if self.pooling == "cls" else masked_mean(h, mask)  # (B, D)
        return self.classifier(self.dropout(pooled))
