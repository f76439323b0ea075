"""QATModule: a LightningModule around any text model that returns logits."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import MetricCollection

__all__ = ["QATModule"]

NON_INPUTS = ("labels", "idx")


class QATModule(L.LightningModule):
    """Task loss, metrics, optimizer and schedule around ``model``.

    ``model(**inputs)`` returns logits (B, num_labels); num_labels == 1 with ``regression``.
    ``optimizer`` and ``scheduler`` are factories (Hydra ``_partial_``): ``optimizer(params)``,
    ``scheduler(optimizer, total_steps=...)``. ``metrics`` builds a fresh MetricCollection;
    ``val_names`` names the validation (and test) dataloaders, e.g. MNLI's matched/mismatched.
    ``distiller``, a :class:`qat.distill.Distiller`, mixes the task loss with distillation from
    its frozen teacher; its loss module (and any projection) becomes ``self.distill_loss``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[[Iterable[Tensor]], torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        metrics: Callable[[], MetricCollection] | None = None,
        regression: bool = False,
        val_names: Sequence[str] = ("val",),
        test_names: Sequence[str] | None = None,
        main_metric: str = "accuracy",
        distiller: Any = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.regression = regression
        self.main_metric = main_metric
        self.distiller = distiller
        self.distill_loss = distiller.loss if distiller is not None else None
        self.val_names = self.prefixes("val", val_names)
        self.test_names = self.prefixes("test", test_names or ["test"])
        make = metrics or (lambda: MetricCollection({}))
        self.train_metrics = make().clone(prefix="train/")
        self.val_metrics = nn.ModuleList(make().clone(prefix=f"{n}/") for n in self.val_names)
        self.test_metrics = nn.ModuleList(make().clone(prefix=f"{n}/") for n in self.test_names)

    @staticmethod
    def prefixes(stage: str, names: Sequence[str]) -> list[str]:
        """Metric prefixes: ``val`` for one loader, ``val_<name>`` for each of several."""
        return [stage] if len(names) == 1 else [f"{stage}_{n}" for n in names]

    def on_train_start(self) -> None:
        """Every module of the model trains in train mode (Lightning keeps the mode each module
        had: a pretrained encoder loaded in eval mode would fine-tune with dropout off).
        Callbacks that want a part in eval mode (frozen norm statistics) set it per batch."""
        self.model.train()

    # ---- forward and loss -----------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model(**{k: v for k, v in batch.items() if k not in NON_INPUTS})

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.regression:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        return F.cross_entropy(logits.float(), labels)

    def predictions(self, logits: Tensor) -> Tensor:
        return logits.squeeze(-1).float() if self.regression else logits.argmax(-1)

    def _metric_input(self, logits: Tensor) -> Tensor:
        return logits.squeeze(-1).float() if self.regression else logits.float()

    # ---- steps ----------------------------------------------------------------------------------
    def _distill(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Student forward under the distiller's feature capture, then the mixed loss."""
        d = self.distiller
        inputs = {k: v for k, v in batch.items() if k not in NON_INPUTS}
        cap = d.student_capture(self.model) if d.needs_features else nullcontext()
        with cap as scap:
            logits = self.model(**inputs)
        d.teacher_to(logits.device)
        task = self.loss(logits, batch["labels"])
        loss, logs = d.compute(logits, scap, (), inputs, lambda m: m(**inputs), task, batch)
        self.log_dict({f"train/{k}": v for k, v in logs.items() if k != "loss"})
        return logits, loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.distiller is not None:
            logits, loss = self._distill(batch)
        else:
            logits = self(batch)
            loss = self.loss(logits, batch["labels"])
        bs = batch["labels"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.train_metrics.update(self._metric_input(logits.detach()), batch["labels"])
        return loss

    def on_train_epoch_end(self) -> None:
        if self.train_metrics._modules:
            self.log_dict(self.train_metrics.compute())
            self.train_metrics.reset()

    def _eval_step(self, batch, metrics: nn.ModuleList, names, stage: str, idx: int) -> None:
        """Loss and metric update for dataloader ``idx`` of a validation or test stage."""
        logits = self(batch)
        loss = self.loss(logits, batch["labels"])
        name = names[idx]
        self.log(f"{name}/loss", loss, batch_size=batch["labels"].shape[0],
                 add_dataloader_idx=False)
        metrics[idx].update(self._metric_input(logits), batch["labels"])

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.val_metrics, self.val_names, "val", dataloader_idx)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, self.test_metrics, self.test_names, "test", dataloader_idx)

    def _log_eval(self, metrics: nn.ModuleList) -> None:
        for m in metrics:
            if m._modules:
                self.log_dict(m.compute(), add_dataloader_idx=False)
                m.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_eval(self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_eval(self.test_metrics)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        logits = self(batch)
        out = {"predictions": self.predictions(logits), "logits": logits.float()}
        if "idx" in batch:
            out["idx"] = batch["idx"]
        return out

    # ---- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)
        params = [p for p in self.parameters() if p.requires_grad]
        opt = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return opt
        total = int(self.trainer.estimated_stepping_batches) if self._trainer else 1
        sched = self.scheduler_factory(opt, total_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
