"""Input quantizers tied across layers that read one tensor (qat.nn.sharing)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat
from qat.nn import QuantConv1d
from qat.nn.sharing import shared_inputs


class CNN(nn.Module):
    """Three convolutions read one (strided) tensor; a head reads another."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.convs = nn.ModuleList(nn.Conv1d(16, 8, k) for k in (2, 3, 4))
        self.fc = nn.Linear(24, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids).transpose(1, 2)  # (B, T, D) -> (B, D, T)
        return self.fc(torch.cat([F.relu(c(x)).amax(dim=2) for c in self.convs], dim=1))


class TwoHeads(nn.Module):
    """The model's input itself is read by two linears."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) * self.b(x)


def _pair(model: nn.Module, **config):
    torch.manual_seed(0)
    tied, _ = qat.prepare(model, config)
    plain, _ = qat.prepare(model, {**config, "share_inputs": False})
    return tied, plain


def _train(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    outs = []
    for x in batches:
        opt.zero_grad()
        y = model(x)
        y.square().mean().backward()
        opt.step()
        outs.append(y.detach())
    return outs


def _same_state(a: nn.Module, b: nn.Module, exact: bool = True) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if exact or "quant" in k:
            torch.testing.assert_close(sa[k], sb[k], atol=0, rtol=0, equal_nan=True, msg=k)
        else:
            torch.testing.assert_close(sa[k], sb[k], atol=1e-6, rtol=1e-5, msg=k)


def test_readers_of_one_tensor_share_a_quantizer_and_train_alike():
    tied, plain = _pair(CNN())
    assert shared_inputs(tied) == []  # the probe ties during the first forward
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 50, (4, 12), generator=g) for _ in range(5)]
    out_t, out_p = _train(tied, batches), _train(plain, batches)
    assert shared_inputs(tied) == [["convs.0", "convs.1", "convs.2"]]
    assert shared_inputs(plain) == []
    q = tied.convs[0].input_quant
    assert all(c.input_quant is q for c in tied.convs) and q.shared
    assert len({id(c.input_quant) for c in plain.convs}) == 3
    assert tied.fc.input_quant is not q
    for a, b in zip(out_t, out_p, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # observer statistics and scales are exact; weights differ only by gradient summation order
    _same_state(tied, plain, exact=False)


def test_calibration_without_grad_and_a_reused_input_observe_once_per_forward():
    """Without autograd the shared copy is reused as well; the same input object in the next
    forward is observed again (the root hooks forget it)."""
    tied, plain = _pair(TwoHeads())
    x = torch.randn(6, 8)
    with torch.no_grad():
        for _ in range(3):
            for m in (tied, plain):
                m(x)
    assert shared_inputs(tied) == [["a", "b"]]
    assert int(tied.a.input_quant.observer.count) == 3
    _same_state(tied, plain)
    torch.testing.assert_close(tied(x), plain(x), atol=0, rtol=0)


@pytest.mark.parametrize("config", [
    {"overrides": {"convs.1": {"activation": {"bits": 4}}}},  # different specs
    {"activation": {"bits": 8, "symmetric": False, "signed": False, "estimator": "lsq_plus"}},
])
def test_no_tie_across_specs_or_learned_scales(config):
    tied, _ = qat.prepare(CNN(), config)
    tied(torch.randint(0, 50, (2, 9)))
    quants = [c.input_quant for c in tied.convs]
    if "overrides" in config:
        assert shared_inputs(tied) == [["convs.0", "convs.2"]]
        assert quants[0] is quants[2] and quants[1] is not quants[0]
    else:
        assert shared_inputs(tied) == [] and len({id(q) for q in quants}) == 3


def test_checkpoints_copies_and_pickles_of_a_tied_model():
    tied, plain = _pair(CNN())
    x = torch.randint(0, 50, (3, 10))
    _train(tied, [x, x])
    # a tied checkpoint loads into an untied model, which ties itself on its first forward
    fresh, _ = qat.prepare(CNN())
    fresh.load_state_dict(tied.state_dict())
    tied.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), tied(x), atol=0, rtol=0)
    assert shared_inputs(fresh) == shared_inputs(tied)
    twin = copy.deepcopy(tied)
    assert all(c.input_quant is twin.convs[0].input_quant for c in twin.convs)
    torch.testing.assert_close(twin(x), tied(x), atol=0, rtol=0)
    buf = io.BytesIO()
    torch.save(tied, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x), tied(x), atol=0, rtol=0)
    plain.load_state_dict(tied.state_dict())
    torch.testing.assert_close(plain.eval()(x), tied(x), atol=0, rtol=0)


def test_inference_mode():
    tied, plain = _pair(CNN())
    x = torch.randint(0, 50, (3, 10))
    with torch.inference_mode():
        for _ in range(2):
            torch.testing.assert_close(tied(x), plain(x), atol=0, rtol=0)
    assert shared_inputs(tied) == [["convs.0", "convs.1", "convs.2"]]
    _same_state(tied, plain)


def test_a_layer_called_alone_is_unaffected():
    conv = QuantConv1d.from_float(nn.Conv1d(4, 2, 3))
    x = torch.randn(2, 4, 9)
    y = conv(x)
    assert not conv.input_quant.shared and conv.input_quant.memo is None
    torch.testing.assert_close(conv(x), y, atol=0, rtol=0)


def test_quantization_callback_lists_each_tied_quantizer_once():
    import lightning as L

    from qat.callbacks import QuantizationCallback

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = CNN()

    lit, cb = Lit(), QuantizationCallback()
    cb.prepare(lit)
    names = [n for n, _ in cb._quantizers]
    assert {"convs.0.input_quant", "convs.1.input_quant", "convs.2.input_quant"} <= set(names)
    lit.model(torch.randint(0, 50, (2, 9)))
    cb._refresh(lit)
    names = [n for n, _ in cb._quantizers]
    assert "convs.0.input_quant" in names and "convs.1.input_quant" not in names
    assert len({id(q) for _, q in cb._quantizers}) == len(names)


def test_share_inputs_switch_is_validated_and_reaches_the_callback():
    import lightning as L

    from qat.callbacks import QuantizationCallback

    with pytest.raises(ValueError, match="share_inputs must be true or false"):
        qat.QATConfig(share_inputs="yes")

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = CNN()

    lit = Lit()
    QuantizationCallback(share_inputs=False).prepare(lit)
    lit.model(torch.randint(0, 50, (2, 9)))
    assert shared_inputs(lit.model) == []


def test_tied_linears_export_to_onnx_and_int8():
    """A tied quantizer exports once (one QuantizeLinear for both readers) and runs the same."""
    import onnxruntime as ort

    from qat.export import export_onnx, to_int8

    tied, _ = _pair(TwoHeads())
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _ in range(3):
            tied(torch.randn(16, 8, generator=g))
    assert shared_inputs(tied) == [["a", "b"]]
    tied.eval()
    x = torch.randn(5, 8, generator=g)
    ref = tied(x).detach()
    proto = export_onnx(tied, (x,), io.BytesIO(), dynamic_axes={"input_0": {0: "batch"}})
    quantize_ops = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize_ops) == 1  # the input, quantized once for both linears
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input_0": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(to_int8(tied)(x), ref, atol=1e-4, rtol=1e-4)


def test_the_shared_copy_is_released_when_the_forward_ends():
    tied, _ = _pair(CNN())
    x = torch.randint(0, 50, (2, 9))
    tied(x)
    tied(x)
    q = tied.convs[0].input_quant
    assert q.shared and q.memo is None
