"""qat.export: ONNX QDQ in onnxruntime and the int8 PyTorch path agree with the fake-quant model."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from test_export import SCHEMES, batches, build, quantized, synthetic

import qat
from qat.export import (
    compare_predictions,
    export_onnx,
    int8_summary,
    make_session,
    onnx_mode,
    ort_predict,
    to_int8,
    torch_predict,
)
from qat.quant import quantizers

MODELS = ["textcnn", "transformer", "bilstm", "bert"]
KEYS = {"textcnn": ["input_ids", "attention_mask"], "bilstm": ["input_ids", "attention_mask"],
        "transformer": ["input_ids", "attention_mask", "token_type_ids"],
        "bert": ["input_ids", "attention_mask", "token_type_ids"]}
_CACHE: dict[tuple[str, str], torch.nn.Module] = {}


# the CPU is shared: one intra-op thread keeps these small models fast and stable
pytestmark = pytest.mark.usefixtures("one_thread")


def trained(name: str, scheme: str = "w8_channel") -> torch.nn.Module:
    """A small model trained on the synthetic task, QAT, calibrated and frozen (cached)."""
    if (name, scheme) not in _CACHE:
        _CACHE[name, scheme] = quantized(name, scheme, steps=30)
    return _CACHE[name, scheme]


def _export(name: str, pm: torch.nn.Module, weight_dtype: str = "uint8",
            lstm: str = "float") -> onnx.ModelProto:
    example = {k: v[:2] for k, v in synthetic(2, 0).items() if k in KEYS[name]}
    return export_onnx(pm, example, io.BytesIO(), weight_dtype=weight_dtype, lstm=lstm)


def _constants(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


@pytest.mark.parametrize("name", MODELS)
def test_onnx_qdq_agrees_with_fake_quant(name: str) -> None:
    """uint8 weight codes (the default; u8u8 kernels, no saturation): the same predictions.

    (int8 weight codes run u8s8 kernels, which saturate on CPUs without VNNI: not asserted.)"""
    pm = trained(name)
    data = batches(synthetic(320, 9), 64)
    proto = _export(name, pm)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in proto.graph.node}
    a = compare_predictions(torch_predict(pm, KEYS[name]),
                            ort_predict(make_session(proto, threads=1)), data)
    assert a.agree >= 0.995 and a.acc_delta == 0.0 and a.max_abs_diff < 0.05, str(a)


def test_onnx_scales_are_the_models(tmp_path) -> None:
    pm = trained("transformer")
    proto = _export("transformer", pm, "int8")
    consts = _constants(proto)
    q_scales = {float(consts[n.input[1]]) for n in proto.graph.node
                if n.op_type == "QuantizeLinear" and n.input[1] in consts}
    for name, q in quantizers(pm):
        if "weight_quant" not in name:
            assert float(q.qparams()[0]) in q_scales, name
    w = pm.classifier.weight_quant.qparams()[0].numpy()
    assert any(v.shape == w.shape and np.array_equal(v, w) for v in consts.values())
    path = tmp_path / "opt.onnx"
    sess = make_session(proto, threads=1, optimized_path=str(path))
    assert sess.get_providers() == ["CPUExecutionProvider"]
    fused = {n.op_type for n in onnx.load(path).graph.node}
    assert fused & {"MatMulIntegerToFloat", "QGemm", "QLinearMatMul"}, fused


def test_onnx_int4_weights_stay_on_the_4bit_grid() -> None:
    pm = trained("transformer", "w4_lsq")
    proto = _export("transformer", pm, "int8")
    dq_inputs = {n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    codes = [v for k, v in _constants(proto).items() if k in dq_inputs and v.dtype == np.int8
             and v.ndim == 2]
    assert codes and all(c.min() >= -8 and c.max() <= 7 for c in codes)
    a = compare_predictions(torch_predict(pm, KEYS["transformer"]),
                            ort_predict(make_session(proto, threads=1)),
                            batches(synthetic(128, 9), 64))
    assert a.agree == 1.0 and a.max_abs_diff < 1e-3, str(a)  # 4-bit codes: no saturation


def _gates(x: np.ndarray) -> np.ndarray:
    """PyTorch's gate order (i, f, g, o) along axis 0 to ONNX's (i, o, f, c)."""
    i, f, g, o = np.split(x, 4)
    return np.concatenate([i, o, f, g])


def test_onnx_int8_lstm_agrees_with_fake_quant() -> None:
    """lstm='int8': DynamicQuantizeLSTM with the model's codes and scales; dynamically quantized
    input / hidden state, so close to (not equal to) the fake-quant model."""
    pm = trained("bilstm")
    proto = _export("bilstm", pm, lstm="int8")
    nodes = [n for n in proto.graph.node if n.op_type == "DynamicQuantizeLSTM"]
    assert len(nodes) == 2 and "LSTM" not in {n.op_type for n in proto.graph.node}
    directions = [next(a.s for a in n.attribute if a.name == "direction") for n in nodes]
    assert directions == [b"forward", b"reverse"]  # one one-way op per direction
    consts = _constants(proto)
    lstm = pm.lstm
    h = lstm.hidden_size
    for d, sfx in enumerate(["_l0", "_l0_reverse"]):
        w_codes, w_scale, w_zp = (consts[nodes[d].input[i]][0] for i in (1, 8, 9))
        assert w_codes.dtype == np.uint8 and w_codes.shape == (lstm.input_size, 4 * h)
        assert np.all(w_zp == 128) and w_scale.shape == (4 * h,)
        q = lstm.weight_quant["weight_ih" + sfx]
        scale = q.qparams()[0].numpy()
        assert np.array_equal(w_scale, _gates(scale))
        w = getattr(lstm, "weight_ih" + sfx).detach().numpy()  # (4H, I)
        deq = (w_codes.astype(np.float32) - 128) * w_scale  # (I, 4H)
        assert np.allclose(deq.T, _gates(q(torch.from_numpy(w)).detach().numpy()), atol=1e-6)
    a = compare_predictions(torch_predict(pm, KEYS["bilstm"]),
                            ort_predict(make_session(proto, threads=1)),
                            batches(synthetic(320, 9), 64))
    assert a.agree >= 0.99 and a.max_abs_diff < 0.1, str(a)


def test_onnx_int8_lstm_only_for_8bit_symmetric_weights() -> None:
    """4-bit weights keep the float LSTM; per-tensor 8-bit weights qualify; bad mode raises."""
    w4 = quantized("bilstm", "w4_lsq")
    ops = {n.op_type for n in _export("bilstm", w4, lstm="int8").graph.node}
    assert "LSTM" in ops and "DynamicQuantizeLSTM" not in ops
    pm = quantized("bilstm", "w8_tensor")
    proto = _export("bilstm", pm, lstm="int8")
    assert "DynamicQuantizeLSTM" in {n.op_type for n in proto.graph.node}
    a = compare_predictions(torch_predict(pm, KEYS["bilstm"]),
                            ort_predict(make_session(proto, threads=1)),
                            batches(synthetic(128, 9), 64))
    assert a.agree >= 0.99 and a.max_abs_diff < 0.05, str(a)  # untrained: compare the logits
    with pytest.raises(ValueError, match="lstm"):
        _export("bilstm", pm, lstm="int4")


def test_onnx_mode_restores_the_model() -> None:
    pm = trained("textcnn")
    x = {k: v for k, v in synthetic(8, 3).items() if k in KEYS["textcnn"]}
    with torch.no_grad():
        before = pm(**x)
        with onnx_mode(pm):
            inside = pm(**x)
        after = pm(**x)
    assert torch.allclose(before, inside, atol=1e-5) and torch.equal(before, after)
    assert not any(k.startswith("_onnx") or ".\u005fonnx" in k for k in pm.state_dict())
    assert all("forward" not in vars(m) for m in pm.modules())


def test_onnx_export_moves_no_observer() -> None:
    """Exporting a model whose observers are still on changes none of its state."""
    pm = qat.prepare(build("transformer"))[0].eval()
    with torch.no_grad():
        pm(**{k: v for k, v in synthetic(16, 1).items() if k in KEYS["transformer"]})
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    _export("transformer", pm)
    after = pm.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before if "clip_fraction" not in k)
    assert all(q.is_observing for _, q in quantizers(pm))


def test_onnx_errors() -> None:
    from test_export import build

    import qat

    raw = qat.prepare(build("textcnn"))[0]
    with pytest.raises(ValueError, match="never observed"):
        _export("textcnn", raw)
    with pytest.raises(ValueError, match="weight_dtype"):
        _export("textcnn", trained("textcnn"), "int4")
    full = qat.prepare(build("bilstm"), {"overrides": {"lstm": {"slots": {"gates": {}}}}})[0]
    with pytest.raises(ValueError, match="path 'full'"):
        _export("bilstm", full)


@pytest.mark.parametrize("name", MODELS)
def test_int8_torch_agrees_with_fake_quant(name: str) -> None:
    pm = trained(name)
    data = batches(synthetic(320, 9), 64)
    model = to_int8(pm, "static")
    counts = int8_summary(model)
    assert counts["Int8Linear"] >= 1 and counts["Int8Embedding"] >= 1, counts
    a = compare_predictions(torch_predict(pm, KEYS[name]), torch_predict(model, KEYS[name]), data)
    assert a.agree >= 0.995, str(a)


@pytest.mark.parametrize("name", ["textcnn", "transformer"])
def test_int8_torch_is_exact_for_4bit_weights(name: str) -> None:
    """Narrow weights never saturate the int16 pair sums: the int8 path is the fake-quant model
    up to float rounding. The float GEMMs of the fake-quant model round (~1e-7) where the int32
    ones do not, so a value within that of a rounding tie of the next quantizer can land on the
    neighbouring code (one code, about 1e-2 at the output): rare, not never."""
    pm = trained(name, "w4_lsq")
    x = {k: v for k, v in synthetic(64, 4).items() if k in KEYS[name]}
    with torch.no_grad():
        diff = (to_int8(pm)(**x) - pm(**x)).abs()
    assert float((diff > 1e-4).float().mean()) <= 0.05 and float(diff.max()) < 0.05, diff.max()


def test_int8_dynamic_mode_and_errors() -> None:
    pm = trained("transformer")
    model = to_int8(pm, "dynamic")
    a = compare_predictions(torch_predict(pm, KEYS["transformer"]),
                            torch_predict(model, KEYS["transformer"]),
                            batches(synthetic(128, 9), 64))
    assert a.agree >= 0.95, str(a)
    fast = to_int8(pm, "fast")  # one GEMM per layer: runs (may saturate without VNNI)
    assert fast(**{k: v[:4] for k, v in synthetic(4, 1).items() if k in KEYS["transformer"]}
                ).shape == (4, 4)
    with pytest.raises(ValueError, match="mode"):
        to_int8(pm, "int4")
    assert SCHEMES["w8_channel"] is None  # the default W8A8 config


def test_packed_lstm_export_prints_no_native_notice(capfd) -> None:
    """The exporter's C++ notice on prim::PackPadded / PadPacked (straight to fd 2) is dropped;
    any other native stderr line in the block still shows."""
    import os

    from qat.quiet import native_stderr_without

    pm = trained("bilstm")
    capfd.readouterr()
    _export("bilstm", pm)
    err = capfd.readouterr().err
    assert "PackPadded" not in err and "PadPacked" not in err
    with native_stderr_without():
        os.write(2, b"[W shape_type_inference.cpp] Warning: The shape inference of "
                    b"prim::PackPadded type is missing, so ...\n")
        os.write(2, b"a real native warning\n")
    err = capfd.readouterr().err
    assert "a real native warning" in err and "PackPadded" not in err
