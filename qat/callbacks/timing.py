"""StepTimer: wall time of each training step (forward, backward, optimizer), without the data."""

from __future__ import annotations

import statistics
import time
from typing import Any

import lightning as L
import torch

__all__ = ["StepTimer", "sync_device"]


def sync_device(module: torch.nn.Module | L.LightningModule) -> None:
    """Wait for the kernels queued on ``module``'s CUDA device (nothing on a CPU module)."""
    device = getattr(module, "device", None)
    if isinstance(device, torch.device) and device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(L.Callback):
    """Record the wall time from a batch's arrival to the end of its optimizer step.

    The first ``warmup`` steps of a fit (allocator and kernel warm-up, observer initialisation)
    are left out. :attr:`median_s` is the median of the rest (``None`` before any).
    ``clock``: ``"wall"`` (default, what a user waits) or ``"cpu"`` (CPU seconds of the whole
    process: steadier than wall time on a machine other jobs share, but it counts the time
    threads spend waiting on each other).
    """

    CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}

    def __init__(self, warmup: int = 5, clock: str = "wall") -> None:
        if warmup < 0:
            raise ValueError(f"StepTimer.warmup={warmup}: allowed >= 0")
        if clock not in self.CLOCKS:
            raise ValueError(f"StepTimer.clock={clock!r}: allowed {sorted(self.CLOCKS)}")
        self.warmup = warmup
        self.clock = clock
        self._now = self.CLOCKS[clock]
        self.times: list[float] = []
        self._seen = 0
        self._t0: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        sync_device(pl_module)
        self._t0 = self._now()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._t0 is None:
            return
        sync_device(pl_module)
        elapsed, self._t0 = self._now() - self._t0, None
        self._seen += 1
        if self._seen > self.warmup:
            self.times.append(elapsed)

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times) if self.times else None
