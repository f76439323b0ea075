"""Post-training quantization: calibrate observers on a few batches, then freeze."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn

from .control import disable_fake_quant, enable_fake_quant, enable_observers, freeze

__all__ = ["calibrate"]


@torch.no_grad()
def calibrate(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], num_batches: int = 32
) -> int:
    """Run ``num_batches`` through a prepared ``model`` with observers on and fake quant off,
    then freeze the observers and switch fake quant on. Returns the number of batches seen."""
    was_training = model.training
    model.eval()
    enable_observers(model)
    disable_fake_quant(model)
    seen = 0
    for batch in islice(batches, num_batches):
        model(**{k: v for k, v in batch.items() if k not in ("labels", "idx")})
        seen += 1
    if seen == 0:
        raise ValueError("calibrate: the calibration data yielded no batch")
    freeze(model)
    enable_fake_quant(model)
    model.train(was_training)
    return seen
