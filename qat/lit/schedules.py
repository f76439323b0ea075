"""Learning-rate schedules as pure functions of the step (for Hydra ``_partial_`` configs)."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["linear_warmup_decay", "constant"]


def linear_warmup_decay(
    optimizer: Optimizer,
    total_steps: int,
    warmup_ratio: float = 0.1,
    warmup_steps: int | None = None,
) -> LambdaLR:
    """Linear warm-up from 0 to the base rate, then linear decay to 0 at ``total_steps``."""
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"scheduler.warmup_ratio={warmup_ratio} is invalid: allowed [0, 1)")
    total = max(int(total_steps), 1)
    warm = int(warmup_steps) if warmup_steps is not None else int(warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (total - step) / max(total - warm, 1))

    return LambdaLR(optimizer, factor)


def constant(optimizer: Optimizer, total_steps: int = 0) -> LambdaLR:
    """The base learning rate throughout."""
    return LambdaLR(optimizer, lambda step: 1.0)
