"""Float tolerances for "quantization off equals the float module" tests."""

from __future__ import annotations

import torch

__all__ = ["EPS32", "assert_ulps_close"]

EPS32 = torch.finfo(torch.float32).eps


def assert_ulps_close(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 4.0,
                      floor: float = 1.0) -> None:
    """|actual - expected| <= ulps * eps32 * max(max|expected|, floor), elementwise: the two
    computations are the same up to float32 rounding of sums taken in another order (a few
    units in the last place of the tensor's largest value; ``floor`` for tensors near 0)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(expected.detach().abs().max()) if expected.numel() else 0.0, floor)
    torch.testing.assert_close(actual, expected, atol=ulps * EPS32 * scale, rtol=0)
