"""ONNX export with QuantizeLinear / DequantizeLinear (QDQ) nodes carrying the model's own scales.

:func:`onnx_mode` temporarily turns every FakeQuantizer of a prepared model into an export op:

- activation quantizers -> ``QuantizeLinear -> DequantizeLinear`` with the quantizer's current
  ``qparams()`` (uint8 for unsigned grids, int8 for signed ones). Grids narrower than 8 bits get a
  ``Clip`` to their range first, so values stay on the b-bit grid. Every estimator (LSQ / LSQ+
  / PACT too) trains on exactly the grid ``qparams()`` describes.
- weight quantizers -> ``DequantizeLinear`` of an int8 / uint8 initializer holding the integer
  codes of :func:`qat.export.quantize_weight` (the same codes as the integer checkpoint): int4 and
  ternary / binary weights are stored as int8 codes with their own scales (the values stay on the
  4-bit / ternary grid; ONNX INT4 tensors are not used because onnxruntime's CPU kernels for
  them are limited). Per-group weights are exported as folded float constants.
- QuantEmbedding -> ``Gather`` of the int8 table and of the per-row scales, then
  ``DequantizeLinear``: only the looked-up rows are dequantized.
- QuantConv1d (stride 1, no dilation, groups 1) -> ``QuantizeLinear``, im2col on the 8-bit codes
  (k shifted slices, concatenated), ``DequantizeLinear -> MatMul`` with the weight as (k*E, F)
  codes, which onnxruntime runs as an integer GEMM (a QDQ ``Conv`` is only fused into an integer
  kernel when its output is quantized too).

:func:`export_onnx` exports with the TorchScript-based exporter (``dynamo=False``; it maps the
custom ops above through their ``symbolic``), then folds ``Transpose`` after a weight's
``DequantizeLinear`` into the initializer, so that onnxruntime sees ``DQ -> MatMul`` and fuses it
into an integer kernel (``MatMulIntegerToFloat``, ``QGemm``, ``QLinearMatMul``).
"""

from __future__ import annotations

import contextlib
import io
import os
import types
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..quant.fake_quantizer import FakeQuantizer
from ..quiet import native_stderr_without
from .onnx_lstm import LSTM_MODES, lstm_export_forward, lstm_export_weights
from .onnx_ops import QDQ, Dequantize, DQConst, EmbedDQ, Quantize
from .qweight import IntWeight, quantize_weight, weight_quantizers

__all__ = ["onnx_mode", "export_onnx", "fold_weight_transposes", "make_session", "WEIGHT_DTYPES"]

WEIGHT_DTYPES = ("int8", "uint8")


def _store_dtype(qmin: int, qmax: int, name: str) -> torch.dtype:
    if qmin >= -128 and qmax <= 127:
        return torch.int8
    if qmin >= 0 and qmax <= 255:
        return torch.uint8
    raise ValueError(f"{name}: the grid [{qmin}, {qmax}] does not fit int8 or uint8")


def _act_export(q: FakeQuantizer, name: str) -> dict[str, Any]:
    """Export constants of an activation quantizer (its current qparams)."""
    spec = q.spec
    if spec.mode != "int":
        raise ValueError(f"{name}: mode={spec.mode!r} activations cannot be exported")
    if int(q.observer.count) == 0 and not bool(q.initialized[0]):
        raise ValueError(f"{name} has never observed data: calibrate the model (run batches with "
                         "observers on) before exporting")
    if spec.granularity == "group":
        raise ValueError(f"{name}: per-group activation quantizers cannot be exported")
    scale, zp = q.qparams()
    qmin, qmax = spec.quant_min, spec.quant_max
    dtype = _store_dtype(qmin, qmax, name)
    full = (-128, 127) if dtype == torch.int8 else (0, 255)
    clip = None
    if (qmin, qmax) != full:
        lo = float((qmin - zp.float()) * scale) if scale.numel() == 1 else None
        hi = float((qmax - zp.float()) * scale) if scale.numel() == 1 else None
        if lo is None:
            raise ValueError(f"{name}: per-channel activation grids narrower than 8 bits cannot be "
                             "exported")
        clip = (lo, hi)
    axis = None if spec.granularity == "tensor" else spec.axis
    if axis is None:
        scale, zp = scale.reshape(()), zp.reshape(())
    return {"scale": scale.float(), "zp": zp.to(dtype), "qmin": qmin, "qmax": qmax, "axis": axis,
            "clip": clip}


