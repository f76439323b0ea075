"""The logger of one stage of a run (float, QAT, PTQ), from the ``logger`` config group.

File loggers (CSV) write into the stage's folder. A W&B run is opened per stage and closed at
its end: each stage is its own W&B run (``job_type`` = the stage, name ``<job name>/<stage>``),
the stages of one run share a W&B group (the run id; the job's in a sweep), and an offline run
is written under ``<run dir>/wandb/``, as ``conf/logger/wandb_offline.yaml`` says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

__all__ = ["build_logger", "finish_logger", "is_wandb"]


def is_wandb(node: Any) -> bool:
    """Whether a logger config node builds Lightning's WandbLogger."""
    if not node or "_target_" not in node:
        return False
    from lightning.pytorch.loggers import WandbLogger

    try:
        return issubclass(get_class(node._target_), WandbLogger)
    except (ImportError, ValueError, AttributeError):
        return False


def _group(cfg: DictConfig) -> str:
    """The run id; in a sweep, ``<run id>/<job number>`` (the job's own folder)."""
    from .jobs import hydra_of, is_sweep_job

    if is_sweep_job(cfg):
        return f"{cfg.run_id}/{hydra_of(cfg).job.num}"
    return str(cfg.run_id)


def build_logger(cfg: DictConfig, out: Path, run_dir: Path, stage: str) -> Any:
    """The logger of ``stage``, writing into ``out`` (the stage's folder), or False for none.
    W&B: one run per stage under ``run_dir/wandb``, grouped by the run id."""
    node = cfg.get("logger")
    if not node or "_target_" not in node:
        return False
    if not is_wandb(node):
        return instantiate(OmegaConf.merge(node, {"save_dir": str(out)}))
    from .jobs import job_name

    run_dir.mkdir(parents=True, exist_ok=True)
    merged = OmegaConf.merge(node, {"save_dir": str(run_dir)})
    OmegaConf.set_struct(merged, False)
    merged.job_type = stage
    if merged.get("name") is None:
        merged.name = f"{job_name(cfg)}/{stage}"
    if merged.get("group") is None:
        merged.group = _group(cfg)
    logger = instantiate(merged)
    # Lightning passes anonymous=None, which wandb >= 0.19 reports as "has no effect": harmless
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)
    return logger


def finish_logger(trainer: Any) -> None:
    """Close the stage's W&B run (else the next stage's logger would reuse it); other loggers
    need nothing."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in getattr(trainer, "loggers", []):
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
