"""Notices of our dependencies known to be harmless, silenced by the qat commands.

Only these exact messages are dropped; every other warning (a real one: too few batches for the
logging interval, an unused override, a deprecated argument of ours) still shows.

- torch 2.13 deprecates ``isinstance(x, LeafSpec)``, which Lightning 2.6 still uses
  (``lightning/pytorch/utilities/_pytree.py``), once per run;
- Lightning's tip to install ``litlogger`` at every Trainer.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["KNOWN_WARNINGS", "KNOWN_LOG_RECORDS", "silence_known_noise"]

KNOWN_WARNINGS = ((r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),)
KNOWN_LOG_RECORDS = (("lightning.pytorch.utilities.rank_zero", "Tip: For seamless cloud logging"),)


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
