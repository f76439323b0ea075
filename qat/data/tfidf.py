"""TF-IDF bags of word n-grams: per document, its distinct terms and their TF-IDF weights.

The weighting is scikit-learn's ``TfidfVectorizer(sublinear_tf=True)`` (smooth idf
``ln((1 + n) / (1 + df)) + 1``, tf ``1 + ln(count)``, each document L2-normalised), computed on
the training split only. A document becomes ``input_ids`` (its distinct terms, highest weight
first, at most ``max_length``) and ``term_weights`` (the same order); a model sums the rows of
an embedding table weighted by them: a dense network over the TF-IDF vector.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from .encoding import Features
from .vocab import SPECIALS, Vocab, tokenize

__all__ = ["terms", "TfidfEncoder"]


def terms(text: str, ngram: int) -> list[str]:
    """The word n-grams of ``text`` for n = 1 .. ``ngram`` (words joined by a space)."""
    words = tokenize(text)
    out = list(words)
    for n in range(2, ngram + 1):
        out += [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
    return out


class TfidfEncoder:
    """Encode texts as TF-IDF-weighted bags of n-gram ids (``kind = 'tfidf'``).

    Build it with :meth:`fit` on the training texts; ``vocab`` holds the terms (document
    frequency >= ``min_df``, the ``max_vocab`` most frequent), ``idf`` their idf weights.
    Pairs are encoded as one bag of both texts.
    """

    kind = "tfidf"

    def __init__(self, vocab: Vocab, idf: Sequence[float], ngram: int, max_length: int) -> None:
        if len(idf) != len(vocab):
            raise ValueError(f"{len(idf)} idf weights for a vocabulary of {len(vocab)}")
        if ngram < 1:
            raise ValueError(f"ngram={ngram} is invalid: must be >= 1")
        self.vocab, self.idf = vocab, list(map(float, idf))
        self.ngram, self.max_length = ngram, max_length

    @classmethod
    def fit(cls, texts: Iterable[str], ngram: int = 2, min_df: int = 2,
            max_vocab: int | None = None, max_length: int = 1024) -> TfidfEncoder:
        """Vocabulary and idf from ``texts`` (the training split)."""
        df: Counter[str] = Counter()
        n = 0
        for t in texts:
            df.update(set(terms(t, ngram)))
            n += 1
        keep = sorted((w for w, c in df.items() if c >= min_df and w not in SPECIALS),
                      key=lambda w: (-df[w], w))
        if max_vocab is not None:
            keep = keep[: max(max_vocab - len(SPECIALS), 0)]
        vocab = Vocab([*SPECIALS, *keep])
        idf = [0.0] * len(SPECIALS) + [math.log((1 + n) / (1 + df[w])) + 1.0 for w in keep]
        return cls(vocab, idf, ngram, max_length)

    @property
    def pad_id(self) -> int:
        return self.vocab.pad_id

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def bag(self, text: str) -> tuple[list[int], list[float]]:
        """(term ids, L2-normalised sublinear TF-IDF weights), highest weight first."""
        get, idf = self.vocab.stoi.get, self.idf
        counts = Counter(i for i in (get(w) for w in terms(text, self.ngram)) if i is not None)
        if not counts:
            return [self.vocab.unk_id], [0.0]
        w = {i: (1.0 + math.log(c)) * idf[i] for i, c in counts.items()}
        norm = math.sqrt(sum(v * v for v in w.values())) or 1.0
        ids = sorted(w, key=lambda i: (-w[i], i))[: self.max_length]
        return ids, [w[i] / norm for i in ids]

    def __call__(self, texts_a: Sequence[str], texts_b: Sequence[str] | None = None) -> Features:
        if texts_b is not None:
            if len(texts_b) != len(texts_a):
                raise ValueError(f"{len(texts_a)} first texts but {len(texts_b)} second ones")
            texts_a = [f"{a} {b}" for a, b in zip(texts_a, texts_b, strict=True)]
        ids, weights = [], []
        for t in texts_a:
            i, w = self.bag(t)
            ids.append(i)
            weights.append(w)
        return {"input_ids": ids, "term_weights": weights}  # type: ignore[dict-item]

    def state_dict(self) -> dict[str, Any]:
        return {"vocab": self.vocab.state_dict(), "idf": self.idf, "ngram": self.ngram}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], max_length: int) -> TfidfEncoder:
        return cls(Vocab.from_state_dict(state["vocab"]), state["idf"], int(state["ngram"]),
                   max_length)
