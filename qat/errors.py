"""The error report shared by qat-train, qat-eval and qat-export.

Bad input (a config value, a data file, a checkpoint) or a diverged run ends the command with
one message, ``qat: error: <Type>: <cause>``, and exit status :data:`EXIT_ERROR`; the whole
cause is kept (wrapped to the terminal's width on a terminal, one line in a file). Anything else
is a bug and keeps its traceback; ``HYDRA_FULL_ERROR=1`` (or ``QAT_FULL_ERROR=1``) asks for the
traceback of every error.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

__all__ = ["EXIT_ERROR", "EXIT_SIGTERM", "PREFIX", "full_error", "user_errors", "root_cause",
           "is_user_error", "describe", "format_error", "fail", "handle", "reported",
           "checkpoint_mismatch"]

EXIT_ERROR = 1
"""Exit status of every qat command on bad input (argparse's own usage errors exit 2)."""
EXIT_SIGTERM = 143
"""Exit status of qat-train stopped by SIGTERM (128 + 15, as a shell reports it)."""
PREFIX = "qat: error: "

_WRAPPERS = ("InstantiationException", "ConfigCompositionException", "HydraException")


def full_error() -> bool:
    """Whether the user asked for tracebacks (``QAT_FULL_ERROR=1``, else ``HYDRA_FULL_ERROR=1``)."""
    return os.environ.get("QAT_FULL_ERROR", os.environ.get("HYDRA_FULL_ERROR", "0")) == "1"


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input (config, data, checkpoint) or a diverged run."""
    from hydra.errors import HydraException
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from omegaconf.errors import OmegaConfBaseException

    return (ValueError, TypeError, LookupError, OSError, ImportError, ArithmeticError,
            HydraException, OmegaConfBaseException, MisconfigurationException)


def root_cause(err: BaseException) -> BaseException:
    """The error a Hydra wrapper (instantiate, composition) was raised from."""
    cause = err
    while cause.__cause__ is not None and type(cause).__name__ in _WRAPPERS:
        cause = cause.__cause__
    return cause


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` (or the error a Hydra wrapper holds) is bad input, not a bug."""
    return isinstance(root_cause(err), user_errors())


def _joined(msg: str) -> str:
    """A multi-line message as one line: option lists joined by commas, other lines by ``; ``.
    Nothing is cut."""
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
    text = out[0] if out else ""
    for ln in out[1:]:  # a line that ends a sentence or opens a list needs no "; "
        text += (" " if text.endswith((":", ".", ";")) else "; ") + ln
    return text


def describe(err: BaseException) -> str:
    """``Type: message`` of the root cause, whole, on one line, with the config key Hydra names
    (``full_key``) and the advice of a composition error kept."""
    cause = root_cause(err)
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
    hint = _key_hint(cause)
    return f"{type(cause).__name__}: {_joined(msg)}" + (f"; {hint}" if hint else "")


def _key_hint(cause: BaseException) -> str | None:
    """For a config key that does not exist (a typo in an override): the keys beside it that
    look like it (``did you mean trainer.max_epochs?``), else the options of its group that hold
    it (``quant.budget is a key of quant=auto_per_channel_lsq``), else the keys there are."""
    from omegaconf import DictConfig
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    parent, key = getattr(cause, "parent_node", None), getattr(cause, "key", None)
    if not isinstance(cause, ConfigAttributeError | ConfigKeyError) or not isinstance(
            parent, DictConfig) or not isinstance(key, str):
        return None
    keys = [str(k) for k in parent]
    if key in keys:
        return None
    full = str(getattr(cause, "full_key", None) or key)
    where = full[: -len(key)] if full.endswith(key) else ""
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(where + k for k in close) + "?"
    owners = _group_options_with(full)
    if owners:
        return f"{full} is a key of " + ", ".join(owners)
    shown = sorted(k for k in keys if not k.startswith("_"))
    if not shown:
        return None
    return f"keys of {where.rstrip('.') or 'the config'}: " + ", ".join(shown)


def _group_options_with(full_key: str) -> list[str]:
    """The options of a config group that hold ``full_key`` (``quant.budget`` ->
    ``quant=auto_per_channel_lsq``): the key exists, in another choice of its group."""
    from omegaconf import OmegaConf

    from .configs import config_dir

    group, _, rest = full_key.partition(".")
    folder = config_dir() / group
    if not rest or not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.yaml")):
        try:
            node = OmegaConf.select(OmegaConf.load(path), rest, default=_MISSING)
        except Exception:  # an unreadable option file: not this error's business
            continue
        if node is not _MISSING:
            found.append(f"{group}={path.stem}")
    return found


_MISSING = object()


def format_error(err: BaseException, width: int | None = None) -> str:
    """The report of ``err``: ``qat: error: ...``, wrapped at ``width`` columns (continuation
    lines indented; words and paths never split) when ``width`` is given, else one line."""
    text = PREFIX + describe(err)
    if not width:
        return text
    return textwrap.fill(text, width=max(width, 40), subsequent_indent="  ",
                         break_long_words=False, break_on_hyphens=False)


def _stderr_width() -> int | None:
    """The terminal's width when stderr is a terminal; None when it goes to a file or pipe."""
    isatty = getattr(sys.stderr, "isatty", None)
    if not (callable(isatty) and isatty()):
        return None
    return shutil.get_terminal_size().columns


def fail(err: BaseException) -> NoReturn:
    """Print the report of ``err`` on stderr and exit with :data:`EXIT_ERROR` (re-raise instead
    when the user asked for tracebacks)."""
    if full_error():
        raise err
    print(format_error(err, _stderr_width()), file=sys.stderr)
    sys.exit(EXIT_ERROR)


def checkpoint_mismatch(err: BaseException, ckpt: str | Path | None) -> BaseException:
    """Lightning's strict load of a checkpoint of another model (a RuntimeError) as the bad input
    it is; any other error unchanged."""
    if ckpt is not None and isinstance(err, RuntimeError) and "loading state_dict" in str(err):
        mismatch = ValueError(f"checkpoint={str(ckpt)!r} does not fit the model of its run "
                              f"(another model or task?): {err}")
        mismatch.__cause__ = err
        return mismatch
    return err


def handle(err: BaseException, ckpt: str | Path | None = None) -> NoReturn:
    """End the command on ``err``: bad input with :func:`fail`; a bug is raised again, with its
    traceback. ``ckpt``: the checkpoint the command reads, named when it does not fit its
    model."""
    shown = checkpoint_mismatch(err, ckpt)
    if full_error() or not is_user_error(shown):
        raise err
    fail(shown)


@contextmanager
def reported(ckpt: str | Path | None = None) -> Iterator[None]:
    """Run a command's body under :func:`handle`."""
    try:
        yield
    except Exception as err:
        handle(err, ckpt)
