"""Frequency bands of an embedding: row ranges that take formats of their own, the rarest dropped.

qat's word vocabularies list the most frequent tokens first (:meth:`qat.data.vocab.Vocab.build`),
so an embedding's row index is its frequency rank. ``band_embedding(model, "embedding",
[10000, 25000])`` replaces that ``nn.Embedding`` with a :class:`BandedEmbedding`: rows
``[0, 10000)`` and ``[10000, 25000)`` become two ``nn.Embedding`` modules, ``embedding.bands.0``
and ``embedding.bands.1``, that :func:`qat.prepare` and :func:`qat.autoquant` quantize like any
embedding, each in a format of its own (frequent rows at 4 bits, rarer ones ternary); rows from
the last bound on are dropped: their tokens embed to zeros, as fully pruned rows do, and they
store nothing. A bound at or past the vocabulary size drops nothing (the bands past it are
empty and left out).

For a tokenizer whose ids are not frequency ranks (WordPiece, BPE) the bands are plain id
ranges: band only a vocabulary built most-frequent first.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BandedEmbedding", "band_embedding", "check_bands"]


def _check_bounds(bounds: Sequence[int], num_embeddings: int, where: str) -> list[int]:
    """Increasing positive row counts, cut at ``num_embeddings`` (a vocabulary smaller than a
    bound has fewer rows in that band, and the bands past it are empty: left out)."""
    ok = (isinstance(bounds, Sequence) and not isinstance(bounds, str) and len(bounds) > 0
          and all(isinstance(b, int) and not isinstance(b, bool) for b in bounds))
    if ok:
        seq = [int(b) for b in bounds]
        ok = seq[0] > 0 and all(a < b for a, b in zip(seq, seq[1:], strict=False))
    if not ok:
        shown = list(bounds) if isinstance(bounds, Sequence) and not isinstance(bounds, str) \
            else repr(bounds)
        raise ValueError(f"{where}: bounds={shown} is invalid: allowed increasing row counts > 0")
    cut = [b for b in seq if b < num_embeddings]
    return [*cut, num_embeddings] if len(cut) < len(seq) else cut


class BandedEmbedding(nn.Module):
    """An embedding table split into row bands (``bands[i]`` holds rows
    ``[bounds[i-1], bounds[i])``); ids from ``bounds[-1]`` on embed to zeros."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bounds: Sequence[int],
                 padding_idx: int | None = None) -> None:
        super().__init__()
        self.bounds = _check_bounds(bounds, num_embeddings, "BandedEmbedding")
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.padding_idx = padding_idx
        self.starts = [0, *self.bounds[:-1]]
        bands = []
        for lo, hi in zip(self.starts, self.bounds, strict=True):
            pad = padding_idx - lo if padding_idx is not None and lo <= padding_idx < hi else None
            bands.append(nn.Embedding(hi - lo, embedding_dim, padding_idx=pad))
        self.bands = nn.ModuleList(bands)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bounds: Sequence[int]) -> BandedEmbedding:
        """The bands of ``emb``'s rows (copied); rows from ``bounds[-1]`` on are left out."""
        if type(emb) is not nn.Embedding:
            raise ValueError(f"only a float nn.Embedding can be banded, not {type(emb).__name__}"
                             " (band before qat.prepare)")
        if emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse:
            raise ValueError("a banded embedding supports neither max_norm, "
                             "scale_grad_by_freq nor sparse gradients")
        out = cls(emb.num_embeddings, emb.embedding_dim, bounds, emb.padding_idx)
        out.to(device=emb.weight.device, dtype=emb.weight.dtype)
        with torch.no_grad():
            for lo, hi, band in zip(out.starts, out.bounds, out.bands, strict=True):
                band.weight.copy_(emb.weight[lo:hi])
        out.train(emb.training)
        return out

    def forward(self, input: Tensor) -> Tensor:
        """``input`` (...) ids -> (..., embedding_dim); each band looks up its own rows."""
        out: Tensor | None = None
        for lo, hi, band in zip(self.starts, self.bounds, self.bands, strict=True):
            inside = (input >= lo) & (input < hi)  # (...)
            y = band(torch.where(inside, input - lo, 0)) * inside.unsqueeze(-1)
            out = y if out is None else out + y
        assert out is not None
        return out

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bounds={self.bounds}, "
                f"dropped={self.num_embeddings - self.bounds[-1]}")


def check_bands(bands: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``{"module": name, "bounds": [...]}`` checked (bounds against the model come later)."""
    if bands is None:
        return None
    if not isinstance(bands, Mapping) or set(bands) - {"module", "bounds"} or \
            "bounds" not in bands:
        raise ValueError(f"embedding_bands={bands!r} is invalid: allowed null or "
                         "{module: <embedding name>, bounds: [rows, ...]}")
    module = bands.get("module", "embedding")
    if not isinstance(module, str) or not module:
        raise ValueError(f"embedding_bands.module={module!r} is invalid: allowed a module name")
    bounds = bands["bounds"]
    _check_bounds(bounds, 2**62, "embedding_bands")
    return {"module": module, "bounds": [int(b) for b in bounds]}


def band_embedding(model: nn.Module, name: str, bounds: Sequence[int],
                   inplace: bool = True) -> nn.Module:
    """``model`` with its embedding ``name`` banded at ``bounds`` (see the module doc); a module
    already banded at these bounds is left as it is."""
    if not inplace:
        model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    emb = modules.get(name)
    if emb is None:
        embeddings = [n for n, m in modules.items()
                      if isinstance(m, nn.Embedding | BandedEmbedding)]
        raise ValueError(f"embedding_bands.module={name!r}: {type(model).__name__} has no such "
                         f"module (its embeddings: {embeddings})")
    if isinstance(emb, BandedEmbedding):
        if emb.bounds != _check_bounds(bounds, emb.num_embeddings, "embedding_bands"):
            raise ValueError(f"{name!r} is banded at {emb.bounds} already, not {list(bounds)}")
        return model
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"embedding_bands.module={name!r} is a {type(emb).__name__}, not an "
                         "nn.Embedding")
    _check_bounds(bounds, emb.num_embeddings, f"embedding_bands of {name!r}")
    banded = BandedEmbedding.from_embedding(emb, bounds)
    parent_name, _, attr = name.rpartition(".")
    setattr(modules[parent_name] if parent_name else model, attr, banded)
    return model
