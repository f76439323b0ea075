"""Quantized Linear, Conv1d and Embedding: the torch modules plus weight / activation fake quant.

Each wrapper subclasses its float module, keeps its parameters (same names, same state_dict keys)
and adds ``weight_quant``, ``input_quant`` and ``output_quant`` (FakeQuantizer or None). With
every quantizer off (None, or both flags 0) the forward is the float forward, bit for bit.

Weight quantizers see the whole weight tensor; with the default per-channel spec (axis 0) that is
one scale per output channel for Linear / Conv1d and one scale per *token vector* (row) for
Embedding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant.fake_quantizer import FakeQuantizer
from ..quant.functional import fake_quantize_affine
from ..quant.spec import QuantSpec
from .base import QuantModule, adopt, register_quant_module, strip_to
from .config import LayerQuantConfig

__all__ = [
    "QuantLinear",
    "QuantConv1d",
    "QuantEmbedding",
    "make_quantizer",
    "quant_input",
    "QUANT_SLOTS",
]

QUANT_SLOTS = ("weight_quant", "input_quant", "output_quant")


def make_quantizer(
    spec: QuantSpec | None, shape: tuple[int, ...] | None = None, like: Tensor | None = None,
    weight: bool = False,
) -> FakeQuantizer | None:
    """A FakeQuantizer for ``spec`` (None stays None), on the device of ``like``; ``weight``:
    a weight quantizer (its range is the current weight's)."""
    if spec is None:
        return None
    q = FakeQuantizer(spec, shape, weight=weight)
    return q.to(like.device) if like is not None and like.device.type != "cpu" else q


def quant_input(q: FakeQuantizer | None, x: Tensor) -> Tensor:
    """``q(x)``, on a contiguous copy of ``x`` when it is strided: the fake-quant kernels are
    several times slower on strided input and the following matmul / conv would copy anyway."""
    if q is None:
        return x
    y = q.recall(x) if q.shared else None  # tied to several readers (qat.nn.sharing)
    if y is None:
        # (a contiguous copy only when values change: an observe-only pass keeps x itself)
        y = q(x if x.is_contiguous() or not q.is_fake_quant else x.contiguous())
        if q.shared:
            q.remember(x, y)
    return y


class _QuantWeightMixin(QuantModule):
    """Shared slot handling for the single-weight wrappers."""

    _float_cls: type[nn.Module]
    weight: Tensor

    def _init_quant(self, config: LayerQuantConfig | None, use_input: bool = True) -> None:
        config = LayerQuantConfig.from_any(config)
        config.check_slots((), type(self).__name__)
        w = self.weight
        self.register_module("weight_quant", make_quantizer(config.weight, tuple(w.shape), w,
                                                            weight=True))
        in_spec = config.input if use_input else None
        self.register_module("input_quant", make_quantizer(in_spec, None, w))
        self.register_module("output_quant", make_quantizer(config.output, None, w))

    def _qweight(self) -> Tensor:
        wq = self.weight_quant
        return self.weight if wq is None else wq(self.weight)

    @classmethod
    def from_float(cls, module: nn.Module, config: LayerQuantConfig | None = None,
                   convert_children: bool = True) -> Any:
        """Wrap ``module`` (sharing its parameters) with quantizers built from ``config``."""
        base = cls._float_cls
        if not isinstance(module, base) or isinstance(module, _QuantWeightMixin):
            raise ValueError(f"{cls.__name__}.from_float expects a float {base.__name__}, "
                             f"got {type(module).__name__}")
        new = adopt(cls, module)
        new._float_cls = type(module)
        new._check_float(config)
        new._init_quant(config)
        return new

    def _check_float(self, config: LayerQuantConfig | None) -> None:
        """Reject float modules whose options the wrapper cannot quantize."""

    def to_float(self) -> nn.Module:
        """The float module with the same (unfolded) parameters."""
        return strip_to(self._float_cls, self, QUANT_SLOTS)


class QuantLinear(_QuantWeightMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weight, input and (optionally) output."""

    _float_cls = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, config: LayerQuantConfig | None = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_quant(config)

    def forward(self, input: Tensor) -> Tensor:
        x = quant_input(self.input_quant, input)
        y = F.linear(x, self._qweight(), self.bias)
        return y if self.output_quant is None else self.output_quant(y)


class QuantConv1d(_QuantWeightMixin, nn.Conv1d):
    """``nn.Conv1d`` (any padding mode, groups, dilation) with fake quant."""

    _float_cls = nn.Conv1d

    def __init__(self, *args: Any, config: LayerQuantConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_quant(config)

    def forward(self, input: Tensor) -> Tensor:
        x = quant_input(self.input_quant, input)
        y = self._conv_forward(x, self._qweight(), self.bias)
        return y if self.output_quant is None else self.output_quant(y)


class QuantEmbedding(_QuantWeightMixin, nn.Embedding):
    """``nn.Embedding`` with a fake-quantized table (per-row scales by default).

    The input is integer indices, so ``input_quant`` is always None. ``max_norm`` renormalises
    the float table in place (as ``nn.Embedding`` does) before it is quantized. ``sparse=True``
    cannot be combined with a weight quantizer (the quantized table is dense).

    With fixed-scale int weights per row (the default: channel axis 0) or per tensor, STE or
    clipped STE, the observer still sees the whole table, but only the looked-up rows are
    fake-quantized (with their row's scale): the same values and gradients as quantizing the
    table, at a fraction of the cost for large vocabularies.
    """

    _float_cls = nn.Embedding

    def __init__(self, *args: Any, config: LayerQuantConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._check_float(config)
        self._init_quant(config)

    def _init_quant(self, config: LayerQuantConfig | None, use_input: bool = False) -> None:
        super()._init_quant(config, use_input=False)
        q = self.weight_quant
        self._row_path = q is not None and q.spec.mode == "int" and (
            q.spec.granularity == "tensor"
            or (q.spec.granularity == "channel" and q.spec.axis in (0, -2))
        ) and q.spec.estimator in ("ste", "clipped_ste")

    def _check_float(self, config: LayerQuantConfig | None) -> None:
        if self.sparse and LayerQuantConfig.from_any(config).weight is not None:
            raise ValueError("QuantEmbedding: sparse=True cannot be used with a weight quantizer "
                             "(set config.weight=None or sparse=False)")

    def _lookup(self, input: Tensor, table: Tensor) -> Tensor:
        return F.embedding(input, table, self.padding_idx, None, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    def forward(self, input: Tensor) -> Tensor:
        q = self.weight_quant
        if q is None:
            y = F.embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                            self.scale_grad_by_freq, self.sparse)
        else:
            if self.max_norm is not None:
                with torch.no_grad():
                    torch.embedding_renorm_(self.weight, input, self.max_norm, self.norm_type)
            y = self._rows(q, input) if self._row_path else self._lookup(input, q(self.weight))
        return y if self.output_quant is None else self.output_quant(y)

    def _rows(self, q: FakeQuantizer, input: Tensor) -> Tensor:
        """Observe the whole table, fake-quantize only the looked-up rows."""
        extrema = q.observe(self.weight)  # per table row, when the observer computed them
        rows = self._lookup(input, self.weight)
        if not q.is_fake_quant:
            return rows
        clip = q.spec.estimator != "ste"
        if q.spec.granularity == "tensor":  # one scale: quantize the rows as they come
            y = fake_quantize_affine(rows, q.scale, q.zero_point, q.spec, clip, extrema)
        else:
            flat = input.reshape(-1)
            spec = q.spec.replace(axis=0)
            if extrema is not None:
                extrema = (extrema[0].index_select(0, flat), extrema[1].index_select(0, flat))
            y = fake_quantize_affine(rows.reshape(-1, rows.shape[-1]),
                                     q.scale.index_select(0, flat),
                                     q.zero_point.index_select(0, flat), spec, clip_grad=clip,
                                     extrema=extrema).view(rows.shape)  # (B*T, D) -> (..., D)
        if q.track_clipping:
            q._record_clipping(self.weight)
        return y


register_quant_module(nn.Linear, QuantLinear)
register_quant_module(nn.modules.linear.NonDynamicallyQuantizableLinear, QuantLinear)
register_quant_module(nn.Conv1d, QuantConv1d)
register_quant_module(nn.Embedding, QuantEmbedding)
