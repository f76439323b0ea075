"""Bidirectional LSTM classifier with masked pooling; pairs encoded as [u, v, |u-v|, u*v]."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .common import make_embedding, mask_from, masked_max, masked_mean, pair_features

__all__ = ["BiLSTMClassifier", "POOLINGS"]

POOLINGS = ("mean", "max", "meanmax")


class BiLSTMClassifier(nn.Module):
    """Embedding -> ``nn.LSTM(bidirectional)`` -> masked mean/max pooling -> ``classifier``.

    With ``pair=True`` each sentence (``input_ids_a``/``input_ids_b``, falling back to
    ``input_ids`` for a when absent) is encoded by the same LSTM and the features
    ``[u, v, |u-v|, u*v]`` go through a one-hidden-layer MLP (``mlp``) before ``classifier``.
    ``pack=True`` runs the LSTM on packed sequences (exact for right-padded batches); with
    ``pack=False`` it runs on the padded tensor and only the pooling is masked.
    """

    def __init__(
        self,
        vocab_size: int,
        num_labels: int,
        pad_id: int = 0,
        embed_dim: int = 128,
        hidden_size: int = 128,
        num_layers: int = 1,
        dropout: float = 0.3,
        pooling: str = "max",
        pair: bool = False,
        mlp_hidden: int = 256,
        pack: bool = True,
        pretrained_embeddings: Tensor | None = None,
        freeze_embeddings: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is invalid: allowed {POOLINGS}")
        self.pad_id, self.pooling, self.pair, self.pack = pad_id, pooling, pair, pack
        self.embedding = make_embedding(vocab_size, embed_dim, pad_id, pretrained_embeddings,
                                        freeze_embeddings)
        self.lstm = nn.LSTM(embed_dim, hidden_size, num_layers=num_layers, batch_first=True,
                            bidirectional=True, dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        feat = 2 * hidden_size * (2 if pooling == "meanmax" else 1)
        if pair:
            self.mlp = nn.Sequential(nn.Linear(4 * feat, mlp_hidden), nn.ReLU(),
                                     nn.Dropout(dropout))
            feat = mlp_hidden
        self.classifier = nn.Linear(feat, num_labels)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Sentence vectors: (B, T) ids -> (B, 2H) (``meanmax``: (B, 4H))."""
        mask = mask_from(input_ids, attention_mask, self.pad_id)  # (B, T)
        x = self.dropout(self.embedding(input_ids))  # (B, T, E)
        if self.pack:
            lengths = mask.sum(dim=1).clamp_min(1).cpu()
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, _ = self.lstm(packed)
            h, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])  # (B,T,2H)
        else:
            h, _ = self.lstm(x)  # (B, T, 2H)
        if self.pooling == "mean":
            return masked_mean(h, mask)
        if self.pooling == "max":
            return masked_max(h, mask)
        return torch.cat([masked_mean(h, mask), masked_max(h, mask)], dim=-1)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        input_ids_a: Tensor | None = None,
        attention_mask_a: Tensor | None = None,
        input_ids_b: Tensor | None = None,
        attention_mask_b: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Logits (B, num_labels)."""
        if not self.pair:
            return self.classifier(self.dropout(self.encode(input_ids, attention_mask)))
        if input_ids_b is None:
            raise ValueError("BiLSTMClassifier(pair=True) needs input_ids_b in the batch "
                             "(word-level pair data)")
        if input_ids_a is None:
            input_ids_a, attention_mask_a = input_ids, attention_mask
        u = self.encode(input_ids_a, attention_mask_a)
        v = self.encode(input_ids_b, attention_mask_b)
        return self.classifier(self.mlp(self.dropout(pair_features(u, v))))
