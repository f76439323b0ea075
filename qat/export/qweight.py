"""Integer weights: the codes, scales and zero points a weight fake-quantizer stands for.

:func:`quantize_weight` runs (a copy of) the weight quantizer the way the model's forward would,
then recomputes the integer codes with the same arithmetic, so that
``IntWeight.dequantize()`` equals the fake-quantized weight bit for bit:

- fixed-scale int (``ste`` / ``clipped_ste``): ``clamp(round(w * (1/s)) + zp, qmin, qmax)``,
  value ``(q - zp) * s`` (PyTorch's fused fake-quant arithmetic);
- LSQ / LSQ+ / PACT: the same arithmetic with ``s = |scale|`` (PACT: ``|alpha| / qmax``) and
  the zero point of ``FakeQuantizer.qparams()`` (asymmetric LSQ: the observer's, LSQ+: the
  offset rounded to the grid, PACT: 0), which is what their forward computes with;
- ternary / binary: levels in {-1, 0, 1} / {-1, 1} and the per-row alpha, value ``level * alpha``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from ..nn.base import weight_quantizers
from ..quant import functional as F
from ..quant.fake_quantizer import FakeQuantizer
from ..quant.spec import QuantSpec

__all__ = ["IntWeight", "quantize_weight", "weight_quantizers", "row_shape"]


def row_shape(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape that a per-row vector takes to broadcast against a weight of ``shape``."""
    if spec.granularity == "channel":
        out = [1] * len(shape)
        out[spec.axis % len(shape)] = -1
        return tuple(out)
    return (1,) * len(shape)


@dataclass
class IntWeight:
    """One quantized weight: integer ``codes`` shaped like the weight, per-row ``scale``
    (float32) and ``zero_point`` (int32), the spec, and a float per-row ``offset`` (value
    ``q * s + offset``; only in integer checkpoints written before LSQ+ used an integer grid)."""

    codes: Tensor
    scale: Tensor
    zero_point: Tensor
    spec: QuantSpec
    offset: Tensor | None = None

    @property
    def qmin(self) -> int:
        return self.spec.quant_min

    @property
    def bits(self) -> int:
        return self.spec.bits

    def _rows(self, x: Tensor) -> Tensor:
        return x.reshape(1, -1) if self.spec.granularity == "tensor" else F.to_rows(x, self.spec)

    def _back(self, rows: Tensor) -> Tensor:
        if self.spec.granularity == "channel":
            return F.from_rows(rows, self.codes, self.spec)
        return rows.reshape(self.codes.shape)

    def dequantize(self) -> Tensor:
        """The float weight the fake-quant model computes with (float32)."""
        rows = self._rows(self.codes)  # (rows, elements)
        s = self.scale.float()[:, None]
        if self.spec.mode != "int":
            return self._back(rows.float() * s)
        if self.offset is not None:
            return self._back(rows.float() * s + self.offset.float()[:, None])
        zp = self.zero_point.to(torch.int64)[:, None]
        return self._back((rows.to(torch.int64) - zp).float() * s)

    def integer_zero_point(self) -> Tensor:
        """Zero point for integer kernels (LSQ+: ``round(-offset / s)``, else the stored one)."""
        if self.offset is None:
            return self.zero_point
        zp = torch.round(-self.offset.float() / self.scale.float())
        return zp.clamp(self.spec.quant_min, self.spec.quant_max).to(torch.int32)

    def integer_codes(self) -> Tensor:
        """Codes on the integer-zero-point grid (differ from ``codes`` only for LSQ+)."""
        if self.offset is None:
            return self.codes
        zp = self.integer_zero_point().to(torch.int64)[:, None]
        rows = self._rows(self.codes).to(torch.int64) + zp
        return self._back(rows.clamp(self.spec.quant_min, self.spec.quant_max)).to(torch.int32)


@torch.no_grad()
def quantize_weight(q: FakeQuantizer, w: Tensor, check: bool = True,
                    name: str = "weight") -> IntWeight | None:
    """Integer codes of ``w`` under ``q`` (None when ``q``'s fake quant is off).

    A copy of ``q`` runs on ``w`` first, exactly as the model's forward would (observing if its
    observer is on or it never observed, initialising a learned scale), so ``q`` itself is left
    unchanged. With
    ``check`` the dequantized codes must equal that fake-quantized weight bit for bit, else
    RuntimeError (naming ``name``).
    """
    if not q.is_fake_quant:
        return None
    qc = copy.deepcopy(q)
    if int(qc.observer.count) == 0:
        qc.enable_observer(True)  # never observed: its range is the weight's (as convert does)
    wf = w.detach().float()
    ref = qc(wf.clone())
    spec = qc.spec
    if spec.mode in ("ternary", "binary"):
        fn = F.ternarize if spec.mode == "ternary" else F.binarize
        levels, alpha = fn(wf, spec)
        if spec.mode == "ternary" and spec.ternary_scale == "learned":
            alpha = qc.scale.detach().abs()
        iw = IntWeight(levels.to(torch.int32), alpha.float().clone(),
                       torch.zeros(alpha.numel(), dtype=torch.int32, device=alpha.device), spec)
    else:
        iw = _int_codes(qc, wf)
    if check:
        got = iw.dequantize()
        same = (got == ref) | (torch.isnan(got) & torch.isnan(ref))
        if not bool(same.all()):
            bad = int((~same).sum())
            diff = float((got - ref).abs().nan_to_num().max())
            raise RuntimeError(f"{name}: {bad} dequantized values differ from the fake-quantized "
                               f"weight (max |diff| {diff:.3g}); spec {spec}")
    return iw


def _int_codes(q: FakeQuantizer, wf: Tensor) -> IntWeight:
    """Codes of an int-mode quantizer with the arithmetic of its own estimator."""
    spec = q.spec
    rows = wf.reshape(1, -1) if spec.granularity == "tensor" else F.to_rows(wf, spec)
    if spec.estimator in ("lsq", "lsq_plus"):
        s = q.scale.detach().abs().clamp_min(spec.eps).float()
        zp = F.lsq_zero_point(s, q.offset, q.zero_point, spec).to(torch.int32)
    elif spec.estimator == "pact":
        a = q.alpha.detach().abs()
        s = (a / spec.quant_max).clamp_min(spec.eps).float().expand(rows.shape[0]).clone()
        zp = torch.zeros(s.numel(), dtype=torch.int32, device=s.device)
    else:
        s = q.scale.detach().float().clone()
        zp = q.zero_point.detach().to(torch.int32).clone()
    v = torch.round(rows * (1.0 / s[:, None])) + zp[:, None]
    codes = v.clamp(spec.quant_min, spec.quant_max)
    codes = codes.to(torch.int32)
    if spec.granularity == "channel":
        codes = F.from_rows(codes, wf, spec)
    else:
        codes = codes.reshape(wf.shape)
    return IntWeight(codes, s, zp, spec)
