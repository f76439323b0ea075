"""Embedding-bag MLP: the dense bag-of-words network (mean of embeddings, or TF-IDF-weighted
sum of n-gram embeddings: a dense network over the TF-IDF vector)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .common import make_embedding, mask_from, masked_mean, pair_features

__all__ = ["EmbeddingBagMLP"]


class EmbeddingBagMLP(nn.Module):
    """Mean of the token embeddings -> MLP (``mlp``: Linear/ReLU/Dropout per hidden size) ->
    ``classifier``.

    ``bag=False`` (default): masked mean of an ``nn.Embedding`` (``embedding``), which
    ``qat.prepare`` can quantize; ``bag=True``: ``nn.EmbeddingBag(mode='mean')`` (``bag``)
    that skips ``pad_id``. With ``term_weights`` in the batch (``tokenizer: tfidf``) the
    bag is the weighted sum of the rows instead of their mean (then ``bag`` sums).
    ``activation`` after the bag (``relu`` / ``none``) acts on the first hidden layer
    ``W x_tfidf``. ``pair=True`` encodes ``input_ids_a``/``input_ids_b`` separately as
    ``[u, v, |u-v|, u*v]``; otherwise pairs use the concatenated ``input_ids``.
    """

    def __init__(
        self,
        vocab_size: int,
        num_labels: int,
        pad_id: int = 0,
        embed_dim: int = 128,
        hidden_sizes: Sequence[int] = (256,),
        dropout: float = 0.2,
        bag: bool = False,
        pair: bool = False,
        pretrained_embeddings: Tensor | None = None,
        freeze_embeddings: bool = False,
        activation: str = "none",
        embed_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if activation not in ("none", "relu"):
            raise ValueError(f"activation={activation!r} is invalid: allowed 'none', 'relu'")
        self.pad_id, self.use_bag, self.pair = pad_id, bag, pair
        self.act = nn.ReLU() if activation == "relu" else nn.Identity()
        self.embed_dropout = nn.Dropout(embed_dropout)
        if bag:
            self.bag = nn.EmbeddingBag(vocab_size, embed_dim, mode="sum", padding_idx=pad_id)
            if pretrained_embeddings is not None:
                src = make_embedding(vocab_size, embed_dim, pad_id, pretrained_embeddings)
                self.bag.weight.data.copy_(src.weight.data)
            self.bag.weight.requires_grad_(not freeze_embeddings)
        else:
            self.embedding = make_embedding(vocab_size, embed_dim, pad_id,
                                            pretrained_embeddings, freeze_embeddings)
        layers: list[nn.Module] = []
        d = embed_dim * (4 if pair else 1)
        for h in hidden_sizes:
            layers += [nn.Linear(d, h), nn.ReLU(), nn.Dropout(dropout)]
            d = h
        self.mlp = nn.Sequential(*layers)
        self.classifier = nn.Linear(d, num_labels)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               term_weights: Tensor | None = None) -> Tensor:
        """(B, T) ids -> (B, E): mean embedding of the real tokens, or the ``term_weights``
        (B, T) weighted sum (0 at padding)."""
        mask = mask_from(input_ids, attention_mask, self.pad_id)  # (B, T)
        if self.use_bag:  # 2-D input: one bag per row, pad_id skipped
            if term_weights is not None:
                return self.act(self.bag(input_ids, per_sample_weights=term_weights))
            return self.act(self.bag(input_ids) / mask.sum(1, keepdim=True).clamp_min(1))
        e = self.embedding(input_ids)  # (B, T, E)
        if term_weights is not None:
            return self.act(torch.einsum("bte,bt->be", e, term_weights.to(e.dtype)))
        return self.act(masked_mean(e, mask))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        input_ids_a: Tensor | None = None,
        attention_mask_a: Tensor | None = None,
        input_ids_b: Tensor | None = None,
        attention_mask_b: Tensor | None = None,
        term_weights: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Logits (B, num_labels)."""
        if not self.pair:
            x = self.encode(input_ids, attention_mask, term_weights)
        else:
            if input_ids_b is None:
                raise ValueError("EmbeddingBagMLP(pair=True) needs input_ids_b in the batch")
            if input_ids_a is None:
                input_ids_a, attention_mask_a = input_ids, attention_mask
            x = pair_features(self.encode(input_ids_a, attention_mask_a),
                              self.encode(input_ids_b, attention_mask_b))
        return self.classifier(self.mlp(self.embed_dropout(x)))
