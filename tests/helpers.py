"""Shared test helpers: the real Hydra config as qat-train composes it; a tiny-run override set."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from qat.configs import compose_train

__all__ = ["TINY", "compose_cfg"]

# a few batches of a small subset, short sequences, no progress bar
TINY = [
    "data.limit_train=48", "data.limit_eval=24", "data.batch_size=8", "data.max_length=32",
    "trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1", "callbacks.progress_bar=null",
    "float_overrides=['trainer.max_epochs=1']",  # a float run trained for init_from: one epoch
]


def compose_cfg(overrides: list[str], out: Path) -> DictConfig:
    """The real config, as qat-train composes it, with its output under ``out``."""
    return compose_train(overrides, out)
