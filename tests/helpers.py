"""Shared test helpers: the real Hydra config as qat-train composes it; a tiny-run override set;
the scripts in scripts/ as modules."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from omegaconf import DictConfig

from qat.configs import compose_train

__all__ = ["TINY", "compose_cfg", "load_script"]

ROOT = Path(__file__).resolve().parents[1]

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


def load_script(name: str, file: str) -> ModuleType:
    """``scripts/<file>`` imported as module ``name`` (registered in sys.modules, where
    dataclasses look their module up; pop it when done)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
