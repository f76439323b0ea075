"""Tokenizer, vocabulary (build, save/load), GloVe init, and the two encoders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qat.data.encoding import HFEncoder, WordEncoder, _pair_lengths, minilm_path, resolve_tokenizer
from qat.data.vocab import SPECIALS, Vocab, glove_embeddings, tokenize

TEXTS = ["The cat sat.", "the dog sat!", "A cat, a dog", "don't panic, it's fine"]


def test_tokenize() -> None:
    assert tokenize("Don't PANIC, it's 3.5 \"ok\"") == [
        "do", "n't", "panic", ",", "it", "'s", "3", ".", "5", '"', "ok", '"']
    assert tokenize("it 's a charming journey .") == ["it", "'s", "a", "charming", "journey", "."]
    assert tokenize("") == []


def test_build_order_min_freq_max_size() -> None:
    v = Vocab.build(TEXTS)
    assert tuple(v.itos[:4]) == SPECIALS == ("<pad>", "<unk>", "<cls>", "<sep>")
    assert (v.pad_id, v.unk_id, v.cls_id, v.sep_id) == (0, 1, 2, 3)
    # by frequency then alphabetically: a(2) cat(2) dog(2) sat(2) the(2) ,(2)
    assert v.itos[4:10] == [",", "a", "cat", "dog", "sat", "the"]
    v2 = Vocab.build(TEXTS, min_freq=2)
    assert v2.itos[4:] == [",", "a", "cat", "dog", "sat", "the"]
    v3 = Vocab.build(TEXTS, max_size=6)
    assert len(v3) == 6 and v3.itos[4:] == [",", "a"]
    assert v3.encode("a zebra") == [5, v3.unk_id]
    with pytest.raises(ValueError, match="min_freq"):
        Vocab.build(TEXTS, min_freq=0)
    with pytest.raises(ValueError, match="max_size"):
        Vocab.build(TEXTS, max_size=2)


def test_save_load_and_state_dict(tmp_path: Path) -> None:
    v = Vocab.build(TEXTS)
    v.save(tmp_path / "vocab.json")
    w = Vocab.load(tmp_path / "vocab.json")
    assert w == v and w.encode("the dog") == v.encode("the dog")
    u = Vocab(SPECIALS)
    u.load_state_dict(v.state_dict())
    assert u == v and u.stoi["cat"] == v.stoi["cat"]
    assert Vocab.from_state_dict(v.state_dict()).itos == v.itos
    with pytest.raises(ValueError, match="special tokens"):
        Vocab(["a", "b"])
    with pytest.raises(ValueError, match="itos"):
        Vocab.from_state_dict({"words": []})


def test_glove_embeddings(capsys: pytest.CaptureFixture[str]) -> None:
    v = Vocab([*SPECIALS, "the", "cat", "qqqzzzunseen"])
    e = glove_embeddings(v)
    assert e.shape == (7, 50) and e.dtype == torch.float32
    assert "2/3" in capsys.readouterr().out  # coverage printed
    assert torch.all(e[0] == 0)  # <pad>
    # GloVe 6B-50d "the" starts 0.418, 0.24968, -0.41242 (first row of the published file)
    torch.testing.assert_close(e[4, :3], torch.tensor([0.418, 0.24968, -0.41242]))
    assert not torch.equal(e[6], torch.zeros(50))  # random init for the unseen word
    torch.testing.assert_close(glove_embeddings(v, verbose=False), e)  # seeded
    with pytest.raises(ValueError, match="dim=100"):
        glove_embeddings(v, dim=100)


def test_pair_truncation_lengths() -> None:
    assert _pair_lengths(3, 4, 10) == (3, 4)
    assert _pair_lengths(10, 3, 8) == (5, 3)
    assert _pair_lengths(2, 30, 8) == (2, 6)
    assert _pair_lengths(10, 10, 7) == (4, 3)


def test_word_encoder_single_and_pair() -> None:
    v = Vocab.build(TEXTS)
    enc = WordEncoder(v, max_length=6)
    single = enc(["the cat sat . the dog sat", ""])
    assert single["input_ids"][0] == [v.cls_id, *v.encode("the cat sat . the")]
    assert single["input_ids"][1] == [v.cls_id]
    pair = enc(["the cat sat", "a"], ["the dog", ""])
    a, b = v.encode("the cat sat"), v.encode("the dog")
    assert pair["input_ids"][0] == [v.cls_id, *a[:2], v.sep_id, *b[:2]]
    assert pair["token_type_ids"][0] == [0, 0, 0, 0, 1, 1]
    assert pair["input_ids_a"][0] == a and pair["input_ids_b"][0] == b
    assert pair["input_ids_b"][1] == [v.unk_id]  # an empty sentence is never empty
    with pytest.raises(ValueError, match="max_length"):
        WordEncoder(v, max_length=2)
    with pytest.raises(ValueError, match="second"):
        enc(["a", "b"], ["c"])


def test_minilm_tokenizer() -> None:
    assert Path(minilm_path(), "config.json").is_file()
    assert resolve_tokenizer("minilm") == minilm_path() and resolve_tokenizer("word") == "word"
    enc = HFEncoder(minilm_path(), max_length=8)
    assert enc.pad_id == 0 and enc.vocab_size == 30522
    out = enc(["hello world"], ["a much longer second sentence here"])
    ids = out["input_ids"][0]
    assert len(ids) == 8 and ids[0] == 101 and ids.count(102) == 2  # [CLS] ... [SEP] ... [SEP]
    assert out["token_type_ids"][0][0] == 0 and out["token_type_ids"][0][-1] == 1
    a, b = ["a b c d e f g", "hi", "x " * 50], ["one", "two three four five six", "y " * 3]
    ref = enc.tokenizer(a, b, truncation=True, max_length=8)
    got = enc(a, b)
    assert got["input_ids"] == ref["input_ids"] and got["token_type_ids"] == ref["token_type_ids"]
    with pytest.raises(ValueError, match="tokenizer"):
        resolve_tokenizer("")


@pytest.mark.parametrize("max_length", [8, 64, 300])
def test_prefix_tokenization_is_exact(data_dir: Path, max_length: int) -> None:
    from qat.data.newsgroups import load_20newsgroups

    texts = load_20newsgroups(data_dir, "test", download=False).texts[::40]
    texts += ["x" * 5000 + " tail", "word " * 3000, "a\u00e9\u4e2d " * 900, ""]
    hf = HFEncoder(minilm_path(), max_length)
    ref = hf.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    assert hf(texts)["input_ids"] == ref
    v = Vocab.build(texts)
    ref_w = [[v.cls_id, *v.encode(t)[: max_length - 1]] for t in texts]
    assert WordEncoder(v, max_length)(texts)["input_ids"] == ref_w
