"""CompileModel: opt-in ``torch.compile`` of a (fake-quantized) model inside a Lightning run.

The model's forward is compiled in place (``nn.Module.compile``: parameter names, state_dict
and checkpoints unchanged); AOTAutograd compiles the backward of each captured graph. The
fixed-scale fake quantizers (int, STE / clipped STE, min-max or moving-average observer) trace
into the graph with tensor-only code paths that compute the same values as eager mode
(:meth:`qat.quant.FakeQuantizer.sync_flags`); other quantizers, the LSTM and anything Dynamo
cannot trace run eagerly between graphs. The first ``after_steps`` training steps run eagerly
(the first forward ties shared input quantizers, see :mod:`qat.nn.sharing`). Compile time is
reported in :attr:`compile_s` (Dynamo's own clock: frame and backward compilation).

Text batches change length from batch to batch: ``dynamic=True`` (default) compiles shape-
generic graphs once instead of once per length.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from torch import nn

from ..quant.fake_quantizer import FakeQuantizer

__all__ = ["CompileModel", "compile_seconds", "graph_breaks"]

log = logging.getLogger("qat")


def compile_seconds() -> float:
    """Seconds torch.compile has spent compiling in this process so far (0.0 if unknown)."""
    try:
        from torch._dynamo.utils import calculate_time_spent

        return float(calculate_time_spent().get("total_wall_time", 0.0))
    except Exception:  # noqa: BLE001 - a private helper of torch: absent in some versions
        return 0.0


def graph_breaks() -> int:
    """Graph breaks torch.compile has met in this process so far (0 if unknown)."""
    try:
        from torch._dynamo.utils import counters

        return int(sum(counters["graph_break"].values()))
    except Exception:  # noqa: BLE001
        return 0


class CompileModel(L.Callback):
    """Compile ``pl_module.<model_attr>`` (or the module itself) with ``torch.compile``.

    ``mode`` / ``dynamic`` / ``backend`` / ``fullgraph`` go to ``torch.compile``. After the fit,
    :attr:`compile_s` holds the compilation seconds and :attr:`graph_breaks` the graph breaks
    seen during it (both also logged).
    """

    def __init__(self, mode: str | None = None, dynamic: bool | None = True,
                 backend: str = "inductor", fullgraph: bool = False, after_steps: int = 1,
                 model_attr: str = "model") -> None:
        super().__init__()
        if after_steps < 0:
            raise ValueError(f"CompileModel.after_steps={after_steps}: allowed >= 0")
        self.options: dict[str, Any] = {"mode": mode, "dynamic": dynamic, "backend": backend,
                                        "fullgraph": fullgraph}
        self.after_steps = after_steps
        self.model_attr = model_attr
        self.compiled = False
        self.compile_s: float | None = None
        self.graph_breaks: int | None = None
        self._t0 = 0.0
        self._b0 = 0

    def target(self, pl_module: L.LightningModule) -> nn.Module:
        """The module this callback compiles."""
        return getattr(pl_module, self.model_attr, None) or pl_module

    def _sync(self, pl_module: L.LightningModule) -> None:
        if self.compiled:
            for m in self.target(pl_module).modules():
                if isinstance(m, FakeQuantizer):
                    m.sync_flags()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._b0 = compile_seconds(), graph_breaks()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if not self.compiled and trainer.global_step >= self.after_steps:
            self.target(pl_module).compile(**self.options)
            self.compiled = True
        self._sync(pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._sync(pl_module)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._sync(pl_module)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        self._sync(pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.compiled:
            self.compile_s = compile_seconds() - self._t0
            self.graph_breaks = graph_breaks() - self._b0
            log.info("torch.compile: %.1f s compiling, %d graph breaks", self.compile_s,
                     self.graph_breaks)
