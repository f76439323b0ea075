"""FakeQuantizer: an observer, quantization parameters and on/off flags in one module."""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from . import functional as F
from .distributed import sync_enabled
from .observer import make_observer
from .spec import QuantSpec

__all__ = ["FakeQuantizer"]


def _version(x: Tensor) -> int:
    """In-place change counter (inference tensors keep none)."""
    return -1 if x.is_inference() else x._version


def _compiling() -> bool:
    """True while torch.compile traces the code (see :meth:`FakeQuantizer.sync_flags`)."""
    return torch.compiler.is_compiling()


@torch.compiler.disable
def _eager_forward(q: FakeQuantizer, x: Tensor) -> Tensor:
    """``q(x)`` outside the compiled graph (quantizers the traced path does not cover)."""
    return q(x)


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
    _flags = (True, True)  # (the same for the compiled-code copy of the flags)

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
        self._flags = (True, True)  # (observer, fake quant) as compiled code reads them

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
        if memo is None:
            return None
        if _compiling():  # a traced forward: the same traced tensor (no weak reference)
            return memo[1] if len(memo) == 2 and memo[0] is x else None
        if len(memo) != 3 or memo[0]() is not x or memo[1] != _version(x):
            return None
        return memo[2]

    def remember(self, x: Tensor, y: Tensor) -> None:
        self.memo = (x, y) if _compiling() else (weakref.ref(x), _version(x), y)

    # ---- flags --------------------------------------------------------------------------------
    def enable_observer(self, on: bool = True) -> FakeQuantizer:
        self.observer_enabled.fill_(int(on))
        self._flags = (bool(on), self._flags_now()[1])
        return self

    def enable_fake_quant(self, on: bool = True) -> FakeQuantizer:
        self.fake_quant_enabled.fill_(int(on))
        self._flags = (self._flags_now()[0], bool(on))
        return self

    def _flags_now(self) -> tuple[bool, bool]:
        return bool(self.observer_enabled.item()), bool(self.fake_quant_enabled.item())

    def sync_flags(self) -> FakeQuantizer:
        """Copy the flag buffers into the plain attributes compiled code reads.

        Eager code reads ``observer_enabled`` / ``fake_quant_enabled`` at every forward; a
        torch.compile'd forward reads the plain copy (a guard: a change recompiles instead of
        syncing the host). :meth:`enable_observer` / :meth:`enable_fake_quant` keep both in
        step; after writing the buffers any other way (``load_state_dict``, ``copy_``) call
        this before the next compiled forward (``qat.callbacks.CompileModel`` does, before
        every batch)."""
        self._flags = self._flags_now()
        return self

    @property
    def takes_strided(self) -> bool:
        """True when a strided (non-contiguous) input costs no extra pass: one scale, fixed-scale
        int fake quant (the output is written contiguous, the observer reduces the view)."""
        s = self.spec
        return s.granularity == "tensor" and s.mode == "int" and not s.learnable

    @property
    def traceable(self) -> bool:
        """True when torch.compile can trace this quantizer's forward into the graph:
        fixed-scale int fake quant with a min-max or moving-average observer. Others run
        eagerly between compiled graphs (a graph break)."""
        s = self.spec
        return s.mode == "int" and not s.learnable and self.observer.traceable

    @property
    def is_observing(self) -> bool:
        if _compiling():
            return self._flags[0]
        return bool(self.observer_enabled.item())

    @property
    def is_fake_quant(self) -> bool:
        if _compiling():
            return self._flags[1]
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
            self.scale.copy_(F.exact_div(self.alpha.abs(), spec.quant_max))
            return
        if spec.estimator == "lsq_plus":
            self.offset.copy_(-(zp.float() * scale))  # beta = -zp * s: the same grid
        self.scale.copy_(scale)
        self.zero_point.copy_(zp if spec.estimator != "lsq_plus" else torch.zeros_like(zp))

    def qparams(self) -> tuple[Tensor, Tensor]:
        """Current (scale, integer zero point), per row, as export sees them."""
        spec = self.spec
        if spec.estimator == "pact":
            s = F.exact_div(self.alpha.detach().abs(), spec.quant_max).clamp_min(spec.eps)
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
            if _compiling():  # traceable (see forward): tensor ops only, no extrema
                self.observer.observe_traced(x)
                self._sync_traced()
                return None
            extrema = self.observer(x)
            self._sync_from_observer()
            return extrema
        return None

    @torch.no_grad()
    def _sync_traced(self) -> None:
        """:meth:`_sync_from_observer` for traced code (fixed-scale int): the same values,
        computed with tensor ops and kept unchanged while the observer has seen nothing."""
        obs = self.observer
        scale, zp = F.calc_qparams_tensor(obs.min_val, obs.max_val, self.spec)
        seen = obs.count > 0
        self.scale.copy_(torch.where(seen, scale, self.scale))
        self.zero_point.copy_(torch.where(seen, zp, self.zero_point))

    def forward(self, x: Tensor) -> Tensor:
        """Observe ``x`` and fake-quantize it (each when enabled)."""
        if x.numel() == 0:
            return x
        if _compiling() and not (self.traceable and not sync_enabled(x)):
            return _eager_forward(self, x)
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
                s = F.exact_div(self.alpha.abs(), spec.quant_max)
                self.scale.copy_(s.clamp_min(spec.eps))
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
        self.clip_fraction.copy_(clipped.float().mean().reshape(1))  # no host sync

    def extra_repr(self) -> str:
        s = self.spec
        gran = s.granularity if s.granularity != "group" else f"group({s.group_size})"
        return (
            f"bits={s.bits}, mode={s.mode}, {'sym' if s.symmetric else 'asym'}, "
            f"{'signed' if s.signed else 'unsigned'}, {gran}, observer={s.observer}, "
            f"estimator={s.estimator}"
        )
