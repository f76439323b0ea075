"""qat.export: bit packing and integer checkpoints (exact). Shared helpers for test_export_*.py."""

from __future__ import annotations

import io
import os

import pytest
import torch
from torch import nn

import qat
from qat.export import (
    load_int_checkpoint,
    pack_codes,
    packed_nbytes,
    read_int_weights,
    save_int_checkpoint,
    unpack_codes,
)
from qat.models import BiLSTMClassifier, TextCNN, TransformerClassifier
from qat.quant import freeze

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB, CLASSES, SEQ = 60, 4, 16
ACT = {"bits": 8, "symmetric": False, "signed": False, "observer": "ema"}
SCHEMES = {
    "w8_tensor": {"weight": {"bits": 8, "granularity": "tensor"}},
    "w8_channel": None,
    "w8_asym": {"weight": {"bits": 8, "symmetric": False}},
    "w4_lsq": {"weight": {"bits": 4, "estimator": "lsq"}},
    "w4a4_lsq_plus": {"weight": {"bits": 4, "estimator": "lsq"},
                      "activation": {"bits": 4, "symmetric": False, "signed": False,
                                     "estimator": "lsq_plus"}},
    "w8_pact": {"weight": {"bits": 8, "granularity": "tensor", "estimator": "pact"}},
    "ternary": {"weight": {"bits": 2, "mode": "ternary", "estimator": "ste",
                           "ternary_scale": "learned"}},
    "binary": {"weight": {"bits": 1, "mode": "binary", "estimator": "ste"}},
    "w3_group": {"weight": {"bits": 3, "granularity": "group", "group_size": 8}},
}


# the CPU is shared: one intra-op thread keeps these small models fast and stable
pytestmark = pytest.mark.usefixtures("one_thread")


class TinyBert(nn.Module):
    """A random-init 2-layer BERT (hidden 32) classifier returning logits."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=48, max_position_embeddings=32,
                         num_labels=CLASSES, attn_implementation="eager")
        self.model = BertForSequenceClassification(cfg)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **kw):  # noqa: ANN001
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).logits


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "textcnn":
        return TextCNN(VOCAB, CLASSES, embed_dim=16, num_filters=8, kernel_sizes=(2, 3),
                       dropout=0.0)
    if name == "transformer":
        return TransformerClassifier(VOCAB, CLASSES, d_model=16, nhead=2, dim_feedforward=32,
                                     dropout=0.0, max_len=32)
    if name == "bilstm":
        return BiLSTMClassifier(VOCAB, CLASSES, embed_dim=16, hidden_size=8, dropout=0.0)
    pytest.importorskip("transformers")
    return TinyBert()


def synthetic(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Token ids with right padding; the label is the class whose 5 marker tokens occur most."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1 + 5 * CLASSES, VOCAB, (n, SEQ), generator=g)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    for i in range(n):
        marks = torch.randint(0, 5, (4,), generator=g) + 1 + 5 * labels[i]
        ids[i, torch.randperm(SEQ, generator=g)[:4]] = marks
    lengths = torch.randint(SEQ // 2, SEQ + 1, (n,), generator=g)
    mask = torch.arange(SEQ)[None] < lengths[:, None]
    ids = ids.masked_fill(~mask, 0)
    return {"input_ids": ids, "attention_mask": mask.long(), "labels": labels,
            "token_type_ids": torch.zeros_like(ids)}


def batches(data: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    n = len(data["labels"])
    return [{k: v[i:i + size] for k, v in data.items()} for i in range(0, n, size)]


def inputs(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in b.items() if k != "labels"}


def train(model: nn.Module, steps: int, seed: int = 0) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    data = batches(synthetic(32 * steps, seed), 32)
    for b in data:
        loss = nn.functional.cross_entropy(model(**inputs(b)), b["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()


def quantized(name: str, scheme: str | dict | None = "w8_channel", steps: int = 0) -> nn.Module:
    """A prepared model: (optionally trained) float, QAT steps with observers on, calibrated,
    then frozen, in eval mode."""
    model = build(name)
    if steps:
        train(model, steps)
    config = SCHEMES[scheme] if isinstance(scheme, str) else scheme
    pm = qat.prepare(model, config)[0]
    if steps:
        train(pm, max(steps // 3, 1), seed=1)
    pm.eval()
    with torch.no_grad():
        for b in batches(synthetic(96, 2), 32):
            pm(**inputs(b))
    return freeze(pm)


# ---- packing ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_roundtrip_every_width(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    qmin = -(2 ** (bits - 1)) if bits > 1 else 0
    codes = torch.randint(qmin, qmin + 2**bits, (7, 13), generator=g)
    packed = pack_codes(codes, bits, qmin)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(codes.numel(), bits)
    assert torch.equal(unpack_codes(packed, bits, codes.numel(), qmin).view(7, 13), codes.int())


def test_pack_ternary_binary_and_density() -> None:
    levels = torch.tensor([-1, 0, 1, 1, 0, -1, -1, 1, 0])
    packed = pack_codes(levels, 2, -1)
    assert packed.numel() == 3  # 4 ternary codes per byte
    assert torch.equal(unpack_codes(packed, 2, 9, -1), levels.int())
    signs = torch.tensor([1, -1, -1, 1, 1, 1, -1, 1, -1])
    packed = pack_codes(signs, 1, -1, binary=True)
    assert packed.numel() == 2  # 8 binary codes per byte
    assert torch.equal(unpack_codes(packed, 1, 9, -1, binary=True), signs.int())
    assert packed_nbytes(9, 4) == 5  # int4: two per byte


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([8]), 4, -8)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.tensor([0]), 9, 0)
    with pytest.raises(ValueError, match="expected"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 9, -8)


# ---- integer checkpoint -----------------------------------------------------------------------
def _same_outputs(a: nn.Module, b: nn.Module, data: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for batch in batches(data, 64):
            assert torch.equal(a(**inputs(batch)), b(**inputs(batch)))


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_int_checkpoint_exact_textcnn(scheme: str, tmp_path) -> None:
    pm = quantized("textcnn", scheme)
    path = tmp_path / "int.pt"
    size = save_int_checkpoint(pm, path)
    assert size.int_bytes > 0 and size.float_bytes > 0  # tiny models: file overhead dominates
    loaded = load_int_checkpoint(path, lambda: qat.prepare(build("textcnn"),
                                                           SCHEMES[scheme])[0])
    assert all(getattr(m, "weight_quant", None) is None for m in loaded.modules())
    _same_outputs(pm, loaded, synthetic(128, 5))


@pytest.mark.parametrize("name", ["transformer", "bilstm", "bert"])
@pytest.mark.parametrize("scheme", ["w8_channel", "w4_lsq", "ternary", "binary"])
def test_int_checkpoint_exact_models(name: str, scheme: str) -> None:
    pm = quantized(name, scheme)
    buf = io.BytesIO()
    save_int_checkpoint(pm, buf)
    loaded = load_int_checkpoint(buf, qat.prepare(build(name), SCHEMES[scheme])[0])
    _same_outputs(pm, loaded, synthetic(96, 5))


def test_int_checkpoint_file_is_plain_and_weights_packed(tmp_path) -> None:
    pm = quantized("textcnn", "w4_lsq")
    save_int_checkpoint(pm, tmp_path / "c.pt")
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    entry = raw["weights"]["classifier.weight"]
    assert entry["packed"].dtype == torch.uint8
    assert entry["packed"].numel() == packed_nbytes(pm.classifier.weight.numel(), 4)
    assert torch.equal(entry["scale"], pm.classifier.weight_quant.qparams()[0])
    assert "classifier.bias" in raw["float"] and "classifier.input_quant.scale" in raw["float"]
    assert not any(k.startswith("classifier.weight_quant") for k in raw["float"])


def _prune(model: nn.Module, sparsity: float = 0.5) -> None:
    """qat.prune's convention (a bool ``weight_mask`` buffer, weights zeroed in place), without
    importing qat.prune (it imports lightning, slow to import)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv1d | nn.Linear):
                keep = m.weight.abs() > m.weight.abs().flatten().quantile(sparsity)
                m.weight.mul_(keep)
                m.register_buffer("weight_mask", keep)


