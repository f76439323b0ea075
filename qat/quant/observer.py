"""Observers: record a range per row (tensor, channel or group) in buffers allocated up front.

Non-finite values never enter the statistics: rows with no finite value are left unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .distributed import sync_enabled, sync_range
from .functional import calc_qparams, fake_quantize_affine_plain, to_rows
from .spec import QuantSpec

__all__ = [
    "Observer",
    "MinMaxObserver",
    "EMAObserver",
    "PercentileObserver",
    "MSEObserver",
    "make_observer",
]


class Observer(nn.Module):
    """Base: running ``min_val`` / ``max_val`` per row and the number of batches seen.

    Under data parallelism each batch range is all-reduced first (``sync_mode``, see
    :mod:`qat.quant.distributed`), so every rank accumulates the same statistics.

    ``current=True`` (weight quantizers): the statistics describe the last tensor observed
    instead of accumulating over the history (a weight's range may shrink as it trains); the
    moving average (``ema``) keeps averaging, as torch.ao's weight fake quant does.
    """

    sync_mode = "extreme"
    exact_extrema = True  # fast_range gives the batch's true min / max
    current = False  # (class default: observers pickled before the flag existed accumulate)

    def __init__(self, spec: QuantSpec, rows: int, current: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.current = current
        self.register_buffer("min_val", torch.zeros(rows))
        self.register_buffer("max_val", torch.zeros(rows))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """Record ``x``; return its exact per-row (min, max) when they were computed on the way
        (all values finite and an extrema-based observer), else None."""
        if x.numel() == 0:
            return None
        sync = sync_enabled(x)
        rows = to_rows(x.detach().float(), self.spec)
        lo, hi = self.fast_range(rows)
        extrema = (lo, hi) if lo is not None and self.exact_extrema else None
        has = None
        if lo is None:  # non-finite values present: mask them out, skip rows with none finite
            finite = torch.isfinite(rows)
            has = finite.any(dim=1)
            if not sync and not bool(has.any()):
                return None
            lo, hi = self.batch_range(rows, finite)
        if sync:  # data parallel: the range of the global batch, the same on every rank
            lo, hi, has = sync_range(lo, hi, has, self.sync_mode)
        if has is not None:
            if not bool(has.any()):
                return None
            lo = torch.where(has, lo, self.min_val)
            hi = torch.where(has, hi, self.max_val)
        if self.count.item() == 0 or (self.current and not isinstance(self, EMAObserver)):
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
        else:
            self.accumulate(lo, hi)
        self.count.add_(1)  # in place: no Module.__setattr__ per forward
        return extrema

    def fast_range(self, rows: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """One pass over all-finite rows; (None, None) when any value is NaN or infinite."""
        if rows.shape[0] == 1:  # a full reduction is ~10x faster than aminmax(dim=1) on CPU
            lo, hi = torch.aminmax(rows)
            lo, hi = lo.reshape(1), hi.reshape(1)
        else:
            lo, hi = rows.amin(dim=1), rows.amax(dim=1)  # NaN and inf propagate
        # one scalar decides: a NaN or infinite bound makes it non-finite (an overflowing but
        # finite range only sends the batch to the slower, masked path, which is also exact)
        if math.isfinite((hi - lo).sum().item()):
            return lo, hi
        return None, None

    def batch_range(self, rows: Tensor, finite: Tensor) -> tuple[Tensor, Tensor]:
        lo = torch.where(finite, rows, torch.inf).amin(dim=1)
        hi = torch.where(finite, rows, -torch.inf).amax(dim=1)
        return lo, hi

    def accumulate(self, lo: Tensor, hi: Tensor) -> None:
        torch.minimum(self.min_val, lo, out=self.min_val)
        torch.maximum(self.max_val, hi, out=self.max_val)

    def qparams(self) -> tuple[Tensor, Tensor]:
        return calc_qparams(self.min_val, self.max_val, self.spec)

    def extra_repr(self) -> str:
        return f"rows={self.min_val.numel()}" + (", current" if self.current else "")


class MinMaxObserver(Observer):
    """Running minimum and maximum."""


class EMAObserver(Observer):
    """Exponential moving average of each batch's min / max: v += momentum * (new - v)."""

    def accumulate(self, lo: Tensor, hi: Tensor) -> None:
        m = self.spec.momentum
        self.min_val.add_(m * (lo - self.min_val))
        self.max_val.add_(m * (hi - self.max_val))


class _MeanObserver(Observer):
    """Cumulative mean of a per-batch range."""

    sync_mode = "mean"
    exact_extrema = False  # percentiles / searched ranges, not the batch min / max

    def accumulate(self, lo: Tensor, hi: Tensor) -> None:
        n = self.count.float()
        self.min_val.add_((lo - self.min_val) / (n + 1))
        self.max_val.add_((hi - self.max_val) / (n + 1))


class PercentileObserver(_MeanObserver):
    """Mean over batches of the (100 - p)-th and p-th percentiles."""

    def fast_range(self, rows: Tensor) -> tuple[Tensor | None, Tensor | None]:
        if bool(torch.isfinite(rows).all()):
            return self.batch_range(rows, None)
        return None, None

    def batch_range(self, rows: Tensor, finite: Tensor) -> tuple[Tensor, Tensor]:
        p = self.spec.percentile / 100.0
        if finite is None:
            n = rows.shape[1]
            k_hi = min(max(int(round(p * n)), 1), n)
            k_lo = min(max(n - k_hi + 1, 1), n)
            hi = rows.kthvalue(k_hi, dim=1).values
            lo = rows.kthvalue(k_lo, dim=1).values
            return lo, hi
        masked = torch.where(finite, rows, torch.nan)
        lo = torch.nanquantile(masked, 1.0 - p, dim=1)
        hi = torch.nanquantile(masked, p, dim=1)
        return lo, hi


class MSEObserver(_MeanObserver):
    """Grid search of the clipping range [a * min, a * max] minimising quantization MSE."""

    def fast_range(self, rows: Tensor) -> tuple[Tensor | None, Tensor | None]:
        if bool(torch.isfinite(rows).all()):
            return self.batch_range(rows, None)
        return None, None

    def batch_range(self, rows: Tensor, finite: Tensor | None) -> tuple[Tensor, Tensor]:
        if finite is None:
            lo, hi = torch.aminmax(rows, dim=1)
            x = rows
        else:
            lo, hi = super().batch_range(rows, finite)
            lo = torch.where(torch.isfinite(lo), lo, 0.0)
            hi = torch.where(torch.isfinite(hi), hi, 0.0)
            x = torch.where(finite, rows, 0.0)
        spec = self.spec
        best_err = torch.full_like(lo, torch.inf)
        best = torch.ones_like(lo)
        for i in range(1, spec.mse_grid + 1):
            a = i / spec.mse_grid
            scale, zp = calc_qparams(lo * a, hi * a, spec)
            y = fake_quantize_affine_plain(
                x, scale[:, None], zp[:, None].float(), spec.quant_min, spec.quant_max
            )
            err = (y - x).pow(2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(best, a), best)
        return lo * best, hi * best


_OBSERVERS = {
    "minmax": MinMaxObserver,
    "ema": EMAObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}


def make_observer(spec: QuantSpec, rows: int, current: bool = False) -> Observer:
    """The observer named by ``spec.observer`` for ``rows`` scales (``current``: see
    :class:`Observer`)."""
    return _OBSERVERS[spec.observer](spec, rows, current)
