"""Progress for where the output goes: Lightning's Rich bar on a terminal, plain lines in a file.

A Rich (or TQDM) bar redraws one line in place; written to a file (nohup, SLURM, CI) it shows
nothing until the end. :class:`LineProgressBar` prints a line every N training steps and one at
each epoch end instead, each complete on its own::

    [qat] epoch 1/2  step 50/708 (7%)  loss 2.9512  val/accuracy -  elapsed 0:00:16  eta 0:03:31
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

__all__ = ["LineProgressBar", "progress_bar"]

STYLES = ("auto", "rich", "lines")


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _number(value: Any) -> str:
    if value is None:
        return "-"
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return str(value)


class LineProgressBar(ProgressBar):
    """Training progress as plain lines: one every ``every_n_steps`` training steps and one at
    each epoch end, naming the stage (``float``, ``qat``, ... : the quantization callback's mode
    unless ``stage`` is given), the epoch, the step out of the stage's total, the training loss,
    the monitored metric, the elapsed time and an estimate of the time left; one line at the
    end of each test, validation or prediction run. Written to ``stream`` (default: stdout)."""

    def __init__(self, every_n_steps: int = 50, stage: str | None = None,
                 stream: TextIO | None = None) -> None:
        super().__init__()
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"LineProgressBar.every_n_steps={every_n_steps!r}: allowed an "
                             "integer >= 1")
        self.every_n_steps = every_n_steps
        self.stage = stage
        self.stream = stream
        self._enabled = True
        self._t0 = 0.0
        self._eval_t0 = 0.0
        self._first = 0

    # ---- ProgressBar interface ---
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            print(*args, file=self.stream or sys.stdout, flush=True, **kwargs)

    # ---- what a line says ---
    def _stage(self, trainer: L.Trainer) -> str:
        if self.stage:
            return self.stage
        from .quantization import QuantizationCallback

        modes = [c.mode for c in trainer.callbacks if isinstance(c, QuantizationCallback)]
        return "float" if not modes or modes[0] == "fp32" else str(modes[0])

    def _monitor(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str | None:
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "monitor", None):
                return cb.monitor
        main = getattr(pl_module, "main_metric", None)
        return f"val/{main}" if main else None

    def _total(self, trainer: L.Trainer) -> float:
        """Training batches of the whole fit (inf when the loader has no length)."""
        per_epoch = self.total_train_batches
        total = per_epoch * max(trainer.max_epochs or 1, 1) if trainer.max_epochs != -1 \
            else math.inf
        if trainer.max_steps and trainer.max_steps > 0:
            total = min(total, trainer.max_steps * trainer.accumulate_grad_batches)
        return total

    def _done(self, trainer: L.Trainer) -> int:
        return int(trainer.fit_loop.epoch_loop.total_batch_idx) + 1

    def _line(self, trainer: L.Trainer, pl_module: L.LightningModule, done: int,
              epoch_end: bool = False) -> str:
        total = self._total(trainer)
        elapsed = time.monotonic() - self._t0
        rate = elapsed / max(done - self._first, 1)
        eta = rate * (total - done) if math.isfinite(total) else math.inf
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        pct = f" ({done / total:.0%})" if math.isfinite(total) and total else ""
        step = f"step {done}/{int(total)}{pct}" if math.isfinite(total) else f"step {done}"
        metrics = trainer.progress_bar_metrics
        loss = metrics.get("train/loss", trainer.callback_metrics.get("train/loss"))
        monitor = self._monitor(trainer, pl_module)
        parts = [f"[{self._stage(trainer)}] epoch {trainer.current_epoch + 1}/{epochs}"
                 + (" done" if epoch_end else ""), step, f"loss {_number(loss)}"]
        if monitor:
            parts.append(f"{monitor} {_number(trainer.callback_metrics.get(monitor))}")
        parts += [f"elapsed {_hms(elapsed)}", f"eta {_hms(eta)}"]
        return "  ".join(parts)

    # ---- hooks ---
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.monotonic()
        self._first = self._done(trainer)  # a resumed fit starts past 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        done = self._done(trainer)
        last = batch_idx + 1 >= self.total_train_batches  # the epoch line follows
        if done % self.every_n_steps == 0 and not last:
            self.print(self._line(trainer, pl_module, done))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.print(self._line(trainer, pl_module, self._done(trainer), epoch_end=True))

    def _eval_start(self, *_: Any) -> None:
        self._eval_t0 = time.monotonic()

    on_test_start = on_predict_start = _eval_start

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start()

    def _eval_end(self, trainer: L.Trainer, what: str, batches: Any) -> None:
        n = sum(batches) if isinstance(batches, list) else batches
        self.print(f"[{self._stage(trainer)}] {what}: {n} batches in "
                   f"{_hms(time.monotonic() - self._eval_t0)}")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_end(trainer, "test", trainer.num_test_batches)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_end(trainer, "predict", trainer.num_predict_batches)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":  # during fit, the epoch line says it
            self._eval_end(trainer, "validate", trainer.num_val_batches)


def progress_bar(every_n_steps: int = 50, style: str = "auto") -> ProgressBar:
    """The progress bar for where the output goes. ``style``: ``auto`` (Lightning's Rich bar
    when stdout is a terminal, else :class:`LineProgressBar`), ``rich`` or ``lines``;
    ``every_n_steps``: steps between two lines."""
    if style not in STYLES:
        raise ValueError(f"progress_bar.style={style!r}: allowed one of {STYLES}")
    isatty = getattr(sys.stdout, "isatty", None)
    if style == "rich" or (style == "auto" and callable(isatty) and isatty()):
        return RichProgressBar()
    return LineProgressBar(every_n_steps=every_n_steps)
