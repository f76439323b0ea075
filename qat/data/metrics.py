"""Task metrics as torchmetrics collections.

Every collection is updated with the model output as it comes: ``update(logits, labels)`` with
logits ``(B, C)`` for classification (argmax is taken inside) or ``(B,)``/``(B, 1)`` for
regression.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    BinaryF1Score,
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassMatthewsCorrCoef,
)
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef
from torchmetrics.wrappers import LambdaInputTransformer

from .tasks import TaskInfo, get_task

__all__ = ["task_metrics", "main_metric", "argmax_logits", "flatten_regression"]


def argmax_logits(logits: torch.Tensor) -> torch.Tensor:
    """Class ids from ``(B, C)`` logits (1-D inputs are taken as class ids already)."""
    return logits.argmax(dim=-1) if logits.dim() > 1 else logits.long()


def flatten_regression(preds: torch.Tensor) -> torch.Tensor:
    """``(B, 1)`` -> ``(B,)`` float predictions."""
    return preds.reshape(-1).float()  # (B, 1) -> (B,)


def _metric(name: str, info: TaskInfo) -> Metric:
    c = info.num_labels
    if name == "accuracy":
        return MulticlassAccuracy(num_classes=c, average="micro")
    if name == "macro_f1":
        return MulticlassF1Score(num_classes=c, average="macro")
    if name == "mcc":
        return MulticlassMatthewsCorrCoef(num_classes=c)
    if name == "f1":  # F1 of the positive class (label 1), as GLUE reports for MRPC/QQP
        return LambdaInputTransformer(BinaryF1Score(), transform_pred=argmax_logits)
    if name == "pearson":
        return LambdaInputTransformer(PearsonCorrCoef(), transform_pred=flatten_regression,
                                      transform_target=flatten_regression)
    if name == "spearman":
        return LambdaInputTransformer(SpearmanCorrCoef(), transform_pred=flatten_regression,
                                      transform_target=flatten_regression)
    raise ValueError(f"unknown metric {name!r} for task {info.name!r}")


def task_metrics(task: str | TaskInfo, prefix: str | None = None) -> MetricCollection:
    """A fresh MetricCollection with the task's metrics (keys as in ``TaskInfo.metric_names``)."""
    info = task if isinstance(task, TaskInfo) else get_task(task)
    metrics = {name: _metric(name, info) for name in info.metric_names}
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)


def main_metric(task: str | TaskInfo) -> str:
    """Name of the metric to monitor for checkpointing (higher is better for every task)."""
    info = task if isinstance(task, TaskInfo) else get_task(task)
    return info.main_metric
