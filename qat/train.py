"""One training run from a composed Hydra config: float baseline (optional), then QAT / PTQ."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .auto.callback import allocate_for_run
from .callbacks import LineProgressBar, QuantizationCallback, StepTimer
from .jobs import job_name
from .lit import QATModule
from .loggers import build_logger, finish_logger
from .summary import model_size, print_results

__all__ = ["run", "build_datamodule", "build_model", "build_module", "resolve_ckpt"]

log = logging.getLogger("qat")


def _output_dir(cfg: DictConfig) -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # composed without @hydra.main (tests, notebooks)
        return Path(cfg.paths.output_dir)


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    dm = instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    return dm


def build_model(cfg: DictConfig, dm: Any) -> torch.nn.Module:
    import inspect

    factory = instantiate(cfg.model, _convert_="all")
    kwargs = {"vocab_size": dm.vocab_size, "num_labels": dm.num_labels, "pad_id": dm.pad_id}
    if factory.keywords.get("pretrained_embeddings") == "glove":  # GloVe 6B rows for the vocab
        from .data.vocab import glove_embeddings

        dim = factory.keywords.get("embed_dim", factory.keywords.get("d_model", 50))
        if dm.vocab is None:
            raise ValueError("model.pretrained_embeddings=glove needs a word vocabulary "
                             "(data.tokenizer=word)")
        try:
            kwargs["pretrained_embeddings"] = glove_embeddings(
                dm.vocab, dim, seed=int(getattr(dm, "seed", 0)), verbose=False)
        except ValueError as err:
            raise ValueError(f"model.pretrained_embeddings=glove: {err}") from None
    if "pair" in inspect.signature(factory.func).parameters and "pair" not in factory.keywords:
        kwargs["pair"] = dm.is_pair
    return factory(**kwargs)


def build_module(cfg: DictConfig, model: torch.nn.Module, dm: Any, distiller=None) -> QATModule:
    return QATModule(
        model,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        metrics=dm.metrics,
        regression=dm.is_regression,
        val_names=dm.val_names,
        test_names=dm.test_names,
        main_metric=dm.main_metric,
        distiller=distiller,
    )


def _callbacks(cfg: DictConfig, out: Path, monitor: str) -> list[L.Callback]:
    cbs = []
    for key, node in (cfg.get("callbacks") or {}).items():
        if node is None or "_target_" not in node:
            continue
        if "progress" in node._target_.lower() and not cfg.trainer.get("enable_progress_bar",
                                                                        True):
            continue
        logger = cfg.get("logger")
        if "LearningRateMonitor" in node._target_ and not (logger and "_target_" in logger):
            continue  # it needs a logger
        if key == "model_checkpoint":
            node = OmegaConf.merge(node, {"dirpath": str(out / "checkpoints"), "monitor": monitor})
        elif key == "last_checkpoint":
            node = OmegaConf.merge(node, {"dirpath": str(out / "checkpoints")})
        cbs.append(instantiate(node))
    return cbs


def build_trainer(cfg: DictConfig, out: Path, extra: list[L.Callback], monitor: str,
                  stage: str | None = None, run_dir: Path | None = None,
                  **overrides: Any) -> L.Trainer:
    """The Trainer of one stage (``float``, ``qat``, ``ptq``: named in progress lines and W&B)
    writing into ``out``, a folder of the run folder ``run_dir`` (default: Hydra's)."""
    callbacks = _callbacks(cfg, out, monitor) + extra
    for cb in callbacks:
        if isinstance(cb, LineProgressBar) and cb.stage is None:
            cb.stage = stage
    has_ckpt = any(isinstance(c, L.pytorch.callbacks.Checkpoint) for c in callbacks)
    logger = build_logger(cfg, out, run_dir or _output_dir(cfg), stage or "run")
    return instantiate(
        cfg.trainer, callbacks=callbacks, logger=logger, default_root_dir=str(out),
        enable_checkpointing=has_ckpt, **overrides,
    )


def resolve_ckpt(ckpt_path: str | None, out: Path, required: bool = True) -> str | None:
    """``last`` -> this run directory's last checkpoint (None if absent and not ``required``:
    a run stopped in its float stage); a path must exist."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        last = out / "checkpoints" / "last.ckpt"
        if not last.is_file() and not required:
            return None
        if not last.is_file():
            raise FileNotFoundError(
                f"ckpt_path=last: no checkpoint at {last}; pass the run_id of the run to resume "
                "(qat-train ... run_id=<id> ckpt_path=last)"
            )
        return str(last)
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no such file")
    return ckpt_path


def _test(trainer: L.Trainer, lit: QATModule, dm: Any) -> dict[str, float]:
    best = [c.best_model_path for c in trainer.checkpoint_callbacks
            if getattr(c, "monitor", None) and c.best_model_path]
    ckpt = best[0] if best else None
    rows = trainer.test(lit, datamodule=dm, ckpt_path=ckpt, verbose=False, weights_only=True)
    merged: dict[str, float] = {}
    for r in rows:
        merged.update({k: float(v) for k, v in r.items()})
    return merged


def _load_weights(model: torch.nn.Module, path: str) -> None:
    from .config_check import check_checkpoint

    state = check_checkpoint(path, "init_from", model, raw_ok=True, complete=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        log.warning("init_from: ignored %d keys not in the model, e.g. %s", len(unexpected),
                    unexpected[:3])


def _save_config(cfg: DictConfig, out: Path) -> None:
    """The resolved config as ``config.yaml`` in the run folder (also for runs composed in
    process, which have no ``.hydra`` folder): what scripts/report.py reads."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    try:
        text = OmegaConf.to_yaml(OmegaConf.create(plain), resolve=True)
    except Exception:  # an interpolation that needs Hydra's runtime (run dirs): keep it as is
        text = OmegaConf.to_yaml(OmegaConf.create(plain))
    (out / "config.yaml").write_text(text)


def _timing(float_s: float | None, quant_s: float | None) -> dict[str, float | None]:
    """Median training-step seconds of each stage and their ratio (quantized / float)."""
    ratio = quant_s / float_s if float_s and quant_s else None
    return {"fp32_step_s": float_s, "quant_step_s": quant_s, "step_time_ratio": ratio}


def run(cfg: DictConfig, out: Path | None = None) -> dict[str, Any]:
    """Train (and test) as ``cfg`` says; returns the results written to results.json.

    ``out``: the run folder (default: Hydra's run dir, else ``paths.output_dir``).
    ``init_from=recipe:<float recipe>`` starts from that recipe's float run, trained first when
    it is missing (:mod:`qat.upstream`); its test metrics are this run's float row."""
    from .config_check import check_checkpoint, check_ckpt_paths, check_config
    from .upstream import ensure_upstream, upstream

    check_config(cfg)
    out = out or _output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    check_ckpt_paths(cfg, out)  # a bad checkpoint path fails before the float run is trained
    up = upstream(cfg)
    init_from = str(ensure_upstream(up)) if up is not None else cfg.get("init_from")
    L.seed_everything(cfg.seed, workers=True)
    _save_config(cfg, out)
    dm = build_datamodule(cfg)
    model = build_model(cfg, dm)
    if init_from:
        _load_weights(model, init_from)
    monitor = f"{QATModule.prefixes('val', dm.val_names)[0]}/{dm.main_metric}"
    from .provenance import provenance
    from .upstream import command_of

    results: dict[str, Any] = {"name": job_name(cfg), "command": command_of(cfg),
                               **provenance(), "data": dm.describe(), "stages": {}}
    size_float = model_size(model)
    test = bool(cfg.get("test", True))
    timers = {"fp32": StepTimer(), "quant": StepTimer()}
    float_step_s = None
    if up is not None:  # the float row is the float run this one starts from
        prior = up.results()
        results["stages"]["fp32"] = prior.get("stages", {}).get("fp32", {})
        results["float_run"] = {"recipe": up.recipe, "run_dir": str(up.run_dir),
                                "checkpoint": init_from, "commit": prior.get("commit")}
        float_step_s = (prior.get("timing") or {}).get("fp32_step_s")
    elif init_from:
        results["float_run"] = {"checkpoint": str(init_from)}

    if cfg.baseline_epochs > 0:
        lit = build_module(cfg, model, dm)
        fout = out / "float"
        trainer = build_trainer(cfg, fout, [timers["fp32"]], monitor, stage="float",
                                run_dir=out, max_epochs=cfg.baseline_epochs)
        last = fout / "checkpoints" / "last.ckpt"
        trainer.fit(lit, datamodule=dm, ckpt_path=str(last) if cfg.ckpt_path and last.is_file()
                    else None, weights_only=True)
        if test:
            results["stages"]["fp32"] = _test(trainer, lit, dm)
        finish_logger(trainer)
        model = lit.model
        results["stages"].setdefault("fp32", {})

    quant = instantiate(cfg.quant) if cfg.get("quant") else QuantizationCallback(mode="fp32")
    allocate_for_run(quant, model, dm, cfg, out)  # a budget in the quant node: qat.autoquant
    stage = "fp32" if quant.mode == "fp32" else "quant"  # a float-only run times its float stage
    extra: list[L.Callback] = [quant, timers[stage]]
    prune = cfg.get("prune")
    if prune and "_target_" in prune:
        extra.append(instantiate(prune, _convert_="all"))
    distiller = None
    kd_node = cfg.get("distill")
    if kd_node and "_target_" in kd_node:
        from .distill.config import build_distiller

        float_model = model if (cfg.baseline_epochs > 0 or init_from) else None
        distiller = build_distiller(
            instantiate(kd_node, _convert_="all"), float_model, dm.is_regression,
            lambda: build_model(cfg, dm), next(iter(dm.train_dataloader())),
        )
    lit = build_module(cfg, model, dm, distiller=distiller)

    if quant.mode == "ptq":
        seen = quant.calibrate(lit, dm.train_dataloader())
        log.info("PTQ: calibrated on %d batches", seen)
        trainer = build_trainer(cfg, out, [], monitor, stage="ptq", run_dir=out)
        results["stages"]["ptq"] = _test(trainer, lit, dm) if test else {}
        finish_logger(trainer)
    elif quant.mode == "fp32" and cfg.baseline_epochs > 0:
        pass  # the float stage was the whole run
    else:
        trainer = build_trainer(cfg, out, extra, monitor, run_dir=out,
                                stage="float" if quant.mode == "fp32" else quant.mode)
        ckpt = resolve_ckpt(cfg.ckpt_path, out, required=cfg.baseline_epochs <= 0)
        if ckpt:
            check_checkpoint(ckpt, "ckpt_path", model)
        trainer.fit(lit, datamodule=dm, ckpt_path=ckpt, weights_only=True)
        results["stages"][quant.mode] = _test(trainer, lit, dm) if test else {}
        if cfg.get("predict") and dm.task_info.is_glue:
            from .predict import write_predictions

            results["predictions"] = write_predictions(trainer, lit, dm, out / "predictions")
        finish_logger(trainer)

    results["size"] = {"fp32_bytes": size_float, "quantized_bytes": model_size(lit.model)}
    results["monitor"] = monitor
    results["timing"] = _timing(timers["fp32"].median_s or float_step_s, timers["quant"].median_s)
    # jobs sharing this machine (scripts/sweep.py --workers N): step times are then not clean
    results["timing"]["concurrent_jobs"] = int(os.environ.get("QAT_CONCURRENT_JOBS", "1"))
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:  # under DDP every rank gets here: one writes
        tmp = out / "results.json.tmp"  # whole or not at all (a kill mid-write)
        tmp.write_text(json.dumps(results, indent=2, default=str))
        os.replace(tmp, out / "results.json")
        print_results(results, out)
    return results