def _weight_export(iw: IntWeight, weight_dtype: str) -> dict[str, Any]:
    """Export constants of one integer weight: codes, scale, zero point, axis."""
    spec = iw.spec
    value = iw.dequantize()
    if spec.granularity == "group":
        return {"value": value}
    codes, zp = iw.integer_codes(), iw.integer_zero_point()
    lo = -1 if spec.mode != "int" else spec.quant_min
    hi = 1 if spec.mode != "int" else spec.quant_max
    dtype = _store_dtype(lo, hi, "weight")
    if weight_dtype == "uint8" and dtype == torch.int8:
        codes, zp, dtype = codes + 128, zp + 128, torch.uint8
    scale = iw.scale.float()
    axis = None if spec.granularity == "tensor" else spec.axis % codes.dim()
    if axis is None:
        scale, zp = scale.reshape(()), zp.reshape(())
    return {"codes": codes.to(dtype), "scale": scale, "zp": zp.to(dtype), "axis": axis,
            "value": value}


def _act_forward(self: FakeQuantizer, x: Tensor) -> Tensor:
    c = self._onnx
    return QDQ.apply(x, self._onnx_scale, self._onnx_zp, c["qmin"], c["qmax"], c["axis"],
                      c["clip"])


def _weight_forward(self: FakeQuantizer, w: Tensor) -> Tensor:
    if not self._onnx["has_codes"]:
        return self._onnx_value
    return DQConst.apply(self._onnx_codes, self._onnx_scale, self._onnx_zp, self._onnx_value,
                          self._onnx["axis"])


def _embedding_forward(self: nn.Module, input: Tensor) -> Tensor:  # noqa: A002
    q = self.weight_quant
    c = q._onnx
    if c["has_codes"] and c["axis"] in (None, 0):
        y = EmbedDQ.apply(input, q._onnx_codes, q._onnx_scale, q._onnx_zp, q._onnx_value,
                           c["axis"] == 0)
    else:
        y = nn.functional.embedding(input, q._onnx_value)
    return y if self.output_quant is None else self.output_quant(y)


def _conv_forward(self: nn.Module, x: Tensor) -> Tensor:
    """Conv1d as im2col + MatMul, so that onnxruntime runs it with an integer GEMM."""
    k, p = self.kernel_size[0], self.padding[0]
    if p:
        x = nn.functional.pad(x, (p, p))
    xt = x.transpose(1, 2)  # (B, E, T) -> (B, T, E)
    iq = self.input_quant
    t_out = xt.shape[1] - k + 1
    if iq is not None and iq._onnx["axis"] is None:  # the windows of the 8-bit codes
        c = iq._onnx
        q = Quantize.apply(xt, iq._onnx_scale, iq._onnx_zp, c["qmin"], c["qmax"], c["clip"])
        q = torch.cat([q[:, j:j + t_out] for j in range(k)], dim=-1)  # (B, T', k*E) codes
        cols = Dequantize.apply(q, iq._onnx_scale, iq._onnx_zp)
    else:
        cols = torch.cat([xt[:, j:j + t_out] for j in range(k)], dim=-1)  # (B, T', k*E)
        cols = cols if iq is None else iq(cols)
    c = self._onnx_conv
    w = DQConst.apply(c["codes"], c["scale"], c["zp"], c["value"], c["axis"])  # (k*E, F)
    y = torch.matmul(cols, w)
    if self.bias is not None:
        y = y + self.bias
    y = y.transpose(1, 2)  # (B, T', F) -> (B, F, T')
    return y if self.output_quant is None else self.output_quant(y)


def _conv_consts(module: nn.Module, consts: dict[str, Any]) -> dict[str, Any] | None:
    """The weight constants of a Conv1d laid out for im2col: (F, E, k) -> (k*E, F)."""
    if "codes" not in consts or module.groups != 1 or module.padding_mode != "zeros" or \
            module.stride[0] != 1 or module.dilation[0] != 1 or isinstance(module.padding, str):
        return None
    if consts["axis"] not in (None, 0):
        return None

    def im2col(w: Tensor) -> Tensor:
        return w.permute(2, 1, 0).reshape(-1, w.shape[0])  # (F, E, k) -> (k, E, F) -> (k*E, F)

    return {"codes": im2col(consts["codes"]), "value": im2col(consts["value"]),
            "scale": consts["scale"], "zp": consts["zp"],
            "axis": None if consts["axis"] is None else 1}


