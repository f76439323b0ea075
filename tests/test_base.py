"""qat.nn.base: one definition of a quantized layer (base class, registry, enumerations)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qat
from qat.nn import QuantLinear, QuantLSTM, QuantMultiheadAttention
from qat.nn.base import (
    QuantModule,
    layer_quantizers,
    quant_class_for,
    quant_layers,
    registered_quant_modules,
    weight_quantizers,
)
from qat.quant import quantizers
from qat.summary import model_size

pytestmark = pytest.mark.usefixtures("one_thread")


class Every(nn.Module):
    """One module of every registered torch type (and separate-projection attention)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, d)
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        self.mha = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mha_kv = nn.MultiheadAttention(d, 2, kdim=6, vdim=6, batch_first=True)
        self.enc = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.lstm = nn.LSTM(d, d, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(2 * d, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        x = x + self.mha(x, x, x)[0]
        kv = torch.ones(x.shape[0], 4, 6)
        x = x + self.mha_kv(x, kv, kv)[0]
        x = self.enc(x)
        x, _ = self.lstm(x)
        return self.fc(x.mean(1))


def _prepared() -> nn.Module:
    torch.manual_seed(0)
    cfg = {"overrides": {"lstm": {"slots": {"gates": {}, "hidden": {}}}}}
    qm, _ = qat.prepare(Every(), cfg)
    qm(torch.randint(0, 20, (2, 5)))
    return qm


def test_registry_maps_float_types_to_wrappers() -> None:
    reg = registered_quant_modules()
    for float_cls in (nn.Linear, nn.Conv1d, nn.Embedding, nn.MultiheadAttention,
                      nn.TransformerEncoderLayer, nn.LSTM):
        assert issubclass(reg[float_cls], QuantModule) and issubclass(reg[float_cls], float_cls)
    assert quant_class_for(nn.Linear(2, 2)) is QuantLinear

    class MyLinear(nn.Linear):  # a subclass may compute something else: not assumed
        pass

    assert quant_class_for(MyLinear(2, 2)) is None


def test_every_quantizer_belongs_to_one_layer_role() -> None:
    """The layers' own answers cover every quantizer of the model, each once."""
    qm = _prepared()
    listed = [q for _, _, q in layer_quantizers(qm)]
    assert len({id(q) for q in listed}) == len(listed)
    assert {id(q) for q in listed} == {id(q) for _, q in quantizers(qm)}
    roles = {(name, role) for name, role, _ in layer_quantizers(qm)}
    assert ("mha.weight_quant", "weight:in_proj_weight") in roles
    assert ("lstm.gates_quant", "gates") in roles and ("mha.attn_quant", "attn") in roles
    assert {p for n, _, p, _ in weight_quantizers(qm) if n == "mha_kv"} == {
        "q_proj_weight", "k_proj_weight", "v_proj_weight"}


def test_every_quantized_weight_is_a_parameter_of_its_layer() -> None:
    qm = _prepared()
    quantized = {(n, p) for n, _, p, _ in weight_quantizers(qm)}
    for name, layer in quant_layers(qm):
        own = dict(layer.named_parameters(recurse=False))
        for pname in layer.weight_quantizers():
            assert pname in own, (name, pname)
        if isinstance(layer, QuantLSTM):
            assert {p for n, p in quantized if n == name} == {
                p for p in own if p.startswith("weight_")}


def test_to_float_round_trip_of_every_wrapper() -> None:
    qm = _prepared()
    for name, layer in list(quant_layers(qm)):
        back = layer.to_float()
        assert not isinstance(back, QuantModule), name
        assert quant_class_for(back) is type(layer), name


def test_model_size_counts_the_attention_in_projection() -> None:
    """Bug: model_size counted QuantMultiheadAttention.in_proj_weight as float32."""
    torch.manual_seed(0)
    fm = nn.MultiheadAttention(16, 2, batch_first=True)
    qm, _ = qat.prepare(fm, {"activation": None})
    assert isinstance(qm, QuantMultiheadAttention)
    in_proj = 48 * 16 * 1 + 48 * 5  # 8-bit codes + a float32 scale and 8-bit zp per row
    out_proj = 16 * 16 * 1 + 16 * 5
    biases = (48 + 16) * 4
    assert model_size(qm) == in_proj + out_proj + biases


def test_weight_quantizers_track_the_current_weight_activations_accumulate() -> None:
    qm = _prepared()
    weights = {id(q) for *_, q in weight_quantizers(qm)}
    assert weights
    for name, _, q in layer_quantizers(qm):
        assert q.observer.current == (id(q) in weights), name
