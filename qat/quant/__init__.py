"""Fake-quant core: specs, observers, estimators, the FakeQuantizer module, model-wide switches
and post-training calibration."""

from .calibrate import calibrate
from .control import (
    QuantizerRow,
    disable_fake_quant,
    disable_observers,
    enable_fake_quant,
    enable_observers,
    format_report,
    freeze,
    quant_report,
    quantizers,
    track_clipping,
)
from .fake_quantizer import FakeQuantizer
from .observer import (
    EMAObserver,
    MinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)
from .spec import QuantSpec

__all__ = [
    "QuantSpec",
    "FakeQuantizer",
    "Observer",
    "MinMaxObserver",
    "EMAObserver",
    "PercentileObserver",
    "MSEObserver",
    "make_observer",
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
    "calibrate",
]
