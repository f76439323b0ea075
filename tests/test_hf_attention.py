"""Attention of DistilBERT, ALBERT, DeBERTa-v2 and BERT cross-attention: quantized matmuls, and
the prepare report names every attention module left in float (tiny random models, offline)."""

from __future__ import annotations

import io
import os

import pytest
import torch
from numerics import assert_ulps_close
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import qat  # noqa: E402
from qat.nn.attention import ATTN_SLOTS  # noqa: E402
from qat.nn.base import QuantModule  # noqa: E402
from qat.quant import freeze  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
OFF = {"weight": None, "activation": None}


def _build(kind: str, impl: str = "eager") -> nn.Module:
    torch.manual_seed(0)
    t = transformers
    small = {"vocab_size": 50, "max_position_embeddings": 32, "attn_implementation": impl}
    if kind == "distilbert":
        cfg = t.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=48, dropout=0.0,
                                 attention_dropout=0.0, **small)
        return t.DistilBertModel(cfg)
    if kind == "albert":
        cfg = t.AlbertConfig(embedding_size=16, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=48, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0, **small)
        return t.AlbertModel(cfg)
    if kind.startswith("deberta"):
        small.pop("attn_implementation")
        cfg = t.DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0, relative_attention=True,
                                pos_att_type=["p2c", "c2p"], position_buckets=8,
                                max_relative_positions=16, share_att_key=kind == "deberta_v3",
                                **small)
        return t.DebertaV2Model(cfg)
    cfg = t.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=48, is_decoder=True, add_cross_attention=True,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **small)
    return t.BertModel(cfg)


KINDS = ["distilbert", "albert", "deberta_v2", "deberta_v3", "bert_cross"]


def _run(model: nn.Module, kind: str, **kw):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    extra = {}
    if kind == "bert_cross":
        extra = {"encoder_hidden_states": torch.randn(3, 5, 32, generator=g), "use_cache": False}
    return model(input_ids=ids, attention_mask=mask, **extra, **kw)


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    def attn(m: nn.Module) -> bool:
        return "attention" in type(m).__name__.lower()

    return [(n, m) for n, m in model.named_modules()
            if attn(m) and not any(attn(c) for c in m.modules() if c is not m)]


@pytest.mark.parametrize("kind", KINDS)
def test_attention_matmuls_are_quantized(kind: str) -> None:
    """Bug: prepare(attention=True) quantized only the Linear layers of these models, and the
    report said nothing."""
    fm = _build(kind)
    qm, report = qat.prepare(fm)
    assert report.float_attention == [], report
    if kind in ("distilbert", "albert", "bert_cross"):  # dispatch through the config view
        view = next(m.config for _, m in _attention_modules(qm) if "_base" in vars(m.config))
        assert view._attn_implementation == "qat_quant"
        assert qm.config._attn_implementation == "eager"
        view.some_flag = 3  # writes reach the model's config
        assert view._base is qm.config and qm.config.some_flag == 3
    buf = io.BytesIO()
    torch.save(qm, buf)  # (before output_attentions: transformers' capture hooks do not pickle)
    found = _attention_modules(qm)
    assert found
    for name, m in found:
        assert isinstance(m, QuantModule) and isinstance(m, type(fm.get_submodule(name))), name
        assert set(ATTN_SLOTS) <= set(m.activation_quantizers()), name
    qm.train()
    out = _run(qm, kind, output_attentions=True)
    out.last_hidden_state.square().mean().backward()
    assert all(m.attn_quant.observer.count > 0 for _, m in found)
    assert all(p.grad is not None for n, p in qm.named_parameters() if "q_lin" in n or "query" in n)
    freeze(qm.eval())
    with torch.no_grad():
        out = _run(qm, kind, output_attentions=True)
    probs = out.cross_attentions if kind == "bert_cross" else out.attentions
    p, q = probs[-1], found[-1][1].attn_quant
    s, zp = q.qparams()
    assert int(zp) == 0
    torch.testing.assert_close(p / s, (p / s).round(), atol=1e-3, rtol=0)  # on the 8-bit grid
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    again.load_state_dict(qm.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(_run(freeze(again.eval()), kind).last_hidden_state,
                                   out.last_hidden_state, atol=0, rtol=0)
    back = found[0][1].to_float()
    assert type(back) is type(fm.get_submodule(found[0][0]))
    assert all(type(c) is nn.Linear for c in back.children() if isinstance(c, nn.Linear))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_quantization_off_matches_float(kind: str, impl: str) -> None:
    if kind.startswith("deberta") and impl == "sdpa":
        pytest.skip("DeBERTa-v2 has one attention implementation")
    fm = _build(kind, impl).eval()
    qm, _ = qat.prepare(fm, OFF)
    with torch.no_grad():
        y0, y1 = _run(fm, kind).last_hidden_state, _run(qm, kind).last_hidden_state
    if impl == "eager":
        # the same operations in the same order as the float module: bit for bit
        torch.testing.assert_close(y1, y0, atol=0, rtol=0)
    else:  # the float model runs the fused sdpa kernel: another summation order, a few ulps
        assert_ulps_close(y1, y0, ulps=8)


@pytest.mark.parametrize("kind", KINDS)
def test_report_lists_attention_left_in_float(kind: str) -> None:
    fm = _build(kind)
    _, report = qat.prepare(fm, {"attention": False})
    listed = {name for name, _, _ in report.float_attention}
    assert listed == {n for n, _ in _attention_modules(fm)} and listed
    assert all("attention=false" in reason for *_, reason in report.float_attention)
    assert "attention matmuls left in float" in str(report)


def test_report_lists_an_unknown_attention_module() -> None:
    class PoolingAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.score = nn.Linear(8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (torch.softmax(self.score(x), dim=1) * x).sum(1)

    model = nn.Sequential(nn.Linear(8, 8), PoolingAttention())
    _, report = qat.prepare(model)
    assert report.float_attention == [("1", "PoolingAttention",
                                       "no quantized wrapper for this type")]
    _, report = qat.prepare(model, {"skip": ["1"]})
    assert report.float_attention == []  # skipped by the user: reported as skipped
