"""What a qat-train job is called: its recipe, and in a sweep the overrides that tell the jobs
apart (``20ng_textcnn_w8a8 quant=w4a8_per_channel_lsq``), so two jobs of a sweep never share a
name in their tables, ``results.json`` or W&B."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["job_name", "swept_overrides", "hydra_of", "is_sweep_job"]


def _key(override: Any) -> str:
    return str(override.key_or_group)


def hydra_of(cfg: Any) -> Any:
    """The Hydra node of ``cfg``'s job: its own (a config composed with
    ``return_hydra_config=True``, as the float run a quantized run trains first), else the
    running job's; None outside Hydra."""
    node = cfg.get("hydra") if cfg is not None and "hydra" in cfg else None
    if node is not None and node.get("overrides") is not None:
        return node
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get()
    except ValueError:  # composed without @hydra.main (tests, notebooks)
        return None


def swept_overrides(cfg: Any = None) -> list[str]:
    """This job's values of the overrides its sweep varies (``["quant=w4a8", "seed=2"]``): the
    keys given several values on the command line (``-m quant=w8a8,w4a8``, as the sweep recorded
    them in ``multirun.yaml``) and the keys a sweeper searches (``hydra.sweeper.params``).
    Empty outside a sweep or outside Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    if not is_sweep_job(cfg):
        return []
    hc = hydra_of(cfg)
    keys = {str(k) for k in (hc.sweeper.get("params") or {})}
    parser = OverridesParser.create()
    record = Path(str(hc.sweep.dir)) / "multirun.yaml"
    if record.is_file():
        sweep = OmegaConf.load(record)
        given = list(OmegaConf.select(sweep, "hydra.overrides.task", default=[]) or [])
        keys |= {_key(o) for o in parser.parse_overrides(given) if o.is_sweep_override()}
    job = [str(o) for o in hc.overrides.task]
    return [text for text, o in zip(job, parser.parse_overrides(job), strict=True)
            if _key(o) in keys]


def is_sweep_job(cfg: Any = None) -> bool:
    """Whether ``cfg``'s job is one job of a sweep (``qat-train -m``)."""
    from hydra.types import RunMode

    hc = hydra_of(cfg)
    return hc is not None and hc.get("mode") == RunMode.MULTIRUN


def job_name(cfg: Any) -> str:
    """``cfg.name`` (the recipe), followed in a sweep by the overrides that set this job apart."""
    return " ".join([str(cfg.name), *swept_overrides(cfg)])
