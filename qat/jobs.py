"""What a qat-train job is called: its recipe, and in a sweep the overrides that tell the jobs
apart (``20ng_textcnn_w8a8 quant=w4a8_per_channel_lsq``), so two jobs of a sweep never share a
name in their tables, ``results.json`` or W&B."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["job_name", "swept_overrides"]


def _key(override: Any) -> str:
    return str(override.key_or_group)


def swept_overrides() -> list[str]:
    """This job's values of the overrides its sweep varies (``["quant=w4a8", "seed=2"]``): the
    keys given several values on the command line (``-m quant=w8a8,w4a8``, as the sweep recorded
    them in ``multirun.yaml``) and the keys a sweeper searches (``hydra.sweeper.params``).
    Empty outside a sweep or outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    try:
        hc = HydraConfig.get()
    except ValueError:  # composed without @hydra.main (tests, notebooks)
        return []
    if hc.mode != RunMode.MULTIRUN:
        return []
    keys = {str(k) for k in (hc.sweeper.get("params") or {})}
    parser = OverridesParser.create()
    record = Path(str(hc.sweep.dir)) / "multirun.yaml"
    if record.is_file():
        sweep = OmegaConf.load(record)
        given = list(OmegaConf.select(sweep, "hydra.overrides.task", default=[]) or [])
        keys |= {_key(o) for o in parser.parse_overrides(given) if o.is_sweep_override()}
    job = list(hc.overrides.task)
    return [text for text, o in zip(job, parser.parse_overrides(job), strict=True)
            if _key(o) in keys]


def job_name(cfg: Any) -> str:
    """``cfg.name`` (the recipe), followed in a sweep by the overrides that set this job apart."""
    return " ".join([str(cfg.name), *swept_overrides()])