def _attach(q: FakeQuantizer, consts: dict[str, Any], fn: Any) -> None:
    q._onnx = {k: v for k, v in consts.items() if not isinstance(v, Tensor)}
    q._onnx["has_codes"] = "codes" in consts
    for k, v in consts.items():
        if isinstance(v, Tensor):
            q.register_buffer(f"_onnx_{k}", v)
    q.forward = types.MethodType(fn, q)


def _detach(q: FakeQuantizer) -> None:
    for k in [k for k in q._buffers if k.startswith("_onnx_")]:
        del q._buffers[k]
    q.__dict__.pop("forward", None)
    q.__dict__.pop("_onnx", None)


@contextlib.contextmanager
def onnx_mode(model: nn.Module, weight_dtype: str = "uint8",
              lstm: str = "float") -> Iterator[nn.Module]:
    """Within the block, ``model``'s quantizers compute (and export) with fixed integer grids.

    Weights become their integer codes: ``weight_dtype='uint8'`` (default) stores signed codes
    shifted by 128 with the zero point shifted alike (the same values), so onnxruntime runs its
    uint8 x uint8 kernels, exact on every CPU; ``'int8'`` keeps int8 codes: uint8 x int8 kernels,
    faster, but on x86 CPUs without VNNI they add pairs of products in int16 with saturation,
    so 8-bit weights can give wrong sums there. ``lstm='int8'``: QuantLSTM layers with 8-bit
    symmetric int weights export as onnxruntime's ``DynamicQuantizeLSTM`` (integer weights,
    dynamically quantized input / hidden state; the default ``'float'`` keeps the ONNX ``LSTM``
    on the dequantized weights). The model is put in eval mode and restored.
    """
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype={weight_dtype!r} is invalid: allowed {WEIGHT_DTYPES}")
    if lstm not in LSTM_MODES:
        raise ValueError(f"lstm={lstm!r} is invalid: allowed {LSTM_MODES}")
    from ..nn.linear import QuantEmbedding
    from ..nn.lstm import QuantLSTM

    for name, m in model.named_modules():
        if isinstance(m, QuantLSTM) and m.path != "fast":
            raise ValueError(f"{name}: QuantLSTM with cell quantizers (path 'full') cannot be "
                             "exported to ONNX: allowed the 'fast' path (weight, input, output "
                             "quantizers only)")
        if isinstance(m, QuantEmbedding) and m.weight_quant is not None and m.max_norm:
            raise ValueError(f"{name}: QuantEmbedding with max_norm cannot be exported")
    from ..nn.linear import QuantConv1d

    touched: list[FakeQuantizer] = []
    embeddings: list[nn.Module] = []
    lstms = [m for m in model.modules() if isinstance(m, QuantLSTM)]
    was_training = model.training
    weights = {id(q) for *_, q in weight_quantizers(model)}
    observing = [q for _, q in model.named_modules()
                 if isinstance(q, FakeQuantizer) and q.is_observing]
    try:
        model.eval()
        for m in lstms:  # folded weights, before the weight quantizers turn into export ops
            m._onnx_lstm = lstm_export_weights(m, lstm, weight_dtype)
            m.forward = types.MethodType(lstm_export_forward, m)
        for mname, module, pname, q in weight_quantizers(model):
            iw = quantize_weight(q, getattr(module, pname), name=f"{mname}.{pname}")
            if iw is None:
                continue
            consts = _weight_export(iw, weight_dtype)
            _attach(q, consts, _weight_forward)
            touched.append(q)
            conv = _conv_consts(module, consts) if isinstance(module, QuantConv1d) else None
            if conv is not None:
                module._onnx_conv = conv
                module.forward = types.MethodType(_conv_forward, module)
                embeddings.append(module)
            if isinstance(module, QuantEmbedding):
                module.forward = types.MethodType(_embedding_forward, module)
                embeddings.append(module)
        for q in observing:  # weights coded as the forward would; tracing must move no range
            q.enable_observer(False)
        for name, q in model.named_modules():
            if isinstance(q, FakeQuantizer) and id(q) not in weights and q.is_fake_quant:
                _attach(q, _act_export(q, name), _act_forward)
                touched.append(q)
        yield model
    finally:
        for q in touched:
            _detach(q)
        for q in observing:
            q.enable_observer(True)
        for m in embeddings + lstms:  # modules with an export forward
            for key in ("forward", "_onnx_lstm", "_onnx_conv"):
                m.__dict__.pop(key, None)
        model.train(was_training)


