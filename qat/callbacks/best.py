"""BestCheckpoint: the best epoch by the monitored metric, among the epochs whose model is the
final one of every schedule of the run.

A schedule that is still moving (gradual pruning below its final sparsity, fake quant not yet
on) validates a model that is not the one the run stands for: a pruning run whose best epoch
came at 45 % of its 50 % target would report a 50 % row from a 45 % model. A callback with a
schedule says whether its final model is reached (:class:`Scheduled`); ``BestCheckpoint`` keeps
a candidate only when all of them say so.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol, runtime_checkable

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["BestCheckpoint", "Scheduled", "schedules_waiting"]

log = logging.getLogger(__name__)


@runtime_checkable
class Scheduled(Protocol):
    """A callback that changes the model over training (pruning, delayed fake quant)."""

    def final_model_reached(self, trainer: L.Trainer) -> bool:
        """True when the model trained so far has this schedule's final form."""
        ...


def schedules_waiting(trainer: L.Trainer) -> list[str]:
    """Names of the trainer's scheduled callbacks whose final model is not reached yet."""
    return [type(c).__name__ for c in trainer.callbacks
            if isinstance(c, Scheduled) and not c.final_model_reached(trainer)]


class BestCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` whose top-k candidates are only
    epochs where :func:`schedules_waiting` is empty. A run whose schedules never end keeps no
    such checkpoint and says so at the end (it is then tested with its last weights)."""

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        if self.monitor is not None and schedules_waiting(trainer):
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        waiting = schedules_waiting(trainer)
        if self.monitor is not None and waiting and not self.best_model_path:
            log.warning("no best checkpoint: %s had not reached the final model when training "
                        "ended (lengthen training or end the schedule earlier)",
                        ", ".join(waiting))
