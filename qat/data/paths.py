"""Where corpora and caches live: the data directory and the cache directory."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["resolve_data_dir", "cache_dir", "download_dir"]


def cache_dir() -> Path:
    """The cache directory: ``$QAT_CACHE_DIR`` if set, else ``~/.cache/qat``."""
    env = os.environ.get("QAT_CACHE_DIR")
    return Path(env).expanduser() if env else Path("~/.cache/qat").expanduser()


def download_dir() -> Path:
    """Where downloaded corpora go: ``<cache_dir>/data`` (also the last fallback data dir)."""
    return cache_dir() / "data"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data dir: ``data_dir`` if given, else ``$QAT_DATA_DIR``, else ``~/.cache/qat/data``.

    Relative paths are resolved against the current directory. The directory need not exist
    (missing corpora are downloaded into :func:`download_dir` when the network allows it).
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser().resolve()
    env = os.environ.get("QAT_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    return download_dir().resolve()
