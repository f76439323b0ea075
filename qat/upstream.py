"""The float run a quantized run starts from: ``init_from=recipe:<float recipe>``.

A quantized recipe names its float recipe instead of a checkpoint path. The float run is
identified by the seed and by the command-line overrides that shape the float model (data,
model, trainer limits, paths, ...), not by those of the quantized stage (quant, distill, prune,
optimizer, scheduler, epochs, run id), plus ``float_overrides`` (settings of the float run
alone, e.g. its epochs in a quick test). It lives in ``<output_dir>/<float recipe>/seed<seed>``
(plus a hash of those overrides when there are any), so ``qat-train recipe=<float recipe>
run_id=seed<seed>`` produces exactly the run that every quantized recipe of that seed reuses.
When it is missing it is trained first, in the same process (resumed if it was interrupted).
The float and quantized rows of the results then share one float model, which is also the
KD teacher.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

__all__ = ["PREFIX", "Upstream", "upstream", "ensure_upstream", "float_run_id", "command_of"]

log = logging.getLogger("qat")

PREFIX = "recipe:"
# overrides of the quantized stage: they do not change the float model it starts from
STAGE_KEYS = ("recipe", "name", "quant", "distill", "prune", "optimizer", "scheduler",
              "float_overrides",
              "init_from", "run_id", "ckpt_path", "baseline_epochs", "trainer.max_epochs",
              "trainer.max_steps", "hparams_search", "test", "predict", "hydra")
# overrides that change neither the float model nor its numbers (display, logging, paths)
NEUTRAL_KEYS = ("seed", "paths.output_dir", "trainer.enable_progress_bar",
                "trainer.enable_model_summary", "trainer.log_every_n_steps", "logger",
                "callbacks.progress_bar", "callbacks.progress")


@dataclass(frozen=True)
class Upstream:
    """The float run (recipe, folder, the overrides it is composed with)."""

    recipe: str
    run_dir: Path
    overrides: tuple[str, ...]

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "best.ckpt"

    @property
    def results_path(self) -> Path:
        return self.run_dir / "results.json"

    def done(self) -> bool:
        return self.checkpoint.is_file() and self.results_path.is_file()

    def results(self) -> dict[str, Any]:
        return json.loads(self.results_path.read_text())


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _under(key: str, keys: tuple[str, ...]) -> bool:
    return any(key == k or key.startswith(k + ".") or key.startswith(k + "@") for k in keys)


def _stage_key(key: str) -> bool:
    return _under(key, STAGE_KEYS)


def _task_overrides(cfg: DictConfig) -> list[str]:
    """The command-line overrides of this run (Hydra's ``overrides.task``)."""
    node = cfg.get("hydra") if "hydra" in cfg else None
    if node is not None and node.get("overrides") is not None:
        return [str(o) for o in node.overrides.task]
    try:
        from hydra.core.hydra_config import HydraConfig

        return [str(o) for o in HydraConfig.get().overrides.task]
    except ValueError:  # composed without Hydra's runtime (a plain OmegaConf config)
        return []


def command_of(cfg: DictConfig) -> str:
    """The ``qat-train`` command line of this run (its overrides; output paths left out)."""
    parts = [o for o in _task_overrides(cfg) if not _key(o).startswith(("paths.", "name"))]
    return " ".join(["qat-train", *parts])


def float_run_id(seed: int, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """``seed<seed>``, plus a short hash of the float-shaping overrides when there are any
    (display overrides are left out; ``float_overrides`` counts by its items). Also names the
    runs of scripts/sweep.py, whose stage overrides then tell quantized runs apart."""
    rest = []
    for o in overrides:
        if _key(o) == "float_overrides":  # its items shape the float run, not the list
            from hydra.core.override_parser.overrides_parser import OverridesParser

            rest += [str(v) for v in OverridesParser.create().parse_override(o).value()]
        elif not _under(_key(o), NEUTRAL_KEYS):
            rest.append(o)
    rest.sort()
    if not rest:
        return f"seed{seed}"
    return f"seed{seed}-{hashlib.sha1(','.join(rest).encode()).hexdigest()[:8]}"


def upstream(cfg: DictConfig) -> Upstream | None:
    """The float run named by ``init_from=recipe:<name>``, or None for a path / no init."""
    ref = cfg.get("init_from")
    if not isinstance(ref, str) or not ref.startswith(PREFIX):
        return None
    recipe = ref[len(PREFIX):]
    if not recipe:
        raise ValueError(f"init_from={ref!r}: name the float recipe, e.g. "
                         f"init_from={PREFIX}20ng_textcnn_fp32")
    task = [o for o in _task_overrides(cfg) if not _stage_key(_key(o))]
    kept = [o for o in task if not _under(_key(o), NEUTRAL_KEYS)]
    kept += [str(o) for o in cfg.get("float_overrides") or ()]  # the float run's own settings
    shown = [o for o in task if _under(_key(o), NEUTRAL_KEYS)
             and _key(o) not in ("seed", "paths.output_dir")]  # display: passed, not hashed
    run_id = float_run_id(int(cfg.seed), kept)
    out = Path(str(cfg.paths.output_dir))
    overrides = (*kept, *shown, f"seed={cfg.seed}", f"paths.output_dir={out}")
    return Upstream(recipe, out / recipe / run_id, overrides)


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose("train", overrides=overrides, return_hydra_config=True)
    from .configs import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def ensure_upstream(up: Upstream) -> Path:
    """The float run's best checkpoint, training (or resuming) the run first if needed."""
    if up.done():
        log.info("init_from: float run %s (reused)", up.run_dir)
        return up.checkpoint
    from .configs import config_dir

    names = sorted(p.stem for p in (config_dir() / "recipe").glob("*.yaml"))
    if up.recipe not in names:
        raise ValueError(f"init_from={PREFIX}{up.recipe}: no such recipe; allowed "
                         f"{', '.join(names)}")
    overrides = [f"recipe={up.recipe}", f"name={up.recipe}", f"run_id={up.run_dir.name}",
                 *up.overrides]
    if (up.run_dir / "checkpoints" / "last.ckpt").is_file():
        overrides.append("ckpt_path=last")
    log.info("init_from: training the float run first: qat-train %s",
             " ".join(o for o in overrides if not o.startswith(("name=", "paths."))))
    cfg = _compose(overrides)
    if cfg.get("quant") and cfg.quant.get("mode") not in (None, "fp32"):
        raise ValueError(f"init_from={PREFIX}{up.recipe}: not a float recipe "
                         f"(quant.mode={cfg.quant.mode!r})")
    from .train import run

    run(cfg, out=up.run_dir)
    if not up.done():
        raise FileNotFoundError(f"init_from={PREFIX}{up.recipe}: the float run in {up.run_dir} "
                                "wrote no best checkpoint (validation off?)")
    return up.checkpoint
