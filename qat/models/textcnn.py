"""TextCNN (Kim, 2014): parallel 1-D convolutions over word embeddings, max-pooled over time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import make_embedding, mask_from

__all__ = ["TextCNN"]


class TextCNN(nn.Module):
    """Embedding -> Conv1d of each width in ``kernel_sizes`` -> ReLU -> max over valid
    positions -> dropout -> ``classifier``. Pairs use the concatenated ``input_ids``."""

    def __init__(
        self,
        vocab_size: int,
        num_labels: int,
        pad_id: int = 0,
        embed_dim: int = 128,
        num_filters: int = 100,
        kernel_sizes: Sequence[int] = (3, 4, 5),
        dropout: float = 0.5,
        pretrained_embeddings: Tensor | None = None,
        freeze_embeddings: bool = False,
    ) -> None:
        super().__init__()
        if not kernel_sizes or min(kernel_sizes) < 1:
            raise ValueError(f"kernel_sizes={kernel_sizes!r} is invalid: positive widths needed")
        self.pad_id = pad_id
        self.kernel_sizes = tuple(int(k) for k in kernel_sizes)
        self.embedding = make_embedding(vocab_size, embed_dim, pad_id, pretrained_embeddings,
                                        freeze_embeddings)
        self.convs = nn.ModuleList(nn.Conv1d(embed_dim, num_filters, k) for k in self.kernel_sizes)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(num_filters * len(self.kernel_sizes), num_labels)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                **kwargs: Any) -> Tensor:
        """``input_ids`` (B, T) -> logits (B, num_labels)."""
        mask = mask_from(input_ids, attention_mask, self.pad_id)  # (B, T)
        lengths = mask.sum(dim=1)  # (B,)
        x = self.embedding(input_ids) * mask.unsqueeze(-1)  # (B, T, E)
        x = x.transpose(1, 2)  # (B, T, E) -> (B, E, T)
        kmax = max(self.kernel_sizes)
        if x.shape[-1] < kmax:
            x = F.pad(x, (0, kmax - x.shape[-1]))  # (B, E, T) -> (B, E, kmax)
        pooled = []
        for k, conv in zip(self.kernel_sizes, self.convs, strict=True):
            h = torch.relu(conv(x))  # (B, F, T - k + 1)
            # a window is valid if it starts on a token and fits (or is the first window)
            pos = torch.arange(h.shape[-1], device=h.device)
            valid = (pos[None, :] + k <= lengths[:, None]) | (pos[None, :] == 0)  # (B, T')
            pooled.append((h * valid.unsqueeze(1)).amax(dim=-1))  # (B, F); h >= 0 after ReLU
        return self.classifier(self.dropout(torch.cat(pooled, dim=-1)))
