"""Notices of our dependencies known to be harmless, silenced by the qat commands.

Only these exact messages are dropped; every other warning (a real one: too few batches for the
logging interval, an unused override, a deprecated argument of ours) still shows.

- torch 2.13 deprecates ``isinstance(x, LeafSpec)``, which Lightning 2.6 still uses
  (``lightning/pytorch/utilities/_pytree.py``), once per run;
- Lightning's tip to install ``litlogger`` at every Trainer;
- the TorchScript ONNX exporter's C++ notice that ``prim::PackPadded`` / ``PadPacked`` (a packed
  LSTM) have no shape inference, printed straight to the process's stderr: our exported LSTM
  graphs are checked against the model instead (``qat.export.agreement``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator

__all__ = ["KNOWN_WARNINGS", "KNOWN_LOG_RECORDS", "KNOWN_NATIVE_LINES", "silence_known_noise",
           "native_stderr_without"]

KNOWN_WARNINGS = ((r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),)
KNOWN_LOG_RECORDS = (("lightning.pytorch.utilities.rank_zero", "Tip: For seamless cloud logging"),)
KNOWN_NATIVE_LINES = (
    r"Warning: The shape inference of prim::Pa(ckPadded|dPacked) type is missing",)


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def silence_known_noise() -> None:
    """Drop the notices listed in this module (idempotent)."""
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, text in KNOWN_LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessage(text))


@contextlib.contextmanager
def native_stderr_without(patterns: tuple[str, ...] = KNOWN_NATIVE_LINES) -> Iterator[None]:
    """Within the block, lines written to file descriptor 2 (C++ notices bypass Python's
    ``sys.stderr``) that match one of ``patterns`` are dropped; every other line is written
    back to stderr when the block ends."""
    fd = 2  # where native code writes, whatever sys.stderr is
    sys.stderr.flush()
    try:
        saved = os.dup(fd)
    except OSError:  # no descriptor 2 at all
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            kept = [line for line in text.splitlines(keepends=True)
                    if not any(re.search(p, line) for p in patterns)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
