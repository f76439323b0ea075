"""Where qat-train's Hydra configs are."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["config_dir"]


def config_dir() -> Path:
    """The ``conf/`` folder: $QAT_CONFIG_DIR, else the one beside the package (source tree)."""
    env = os.environ.get("QAT_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "conf"
    if not (path / "train.yaml").is_file():
        sys.exit(f"qat: no train.yaml in {path}; set QAT_CONFIG_DIR to the repository's conf/")
    return path
