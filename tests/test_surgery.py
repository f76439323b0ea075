"""qat.prepare / qat.convert / QATConfig."""

from __future__ import annotations

import copy
import importlib.util
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat
from qat.nn import (
    QuantConv1d,
    QuantEmbedding,
    QuantLinear,
    QuantMultiheadAttention,
    QuantTransformerEncoderLayer,
)
from qat.quant import FakeQuantizer, freeze, quantizers

# the CPU is shared: one intra-op thread keeps these small models fast and stable
pytestmark = pytest.mark.usefixtures("one_thread")


class TextNet(nn.Module):
    """Embedding -> conv -> Transformer encoder -> GRU -> classifier: every kind of layer."""

    def __init__(self, vocab: int = 40, d: int = 16, classes: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.rnn = nn.GRU(d, d, batch_first=True)
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, classes))

    def forward(self, ids: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        x = self.emb(ids)
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)  # (B, T, D) -> (B, D, T) -> (B, T, D)
        x = self.encoder(x, src_key_padding_mask=pad)
        x, _ = self.rnn(x)
        return self.head(x.mean(1))


def _ids(b: int = 4, t: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 40, (b, t), generator=torch.Generator().manual_seed(seed))


def test_prepare_report_and_types() -> None:
    torch.manual_seed(0)
    model = TextNet()
    cfg = qat.QATConfig(skip=["head.2"])
    qm, report = qat.prepare(model, cfg)
    assert type(model.emb) is nn.Embedding  # inplace=False leaves the input alone
    assert isinstance(qm.emb, QuantEmbedding) and isinstance(qm.conv, QuantConv1d)
    layer = qm.encoder.layers[0]
    assert isinstance(layer, QuantTransformerEncoderLayer)
    assert isinstance(layer.self_attn, QuantMultiheadAttention)
    assert isinstance(layer.self_attn.out_proj, QuantLinear)
    assert isinstance(layer.linear1, QuantLinear) and isinstance(qm.head[0], QuantLinear)
    assert type(qm.head[2]) is nn.Linear
    assert qm.encoder.use_nested_tensor is False
    names = {r.name: r for r in report.swapped}
    assert names["emb"].bits == "W8A-" and names["head.0"].bits == "W8A8"
    assert names["encoder.layers.1.self_attn"].target == "QuantMultiheadAttention"
    assert report.skipped == [("head.2", "Linear", "head.2")]
    assert report.unsupported == [("rnn", "GRU")]
    assert "unsupported, left in float: rnn (GRU)" in str(report)
    pad = torch.zeros(4, 7, dtype=torch.bool)
    pad[1, 5:] = True
    qm.eval()
    with torch.no_grad():
        assert torch.isfinite(qm(_ids(), pad)).all()  # no nested-tensor fast path


def test_prepare_is_idempotent() -> None:
    qm, _ = qat.prepare(TextNet())
    qm(_ids())
    before = copy.deepcopy(qm.state_dict())
    again, report = qat.prepare(qm, inplace=True)
    assert again is qm and report.swapped == []
    assert "emb" in report.already and "encoder.layers.0" in report.already
    after = qm.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], atol=0, rtol=0, equal_nan=True)
    root, rep = qat.prepare(nn.Linear(3, 2))
    assert isinstance(root, QuantLinear) and rep.swapped[0].name == ""


