"""ONNX export of QuantLSTM (fast path): the ONNX ``LSTM`` op on fake-quantized (folded) weights.

Inside :func:`qat.export.onnx_mode` a QuantLSTM runs :func:`lstm_export_forward`: the input
(padded, or unpacked from a PackedSequence with its lengths) goes through ``input_quant``
(QuantizeLinear / DequantizeLinear), then one ONNX ``LSTM`` per layer with ``sequence_lens`` (the
reverse direction starts at each sequence's last real step, as with packed sequences), weights
folded to their dequantized float values (gates reordered from PyTorch's i, f, g, o to ONNX's
i, o, f, c), then ``output_quant``. A PackedSequence input is unpacked and the output packed
again, so the exporter sees pack / pad pairs around the op.

With ``lstm='int8'`` a layer whose input and recurrent weights are all 8-bit symmetric signed
int codes (per row or per tensor) exports as onnxruntime's contrib op
``com.microsoft::DynamicQuantizeLSTM`` instead: W (D, I, 4H) and R (D, H, 4H) hold the weight
codes (gates i, o, f, c along the last axis), W_scale / R_scale (D, 4H) the per-row scales;
onnxruntime quantizes the input and hidden state dynamically (per step), so the result is close
to, not equal to, the fake-quant model. Other layers keep the float ``LSTM``.

A bidirectional layer exports as two one-way ops (forward, reverse) whose outputs are
concatenated: onnxruntime (1.32, 2 threads) runs them about 13 % faster than one bidirectional op.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import _VF, Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .qweight import IntWeight

__all__ = ["lstm_export_forward", "lstm_export_weights", "LSTM_MODES"]

LSTM_MODES = ("float", "int8")


class _LSTMOp(torch.autograd.Function):
    """One LSTM layer (all directions) on a padded, time-major batch with lengths."""

    @staticmethod
    def forward(ctx, x: Tensor, lengths: Tensor, w: Tensor, r: Tensor, b: Tensor,
                torch_weights: list[Tensor], hidden: int, directions: int,
                quant: tuple[Tensor, ...] | None = None) -> tuple[Tensor, ...]:
        packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
        data, sizes, order, unorder = packed
        z = torch.zeros(directions, x.shape[1], hidden, dtype=x.dtype)
        hx = (z.index_select(1, order), z.index_select(1, order))
        res = _VF.lstm(data, sizes, hx, torch_weights, True, 1, 0.0, False, directions == 2)
        out = PackedSequence(res[0], sizes, order, unorder)
        y = pad_packed_sequence(out, total_length=x.shape[0])[0]  # (T, B, D*H)
        return y, res[1].index_select(1, unorder), res[2].index_select(1, unorder)

    @staticmethod
    def symbolic(g, x, lengths, w, r, b, torch_weights, hidden, directions,  # noqa: ANN001, ANN205
                 quant=None):  # noqa: ANN001
        lens = g.op("Cast", lengths, to_i=6)  # int32 sequence_lens
        if directions == 1:
            y, h, c = _onnx_lstm(g, x, lens, w, r, b, quant, hidden, "forward")
        else:  # two one-way ops: onnxruntime runs them faster than one bidirectional op
            outs = []
            for i, direction in enumerate(("forward", "reverse")):
                idx = g.op("Constant", value_t=torch.tensor([i], dtype=torch.int64))
                wi, ri, bi = (g.op("Gather", t, idx, axis_i=0) for t in (w, r, b))  # (1, ...)
                qi = None if quant is None else tuple(t[i:i + 1] for t in quant)
                outs.append(_onnx_lstm(g, x, lens, wi, ri, bi, qi, hidden, direction))
            y = g.op("Concat", outs[0][0], outs[1][0], axis_i=1)  # 2 x (T, 1, B, H) -> (T, 2, B, H)
            h = g.op("Concat", outs[0][1], outs[1][1], axis_i=0)  # 2 x (1, B, H) -> (2, B, H)
            c = g.op("Concat", outs[0][2], outs[1][2], axis_i=0)
        y = g.op("Transpose", y, perm_i=[0, 2, 1, 3])  # (T, D, B, H) -> (T, B, D, H)
        shape = g.op("Constant", value_t=torch.tensor([0, 0, -1], dtype=torch.int64))
        return g.op("Reshape", y, shape), h, c  # (T, B, D, H) -> (T, B, D*H)


def _onnx_lstm(g: Any, x: Any, lens: Any, w: Any, r: Any, b: Any,
               quant: tuple[Tensor, ...] | None, hidden: int, direction: str) -> Any:
    """One ONNX LSTM (float) or DynamicQuantizeLSTM (``quant``: its integer weights) node."""
    if quant is None:
        return g.op("LSTM", x, w, r, b, lens, hidden_size_i=hidden, direction_s=direction,
                    outputs=3)
    wq, ws, wz, rq, rs, rz = (g.op("Constant", value_t=t.contiguous()) for t in quant)
    none = g.op("prim::Constant")  # a missing optional input
    none.setType(torch._C.OptionalType.ofTensor())
    return g.op("com.microsoft::DynamicQuantizeLSTM", x, wq, rq, b, lens, none, none, none, ws,
                wz, rs, rz, hidden_size_i=hidden, direction_s=direction, outputs=3)


def _onnx_gates(w: Tensor, hidden: int) -> Tensor:
    """Rows of PyTorch's gate order (i, f, g, o) in ONNX's order (i, o, f, c)."""
    h = hidden
    return torch.cat([w[:h], w[3 * h:], w[h:2 * h], w[2 * h:3 * h]])


def _layer_weights(mod: nn.Module, layer: int, weights: dict[str, Tensor]) -> tuple[Tensor, ...]:
    """ONNX W (D, 4H, I), R (D, 4H, H), B (D, 8H) and the PyTorch flat weights of one layer."""
    d = 2 if mod.bidirectional else 1
    h = mod.hidden_size
    sfx = [f"_l{layer}", f"_l{layer}_reverse"][:d]
    w = torch.stack([_onnx_gates(weights["weight_ih" + s], h) for s in sfx])
    r = torch.stack([_onnx_gates(weights["weight_hh" + s], h) for s in sfx])
    if mod.bias:
        b = torch.stack([torch.cat([_onnx_gates(weights["bias_ih" + s], h),
                                    _onnx_gates(weights["bias_hh" + s], h)]) for s in sfx])
    else:
        b = torch.zeros(d, 8 * h)
    flat = []
    for s in sfx:
        flat += [weights["weight_ih" + s], weights["weight_hh" + s]]
        if mod.bias:
            flat += [weights["bias_ih" + s], weights["bias_hh" + s]]
        else:
            flat += [torch.zeros(4 * h), torch.zeros(4 * h)]
    return w.detach(), r.detach(), b.detach(), flat


def _is_int8(iw: IntWeight | None) -> bool:
    """8-bit symmetric signed int codes, one scale per row (or per tensor), zero points 0."""
    if iw is None or iw.offset is not None:
        return False
    sp = iw.spec
    rows = sp.granularity == "tensor" or (sp.granularity == "channel" and sp.axis % 2 == 0)
    return (sp.mode == "int" and sp.bits == 8 and sp.signed and sp.symmetric and rows
            and iw.codes.dim() == 2 and bool((iw.zero_point == 0).all()))


def _int_weights(mod: nn.Module, layer: int, iws: dict[str, IntWeight | None],
                 weight_dtype: str) -> tuple[Tensor, ...] | None:
    """DynamicQuantizeLSTM's W (D, I, 4H), W_scale, W_zero_point (D, 4H), R (D, H, 4H), R_scale,
    R_zero_point for one layer, or None when one of its weights is not 8-bit symmetric int."""
    h = mod.hidden_size
    sfx = [f"_l{layer}", f"_l{layer}_reverse"][:2 if mod.bidirectional else 1]
    out: list[Tensor] = []
    for kind in ("weight_ih", "weight_hh"):
        ws = [iws.get(kind + s) for s in sfx]
        if not all(_is_int8(iw) for iw in ws):
            return None
        codes = torch.stack([_onnx_gates(iw.codes, h).t() for iw in ws])  # (D, 4H, I) -> (D, I, 4H)
        scale = torch.stack([_onnx_gates(iw.scale.float().expand(4 * h), h) for iw in ws])
        if weight_dtype == "uint8":  # the same values shifted by 128: u8u8 kernels, exact
            codes = (codes + 128).to(torch.uint8)
            zp = torch.full(scale.shape, 128, dtype=torch.uint8)
        else:
            codes, zp = codes.to(torch.int8), torch.zeros(scale.shape, dtype=torch.int8)
        out += [codes.contiguous(), scale.contiguous(), zp]
    return tuple(out)


@torch.no_grad()
def lstm_export_weights(mod: nn.Module, lstm: str = "float",
                        weight_dtype: str = "uint8") -> list[tuple[Any, ...]]:
    """Per layer: ONNX W, R, B, PyTorch flat weights (from the fake-quantized weights, computed
    once, outside tracing, so that they export as constants) and, with ``lstm='int8'``, the
    DynamicQuantizeLSTM integer weights (None for a layer that keeps the float LSTM)."""
    from .qweight import quantize_weight

    if lstm not in LSTM_MODES:
        raise ValueError(f"lstm={lstm!r} is invalid: allowed {LSTM_MODES}")
    weights, iws = {}, {}
    wq = mod.weight_quantizers()
    for name in mod._flat_weights_names:
        w = getattr(mod, name).detach()
        iw = quantize_weight(wq[name], w, name=name) if name in wq else None
        weights[name] = w.clone() if iw is None else iw.dequantize()
        iws[name] = iw
    out = []
    for layer in range(mod.num_layers):
        quant = _int_weights(mod, layer, iws, weight_dtype) if lstm == "int8" else None
        out.append((*_layer_weights(mod, layer, weights), quant))
    return out


def lstm_export_forward(self: nn.Module, input: Any, hx: Any = None,  # noqa: A002
                        lengths: Any = None) -> tuple[Any, tuple[Tensor, Tensor]]:
    """QuantLSTM.forward for export (eval, zero initial state, fast path)."""
    if hx is not None:
        raise ValueError("QuantLSTM export supports the zero initial state only (hx=None)")
    packed = isinstance(input, PackedSequence)
    if packed:
        x, lens = pad_packed_sequence(input)  # (T, B, I), original batch order
    else:
        x = input.transpose(0, 1) if self.batch_first else input  # (B, T, I) -> (T, B, I)
        if lengths is None:
            lens = torch.full((x.shape[1],), x.shape[0], dtype=torch.int64)
        else:
            lens = torch.as_tensor(lengths, dtype=torch.int64)
    if self.input_quant is not None:
        x = self.input_quant(x)
    d = 2 if self.bidirectional else 1
    hs, cs = [], []
    for w, r, b, flat, quant in self._onnx_lstm:
        x, h, c = _LSTMOp.apply(x, lens, w, r, b, flat, self.hidden_size, d, quant)
        hs.append(h)
        cs.append(c)
    if self.output_quant is not None:
        x = self.output_quant(x)
    hidden = (torch.cat(hs), torch.cat(cs))
    if packed:
        return pack_padded_sequence(x, lens, enforce_sorted=False), hidden
    return (x.transpose(0, 1) if self.batch_first else x), hidden
