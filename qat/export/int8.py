"""Int8 inference in PyTorch on the CPU: fbgemm int8 GEMMs with the model's own scales.

:func:`to_int8` turns a prepared, calibrated model into an inference model:

- QuantLinear -> :class:`Int8Linear`: int8 weight codes (per tensor or per channel, packed for
  fbgemm once) and, in ``mode='static'``, the layer's input quantizer (scale / zero point)
  quantizing the activation inside the kernel (``quantized::linear_with_input_q_dq_qweight_dq_
  output_fp32``: float in, uint8 x int8 -> int32 GEMM, float out). ``mode='dynamic'`` uses
  ``quantized::linear_dynamic`` (per-batch activation range, 7-bit activations): no saturation,
  but not the model's activation grid. Input grids narrower than 8 bits are clipped first.
- QuantConv1d -> :class:`Int8Conv1d` (im2col: unfold the windows, then the int8 GEMM).
- QuantEmbedding -> :class:`Int8Embedding`: the int8 table and per-row scales, rows dequantized
  after the lookup.
- QuantMultiheadAttention: the packed in-projection becomes an Int8Linear (self-attention,
  batch-first path); the attention matmuls keep their fake quantizers (float kernels).
- BERT-family self-attention: query / key / value get the module's input quantizer.
- Other weight quantizers (LSTM, per-group weights, unsigned or > 8-bit grids) are folded into
  float weights (:func:`qat.convert`): exact, but float kernels.

Saturation (CPUs without AVX512-VNNI): fbgemm's uint8 x int8 kernel adds pairs of products
``x[k] w[k] + x[k+1] w[k+1]`` in int16 with saturation (``vpmaddubsw``). With 8-bit activation
codes (up to 255) that can overflow once ``|w[k]| + |w[k+1]| > 128``: 8-bit weights can, 7-bit or
narrower ones (int4, ternary, binary) never. ``mode='static'`` checks each weight: when a pair can
overflow (and the CPU has no VNNI) the weight is split into two halves in [-64, 64]
(``w = w1 + w2``) and the layer runs two GEMMs, exact but about twice the work;
``mode='fast'`` always runs one GEMM (may saturate on such CPUs).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant.fake_quantizer import FakeQuantizer
from .qweight import IntWeight

__all__ = ["Int8Linear", "Int8Conv1d", "Int8Embedding", "MODES", "int8_supported",
           "can_saturate", "cpu_has_vnni"]

MODES = ("static", "fast", "dynamic")


@functools.cache
def cpu_has_vnni() -> bool:
    """Whether fbgemm's int8 GEMM uses VNNI (int32 accumulation, no int16 saturation)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return "avx512_vnni" in fh.read()
    except OSError:  # not Linux: assume the worst
        return False


def can_saturate(codes: Tensor, x_max: int) -> bool:
    """Whether some ``x_max * (|w[k]| + |w[k+1]|)`` pair of a (N, K) weight exceeds int16."""
    a = codes.reshape(codes.shape[0], -1).abs().to(torch.int64)
    if a.shape[1] % 2:
        a = F.pad(a, (0, 1))
    pairs = a.view(a.shape[0], -1, 2).sum(-1)  # (N, K) -> (N, K/2, 2) -> (N, K/2)
    return bool(int(pairs.max()) * x_max > 32767)


def int8_supported(iw: IntWeight | None) -> bool:
    """Whether fbgemm can take these codes as qint8 (per tensor or per channel axis 0)."""
    if iw is None or iw.spec.granularity == "group":
        return False
    if iw.spec.granularity == "channel" and iw.spec.axis % iw.codes.dim() != 0:
        return False
    codes = iw.integer_codes()
    return int(codes.min()) >= -128 and int(codes.max()) <= 127


