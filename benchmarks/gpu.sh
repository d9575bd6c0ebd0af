#!/usr/bin/env bash
# EarthGPT-7B on one NVIDIA GPU (H100/H200), one command, under 10 minutes:
#   bash benchmarks/gpu.sh [--size=13b] [--batch=16] [--variants=cudnn/none/8] ...
# Stage-B training steps with MFU against the card's measured and datasheet bf16 peaks, and
# KV-cached decode tokens/s at batch 1 and 8 (benchmarks/gpu_bench.py says how). It uses the
# machine's own jax/flax/optax/orbax as installed (no network needed) and synthetic in-memory
# batches. Figures go to stdout and to $OUT/gpu_bench.json (or ./gpu_bench.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Name every missing package at once, before anything slow starts.
"$PY" - <<'PYEOF'
import importlib.util, sys
need = {"jax": "jax (with its CUDA plugin)", "flax": "flax", "optax": "optax",
        "orbax.checkpoint": "orbax-checkpoint", "numpy": "numpy", "PIL": "pillow"}
missing = [pip for mod, pip in need.items() if importlib.util.find_spec(mod) is None]
if missing:
    sys.exit("gpu.sh: missing Python packages: " + ", ".join(missing)
             + " (install them, e.g. from wheels: pip install --no-index <wheel files>)")
import jax
if jax.devices()[0].platform != "gpu":
    sys.exit(f"gpu.sh: jax sees no GPU (devices: {jax.devices()}); is the CUDA plugin installed?")
PYEOF

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
# The 7B state (frozen weights in bf16, or fp32 in a /float32 variant; fp32 trainable masters)
# plus activations needs most of the card.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export PYTHONUNBUFFERED=1
PYTHONPATH=. exec "$PY" benchmarks/gpu_bench.py --out="${OUT:-.}/gpu_bench.json" "$@"