def test_int_checkpoint_mixed_precision_and_pruning() -> None:
    model = build("textcnn")
    _prune(model)
    config = {"weight": {"bits": 4, "estimator": "lsq"},
              "overrides": {"classifier": {"weight": {"bits": 8}},
                            "embedding": {"weight": {"bits": 2, "mode": "ternary",
                                                     "estimator": "ste"}}}}
    pm = qat.prepare(model, config)[0].eval()
    with torch.no_grad():
        for b in batches(synthetic(64, 2), 32):
            pm(**inputs(b))
    freeze(pm)
    buf = io.BytesIO()
    save_int_checkpoint(pm, buf)
    bits = {k: w.spec.bits for k, w in read_int_weights(buf).items()}
    assert bits == {"embedding.weight": 2, "convs.0.weight": 4, "convs.1.weight": 4,
                    "classifier.weight": 8}
    loaded = load_int_checkpoint(buf, qat.prepare(build("textcnn"), config)[0])
    for name in ("convs.0", "convs.1", "classifier"):
        w, mask = loaded.get_submodule(name).weight, loaded.get_submodule(name).weight_mask
        assert int((~mask).sum()) > 0 and bool((w[~mask] == 0).all())
    _same_outputs(pm, loaded, synthetic(96, 5))


def test_int_checkpoint_errors(tmp_path) -> None:
    pm = quantized("textcnn")
    buf = io.BytesIO()
    save_int_checkpoint(pm, buf)
    with pytest.raises(ValueError, match="no weight quantizer"):
        load_int_checkpoint(buf, build("textcnn"))  # float skeleton, no config
    with pytest.raises(ValueError, match="differs"):
        load_int_checkpoint(buf, qat.prepare(build("textcnn"), SCHEMES["w4_lsq"])[0])
    loaded = load_int_checkpoint(buf, build("textcnn"), config={})  # prepared here
    _same_outputs(pm, loaded, synthetic(32, 5))
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a qat integer checkpoint"):
        load_int_checkpoint(tmp_path / "other.pt", build("textcnn"))
    with pytest.raises(ValueError, match="no active weight quantizer"):
        save_int_checkpoint(build("textcnn"), io.BytesIO())


def test_int_checkpoint_size_targets() -> None:
    """An embedding-dominated model: int8 <= 0.26x, int4 <= 0.14x, ternary / binary smaller."""
    torch.manual_seed(0)
    ratios = {}
    for scheme in ("w8_tensor", "w4_lsq", "ternary", "binary"):
        model = TextCNN(4000, CLASSES, embed_dim=128, num_filters=32)
        pm = qat.prepare(model, SCHEMES[scheme])[0].eval()
        with torch.no_grad():
            pm(input_ids=torch.randint(1, 4000, (4, 12)))
        ratios[scheme] = save_int_checkpoint(freeze(pm), io.BytesIO()).ratio
    assert ratios["w8_tensor"] <= 0.26 and ratios["w4_lsq"] <= 0.14
    assert ratios["binary"] < ratios["ternary"] < ratios["w4_lsq"] < ratios["w8_tensor"]