def _pack(iw: IntWeight, bias: Tensor | None, codes: Tensor | None = None) -> Any:
    """fbgemm packed weight (qint8, per tensor or per output channel) with the float bias."""
    if codes is None:
        codes = iw.integer_codes()
    codes = codes.to(torch.int8).reshape(iw.codes.shape[0], -1)  # (N, K)
    zp = iw.integer_zero_point().to(torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated; the kernels are not
        if iw.spec.granularity == "tensor":
            q = torch._make_per_tensor_quantized_tensor(codes, float(iw.scale), int(zp))
        else:
            q = torch._make_per_channel_quantized_tensor(codes, iw.scale.double(), zp, 0)
        return torch.ops.quantized.linear_prepack(q, None if bias is None else
                                                  bias.detach().float())


def _act_grid(q: FakeQuantizer) -> tuple[float, int, tuple[float, float] | None]:
    """(scale, uint8 zero point, clip range or None) of a per-tensor activation quantizer."""
    s = q.spec
    scale, zp = q.qparams()
    scale, zp = float(scale), int(zp)
    shift = 128 if s.quant_min < 0 else 0  # signed grids: the same grid, stored as uint8
    clip = None
    if (s.quant_min + shift, s.quant_max + shift) != (0, 255):
        clip = ((s.quant_min - zp) * scale, (s.quant_max - zp) * scale)
    return scale, zp + shift, clip


def _static_ok(q: FakeQuantizer | None) -> bool:
    return q is not None and q.is_fake_quant and q.spec.mode == "int" and \
        q.spec.granularity == "tensor" and q.spec.quant_max - q.spec.quant_min <= 255


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with an int8 weight; ``act`` is the input quantizer (static mode)."""

    def __init__(self, iw: IntWeight, bias: Tensor | None, act: FakeQuantizer | None,
                 mode: str = "static", output_quant: nn.Module | None = None) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is invalid: allowed {MODES}")
        self.out_features, self.in_features = iw.codes.shape[0], iw.codes[0].numel()
        self.mode = mode if _static_ok(act) or mode == "dynamic" else "dynamic"
        self.x_scale, self.x_zp, self.clip = _act_grid(act) if self.mode != "dynamic" else \
            (1.0, 0, None)
        self.output_quant = output_quant
        codes = iw.integer_codes()
        self.packed2 = None  # second half of a split weight (see the module docstring)
        x_max = 255  # largest uint8 activation code the kernel can see
        if self.clip is not None:
            x_max = act.spec.quant_max + (128 if act.spec.quant_min < 0 else 0)
        if self.mode == "static" and not cpu_has_vnni() and can_saturate(codes, x_max):
            first = codes.clamp(-64, 64)
            self.packed2 = _pack(iw, None, codes - first)
            codes = first
        self.packed = _pack(iw, bias, codes)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()  # (..., K) -> (M, K)
        if self.mode != "dynamic":
            if self.clip is not None:
                x2 = x2.clamp(*self.clip)
            op = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
            y = op(x2, self.x_scale, self.x_zp, self.packed)
            if self.packed2 is not None:
                y = y + op(x2, self.x_scale, self.x_zp, self.packed2)
        else:
            y = torch.ops.quantized.linear_dynamic(x2, self.packed, True)
        y = y.reshape(*shape[:-1], self.out_features)  # (M, N) -> (..., N)
        return y if self.output_quant is None else self.output_quant(y)

    def extra_repr(self) -> str:
        split = ", split" if self.packed2 is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
            f"mode={self.mode}{split}, x_scale={self.x_scale:.4g}, x_zp={self.x_zp}"


class Int8Conv1d(nn.Module):
    """Conv1d (groups=1, zero padding) as unfold + :class:`Int8Linear`."""

    def __init__(self, conv: nn.Conv1d, iw: IntWeight, mode: str) -> None:
        super().__init__()
        self.kernel, self.stride = conv.kernel_size[0], conv.stride[0]
        self.dilation, self.padding = conv.dilation[0], conv.padding
        f, e, k = iw.codes.shape
        # (F, E, k) -> (F, k, E): window elements are laid out position-major after unfold
        perm = IntWeight(iw.codes.permute(0, 2, 1).reshape(f, k * e), iw.scale, iw.zero_point,
                         iw.spec, iw.offset)
        self.linear = Int8Linear(perm, conv.bias, conv.input_quant, mode, conv.output_quant)

    def forward(self, x: Tensor) -> Tensor:
        p = self.padding
        if isinstance(p, str):
            raise ValueError("Int8Conv1d: string padding is not supported")
        if p[0]:
            x = F.pad(x, (p[0], p[0]))
        span = (self.kernel - 1) * self.dilation + 1
        w = x.unfold(2, span, self.stride)[..., :: self.dilation]  # (B, E, T', k)
        w = w.permute(0, 2, 3, 1).reshape(w.shape[0], w.shape[2], -1)  # (B, T', k*E)
        return self.linear(w).transpose(1, 2)  # (B, T', F) -> (B, F, T')


class Int8Embedding(nn.Module):
    """Embedding lookup in an int8 table with per-row (or one) scale."""

    def __init__(self, emb: nn.Embedding, iw: IntWeight) -> None:
        super().__init__()
        self.register_buffer("codes", iw.integer_codes().to(torch.int8))
        per_row = iw.spec.granularity == "channel"
        self.register_buffer("scale", iw.scale.float() if per_row else iw.scale.reshape(()))
        zp = iw.integer_zero_point().to(torch.int32)
        self.register_buffer("zero_point", zp if per_row else zp.reshape(()))
        self.per_row = per_row
        self.output_quant = emb.output_quant

    @property
    def weight(self) -> Tensor:
        """The dequantized table (for code that reads ``embedding.weight`` directly)."""
        rows = self.codes.to(torch.int32)
        if self.per_row:
            return (rows - self.zero_point[:, None]).float() * self.scale[:, None]
        return (rows - self.zero_point).float() * self.scale

    def forward(self, ids: Tensor) -> Tensor:
        rows = self.codes[ids].to(torch.int32)  # (..., D)
        if self.per_row:
            y = (rows - self.zero_point[ids].unsqueeze(-1)).float() * self.scale[ids].unsqueeze(-1)
        else:
            y = (rows - self.zero_point).float() * self.scale
        return y if self.output_quant is None else self.output_quant(y)
