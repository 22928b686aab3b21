#!/usr/bin/env bash
# One-command device benchmark (issue 13), sized for ~10 minutes on one H200 with no network:
# builds a random-weight SD 1.5 (512 px) in diffusers layout, times null-text 50 x 10 (no early
# stop) at batch 1, 4 and 16 in bfloat16 and float32 with nti-jax (remat chosen automatically),
# and the PyTorch reference at batch 1; JSON out.
#
#   benchmarks/device_bench.sh [OUT.json]        # on the device machine
#   benchmarks/device_bench.sh --dry-run [OUT]    # tiny model, 2 x 2 steps, on any machine (CI)
#
# It uses the machine's own python3 (PYTHON to override), which must have jax, flax, optax,
# torch, transformers and safetensors; diffusers, if missing, is installed from a wheel carried
# in the git-ignored .cache/device_bench/wheels/ (fill it here first with
# `pip download diffusers --no-deps -d .cache/device_bench/wheels`) into .cache/device_bench/site.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:-device_bench.json}
CACHE=.cache/device_bench
export PYTHONPATH="$PWD:$CACHE/site${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c "import diffusers" 2>/dev/null; then
    wheel=$(ls "$CACHE"/wheels/diffusers-*.whl 2>/dev/null | head -1 || true)
    if [ -z "$wheel" ]; then
        echo "device_bench: diffusers is missing and no wheel is in $CACHE/wheels/" >&2
        exit 2
    fi
    "$PYTHON" -m pip install -q --no-deps --no-index --target "$CACHE/site" "$wheel"
fi
"$PYTHON" -c "import jax, flax, optax, torch, transformers, safetensors, diffusers" || {
    echo "device_bench: $PYTHON lacks one of jax, flax, optax, torch, transformers, safetensors" >&2; exit 2; }

if [ "$DRY" = 1 ]; then
    exec "$PYTHON" benchmarks/memory.py bench --model tiny --folder "$CACHE/tiny-sd" --dtypes float32,bfloat16 \
        --batches 1 --steps 2 --inner 2 --json "$OUT"
fi
exec "$PYTHON" benchmarks/memory.py bench --model sd15 --folder "$CACHE/sd15-random" --dtypes bfloat16,float32 \
    --batches 1,4,16 --steps 50 --inner 10 --json "$OUT"
