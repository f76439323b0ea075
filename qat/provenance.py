"""Where a result comes from: the git commit, the code that decides its numbers, the hardware."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

__all__ = ["NUMERICS_PATHS", "provenance", "numerics_fingerprint", "git_commit"]

ROOT = Path(__file__).resolve().parents[1]
# the code and configs that decide a run's numbers (a change here means: rerun the row)
NUMERICS_PATHS = ("qat/quant", "qat/nn", "qat/models", "qat/data", "qat/prune", "qat/distill",
                  "qat/lit", "qat/callbacks", "qat/autoquant", "qat/surgery.py", "qat/train.py",
                  "qat/upstream.py", "conf", "recipes")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def git_commit() -> str | None:
    """HEAD's commit, with ``+dirty`` when tracked files differ from it (None outside git;
    ``QAT_COMMIT`` names it for a copy of the tree without .git)."""
    if os.environ.get("QAT_COMMIT"):
        return os.environ["QAT_COMMIT"]
    head = _git("rev-parse", "HEAD")
    if head is None:
        return None
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return head.strip() + ("+dirty" if dirty else "")


def numerics_fingerprint() -> str | None:
    """A hash of the committed trees of :data:`NUMERICS_PATHS` plus any uncommitted change to
    them: equal fingerprints mean the same code decided the numbers (``QAT_NUMERICS`` gives it
    for a copy of the tree without .git)."""
    if os.environ.get("QAT_NUMERICS"):
        return os.environ["QAT_NUMERICS"]
    tree = _git("ls-tree", "-r", "HEAD", "--", *NUMERICS_PATHS)
    if tree is None:
        return None
    diff = _git("diff", "HEAD", "--", *NUMERICS_PATHS) or ""
    return hashlib.sha1((tree + diff).encode()).hexdigest()[:12]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict[str, Any]:
    """Commit, numerics fingerprint, hardware and library versions, for results.json."""
    hw: dict[str, Any] = {"cpu": _cpu_name(), "cpu_count": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "machine": platform.machine()}
    if torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name(0)
    return {"commit": git_commit(), "numerics": numerics_fingerprint(), "hardware": hw,
            "torch": torch.__version__, "python": platform.python_version()}
