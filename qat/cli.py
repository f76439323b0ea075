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


def _full_error() -> bool:
    """Whether the user asked for tracebacks (HYDRA_FULL_ERROR=1 when qat-train started)."""
    return os.environ.get("QAT_FULL_ERROR", os.environ.get("HYDRA_FULL_ERROR", "0")) == "1"


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input (config, data, checkpoint) or a diverged run."""
    from hydra.errors import HydraException
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from omegaconf.errors import OmegaConfBaseException

    return (ValueError, TypeError, LookupError, OSError, ImportError, ArithmeticError,
            HydraException, OmegaConfBaseException, MisconfigurationException)


def _root_cause(err: BaseException) -> BaseException:
    """The error a Hydra wrapper (instantiate, composition) was raised from."""
    cause = err
    while cause.__cause__ is not None and type(cause).__name__ in (
            "InstantiationException", "ConfigCompositionException", "HydraException"):
        cause = cause.__cause__
    return cause


def _one_line(msg: str, limit: int = 600) -> str:
    """A multi-line message on one line (option lists joined by commas), at most ``limit``."""
    msg = msg.split("Config search path")[0]  # Hydra's search path listing: noise here
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    out: list[str] = []
    listing = False
    for ln in lines:
        if listing:
            out[-1] += (" " if out[-1].endswith(":") else ", ") + ln
        else:
            out.append(ln)
        listing = listing or ln.lower().startswith("available options")
    text = "; ".join(out)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(err: BaseException) -> str:
    """``Type: message`` of the root cause, with the config key Hydra names (``full_key``) and
    the advice of a composition error kept."""
    import re

    cause = _root_cause(err)
    msg = str(cause).strip("'\"") if isinstance(cause, KeyError) else str(cause)
    key, e = None, err
    while e is not None and e is not cause:
        found = re.search(r"full_key: (\S+)", str(e))
        key = key or (found.group(1) if found else None)
        if type(e).__name__ == "ConfigCompositionException":
            msg = f"{str(e).strip()}; {msg}"
        e = e.__cause__
    if key and key not in msg:
        msg = f"{key}: {msg}"
    return f"{type(cause).__name__}: {_one_line(msg)}"


def _fail(err: BaseException) -> None:
    """One line naming the problem, unless HYDRA_FULL_ERROR=1 asks for the traceback."""
    if _full_error():
        raise err
    print(f"qat: error: {_describe(err)}", file=sys.stderr)
    sys.exit(1)


def _sigterm_exit(err: BaseException) -> None:
    print("qat: stopped by SIGTERM; checkpoints/last.ckpt was saved: resume with the same "
          "run_id and ckpt_path=last", file=sys.stderr)
    sys.exit(143)


def train() -> None:
    """``qat-train recipe=<name> [key=value ...]``; ``-m`` for sweeps."""
    import hydra
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from omegaconf import DictConfig

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Hydra raises instead of printing its own report; we print one line (or the traceback)
    os.environ.setdefault("QAT_FULL_ERROR", "1" if _full_error() else "0")
    os.environ["HYDRA_FULL_ERROR"] = "1"

    @hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
    def _main(cfg: DictConfig) -> float | None:
        from .train import run

        try:
            results = run(cfg)
        except SIGTERMException as err:
            _sigterm_exit(err)
        except Exception as err:  # bad input: one line here, before Hydra logs the job failure
            if _full_error() or not isinstance(_root_cause(err), _user_errors()):
                raise
            _fail(err)
        metric = cfg.get("optimized_metric")
        if metric:
            for stage in reversed(list(results["stages"].values())):
                key = metric.replace("val/", "test/")
                if key in stage:
                    return stage[key]
        return None

    try:
        _main()
    except SIGTERMException as err:
        _sigterm_exit(err)
    except Exception as err:
        if _full_error() or not isinstance(_root_cause(err), _user_errors()):
            raise
        _fail(err)


def evaluate() -> None:
    """``qat-eval <checkpoint> [--split test|val] [--predict DIR]``: metrics of a checkpoint."""
    import argparse

    from .config_check import check_checkpoint
    from .evaluate import main

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("--predict")
    known, _ = ap.parse_known_args()
    try:
        if known.checkpoint:
            check_checkpoint(known.checkpoint, "checkpoint", lightning=True)
        main()
    except Exception as err:
        # Lightning's strict load of a checkpoint of another model: a RuntimeError
        fits = isinstance(err, RuntimeError) and "loading state_dict" in str(err)
        if _full_error() or not (fits or isinstance(_root_cause(err), _user_errors())):
            raise
        if fits:
            err = ValueError(f"checkpoint={known.checkpoint!r} does not fit the model of its run "
                             f"(another model or task?): {err}")
        _fail(err)
