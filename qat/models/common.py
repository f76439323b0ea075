"""Helpers shared by the float models: masked pooling, pair features, embedding init."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "masked_mean",
    "masked_max",
    "pair_features",
    "make_embedding",
    "mask_from",
    "first_present",
]


def mask_from(input_ids: Tensor, attention_mask: Tensor | None, pad_id: int) -> Tensor:
    """``(B, T)`` bool mask of real tokens (from ``attention_mask``, else ``input_ids != pad``)."""
    return input_ids.ne(pad_id) if attention_mask is None else attention_mask.bool()


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` (B, T, H) over the steps where ``mask`` (B, T) is true -> (B, H)."""
    m = mask.unsqueeze(-1).to(x.dtype)  # (B, T) -> (B, T, 1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def masked_max(x: Tensor, mask: Tensor) -> Tensor:
    """Max of ``x`` (B, T, H) over the valid steps -> (B, H); all-masked rows give 0."""
    m = mask.unsqueeze(-1)  # (B, T) -> (B, T, 1)
    out = x.masked_fill(~m, torch.finfo(x.dtype).min).amax(dim=1)
    return torch.where(m.any(dim=1), out, torch.zeros_like(out))


def pair_features(u: Tensor, v: Tensor) -> Tensor:
    """InferSent pair encoding ``[u, v, |u - v|, u * v]``: (B, D) x 2 -> (B, 4D)."""
    return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)


def make_embedding(
    vocab_size: int,
    embed_dim: int,
    pad_id: int,
    pretrained: Tensor | None = None,
    freeze: bool = False,
) -> nn.Embedding:
    """``nn.Embedding`` (pad row zero), optionally initialised from ``pretrained`` (V, E)."""
    emb = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
    if pretrained is not None:
        pretrained = torch.as_tensor(pretrained, dtype=torch.float32)
        if tuple(pretrained.shape) != (vocab_size, embed_dim):
            raise ValueError(f"pretrained embeddings have shape {tuple(pretrained.shape)}, "
                             f"expected (vocab_size, embed_dim) = ({vocab_size}, {embed_dim})")
        with torch.no_grad():
            emb.weight.copy_(pretrained)
    emb.weight.requires_grad_(not freeze)
    return emb


def first_present(batch: dict[str, Tensor | None], *keys: str) -> Tensor | None:
    """The first of ``keys`` present (not None) in ``batch``."""
    for k in keys:
        if batch.get(k) is not None:
            return batch[k]
    return None
