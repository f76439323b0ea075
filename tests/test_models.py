"""Float model zoo: forward/backward on single, pair and regression batches; masking."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from qat.data.batching import Collator
from qat.data.encoding import HFEncoder, WordEncoder, minilm_path
from qat.data.vocab import Vocab
from qat.models import MODELS, BiLSTMClassifier, PretrainedClassifier, build_model

A = ["a cat sat on the mat .", "dogs bark", "the quick brown fox jumps over the lazy dog",
     "ok"]
B = ["a cat was sitting", "the dogs are loud and bark all night long", "a fox", "fine then"]
VOCAB = Vocab.build(A + B)

WORD_MODELS = {
    "textcnn": {"embed_dim": 16, "num_filters": 8},
    "bilstm": {"embed_dim": 16, "hidden_size": 8},
    "bilstm_pair": {"embed_dim": 16, "hidden_size": 8, "pair": True, "pooling": "meanmax"},
    "bilstm_nopack": {"embed_dim": 16, "hidden_size": 8, "pack": False, "pooling": "mean"},
    "transformer": {"d_model": 16, "nhead": 2, "num_layers": 2, "dim_feedforward": 32},
    "transformer_mean": {"d_model": 16, "nhead": 2, "num_layers": 1, "pooling": "mean",
                         "norm_first": True},
    "transformer_proj": {"d_model": 16, "nhead": 2, "num_layers": 1, "pooling": "mean",
                         "embed_dim": 6},
    "embbag": {"embed_dim": 16, "hidden_sizes": (32,)},
    "embbag_bag_pair": {"embed_dim": 16, "bag": True, "pair": True},
}
KINDS = {"single": (2, False), "pair": (3, False), "regression": (1, True)}


def _word_batch(kind: str) -> dict[str, torch.Tensor]:
    enc = WordEncoder(VOCAB, max_length=16)
    feats = enc(A) if kind == "single" else enc(A, B)
    n = len(A)
    labels = [0.5 * i for i in range(n)] if kind == "regression" else [i % 2 for i in range(n)]
    items = [{**{k: v[i] for k, v in feats.items()}, "labels": labels[i], "idx": i}
             for i in range(n)]
    return Collator(VOCAB.pad_id, regression=kind == "regression")(items)


def _build(key: str, num_labels: int) -> nn.Module:
    name = key.split("_")[0]
    torch.manual_seed(0)
    return build_model(name, vocab_size=len(VOCAB), num_labels=num_labels, pad_id=0,
                       **WORD_MODELS[key])


@pytest.mark.parametrize(("key", "kind"), [(k, kind) for k in sorted(WORD_MODELS)
                                           for kind in sorted(KINDS)
                                           if not (kind == "single" and "pair" in k)])
def test_forward_backward(key: str, kind: str) -> None:
    num_labels, regression = KINDS[kind]
    model = _build(key, num_labels)
    batch = _word_batch(kind)
    labels = batch.pop("labels")
    logits = model(**batch, unused_key=torch.zeros(1))  # unknown keys are ignored
    assert logits.shape == (len(A), num_labels) and torch.isfinite(logits).all()
    if regression:
        loss = nn.functional.mse_loss(logits.squeeze(-1), labels)
    else:
        loss = nn.functional.cross_entropy(logits, labels)
    loss.backward()
    assert isinstance(model.classifier, nn.Linear) and model.classifier.out_features == num_labels
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.classifier.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("key", ["textcnn", "bilstm", "bilstm_pair", "transformer",
                                 "transformer_mean", "transformer_proj", "embbag",
                                 "embbag_bag_pair"])
def test_padding_does_not_change_outputs(key: str) -> None:
    model = _build(key, 3).eval()
    batch = _word_batch("pair")
    with torch.no_grad():
        full = model(**batch)
        for i in range(len(A)):  # each example alone: no padding at all
            alone = {k: v[i : i + 1] for k, v in batch.items() if k != "labels"}
            for key_ids in [k for k in alone if k.startswith("input_ids")]:
                n = int(alone[key_ids.replace("input_ids", "attention_mask")].sum())
                for k in (key_ids, key_ids.replace("input_ids", "attention_mask"),
                          "token_type_ids" if key_ids == "input_ids" else ""):
                    if k in alone:
                        alone[k] = alone[k][:, :n]
            torch.testing.assert_close(model(**alone), full[i : i + 1], atol=1e-5, rtol=1e-4)


def test_uses_swappable_torch_modules() -> None:
    kinds = {k: {type(m) for m in _build(k, 2).modules()} for k in
             ("textcnn", "bilstm", "transformer", "embbag", "embbag_bag_pair")}
    assert {nn.Embedding, nn.Conv1d, nn.Linear} <= kinds["textcnn"]
    assert {nn.Embedding, nn.LSTM, nn.Linear} <= kinds["bilstm"]
    assert {nn.TransformerEncoderLayer, nn.Embedding, nn.Linear} <= kinds["transformer"]
    assert {nn.Embedding, nn.Linear} <= kinds["embbag"]
    assert nn.EmbeddingBag in kinds["embbag_bag_pair"]


def test_pretrained_embeddings_and_errors() -> None:
    emb = torch.randn(len(VOCAB), 16)
    m = build_model("textcnn", vocab_size=len(VOCAB), num_labels=2, embed_dim=16,
                    pretrained_embeddings=emb, freeze_embeddings=True)
    torch.testing.assert_close(m.embedding.weight, emb)
    assert not m.embedding.weight.requires_grad
    bag = build_model("embbag", vocab_size=len(VOCAB), num_labels=2, embed_dim=16, bag=True,
                      pretrained_embeddings=emb)
    torch.testing.assert_close(bag.bag.weight[1:], emb[1:])
    with pytest.raises(ValueError, match="shape"):
        build_model("bilstm", vocab_size=len(VOCAB), num_labels=2, embed_dim=8,
                    pretrained_embeddings=emb)
    # a narrower (GloVe-like) table feeds the encoder through embed_proj; positions start small
    glove = torch.randn(len(VOCAB), 6) * 0.4
    tf = build_model("transformer", vocab_size=len(VOCAB), num_labels=2, d_model=16, nhead=2,
                     embed_dim=6, pretrained_embeddings=glove)
    torch.testing.assert_close(tf.embedding.weight, glove)
    assert (tf.embed_proj.in_features, tf.embed_proj.out_features) == (6, 16)
    assert tf.position_embedding.weight.std() < 0.05
    assert build_model("transformer", vocab_size=10, num_labels=2, d_model=8,
                       nhead=2).embed_proj is None  # embed_dim defaults to d_model
    with pytest.raises(ValueError, match="unknown model"):
        build_model("gpt", vocab_size=5, num_labels=2)
    with pytest.raises(ValueError, match="pooling"):
        BiLSTMClassifier(10, 2, pooling="attention")
    with pytest.raises(ValueError, match="input_ids_b"):
        _build("bilstm_pair", 2)(**{k: v for k, v in _word_batch("single").items()
                                    if k != "labels"})
    with pytest.raises(ValueError, match="max_len"):
        build_model("transformer", vocab_size=10, num_labels=2, d_model=8, nhead=2,
                    max_len=4)(input_ids=torch.ones(1, 5, dtype=torch.long))
    assert set(MODELS) == {"textcnn", "bilstm", "transformer", "pretrained", "embbag"}


def _hf_batch(kind: str, path: str) -> dict[str, torch.Tensor]:
    enc = HFEncoder(path, max_length=24)
    feats = enc(A, B)
    regression = KINDS[kind][1]
    items = [{**{k: v[i] for k, v in feats.items()}, "labels": float(i) if regression else i % 3,
              "idx": i} for i in range(len(A))]
    return Collator(enc.pad_id, regression=regression)(items)


def _check_hf(model: PretrainedClassifier, kind: str, path: str) -> None:
    num_labels, regression = KINDS[kind]
    batch = _hf_batch(kind, path)
    labels = batch.pop("labels")
    logits = model(**batch)
    assert logits.shape == (len(A), num_labels)
    loss = (nn.functional.mse_loss(logits.squeeze(-1), labels) if regression
            else nn.functional.cross_entropy(logits, labels))
    loss.backward()
    head = model.classifier if model.pooling == "mean" else model.model.classifier
    assert head.weight.grad is not None
    emb = model.model.get_input_embeddings().weight
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():  # padding-invariant too
        alone = {k: v[1:2, : int(batch["attention_mask"][1].sum())] for k, v in batch.items()
                 if k != "idx"}
        torch.testing.assert_close(model(**alone), model(**batch)[1:2], atol=1e-4, rtol=1e-4)


def test_pretrained_minilm_pair() -> None:
    torch.manual_seed(0)
    model = PretrainedClassifier(vocab_size=None, num_labels=3)  # default: MiniLM
    assert model.name_or_path == minilm_path()
    assert isinstance(model.model.classifier, nn.Linear)
    assert model.model.classifier.out_features == 3
    assert model.model.config.problem_type == "single_label_classification"
    _check_hf(model, "pair", minilm_path())


def test_pretrained_minilm_mean_pooling() -> None:
    """all-MiniLM-L6-v2's folder says mean pooling: "auto" takes it, the encoder comes without
    its pooler, and the head pools over the attention mask only."""
    torch.manual_seed(0)
    model = PretrainedClassifier(num_labels=3, pooling="auto")
    assert model.pooling == "mean"
    assert not any("pooler" in n for n, _ in model.named_parameters())
    assert isinstance(model.classifier, nn.Linear) and model.classifier.out_features == 3
    assert all(m.training for m in model.modules())
    _check_hf(model, "pair", minilm_path())
    # the pooled vector is the masked mean of the encoder's hidden states
    batch = _hf_batch("pair", minilm_path())
    model.eval()
    with torch.no_grad():
        h = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        token_type_ids=batch["token_type_ids"]).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        ref = model.classifier((h * m).sum(1) / m.sum(1))
        torch.testing.assert_close(model(**{k: v for k, v in batch.items()
                                            if k not in ("labels", "idx")}), ref)


def test_pretrained_pooling_errors_and_fallback(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, BertConfig, BertModel

    with pytest.raises(ValueError, match="model.pooling='max'"):
        PretrainedClassifier(num_labels=2, pooling="max")
    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=32)
    BertModel(cfg).save_pretrained(tmp_path)  # no 1_Pooling folder: "auto" is cls
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(tmp_path)
    assert PretrainedClassifier(num_labels=2, name_or_path=str(tmp_path),
                                pooling="auto").pooling == "cls"


def test_pretrained_local_dir_regression(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, BertConfig, BertModel

    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=32)
    BertModel(cfg).save_pretrained(tmp_path)  # any local folder works, not only MiniLM
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(tmp_path)
    model = PretrainedClassifier(num_labels=1, name_or_path=str(tmp_path))
    assert model.model.config.problem_type == "regression"
    _check_hf(model, "regression", str(tmp_path))