def test_mixed_precision_rules_land() -> None:
    cfg = qat.QATConfig.from_dict({
        "overrides": {
            "encoder": {"bits": 4},
            "encoder.layers.1.linear2": {"weight": {"bits": 2}, "activation": None},
            "emb": {"weight": {"bits": 8}},
        },
        "attention": True,
    })
    qm, _ = qat.prepare(TextNet(), cfg)
    bits = {n: q.spec.bits for n, q in quantizers(qm)}
    assert bits["emb.weight_quant"] == 8 and bits["head.2.weight_quant"] == 8
    assert bits["head.2.input_quant"] == 8 and bits["conv.input_quant"] == 8
    assert bits["encoder.layers.0.linear1.weight_quant"] == 4
    assert bits["encoder.layers.0.self_attn.weight_quant"] == 4
    assert bits["encoder.layers.0.self_attn.attn_quant"] == 4
    assert bits["encoder.layers.0.self_attn.out_proj.input_quant"] == 4
    assert bits["encoder.layers.1.linear2.weight_quant"] == 2  # later rule wins
    assert "encoder.layers.1.linear2.input_quant" not in bits
    assert bits["encoder.layers.1.linear1.input_quant"] == 4
    # per-channel symmetric weight default survives a partial override
    spec = dict(quantizers(qm))["encoder.layers.1.linear2.weight_quant"].spec
    assert spec.granularity == "channel" and spec.symmetric
    # attention off for one layer: no q/k/v/attn quantizers there
    qm2, _ = qat.prepare(TextNet(), {"overrides": [("encoder.layers.0", {"attention": False})]})
    assert qm2.encoder.layers[0].self_attn.attn_quant is None
    assert qm2.encoder.layers[1].self_attn.attn_quant is not None
    assert qm2.encoder.layers[0].self_attn.weight_quant is not None


def test_config_validation_names_the_key() -> None:
    with pytest.raises(ValueError, match="'bitz'"):
        qat.QATConfig.from_dict({"bitz": 4})
    with pytest.raises(ValueError, match="weight has no field 'bitz'"):
        qat.QATConfig.from_dict({"weight": {"bitz": 4}})
    with pytest.raises(ValueError, match="bits"):
        qat.QATConfig.from_dict({"activation": {"bits": 12}})
    with pytest.raises(ValueError, match="no key 'weights'"):
        qat.QATConfig(overrides={"enc*": {"weights": None}})
    with pytest.raises(ValueError, match="no slot 'gate'"):
        qat.QATConfig(overrides=[("rnn", {"slots": {"gate": None}})])
    with pytest.raises(ValueError, match="attention must be true or false"):
        qat.QATConfig(attention="yes")
    with pytest.raises(ValueError, match="pattern"):
        qat.QATConfig(overrides=[{"bits": 4}])
    with pytest.raises(ValueError, match="group_size"):
        qat.prepare(nn.Linear(6, 2), {"weight": {"granularity": "group", "group_size": 4}})
    omegaconf = pytest.importorskip("omegaconf")
    node = omegaconf.OmegaConf.create({"weight": {"bits": 4}, "skip": ["head.*"],
                                       "overrides": [{"pattern": "emb", "bits": 8}]})
    cfg = qat.QATConfig.from_dict(node)
    assert cfg.weight.bits == 4 and cfg.skip == ("head.*",)
    assert cfg.overrides[0][0] == "emb" and cfg.overrides[0][1]["bits"] == 8
    again = qat.QATConfig.from_dict(cfg.to_dict())  # plain data round trip
    assert again.weight == cfg.weight and again.overrides == cfg.overrides


def test_unmatched_pattern_warns() -> None:
    with pytest.warns(UserWarning, match="'decoder.*' matches no module"):
        qat.prepare(TextNet(), {"overrides": {"decoder.*": {"bits": 4}}})


def test_hooks_survive_the_swap() -> None:
    model = TextNet()
    seen = []
    model.head[0].register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    qm, _ = qat.prepare(model)
    qm(_ids())
    assert seen == ["QuantLinear"]


