"""Fine-tuning mode: every module of a training model is in train mode during training_step
(a pretrained encoder too: from_pretrained returns it in eval mode), eval mode in validation."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from qat.lit import QATModule
from qat.models import PretrainedClassifier


class _Recorder(QATModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.eval_in_train: list[list[str]] = []
        self.train_in_val: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        self.eval_in_train.append([n for n, m in self.named_modules() if not m.training])
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.train_in_val.append([n for n, m in self.named_modules() if m.training])
        return super().validation_step(batch, batch_idx, dataloader_idx)


def _tiny_encoder(path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16)
    BertForSequenceClassification(cfg).save_pretrained(path)


def _batches(n: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1, 50, (4, 8), generator=g),
             "attention_mask": torch.ones(4, 8, dtype=torch.long),
             "labels": torch.randint(0, 2, (4,), generator=g)} for _ in range(n)]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pretrained_encoder_trains_in_train_mode(tmp_path, pooling):
    _tiny_encoder(tmp_path / "enc")
    model = PretrainedClassifier(num_labels=2, name_or_path=str(tmp_path / "enc"),
                                 pooling=pooling)
    lit = _Recorder(model)
    data = _batches()
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1,
                        num_sanity_val_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(lit, DataLoader(data, batch_size=None), DataLoader(data, batch_size=None))
    assert len(lit.eval_in_train) == 4  # two epochs of two steps, validation in between
    assert all(names == [] for names in lit.eval_in_train), lit.eval_in_train[0][:5]
    assert lit.train_in_val and all(names == [] for names in lit.train_in_val)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pretrained_classifier_is_built_in_train_mode(tmp_path, pooling):
    _tiny_encoder(tmp_path / "enc")
    model = PretrainedClassifier(num_labels=3, name_or_path=str(tmp_path / "enc"),
                                 pooling=pooling)
    assert all(m.training for m in model.modules())
