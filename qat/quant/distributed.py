"""Observer statistics that agree across data-parallel ranks.

Under DDP every rank sees a different shard of the batch, so each observer would otherwise
accumulate its own statistics and the ranks would end with different scales. The observers call
:func:`sync_range` on each batch's per-row range before accumulating it: min / max observers
take the global minimum and maximum (the range of the whole global batch), mean-of-range
observers (percentile, MSE) average the ranks' ranges. Rows without a finite value on a rank do
not count there. Weights (``nn.Parameter``) are identical on every rank and are not synced.

In a single process (or when ``torch.distributed`` is not initialized) nothing happens: one
``is_initialized()`` call per observation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["sync_enabled", "sync_range", "SYNC_MODES"]

SYNC_MODES = ("extreme", "mean")
_DIST = torch.distributed.is_available()


def sync_enabled(x: Tensor) -> bool:
    """Whether the batch range of ``x`` must be all-reduced: a process group of more than one
    rank is initialized and ``x`` is not a parameter."""
    if not _DIST or not torch.distributed.is_initialized():
        return False
    return not isinstance(x, nn.Parameter) and torch.distributed.get_world_size() > 1


@torch.no_grad()
def sync_range(lo: Tensor, hi: Tensor, has: Tensor | None, mode: str = "extreme",
               group: object = None) -> tuple[Tensor, Tensor, Tensor]:
    """All-reduce one batch's per-row range ``lo``, ``hi`` (R,) over the ranks of ``group``.

    ``has`` (R,) bool marks the rows with a finite value on this rank (None: all). ``mode``
    ``'extreme'``: global min of ``lo`` and max of ``hi``; ``'mean'``: the mean over the ranks
    that have the row. Returns ``(lo, hi, has)`` with ``has`` true where any rank had the row
    (the other rows' values are meaningless). One collective call, on every rank.
    """
    if mode not in SYNC_MODES:
        raise ValueError(f"sync mode {mode!r} is invalid: allowed {list(SYNC_MODES)}")
    dist = torch.distributed
    if has is None:
        has = torch.ones_like(lo, dtype=torch.bool)
    if mode == "extreme":
        inf = torch.full_like(lo, torch.inf)
        buf = torch.stack([torch.where(has, lo, inf), torch.where(has, -hi, inf)])  # (2, R)
        dist.all_reduce(buf, op=dist.ReduceOp.MIN, group=group)
        lo, hi = buf[0], -buf[1]
        return lo, hi, torch.isfinite(lo) & torch.isfinite(hi)
    zero = torch.zeros_like(lo)
    buf = torch.stack([torch.where(has, lo, zero), torch.where(has, hi, zero),
                       has.to(lo.dtype)])  # (3, R)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    n = buf[2]
    return buf[0] / n.clamp_min(1), buf[1] / n.clamp_min(1), n > 0
