"""QuantizationCallback: quantization-aware training in any Lightning project.

Drop it into ``Trainer(callbacks=[...])``. The model to quantize is ``pl_module.<model_attr>``
(default ``model``); when the LightningModule has no such attribute the module itself is
prepared in place. Preparation happens in ``setup`` (before ``configure_optimizers`` and before a
checkpoint is restored), so learned quantizer parameters reach the optimizer and resumed runs
find every quantizer buffer. Nothing else is asked of the LightningModule.

Schedule (in ``unit`` = "epoch" or "step"): before ``start`` the model trains in float while the
observers collect statistics; from ``start`` fake quant is on; from ``freeze_observers`` scales
stop moving; from ``freeze_norm`` BatchNorm running statistics stop moving. Observers never update
during validation, test or predict.

``weight`` / ``activation`` / ``output`` are passed to :class:`qat.QATConfig`: left out, weights
and activations get its defaults (8-bit per-channel weights, 8-bit EMA activations; no output
quantizer); None turns a role off.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from ..nn.base import layer_quantizers
from ..nn.sharing import shared_inputs
from ..quant import FakeQuantizer, QuantSpec

__all__ = ["QuantizationCallback"]

MODES = ("qat", "ptq", "fp32")
UNITS = ("epoch", "step")


def _to_plain(value: Any) -> Any:
    """OmegaConf containers to plain Python (without importing omegaconf at module level)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


def _is_default(value: Any) -> bool:
    return isinstance(value, str) and value == "default"


def _listed(model: nn.Module) -> list[tuple[str, FakeQuantizer]]:
    """(qualified name, quantizer) of every quantizer of the model's quantized layers, once."""
    return [(name, q) for name, _, q in layer_quantizers(model)]


