"""What a quantized layer quantizes: one spec (or None = off) per named slot."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..quant.spec import QuantSpec

__all__ = ["LayerQuantConfig", "W8A8", "default_weight_spec", "default_act_spec"]


def default_weight_spec() -> QuantSpec:
    """8-bit symmetric per-channel weights."""
    return QuantSpec(bits=8, symmetric=True, granularity="channel", axis=0)


def default_act_spec() -> QuantSpec:
    """8-bit asymmetric per-tensor activations with a moving-average observer."""
    return QuantSpec(bits=8, symmetric=False, signed=False, observer="ema", momentum=0.01)


@dataclass(frozen=True)
class LayerQuantConfig:
    """Specs for one wrapped layer.

    ``weight`` quantizes every weight tensor; ``input`` the input activation; ``output`` the
    output (off by default). ``slots`` names the layer-specific activation quantizers and their
    specs (None = off), e.g. for attention ``q``, ``k``, ``v``, ``attn`` (probabilities) and
    for the LSTM ``hidden``, ``gates``, ``sigmoid``, ``tanh``, ``cell``. A slot a layer does not
    know raises ``ValueError`` when the layer is built.
    """

    weight: QuantSpec | None = field(default_factory=default_weight_spec)
    input: QuantSpec | None = field(default_factory=default_act_spec)
    output: QuantSpec | None = None
    slots: Mapping[str, QuantSpec | None] = field(default_factory=dict)

    def slot(self, name: str) -> QuantSpec | None:
        return self.slots.get(name)

    def replace(self, **changes: Any) -> LayerQuantConfig:
        data = {"weight": self.weight, "input": self.input, "output": self.output,
                "slots": dict(self.slots)}
        data.update(changes)
        return LayerQuantConfig(**data)

    def check_slots(self, allowed: tuple[str, ...], layer: str) -> None:
        unknown = sorted(set(self.slots) - set(allowed))
        if unknown:
            raise ValueError(
                f"{layer} has no quantizer slot {unknown[0]!r}: allowed slots {list(allowed)}"
            )

    @classmethod
    def from_any(cls, value: LayerQuantConfig | Mapping[str, Any] | None) -> LayerQuantConfig:
        if isinstance(value, LayerQuantConfig):
            return value
        if value is None:
            return cls()
        data = dict(value)
        known = {"weight", "input", "output", "slots"}
        bad = sorted(set(data) - known)
        if bad:
            raise ValueError(f"LayerQuantConfig has no key {bad[0]!r}: allowed {sorted(known)}")
        out: dict[str, Any] = {k: QuantSpec.from_any(data[k]) for k in ("weight", "input", "output")
                               if k in data}
        if "slots" in data:
            out["slots"] = {k: QuantSpec.from_any(v) for k, v in dict(data["slots"]).items()}
        return cls(**out)


W8A8 = LayerQuantConfig()
