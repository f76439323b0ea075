"""Shared test helpers: the real Hydra config as qat-train composes it; a tiny-run override set."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from qat.cli import config_dir

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
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.hydra.runtime.output_dir = str(out / cfg.run_id)
    HydraConfig.instance().set_config(cfg)
    return cfg