def _train_steps(model: nn.Module, steps: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i in range(steps):
        loss = F.cross_entropy(model(_ids(seed=i)), torch.tensor([0, 1, 0, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    float_model = TextNet()
    cfg = qat.QATConfig(overrides={"encoder": {"bits": 4}})
    qm, _ = qat.prepare(float_model, cfg)
    _train_steps(qm)
    qm.head[0].input_quant.enable_fake_quant(False)
    freeze(qm.encoder)
    buf = io.BytesIO()
    torch.save(qm.state_dict(), buf)
    buf.seek(0)
    fresh, _ = qat.prepare(TextNet(), cfg)
    fresh.load_state_dict(torch.load(buf))
    for (n, a), (_, b) in zip(quantizers(qm), quantizers(fresh), strict=True):
        assert torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point), n
        assert a.is_fake_quant == b.is_fake_quant and a.is_observing == b.is_observing, n
    assert not fresh.head[0].input_quant.is_fake_quant
    qm.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(_ids(seed=9)), qm(_ids(seed=9)), atol=0, rtol=0)


def test_convert_matches_fake_quant_eval() -> None:
    torch.manual_seed(1)
    qm, _ = qat.prepare(TextNet(), {"overrides": {"encoder.layers.0": {"bits": 4}}})
    _train_steps(qm)
    freeze(qm)
    qm.eval()
    conv = qat.convert(qm)
    assert qm.emb.weight_quant is not None  # inplace=False
    for name, m in conv.named_modules():
        assert not isinstance(m._modules.get("weight_quant"), FakeQuantizer), name
    assert conv.head[0].input_quant is not None  # activation fake quant kept
    x = _ids(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), qm(x), atol=1e-6, rtol=0)
    # folded weights sit on the grid of their (former) quantizer
    q = qm.encoder.layers[0].linear1.weight_quant
    s, _ = q.qparams()
    lv = conv.encoder.layers[0].linear1.weight / s[:, None]
    torch.testing.assert_close(lv, lv.round(), atol=1e-3, rtol=0)
    assert lv.abs().max() <= 8


def test_prepared_4bit_model_learns() -> None:
    """Embedding -> encoder layer -> mean -> linear at W4A4; label = most tokens are < 10."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.emb = nn.Embedding(20, 16)
    model.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model.out = nn.Linear(16, 2)

    def run(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return m.out(m.enc(m.emb(ids)).mean(1))

    qm, _ = qat.prepare(model, {"weight": {"bits": 4}, "activation": {"bits": 4}})
    opt = torch.optim.Adam(qm.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(80):  # ~2.5 s on one CPU thread
        ids = torch.randint(0, 20, (32, 7), generator=g)
        loss = F.cross_entropy(run(qm, ids), ((ids < 10).sum(1) >= 4).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[:5]) / 5 > 0.5
    assert sum(losses[-10:]) / 10 < 0.2  # chance is ln 2 = 0.69
    assert qm.enc.linear1.weight_quant.spec.bits == 4
    assert qm.enc.self_attn.attn_quant.spec.bits == 4


@pytest.mark.skipif(importlib.util.find_spec("qat.nn.lstm") is None, reason="no qat.nn.lstm")
def test_lstm_is_swapped() -> None:
    from qat.nn.lstm import QuantLSTM

    model = nn.Sequential(nn.Embedding(40, 8), nn.LSTM(8, 12, batch_first=True,
                                                       bidirectional=True))
    qm, report = qat.prepare(model, {"overrides": {"1": {"weight": {"bits": 4}}}})
    assert isinstance(qm[1], QuantLSTM)
    assert any(r.name == "1" and r.target == "QuantLSTM" and r.weight_bits == 4
               for r in report.swapped)
    assert qm[1].weight_quant["weight_hh_l0_reverse"].spec.bits == 4
    out, _ = qm[1](qm[0](_ids()))
    assert out.shape == (4, 7, 24)
    freeze(qm)
    conv = qat.convert(qm)
    assert conv[1].weight_quant is None
    qm.eval()
    conv.eval()
    with torch.no_grad():
        x = qm[0](_ids(seed=3))
        torch.testing.assert_close(conv[1](conv[0](_ids(seed=3)))[0], qm[1](x)[0], atol=1e-6,
                                   rtol=0)
