"""FakeQuantizer: an observer, quantization parameters and on/off flags in one module."""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from . import functional as F
from .observer import make_observer
from .spec import QuantSpec

__all__ = ["FakeQuantizer"]


def _version(x: Tensor) -> int:
    """In-place change counter (inference tensors keep none)."""
    return -1 if x.is_inference() else x._version


class FakeQuantizer(nn.Module):
    """Fake-quantizes a tensor according to a :class:`QuantSpec`.

    ``shape`` is the shape of the tensor to quantize; it is needed for per-channel and per-group
    specs so that every buffer exists at construction. ``weight=True`` for a weight quantizer: its
    observer describes the current weight, not the range of its whole history (see
    :class:`qat.quant.observer.Observer`). Flags ``observer_enabled`` and
    ``fake_quant_enabled`` are buffers: they travel with the state_dict and DDP broadcasts.

    Learnable estimators keep their parameter in ``scale`` (LSQ, LSQ+, learned ternary),
    ``offset`` (LSQ+) or ``alpha`` (PACT); they are initialised from the observer at the first
    fake-quantized forward (from the observer's statistics, which that forward adds to only when
    the observer is enabled), and follow the observer until then; with the observer paused and
    no statistics yet, the forward passes ``x`` through unchanged (e.g. Lightning's sanity-check
    validation, before any training batch). Every int estimator computes on
    the integer grid that :meth:`qparams` (and so every export) describes: asymmetric LSQ keeps
    the observer's integer zero point, LSQ+ uses its offset rounded to a whole number of steps,
    PACT's zero point is 0.
    """

    for_weight = False  # (class default, for quantizers pickled before the flag existed)

    def __init__(self, spec: QuantSpec | dict, shape: tuple[int, ...] | None = None,
                 weight: bool = False) -> None:
        super().__init__()
        spec = QuantSpec.from_any(spec)
        self.spec = spec
        self.for_weight = weight  # a weight quantizer (its observer tracks the current weight)
        rows = F.num_rows(spec, shape)
        self.register_buffer("observer_enabled", torch.ones(1, dtype=torch.uint8))
        self.register_buffer("fake_quant_enabled", torch.ones(1, dtype=torch.uint8))
        self.register_buffer("initialized", torch.zeros(1, dtype=torch.uint8))
        self.register_buffer("clip_fraction", torch.full((1,), float("nan")))
        self.observer = make_observer(spec, rows, current=weight)
        learned_scale = spec.estimator in ("lsq", "lsq_plus") or (
            spec.mode == "ternary" and spec.ternary_scale == "learned"
        )
        if learned_scale:
            self.scale = nn.Parameter(torch.ones(rows))
        else:
            self.register_buffer("scale", torch.ones(rows))
        self.register_buffer("zero_point", torch.zeros(rows, dtype=torch.int32))
        self.offset = nn.Parameter(torch.zeros(rows)) if spec.estimator == "lsq_plus" else None
        self.alpha = nn.Parameter(torch.ones(1)) if spec.estimator == "pact" else None
        self.track_clipping = False  # runtime switch: record the clipped fraction per forward
        self.shared = False  # read by several layers (qat.nn.sharing): remembers its last input
        self.memo: tuple | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["memo"] = None  # a weak reference does not pickle; the memo is per forward
        return state

    # ---- one quantizer, several readers (qat.nn.sharing) ---------------------------------------
    def forget(self) -> None:
        """Drop the remembered input (a new forward of the model starts)."""
        self.memo = None

    def recall(self, x: Tensor) -> Tensor | None:
        """The fake-quantized ``x`` made since the last :meth:`forget` (the model forgets at the
        start and end of each forward), or None."""
        memo = self.memo
        if memo is None or memo[0]() is not x or memo[1] != _version(x):
            return None
        return memo[2]

    def remember(self, x: Tensor, y: Tensor) -> None:
        self.memo = (weakref.ref(x), _version(x), y)

    # ---- flags --------------------------------------------------------------------------------
    def enable_observer(self, on: bool = True) -> FakeQuantizer:
        self.observer_enabled.fill_(int(on))
        return self

    def enable_fake_quant(self, on: bool = True) -> FakeQuantizer:
        self.fake_quant_enabled.fill_(int(on))
        return self

    @property
    def is_observing(self) -> bool:
        return bool(self.observer_enabled.item())

    @property
    def is_fake_quant(self) -> bool:
        return bool(self.fake_quant_enabled.item())

    # ---- quantization parameters ----------------------------------------------------------
    @torch.no_grad()
    def _sync_from_observer(self) -> None:
        """Copy the observer's range into scale / zero point (or the learnable parameters)."""
        if self.observer.count.item() == 0:
            return
        scale, zp = self.observer.qparams()
        spec = self.spec
        if spec.mode != "int":
            return  # ternary / binary scales come from the weights themselves
        if spec.estimator == "pact":
            lo, hi = self.observer.min_val, self.observer.max_val
            a = torch.maximum(hi, -lo) if spec.signed else hi
            self.alpha.copy_(a.max().clamp_min(spec.eps).reshape(1))
            self.scale.copy_(self.alpha.abs() / spec.quant_max)
            return
        if spec.estimator == "lsq_plus":
            self.offset.copy_(-(zp.float() * scale))  # beta = -zp * s: the same grid
        self.scale.copy_(scale)
        self.zero_point.copy_(zp if spec.estimator != "lsq_plus" else torch.zeros_like(zp))

    def qparams(self) -> tuple[Tensor, Tensor]:
        """Current (scale, integer zero point), per row, as export sees them."""
        spec = self.spec
        if spec.estimator == "pact":
            s = (self.alpha.detach().abs() / spec.quant_max).clamp_min(spec.eps)
            return s.expand_as(self.scale).clone(), torch.zeros_like(self.zero_point)
        s = self.scale.detach().abs().clamp_min(spec.eps)
        if spec.estimator in ("lsq", "lsq_plus"):
            return s.clone(), F.lsq_zero_point(s, self.offset, self.zero_point, spec)
        return s.clone(), self.zero_point.clone()

    # ---- forward --------------------------------------------------------------------------------
    def observe(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """Record ``x`` in the observer and refresh scale / zero point, when observing (a learned
        scale, once initialised, no longer needs statistics). Returns the batch's exact per-row
        (min, max) when the observer computed them, else None."""
        learned = self.spec.learnable and bool(self.initialized[0])
        if self.is_observing and not learned:
            extrema = self.observer(x)
            self._sync_from_observer()
            return extrema
        return None

    def forward(self, x: Tensor) -> Tensor:
        """Observe ``x`` and fake-quantize it (each when enabled)."""
        if x.numel() == 0:
            return x
        spec = self.spec
        extrema = self.observe(x)
        if not self.is_fake_quant:
            return x
        if spec.learnable and not bool(self.initialized[0]):
            if int(self.observer.count) == 0:
                return x  # observers paused and nothing seen yet: no range to start from
            self.initialized.fill_(1)  # from the statistics the observer holds
        y = self._quantize(x, extrema)
        if self.track_clipping:
            self._record_clipping(x)
        return y

    def _quantize(self, x: Tensor, extrema: tuple[Tensor, Tensor] | None = None) -> Tensor:
        spec = self.spec
        if spec.mode == "ternary":
            levels, alpha = F.ternarize(x, spec)
            if spec.ternary_scale == "learned":
                if not bool(self.initialized[0]):
                    with torch.no_grad():
                        self.scale.copy_(alpha)
                    self.initialized.fill_(1)
                return F.scaled_levels(x, levels, self.scale.abs(), spec)
            self.scale.copy_(alpha)
            return F.scaled_levels(x, levels, alpha, spec)
        if spec.mode == "binary":
            levels, alpha = F.binarize(x, spec)
            self.scale.copy_(alpha)
            return F.scaled_levels(x, levels, alpha, spec)
        if spec.estimator in ("lsq", "lsq_plus"):
            return F.lsq_fake_quantize(x, self.scale, spec, self.offset, self.zero_point)
        if spec.estimator == "pact":
            with torch.no_grad():
                self.scale.copy_((self.alpha.abs() / spec.quant_max).clamp_min(spec.eps))
            return F.pact_fake_quantize(x, self.alpha, spec)
        return F.fake_quantize(x, self.scale, self.zero_point, spec, extrema)

    @torch.no_grad()
    def _record_clipping(self, x: Tensor) -> None:
        if self.spec.mode != "int":
            self.clip_fraction.fill_(0.0)
            return
        scale, zp = self.qparams()
        rows = F.to_rows(x.detach().float(), self.spec)
        v = torch.round(rows * (1.0 / scale[:, None])) + zp[:, None]
        clipped = (v < self.spec.quant_min) | (v > self.spec.quant_max)
        self.clip_fraction.fill_(float(clipped.float().mean()))

    def extra_repr(self) -> str:
        s = self.spec
        gran = s.granularity if s.granularity != "group" else f"group({s.group_size})"
        return (
            f"bits={s.bits}, mode={s.mode}, {'sym' if s.symmetric else 'asym'}, "
            f"{'signed' if s.signed else 'unsigned'}, {gran}, observer={s.observer}, "
            f"estimator={s.estimator}"
        )