class QuantizationCallback(L.Callback):
    """Prepare a model for QAT and drive its quantizers' flags over training."""

    def __init__(
        self,
        weight: QuantSpec | dict | None | str = "default",
        activation: QuantSpec | dict | None | str = "default",
        output: QuantSpec | dict | None = None,
        attention: bool = True,
        overrides: dict | list | None = None,
        skip: list[str] | None = None,
        share_inputs: bool = True,
        mode: str = "qat",
        unit: str = "epoch",
        start: int = 0,
        freeze_observers: int | None = None,
        freeze_norm: int | None = None,
        calibration_batches: int = 32,
        log_every_n_steps: int = 50,
        model_attr: str = "model",
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"quant.mode={mode!r} is invalid: allowed {list(MODES)}")
        if unit not in UNITS:
            raise ValueError(f"quant.unit={unit!r} is invalid: allowed {list(UNITS)}")
        for key, val in (("start", start), ("freeze_observers", freeze_observers),
                         ("freeze_norm", freeze_norm)):
            if val is not None and (not isinstance(val, int) or val < 0):
                raise ValueError(f"quant.{key}={val!r} is invalid: allowed an integer >= 0")
        if calibration_batches < 1:
            raise ValueError(f"quant.calibration_batches={calibration_batches} must be >= 1")
        self.mode = mode
        self.unit = unit
        self.start = start
        self.freeze_observers = freeze_observers
        self.freeze_norm = freeze_norm
        self.calibration_batches = calibration_batches
        self.log_every_n_steps = log_every_n_steps
        self.model_attr = model_attr
        self.config = None
        if mode != "fp32":
            from ..surgery import QATConfig

            roles = {"weight": weight, "activation": activation, "output": output}
            self.config = QATConfig.from_dict({
                **{k: _to_plain(v) for k, v in roles.items() if not _is_default(v)},
                "attention": attention, "share_inputs": share_inputs,
                "overrides": _to_plain(overrides) or {}, "skip": _to_plain(skip) or [],
            })
        self.report = None
        self._saved_flags: list[tuple[FakeQuantizer, bool]] = []
        self._quantizers: list[tuple[str, FakeQuantizer]] = []
        self._ties = 0

    # ---- preparation ----
    def target(self, pl_module: L.LightningModule) -> nn.Module:
        """The model this callback quantizes."""
        return getattr(pl_module, self.model_attr, None) or pl_module

    def prepare(self, pl_module: L.LightningModule) -> nn.Module:
        """Swap the target's layers for quantized ones (idempotent); returns the target."""
        if self.config is None:
            return self.target(pl_module)
        from ..surgery import prepare

        model = self.target(pl_module)
        prepared, self.report = prepare(model, self.config, inplace=True)
        if prepared is not model and model is not pl_module:
            setattr(pl_module, self.model_attr, prepared)
        self._quantizers = _listed(prepared)
        self._ties = len(shared_inputs(prepared))
        return prepared

    def _refresh(self, pl_module: L.LightningModule) -> None:
        """Re-list the quantizers once the first forward has tied shared inputs."""
        model = self.target(pl_module)
        ties = len(shared_inputs(model))
        if ties != self._ties:
            self._quantizers, self._ties = _listed(model), ties

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.prepare(pl_module)
        if self.mode == "ptq":
            for _, q in self._quantizers:
                q.enable_fake_quant(True).enable_observer(False)

    # ---- schedule ----
    def position(self, trainer: L.Trainer) -> int:
        return trainer.current_epoch if self.unit == "epoch" else trainer.global_step

    def final_model_reached(self, trainer: L.Trainer) -> bool:
        """Fake quant was on for the model trained so far (:class:`qat.callbacks.Scheduled`)."""
        if self.mode != "qat":
            return True
        if self.unit == "epoch":
            return trainer.current_epoch >= self.start
        return trainer.global_step > self.start  # the last step trained was at >= start

    def apply_schedule(self, pos: int) -> None:
        """Set every quantizer's flags for schedule position ``pos``."""
        if self.mode != "qat":
            return
        quant_on = pos >= self.start
        observe = self.freeze_observers is None or pos < self.freeze_observers
        for _, q in self._quantizers:
            q.enable_fake_quant(quant_on)
            q.enable_observer(observe)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._refresh(pl_module)
        pos = self.position(trainer)
        self.apply_schedule(pos)
        if self.freeze_norm is not None and pos >= self.freeze_norm:
            for m in self.target(pl_module).modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        log_now = bool(self.log_every_n_steps) and \
            trainer.global_step % self.log_every_n_steps == 0
        for _, q in self._quantizers:  # clipped fractions cost a pass: logging steps only
            q.track_clipping = log_now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        tracked = [(name, q) for name, q in self._quantizers if q.track_clipping]
        for _, q in tracked:
            q.track_clipping = False  # off again before validation and the next step
        logs: dict[str, float] = {}
        for name, q in tracked:
            if not q.is_fake_quant:
                continue
            scale, _ = q.qparams()
            logs[f"quant/{name}/scale_max"] = float(scale.max())
            logs[f"quant/{name}/clipped"] = float(q.clip_fraction[0])
        if logs and pl_module._trainer is not None:
            pl_module.log_dict(logs, on_step=True, on_epoch=False)

    # ---- evaluation never moves the observers ----
    def _pause_observers(self, pl_module: L.LightningModule) -> None:
        self._refresh(pl_module)
        self._saved_flags = [(q, q.is_observing) for _, q in self._quantizers]
        for _, q in self._quantizers:
            q.enable_observer(False)

    def _resume_observers(self) -> None:
        for q, on in self._saved_flags:
            q.enable_observer(on)
        self._saved_flags = []

    def on_validation_start(self, trainer, pl_module) -> None:
        self._pause_observers(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._resume_observers()

    def on_test_start(self, trainer, pl_module) -> None:
        self._pause_observers(pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        self._resume_observers()

    def on_predict_start(self, trainer, pl_module) -> None:
        self._pause_observers(pl_module)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._resume_observers()

    # ---- checkpoint state ----
    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "unit": self.unit, "start": self.start,
                "freeze_observers": self.freeze_observers, "freeze_norm": self.freeze_norm}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("mode", self.mode) != self.mode:
            raise ValueError(
                f"checkpoint was written with quant.mode={state_dict['mode']!r}, this run uses "
                f"{self.mode!r}"
            )

    @torch.no_grad()
    def calibrate(self, pl_module: L.LightningModule, batches) -> int:
        """PTQ: prepare if needed, calibrate on ``calibration_batches`` batches, then freeze."""
        from ..quant.calibrate import calibrate

        model = self.prepare(pl_module)
        return calibrate(model, batches, self.calibration_batches)
