"""Quantizer specification: a validated, immutable description of one fake-quantizer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

__all__ = ["QuantSpec", "OBSERVERS", "ESTIMATORS", "GRANULARITIES", "MODES"]

OBSERVERS = ("minmax", "ema", "percentile", "mse")
ESTIMATORS = ("ste", "clipped_ste", "lsq", "lsq_plus", "pact")
GRANULARITIES = ("tensor", "channel", "group")
MODES = ("int", "ternary", "binary")
TERNARY_SCALES = ("closed_form", "learned")


def _bad(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"QuantSpec.{field}={value!r} is invalid: allowed {allowed}")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is fake-quantized.

    ``bits`` is the integer width (1-8). ``mode='ternary'`` (2 bits, TWN) and ``mode='binary'``
    (1 bit, sign x mean|w|) are weight-only special modes. Per-group granularity groups
    ``group_size`` consecutive elements of each output channel (the flattened input dimension).

    Estimators: ``ste`` / ``clipped_ste`` (fixed scale from the observer), ``lsq`` (learned
    scale; asymmetric: the observer's integer zero point, fixed once learning starts),
    ``lsq_plus`` (learned scale and offset, the offset rounded to a whole number of steps in the
    forward: an integer zero point), ``pact`` (learned clipping level alpha; zero point 0 whatever
    ``symmetric`` says: [0, alpha] unsigned, [qmin / qmax * alpha, alpha] signed). All of them
    train on the integer grid that export uses.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    narrow_range: bool = False
    granularity: str = "tensor"
    axis: int = 0
    group_size: int = 128
    observer: str = "minmax"
    momentum: float = 0.01
    percentile: float = 99.99
    mse_grid: int = 50
    estimator: str = "clipped_ste"
    mode: str = "int"
    ternary_scale: str = "closed_form"
    eps: float = 1.1920928955078125e-07  # float32 machine epsilon: the smallest scale

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "bool" and not isinstance(v, bool):
                raise _bad(f.name, v, "true or false")
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 1 <= self.bits <= 8:
            raise _bad("bits", self.bits, "an integer from 1 to 8")
        if self.granularity not in GRANULARITIES:
            raise _bad("granularity", self.granularity, f"one of {GRANULARITIES}")
        if self.observer not in OBSERVERS:
            raise _bad("observer", self.observer, f"one of {OBSERVERS}")
        if self.estimator not in ESTIMATORS:
            raise _bad("estimator", self.estimator, f"one of {ESTIMATORS}")
        if self.mode not in MODES:
            raise _bad("mode", self.mode, f"one of {MODES}")
        if self.ternary_scale not in TERNARY_SCALES:
            raise _bad("ternary_scale", self.ternary_scale, f"one of {TERNARY_SCALES}")
        if not isinstance(self.axis, int) or isinstance(self.axis, bool):
            raise _bad("axis", self.axis, "an integer dimension index")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise _bad("group_size", self.group_size, "a positive integer")
        if not (isinstance(self.momentum, int | float) and 0.0 < self.momentum <= 1.0):
            raise _bad("momentum", self.momentum, "a number in (0, 1]")
        if not (isinstance(self.percentile, int | float) and 50.0 < self.percentile <= 100.0):
            raise _bad("percentile", self.percentile, "a number in (50, 100]")
        if not isinstance(self.mse_grid, int) or self.mse_grid < 2:
            raise _bad("mse_grid", self.mse_grid, "an integer >= 2")
        if not (isinstance(self.eps, int | float) and self.eps > 0):
            raise _bad("eps", self.eps, "a positive number")
        self._check_combinations()

    def _check_combinations(self) -> None:
        if self.mode == "ternary":
            if self.bits != 2:
                raise _bad("bits", self.bits, "2 with mode='ternary'")
            if not (self.symmetric and self.signed):
                raise _bad("symmetric", self.symmetric, "true and signed=true with mode='ternary'")
        elif self.mode == "binary":
            if self.bits != 1:
                raise _bad("bits", self.bits, "1 with mode='binary'")
            if not (self.symmetric and self.signed):
                raise _bad("symmetric", self.symmetric, "true and signed=true with mode='binary'")
        elif self.bits == 1 and self.signed:
            raise _bad("bits", 1, "1 only with signed=false or mode='binary' (signed 1-bit "
                       "integers have no positive level)")
        if self.mode != "int" and self.estimator not in ("ste", "clipped_ste"):
            allowed = f"'ste' or 'clipped_ste' with mode={self.mode!r}"
            raise _bad("estimator", self.estimator, allowed)
        if self.estimator == "lsq_plus" and self.symmetric:
            raise _bad("estimator", "lsq_plus", "only with symmetric=false (LSQ+ learns an offset)")
        if self.estimator == "pact" and self.granularity != "tensor":
            raise _bad("granularity", self.granularity, "'tensor' with estimator='pact'")
        if self.narrow_range and not self.signed:
            raise _bad("narrow_range", True, "only with signed=true")

    # ---- derived integer range -------------------------------------------------------------
    @property
    def quant_min(self) -> int:
        if self.mode == "ternary":
            return -1
        if self.mode == "binary":
            return -1
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def quant_max(self) -> int:
        if self.mode in ("ternary", "binary"):
            return 1
        if not self.signed:
            return 2**self.bits - 1
        return 2 ** (self.bits - 1) - 1

    @property
    def learnable(self) -> bool:
        return self.estimator in ("lsq", "lsq_plus", "pact")

    def replace(self, **changes: Any) -> QuantSpec:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_any(cls, value: QuantSpec | dict[str, Any] | None) -> QuantSpec | None:
        """Build from a spec, a mapping (e.g. an OmegaConf node) or None; unknown keys raise."""
        if value is None or isinstance(value, QuantSpec):
            return value
        data = dict(value)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"QuantSpec has no field {unknown[0]!r}: allowed {sorted(known)}")
        return cls(**data)
