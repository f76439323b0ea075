"""BestCheckpoint keeps the best epoch among those whose model is final: a schedule still moving
(pruning below its target, fake quant not on yet) never gives best.ckpt."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from test_callbacks import PlainModule, _loader
from torch import nn

from qat.callbacks import BestCheckpoint, QuantizationCallback, Scheduled, schedules_waiting


class Worsening(L.LightningModule):
    """Its validation score falls every epoch: a plain ModelCheckpoint keeps epoch 0."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(8, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        self.log("val/score", torch.tensor(1.0 - 0.1 * self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class FinalFrom(L.Callback):
    """A schedule whose final model is reached from epoch ``epoch`` on."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def final_model_reached(self, trainer: L.Trainer) -> bool:
        return trainer.current_epoch >= self.epoch


def _fit(tmp_path, schedule: L.Callback | None, epochs: int = 4) -> BestCheckpoint:
    best = BestCheckpoint(dirpath=tmp_path, filename="best", monitor="val/score", mode="max",
                          save_top_k=1, save_weights_only=True, enable_version_counter=False)
    callbacks = [best] + ([schedule] if schedule else [])
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(Worsening(), _loader(), _loader(16, 1))
    return best


def test_without_schedules_it_is_lightnings_model_checkpoint(tmp_path):
    best = _fit(tmp_path, None)
    assert best.best_model_score == pytest.approx(1.0)  # epoch 0
    assert (tmp_path / "best.ckpt").is_file()


def test_best_is_chosen_among_epochs_with_the_final_model(tmp_path):
    schedule = FinalFrom(2)
    assert isinstance(schedule, Scheduled)
    best = _fit(tmp_path, schedule)
    assert best.best_model_score == pytest.approx(0.8)  # epoch 2, not the better epoch 0
    assert torch.load(best.best_model_path, weights_only=False)["epoch"] == 2


def test_a_schedule_that_never_ends_keeps_no_best_and_says_so(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="qat.callbacks.best"):
        best = _fit(tmp_path, FinalFrom(10), epochs=2)
    assert best.best_model_path == "" and not (tmp_path / "best.ckpt").exists()
    assert "FinalFrom had not reached the final model" in caplog.text


@pytest.mark.parametrize("unit", ["epoch", "step"])
def test_quantization_schedule_is_final_once_fake_quant_is_on(unit):
    cb = QuantizationCallback(unit=unit, start=2, model_attr="net")
    seen: list[tuple[int, int, bool]] = []

    class Spy(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            seen.append((trainer.current_epoch, trainer.global_step,
                         not schedules_waiting(trainer)))

    trainer = L.Trainer(max_epochs=4, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        limit_train_batches=1, callbacks=[cb, Spy()])
    trainer.fit(PlainModule(), _loader(), _loader(16, 1))
    # one step per epoch: step k trains epoch k; fake quant is on from position 2 either way
    assert seen == [(0, 1, False), (1, 2, False), (2, 3, True), (3, 4, True)]
    assert QuantizationCallback(mode="ptq").final_model_reached(trainer)
