"""Where qat-train's Hydra configs are."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["config_dir", "compose_train"]


def config_dir() -> Path:
    """The ``conf/`` folder: $QAT_CONFIG_DIR, else the one beside the package (source tree)."""
    env = os.environ.get("QAT_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "conf"
    if not (path / "train.yaml").is_file():
        sys.exit(f"qat: no train.yaml in {path}; set QAT_CONFIG_DIR to the repository's conf/")
    return path


def compose_train(overrides: list[str], output_dir: str | Path = "outputs") -> Any:
    """The config ``qat-train <overrides>`` composes (Hydra's runtime filled in, so that every
    interpolation resolves), its outputs under ``output_dir``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.hydra.runtime.output_dir = str(Path(output_dir) / str(cfg.get("run_id") or "run"))
    HydraConfig.instance().set_config(cfg)
    return cfg
