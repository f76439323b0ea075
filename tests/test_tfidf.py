"""TF-IDF n-gram bags: the weights are scikit-learn's TfidfVectorizer(sublinear_tf=True) ones,
padding carries weight 0, the encoder round-trips through the DataModule's checkpoint state."""

from __future__ import annotations

import math

import pytest
import torch

from qat.data.batching import Collator
from qat.data.tfidf import TfidfEncoder, terms
from qat.models import EmbeddingBagMLP

DOCS = ["the cat sat on the mat", "the dog sat", "a cat and a dog and a cat", "mat mat mat"]


def test_terms_are_ngrams_of_the_tokens():
    assert terms("The cat, sat", 2) == ["the", "cat", ",", "sat", "the cat", "cat ,", ", sat"]
    assert terms("a b", 1) == ["a", "b"]


def test_weights_by_hand():
    enc = TfidfEncoder.fit(DOCS, ngram=1, min_df=1)
    ids, w = enc.bag("cat cat mat zebra")
    n = len(DOCS)
    idf = {t: math.log((1 + n) / (1 + sum(t in d.split() for d in DOCS))) + 1 for t in
           ("cat", "mat")}
    raw = {"cat": (1 + math.log(2)) * idf["cat"], "mat": idf["mat"]}
    norm = math.sqrt(sum(v * v for v in raw.values()))
    got = dict(zip(enc.vocab.decode(ids), w, strict=True))
    assert set(got) == {"cat", "mat"}  # unknown words carry nothing
    for t, v in raw.items():
        assert got[t] == pytest.approx(v / norm, rel=1e-12)
    assert w == sorted(w, reverse=True)  # highest weight first


def test_weights_equal_scikit_learn():
    sk = pytest.importorskip("sklearn.feature_extraction.text")
    from qat.data.vocab import tokenize

    enc = TfidfEncoder.fit(DOCS, ngram=2, min_df=1)
    vec = sk.TfidfVectorizer(tokenizer=tokenize, lowercase=False, token_pattern=None,
                             ngram_range=(1, 2), sublinear_tf=True).fit(DOCS)
    query = ["the cat sat on a dog", "mat and mat"]
    ref = vec.transform(query).toarray()
    col = vec.vocabulary_
    for row, text in zip(ref, query, strict=True):
        ids, w = enc.bag(text)
        ours = dict(zip(enc.vocab.decode(ids), w, strict=True))
        theirs = {t: row[j] for t, j in col.items() if row[j] != 0}
        assert ours.keys() == theirs.keys()
        for t in ours:
            assert ours[t] == pytest.approx(theirs[t], rel=1e-9)


def test_truncation_keeps_the_heaviest_terms_and_empty_docs_are_zero():
    enc = TfidfEncoder.fit(DOCS, ngram=2, min_df=1, max_length=3)
    ids, w = enc.bag(DOCS[2])
    full = TfidfEncoder.fit(DOCS, ngram=2, min_df=1, max_length=100).bag(DOCS[2])
    assert ids == full[0][:3] and w == full[1][:3]
    assert enc.bag("zebra") == ([enc.vocab.unk_id], [0.0])


def test_collator_pads_weights_with_zero_and_model_sums_them():
    enc = TfidfEncoder.fit(DOCS, ngram=1, min_df=1)
    feats = enc(DOCS[:2])
    batch = Collator(enc.pad_id)([{k: v[i] for k, v in feats.items()} | {"labels": 0, "idx": i}
                                  for i in range(2)])
    assert batch["term_weights"].dtype == torch.float32
    n0 = len(feats["input_ids"][0])
    n1 = len(feats["input_ids"][1])
    assert batch["term_weights"].shape == (2, max(n0, n1))
    assert float(batch["term_weights"][1, n1:].abs().sum()) == 0.0
    model = EmbeddingBagMLP(enc.vocab_size, 3, enc.pad_id, embed_dim=4, hidden_sizes=[])
    x = model.encode(batch["input_ids"], batch["attention_mask"], batch["term_weights"])
    e = model.embedding.weight
    ref = sum(w * e[i] for i, w in zip(feats["input_ids"][1], feats["term_weights"][1],
                                       strict=True))
    torch.testing.assert_close(x[1], ref)
    bag = EmbeddingBagMLP(enc.vocab_size, 3, enc.pad_id, embed_dim=4, hidden_sizes=[], bag=True)
    with torch.no_grad():
        bag.bag.weight.copy_(e)
    torch.testing.assert_close(bag.encode(batch["input_ids"], batch["attention_mask"],
                                          batch["term_weights"]), x)


def test_datamodule_tfidf_state_round_trip(data_dir):
    from qat.data import NewsgroupsDataModule

    kw = dict(data_dir=str(data_dir), tokenizer="tfidf", limit_train=200, limit_eval=50,
              max_length=64, min_freq=2, seed=1)
    dm = NewsgroupsDataModule(**kw)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert {"input_ids", "attention_mask", "term_weights", "labels"} <= set(batch)
    assert batch["input_ids"].shape[1] <= 64
    state = dm.state_dict()
    other = NewsgroupsDataModule(**{**kw, "seed": 2})  # another split: another vocabulary
    other.setup("fit")
    other.load_state_dict(state)
    assert other.vocab == dm.vocab and other.encoder.idf == dm.encoder.idf
    with pytest.raises(ValueError, match="tokenizer='tfidf'"):
        NewsgroupsDataModule(**{**kw, "tokenizer": "word"}).load_state_dict(state)
