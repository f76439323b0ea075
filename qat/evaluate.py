"""qat-eval: test metrics (and GLUE prediction files) of a checkpoint written by qat-train."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["main", "evaluate_checkpoint", "run_config_for", "is_float_stage", "RunParts",
           "open_run"]


def run_config_for(ckpt: Path) -> Path:
    """The resolved config (.hydra/config.yaml) of the run that wrote ``ckpt``."""
    for parent in ckpt.resolve().parents:
        cfg = parent / ".hydra" / "config.yaml"
        if cfg.is_file():
            return cfg
    raise FileNotFoundError(f"{ckpt}: no .hydra/config.yaml in any parent folder (was it "
                            "written by qat-train?)")


def is_float_stage(ckpt: str | Path) -> bool:
    """Whether ``ckpt`` was written by a run's float stage (``<run>/float/checkpoints/``)."""
    return Path(ckpt).resolve().parent.parent.name == "float"


@dataclass
class RunParts:
    """What a run's checkpoint needs to be used again, rebuilt from the run's config: the data,
    the LightningModule (float model, quantizers not yet inserted) and the quantization callback
    (``None`` for a float-stage checkpoint)."""

    ckpt: Path
    cfg: DictConfig
    run_dir: Path
    float_stage: bool
    dm: Any
    lit: Any
    quant: Any
    prune: Any = None

    def restore(self) -> Any:
        """Insert the quantizers, load the checkpoint's weights (``weights_only=True``) and
        vocabulary as ``Trainer.test(ckpt_path=...)`` would; returns the model in eval mode."""
        import torch

        from .config_check import check_checkpoint

        if self.quant:
            self.quant.prepare(self.lit)
        if self.prune:
            self.prune.setup(None, self.lit, "test")  # the mask buffers the checkpoint holds
        model = self.lit.model
        state = check_checkpoint(self.ckpt, "checkpoint", model, lightning=True)
        model.load_state_dict(state, strict=True)
        obj = torch.load(self.ckpt, map_location="cpu", weights_only=True, mmap=True)
        dm_state = obj.get(type(self.dm).__name__)
        if dm_state:
            self.dm.load_state_dict(dm_state)
        return model.eval()


def open_run(ckpt: str | Path) -> RunParts:
    """Rebuild the data, model and quantization callback of the run that wrote ``ckpt``."""
    import torch
    from hydra.utils import instantiate

    from .auto.callback import restore_allocation
    from .train import build_datamodule, build_model, build_module

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt}: no such file")
    try:
        torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ValueError(f"checkpoint {ckpt} is unreadable or not a qat checkpoint: {err}") from err
    cfg = OmegaConf.load(run_config_for(ckpt))
    float_stage = is_float_stage(ckpt)
    dm = build_datamodule(cfg)
    model = build_model(cfg, dm)
    quant = instantiate(cfg.quant) if not float_stage else None
    restore_allocation(quant, ckpt.resolve().parent.parent)  # formats an autoquant run chose
    node = cfg.get("prune")
    prune = (instantiate(node, _convert_="all") if node and "_target_" in node
             and not float_stage else None)
    lit = build_module(cfg, model, dm)
    return RunParts(ckpt, cfg, ckpt.resolve().parent.parent, float_stage, dm, lit, quant, prune)


def evaluate_checkpoint(ckpt: str | Path, predict_dir: str | Path | None = None) -> dict:
    """Rebuild the run's data, model and quantizers, load ``ckpt`` and test it."""
    from .train import build_trainer

    run = open_run(ckpt)
    cfg, dm, lit, quant = run.cfg, run.dm, run.lit, run.quant
    cfg.callbacks = None
    cfg.logger = None
    trainer = build_trainer(cfg, run.run_dir, [c for c in (quant, run.prune) if c], monitor="")
    rows = trainer.test(lit, datamodule=dm, ckpt_path=str(run.ckpt), verbose=False)
    metrics = {k: float(v) for r in rows for k, v in r.items()}
    result = {"checkpoint": str(run.ckpt), "metrics": metrics}
    if predict_dir is not None and dm.task_info.is_glue:
        from .predict import write_predictions

        result["predictions"] = write_predictions(trainer, lit, dm, Path(predict_dir))
    return result


def main(argv: list[str] | None = None) -> None:
    """``qat-eval <checkpoint> [--predict DIR]``: prints the checkpoint's test metrics as JSON;
    bad input gives one line and exit status 1 (:mod:`qat.errors`)."""
    import os

    from .config_check import check_checkpoint
    from .errors import reported
    from .quiet import silence_known_noise

    ap = argparse.ArgumentParser(prog="qat-eval", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a checkpoint written by qat-train (e.g. best.ckpt)")
    ap.add_argument("--predict", metavar="DIR", help="write GLUE prediction files into DIR")
    args = ap.parse_args(argv)
    silence_known_noise()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with reported(ckpt=args.checkpoint):
        check_checkpoint(args.checkpoint, "checkpoint", lightning=True)
        result = evaluate_checkpoint(args.checkpoint, args.predict)
    print(json.dumps(result, indent=2))
