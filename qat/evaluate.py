"""qat-eval: test metrics (and GLUE prediction files) of a checkpoint written by qat-train."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf

__all__ = ["main", "evaluate_checkpoint", "run_config_for"]


def run_config_for(ckpt: Path) -> Path:
    """The resolved config (.hydra/config.yaml) of the run that wrote ``ckpt``."""
    for parent in ckpt.resolve().parents:
        cfg = parent / ".hydra" / "config.yaml"
        if cfg.is_file():
            return cfg
    raise FileNotFoundError(f"{ckpt}: no .hydra/config.yaml in any parent folder (was it "
                            "written by qat-train?)")


def evaluate_checkpoint(ckpt: str | Path, predict_dir: str | Path | None = None) -> dict:
    """Rebuild the run's data, model and quantizers, load ``ckpt`` and test it."""
    import torch
    from hydra.utils import instantiate

    from .train import build_datamodule, build_model, build_module, build_trainer

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt}: no such file")
    try:
        torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ValueError(f"checkpoint {ckpt} is unreadable or not a qat checkpoint: {err}") from err
    cfg = OmegaConf.load(run_config_for(ckpt))
    is_float_stage = ckpt.resolve().parent.parent.name == "float"
    dm = build_datamodule(cfg)
    model = build_model(cfg, dm)
    quant = instantiate(cfg.quant) if not is_float_stage else None
    lit = build_module(cfg, model, dm)
    out = ckpt.resolve().parent.parent
    cfg.callbacks = None
    cfg.logger = None
    trainer = build_trainer(cfg, out, [quant] if quant else [], monitor="")
    rows = trainer.test(lit, datamodule=dm, ckpt_path=str(ckpt), verbose=False)
    metrics = {k: float(v) for r in rows for k, v in r.items()}
    result = {"checkpoint": str(ckpt), "metrics": metrics}
    if predict_dir is not None and dm.task_info.is_glue:
        from .predict import write_predictions

        result["predictions"] = write_predictions(trainer, lit, dm, Path(predict_dir))
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="qat-eval", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--predict", metavar="DIR", help="write GLUE prediction files into DIR")
    args = ap.parse_args(argv)
    from .cli import _fail

    try:
        result = evaluate_checkpoint(args.checkpoint, args.predict)
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    print(json.dumps(result, indent=2))
