"""Console entry points: ``qat-train`` (Hydra, with sweeps) and ``qat-eval``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["train", "evaluate", "config_dir"]


def config_dir() -> Path:
    """The ``conf/`` folder: $QAT_CONFIG_DIR, else the one beside the package (source tree)."""
    env = os.environ.get("QAT_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "conf"
    if not (path / "train.yaml").is_file():
        sys.exit(f"qat: no train.yaml in {path}; set QAT_CONFIG_DIR to the repository's conf/")
    return path


def _fail(err: BaseException) -> None:
    """One line naming the problem, unless HYDRA_FULL_ERROR=1 asks for the traceback."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    cause = err
    while cause.__cause__ is not None and type(cause).__name__ in (
        "InstantiationException", "ConfigCompositionException"):
        cause = cause.__cause__
    print(f"qat: error: {type(cause).__name__}: {cause}", file=sys.stderr)
    sys.exit(1)


def train() -> None:
    """``qat-train recipe=<name> [key=value ...]``; ``-m`` for sweeps."""
    import hydra
    from omegaconf import DictConfig

    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    @hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
    def _main(cfg: DictConfig) -> float | None:
        from .train import run

        try:
            results = run(cfg)
        except (ValueError, FileNotFoundError, KeyError, TypeError) as err:
            _fail(err)
        metric = cfg.get("optimized_metric")
        if metric:
            for stage in reversed(list(results["stages"].values())):
                key = metric.replace("val/", "test/")
                if key in stage:
                    return stage[key]
        return None

    _main()


def evaluate() -> None:
    """``qat-eval <checkpoint> [--split test|val] [--predict DIR]``: metrics of a checkpoint."""
    from .evaluate import main

    main()
