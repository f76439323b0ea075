"""Embedding-bag MLP: the dense bag-of-words baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from .common import make_embedding, mask_from, masked_mean, pair_features

__all__ = ["EmbeddingBagMLP"]


class EmbeddingBagMLP(nn.Module):
    """Mean of the token embeddings -> MLP (``mlp``: Linear/ReLU/Dropout per hidden size) ->
    ``classifier``.

    ``bag=False`` (default): masked mean of an ``nn.Embedding`` (``embedding``), which
    ``qat.prepare`` can quantize; ``bag=True``: ``nn.EmbeddingBag(mode='mean')`` (``bag``)
    that skips ``pad_id``. ``pair=True`` encodes ``input_ids_a``/``input_ids_b`` separately as
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
    ) -> None:
        super().__init__()
        self.pad_id, self.use_bag, self.pair = pad_id, bag, pair
        if bag:
            self.bag = nn.EmbeddingBag(vocab_size, embed_dim, mode="mean", padding_idx=pad_id)
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

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, T) ids -> (B, E) mean embedding of the real tokens."""
        if self.use_bag:
            return self.bag(input_ids)  # 2-D input: one bag per row, pad_id skipped
        mask = mask_from(input_ids, attention_mask, self.pad_id)
        return masked_mean(self.embedding(input_ids), mask)

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
            x = self.encode(input_ids, attention_mask)
        else:
            if input_ids_b is None:
                raise ValueError("EmbeddingBagMLP(pair=True) needs input_ids_b in the batch")
            if input_ids_a is None:
                input_ids_a, attention_mask_a = input_ids, attention_mask
            x = pair_features(self.encode(input_ids_a, attention_mask_a),
                              self.encode(input_ids_b, attention_mask_b))
        return self.classifier(self.mlp(x))
