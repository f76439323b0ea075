"""Export ops: autograd Functions whose ``symbolic`` emits ONNX QDQ nodes (TorchScript exporter).

Each computes in PyTorch exactly what the fake-quant model computes, so tracing sees real values.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["QDQ", "DQConst", "EmbedDQ", "Quantize", "Dequantize"]


class QDQ(torch.autograd.Function):
    """Fixed-grid fake quant; exports as [Clip] -> QuantizeLinear -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zp: Tensor, qmin: int, qmax: int,
                axis: int | None, clip: tuple[float, float] | None) -> Tensor:
        if axis is None:
            return torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
        return torch.fake_quantize_per_channel_affine(x, scale, zp, axis % x.dim(), qmin, qmax)

    @staticmethod
    def symbolic(g, x, scale, zp, qmin, qmax, axis, clip):  # noqa: ANN001, ANN205
        if clip is not None:
            lo = g.op("Constant", value_t=torch.tensor(clip[0], dtype=torch.float32))
            hi = g.op("Constant", value_t=torch.tensor(clip[1], dtype=torch.float32))
            x = g.op("Clip", x, lo, hi)
        kw = {} if axis is None else {"axis_i": axis}
        q = g.op("QuantizeLinear", x, scale, zp, **kw)
        return g.op("DequantizeLinear", q, scale, zp, **kw)


class DQConst(torch.autograd.Function):
    """A constant weight: exports as DequantizeLinear(codes, scale, zero point)."""

    @staticmethod
    def forward(ctx, codes: Tensor, scale: Tensor, zp: Tensor, value: Tensor,
                axis: int | None) -> Tensor:
        return value.clone()

    @staticmethod
    def symbolic(g, codes, scale, zp, value, axis):  # noqa: ANN001, ANN205
        kw = {} if axis is None else {"axis_i": axis}
        return g.op("DequantizeLinear", codes, scale, zp, **kw)


class EmbedDQ(torch.autograd.Function):
    """Embedding lookup in the integer table; exports as Gather -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, ids: Tensor, codes: Tensor, scale: Tensor, zp: Tensor, table: Tensor,
                per_row: bool) -> Tensor:
        return table[ids]

    @staticmethod
    def symbolic(g, ids, codes, scale, zp, table, per_row):  # noqa: ANN001, ANN205
        minus_one = g.op("Constant", value_t=torch.tensor([-1], dtype=torch.int64))
        flat = g.op("Reshape", ids, minus_one)  # (B, T) -> (B*T,)
        rows = g.op("Gather", codes, flat, axis_i=0)  # (B*T, D) integer codes
        if per_row:
            s = g.op("Gather", scale, flat, axis_i=0)  # (B*T,)
            z = g.op("Gather", zp, flat, axis_i=0)
            deq = g.op("DequantizeLinear", rows, s, z, axis_i=0)
        else:
            deq = g.op("DequantizeLinear", rows, scale, zp)
        dim = g.op("Constant", value_t=torch.tensor([table.type().sizes()[1]], dtype=torch.int64))
        shape = g.op("Concat", g.op("Shape", ids), dim, axis_i=0)
        return g.op("Reshape", deq, shape)  # (B*T, D) -> (B, T, D)


class Quantize(torch.autograd.Function):
    """Integer codes of ``x`` on a per-tensor grid (uint8 / int8 tensor); exports as
    [Clip] -> QuantizeLinear."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zp: Tensor, qmin: int, qmax: int,
                clip: tuple[float, float] | None) -> Tensor:
        q = torch.round(x * (1.0 / scale)) + zp.to(torch.float32)
        return q.clamp(qmin, qmax).to(zp.dtype)

    @staticmethod
    def symbolic(g, x, scale, zp, qmin, qmax, clip):  # noqa: ANN001, ANN205
        if clip is not None:
            lo = g.op("Constant", value_t=torch.tensor(clip[0], dtype=torch.float32))
            hi = g.op("Constant", value_t=torch.tensor(clip[1], dtype=torch.float32))
            x = g.op("Clip", x, lo, hi)
        return g.op("QuantizeLinear", x, scale, zp)


class Dequantize(torch.autograd.Function):
    """``(q - zp) * scale`` of per-tensor codes; exports as DequantizeLinear."""

    @staticmethod
    def forward(ctx, q: Tensor, scale: Tensor, zp: Tensor) -> Tensor:
        return (q.to(torch.int32) - zp.to(torch.int32)).to(torch.float32) * scale

    @staticmethod
    def symbolic(g, q, scale, zp):  # noqa: ANN001, ANN205
        return g.op("DequantizeLinear", q, scale, zp)