def export_onnx(model: nn.Module, args: tuple[Any, ...] | Mapping[str, Tensor],
                path: str | os.PathLike | io.BytesIO, dynamic_axes: Mapping[str, Any] | None = None,
                opset: int = 17, weight_dtype: str = "uint8", fold: bool = True,
                lstm: str = "float") -> Any:
    """Export a prepared, calibrated ``model`` to ONNX (QDQ); returns the ``onnx.ModelProto``.

    ``args``: example inputs, a tuple of positional tensors or a mapping of keyword tensors (the
    mapping's keys become the input names). ``dynamic_axes`` defaults to batch and sequence axes
    0 and 1 of every input. The file is written to ``path``. ``weight_dtype`` and ``lstm``: see
    :func:`onnx_mode` (``lstm='int8'`` needs onnxruntime's contrib ops).
    """
    import onnx

    if isinstance(args, Mapping):
        names = list(args)
        inputs = tuple(args.values())
        wrapped: nn.Module = _KwargsWrapper(model, names)
    else:
        inputs, wrapped = tuple(args), model
        names = [f"input_{i}" for i in range(len(inputs))]
    if dynamic_axes is None:
        dynamic_axes = {n: {0: "batch", 1: "sequence"} for n, t in zip(names, inputs, strict=True)
                        if t.dim() >= 2}
        dynamic_axes["logits"] = {0: "batch"}
    buf = io.BytesIO()
    with onnx_mode(model, weight_dtype, lstm), warnings.catch_warnings(), \
            native_stderr_without():  # its C++ notice on packed LSTMs (qat.quiet)
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(wrapped, inputs, buf, dynamo=False, opset_version=opset,
                          input_names=names, output_names=["logits"],
                          dynamic_axes=dict(dynamic_axes), do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    if fold:
        fold_weight_transposes(proto)
    data = proto.SerializeToString()
    if isinstance(path, io.BytesIO):
        path.write(data)
    else:
        with open(path, "wb") as fh:
            fh.write(data)
    return proto


class _KwargsWrapper(nn.Module):
    """Calls ``model(**dict(zip(names, args)))`` so keyword inputs export positionally."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: Tensor) -> Tensor:
        out = self.model(**dict(zip(self.names, args, strict=True)))
        return out.logits if hasattr(out, "logits") else out


def fold_weight_transposes(proto: Any) -> int:
    """Fold ``Transpose(DequantizeLinear(const))`` into the constant (and the DQ axis) so that the
    weight's DQ feeds the MatMul directly. Returns the number of folded transposes."""
    from onnx import numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    folded = 0
    for node in list(graph.node):
        if node.op_type != "Transpose":
            continue
        dq = producers.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        if len(consumers.get(dq.output[0], [])) != 1 or len(consumers.get(dq.input[0], [])) != 1:
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        codes = numpy_helper.to_array(inits[dq.input[0]])
        perm = perm or list(range(codes.ndim))[::-1]
        inits[dq.input[0]].CopyFrom(numpy_helper.from_array(codes.transpose(perm).copy(),
                                                             dq.input[0]))
        axis_attr = next((a for a in dq.attribute if a.name == "axis"), None)
        if axis_attr is not None:
            axis_attr.i = perm.index(axis_attr.i % codes.ndim)
        for c in consumers.get(node.output[0], []):
            for k, name in enumerate(c.input):
                if name == node.output[0]:
                    c.input[k] = dq.output[0]
        for k, out in enumerate(graph.output):
            if out.name == node.output[0]:
                graph.output[k].name = dq.output[0]
        graph.node.remove(node)
        folded += 1
    return folded


def make_session(model: Any, threads: int = 2, optimized_path: str | None = None,
                 spinning: bool = True) -> Any:
    """An onnxruntime CPU session (``threads`` intra-op threads, full graph optimisation);
    ``spinning=False`` makes idle threads sleep (better on a loaded, shared CPU)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    data = model.SerializeToString() if hasattr(model, "SerializeToString") else model
    if isinstance(data, os.PathLike):
        data = os.fspath(data)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
