"""Sparsity schedules: pure functions of the optimizer step.

Every schedule returns the *absolute* target sparsity (fraction of zero weights) at a step;
masks are recomputed from that value, never from the weights that survived the previous update.
Before ``start_step`` every schedule returns 0 (dense model).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SparsitySchedule",
    "OneShotSchedule",
    "LinearSchedule",
    "CubicSchedule",
    "make_schedule",
    "relative",
]


def _check_sparsity(value: float, name: str) -> None:
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name}={value!r} must be in [0, 1)")


def _check_steps(start: int, end: int, frequency: int) -> None:
    if int(start) != start or start < 0:
        raise ValueError(f"start_step={start!r} must be an integer >= 0")
    if int(end) != end or end <= start:
        raise ValueError(f"end_step={end!r} must be an integer > start_step={start}")
    if int(frequency) != frequency or frequency < 1:
        raise ValueError(f"frequency={frequency!r} must be an integer >= 1")


class SparsitySchedule:
    """Base class: ``schedule(step) -> target sparsity in [0, 1)``."""

    def __call__(self, step: int) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def final(self) -> float:  # pragma: no cover - interface
        """The sparsity the schedule ends at."""
        raise NotImplementedError


@dataclass(frozen=True)
class OneShotSchedule(SparsitySchedule):
    """``sparsity`` from ``start_step`` on, 0 before."""

    sparsity: float
    start_step: int = 0

    def __post_init__(self) -> None:
        _check_sparsity(self.sparsity, "sparsity")
        if int(self.start_step) != self.start_step or self.start_step < 0:
            raise ValueError(f"start_step={self.start_step!r} must be an integer >= 0")

    def __call__(self, step: int) -> float:
        return float(self.sparsity) if step >= self.start_step else 0.0

    @property
    def final(self) -> float:
        return float(self.sparsity)


@dataclass(frozen=True)
class _Ramp(SparsitySchedule):
    """Shared fields of the gradual schedules; the value changes only on update steps.

    Update steps are ``start_step + k * frequency`` (k = 0, 1, ...) and ``end_step``; between
    them the value of the last update step holds.
    """

    final_sparsity: float
    start_step: int
    end_step: int
    initial_sparsity: float = 0.0
    frequency: int = 1

    def __post_init__(self) -> None:
        _check_sparsity(self.initial_sparsity, "initial_sparsity")
        _check_sparsity(self.final_sparsity, "final_sparsity")
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"initial_sparsity={self.initial_sparsity} must be <= "
                f"final_sparsity={self.final_sparsity}"
            )
        _check_steps(self.start_step, self.end_step, self.frequency)

    def _progress(self, step: int) -> float | None:
        """Fraction of the ramp done at the last update step <= ``step`` (None before start)."""
        if step < self.start_step:
            return None
        if step >= self.end_step:
            return 1.0
        t = self.start_step + ((step - self.start_step) // self.frequency) * self.frequency
        return (t - self.start_step) / (self.end_step - self.start_step)

    def _shape(self, progress: float) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def final(self) -> float:
        return float(self.final_sparsity)

    def __call__(self, step: int) -> float:
        p = self._progress(step)
        if p is None:
            return 0.0
        if p >= 1.0:
            return float(self.final_sparsity)
        return float(self._shape(p))


@dataclass(frozen=True)
class LinearSchedule(_Ramp):
    """s_t = s_i + (s_f - s_i) (t - t0) / (t_end - t0), on update steps."""

    def _shape(self, progress: float) -> float:
        return self.initial_sparsity + (self.final_sparsity - self.initial_sparsity) * progress


@dataclass(frozen=True)
class CubicSchedule(_Ramp):
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3.

    ``n dt = end_step - start_step``; ``frequency`` is dt (the value changes only on update
    steps t0 + k dt, and is s_f from ``end_step`` on).
    """

    def _shape(self, progress: float) -> float:
        s_i, s_f = self.initial_sparsity, self.final_sparsity
        return s_f + (s_i - s_f) * (1.0 - progress) ** 3


_KINDS: dict[str, type[SparsitySchedule]] = {
    "one_shot": OneShotSchedule,
    "linear": LinearSchedule,
    "cubic": CubicSchedule,
}


FRACTIONS = ("start_fraction", "end_fraction")


def relative(cfg: SparsitySchedule | Mapping[str, Any]) -> bool:
    """True for a mapping that gives its steps as fractions of the run's optimizer steps."""
    return isinstance(cfg, Mapping) and any(k in cfg for k in FRACTIONS)


def make_schedule(cfg: SparsitySchedule | Mapping[str, Any],
                  total_steps: int | None = None) -> SparsitySchedule:
    """A schedule from a mapping ``{"kind": "one_shot"|"linear"|"cubic", **fields}``.

    ``start_fraction`` / ``end_fraction`` (instead of ``start_step`` / ``end_step``) give the
    steps as fractions of ``total_steps``, the run's optimizer steps (so one prune config fits
    runs of any length)."""
    if isinstance(cfg, SparsitySchedule):
        return cfg
    if not isinstance(cfg, Mapping):
        raise ValueError(f"schedule must be a SparsitySchedule or a mapping, got {type(cfg)}")
    data = dict(cfg)
    fractions = relative(data)
    for key in FRACTIONS:
        if key not in data:
            continue
        frac = data.pop(key)
        if not isinstance(frac, int | float) or not 0.0 <= frac <= 1.0:
            raise ValueError(f"{key}={frac!r} must be a fraction in [0, 1]")
        if total_steps is None:
            raise ValueError(f"{key} needs the run's number of steps (set by PruningCallback)")
        step_key = key.replace("fraction", "step")
        if step_key in data:
            raise ValueError(f"give {step_key} or {key}, not both")
        data[step_key] = int(round(frac * total_steps))
    if fractions:
        data.setdefault("start_step", 0)
    if fractions and "end_step" in data and data["end_step"] <= data.get("start_step", 0):
        data["end_step"] = data.get("start_step", 0) + 1  # a run shorter than the schedule
    kind = data.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"schedule kind={kind!r}: allowed {sorted(_KINDS)}")
    cls = _KINDS[kind]
    allowed = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(
            f"schedule {kind!r} has no field {unknown[0]!r}: allowed {sorted(allowed)}"
        )
    return cls(**data)
