"""Console entry points: ``qat-train`` (Hydra, with sweeps) and ``qat-eval``."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any, NoReturn

from .configs import config_dir
from .errors import EXIT_SIGTERM, format_error, full_error, handle, reported

__all__ = ["train", "evaluate", "config_dir"]


def _sigterm_exit(err: BaseException) -> NoReturn:
    print("qat: stopped by SIGTERM; checkpoints/last.ckpt was saved: resume with the same "
          "run_id and ckpt_path=last", file=sys.stderr)
    sys.exit(EXIT_SIGTERM)


def _holds_work(folder: Path, records: set[Path]) -> bool:
    """Whether ``folder`` holds a file besides the records of a run's start (``.hydra/``,
    ``config.yaml``, the job log)."""
    records = records | {folder / "config.yaml"}
    return any(p.is_file() and p not in records and p.relative_to(folder).parts[0] != ".hydra"
               for p in folder.rglob("*"))


def _discard(folder: Path, root: Path) -> None:
    """Remove ``folder``, and its parent when that is left empty (never ``root`` itself)."""
    shutil.rmtree(folder, ignore_errors=True)
    parent = folder.resolve().parent
    if parent != root and root in parent.parents:
        with contextlib.suppress(OSError):
            parent.rmdir()  # only when empty


def _after_failure(cfg: Any, err: BaseException) -> None:
    """A failed job leaves no empty run folder: its folder (and the folder of the float run it
    was training first, for ``init_from=recipe:...``) goes when it holds nothing but the records
    of its start, with ``<output_dir>/<name>/`` if that is left empty; a folder holding work
    (checkpoints, logs of a started run) stays, and the job's gets the error in its job log."""
    from hydra.core.hydra_config import HydraConfig

    from .upstream import upstream

    try:
        hc = HydraConfig.get()
    except ValueError:  # not a Hydra job
        return
    root = Path(str(cfg.paths.output_dir)).resolve()
    with contextlib.suppress(Exception):  # a bad init_from is reported, not cleaned after
        up = upstream(cfg)
        if up is not None and up.run_dir.is_dir() and not _holds_work(up.run_dir, set()):
            _discard(up.run_dir, root)
    out = Path(hc.runtime.output_dir)
    log = out / f"{hc.job.name}.log"
    if not out.is_dir():
        return
    if _holds_work(out, {log}):
        with log.open("a", encoding="utf-8") as fh:
            fh.write(format_error(err) + "\n")
        return
    _discard(out, root)


def train() -> None:
    """``qat-train recipe=<name> [key=value ...]``; ``-m`` for sweeps; ``--help``: the recipes,
    schemes and groups (:mod:`qat.usage`)."""
    import hydra
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from omegaconf import DictConfig

    if any(a in ("--help", "-h") for a in sys.argv[1:]):
        from .usage import usage

        print(usage(config_dir()))
        return
    from .quiet import silence_known_noise

    silence_known_noise()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Hydra raises instead of printing its own report; we print one line (or the traceback)
    os.environ.setdefault("QAT_FULL_ERROR", "1" if full_error() else "0")
    os.environ["HYDRA_FULL_ERROR"] = "1"

    @hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
    def _main(cfg: DictConfig) -> float | None:
        from .train import run

        try:
            results = run(cfg)
        except SIGTERMException as err:
            _sigterm_exit(err)
        except Exception as err:  # bad input: one line here, before Hydra logs the job failure
            _after_failure(cfg, err)
            handle(err)
        metric = cfg.get("optimized_metric")
        if metric:
            for stage in reversed(list(results["stages"].values())):
                key = metric.replace("val/", "test/")
                if key in stage:
                    return stage[key]
        return None

    try:
        with reported():
            _main()
    except SIGTERMException as err:
        _sigterm_exit(err)


def evaluate() -> None:
    """``qat-eval <checkpoint> [--predict DIR]``: test metrics of a checkpoint."""
    from .evaluate import main

    main()
