"""GLUE-format prediction files from a trained module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

__all__ = ["write_predictions"]


def write_predictions(trainer: L.Trainer, lit: L.LightningModule, dm: Any, out: Path) -> list[str]:
    """Predict every unlabelled test split of ``dm`` and write its GLUE submission file."""
    from .data import write_glue_predictions

    out.mkdir(parents=True, exist_ok=True)
    batches = trainer.predict(lit, dataloaders=dm.predict_dataloader())
    names = dm.predict_names
    if names and len(names) == 1:
        batches = [batches]
    written = []
    for name, outs in zip(names, batches, strict=True):
        ids = torch.cat([o["idx"] for o in outs])
        preds = torch.cat([o["predictions"] for o in outs])
        task = dm.task_name
        if task == "mnli":
            task = "mnli-mm" if "mismatched" in name else "mnli-m"
        written.append(str(write_glue_predictions(task, ids, preds, out)))
    return written
