"""Model-wide switches for fake quantizers, and a per-quantizer report."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from .fake_quantizer import FakeQuantizer

__all__ = [
    "quantizers",
    "enable_observers",
    "disable_observers",
    "enable_fake_quant",
    "disable_fake_quant",
    "freeze",
    "track_clipping",
    "QuantizerRow",
    "quant_report",
    "format_report",
]


def quantizers(model: nn.Module) -> Iterator[tuple[str, FakeQuantizer]]:
    """Every FakeQuantizer in ``model`` with its qualified name."""
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantizer):
            yield name, m


def enable_observers(model: nn.Module, on: bool = True) -> nn.Module:
    for _, q in quantizers(model):
        q.enable_observer(on)
    return model


def disable_observers(model: nn.Module) -> nn.Module:
    return enable_observers(model, False)


def enable_fake_quant(model: nn.Module, on: bool = True) -> nn.Module:
    for _, q in quantizers(model):
        q.enable_fake_quant(on)
    return model


def disable_fake_quant(model: nn.Module) -> nn.Module:
    return enable_fake_quant(model, False)


def freeze(model: nn.Module) -> nn.Module:
    """Stop every observer: scales and zero points stay as they are (learned ones still learn)."""
    return disable_observers(model)


@contextmanager
def track_clipping(model: nn.Module, on: bool = True) -> Iterator[nn.Module]:
    """Within the block, every quantizer records the fraction of values it clipped."""
    qs = [q for _, q in quantizers(model)]
    old = [q.track_clipping for q in qs]
    for q in qs:
        q.track_clipping = on
    try:
        yield model
    finally:
        for q, o in zip(qs, old, strict=True):
            q.track_clipping = o


@dataclass
class QuantizerRow:
    name: str
    bits: int
    mode: str
    granularity: str
    estimator: str
    observer: bool
    fake_quant: bool
    scale_min: float
    scale_max: float
    clip_fraction: float


def quant_report(model: nn.Module) -> list[QuantizerRow]:
    """One row per quantizer: bits, granularity, flags, scale range, last clipped fraction."""
    rows = []
    for name, q in quantizers(model):
        scale, _ = q.qparams()
        s = q.spec
        gran = s.granularity if s.granularity != "group" else f"group{s.group_size}"
        rows.append(
            QuantizerRow(
                name=name,
                bits=s.bits,
                mode=s.mode,
                granularity=gran,
                estimator=s.estimator,
                observer=q.is_observing,
                fake_quant=q.is_fake_quant,
                scale_min=float(scale.min()),
                scale_max=float(scale.max()),
                clip_fraction=float(q.clip_fraction[0]),
            )
        )
    return rows


def format_report(rows: list[QuantizerRow]) -> str:
    """The report as an aligned text table."""
    head = f"{'quantizer':<48} {'bits':>4} {'mode':<7} {'gran':<8} {'est':<11} " \
        f"{'obs':>3} {'fq':>2} {'scale min':>10} {'scale max':>10} {'clipped':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.name[-48:]:<48} {r.bits:>4} {r.mode:<7} {r.granularity:<8} {r.estimator:<11} "
            f"{int(r.observer):>3} {int(r.fake_quant):>2} {r.scale_min:>10.3g} "
            f"{r.scale_max:>10.3g} {r.clip_fraction:>8.4f}"
        )
    return "\n".join(lines)

