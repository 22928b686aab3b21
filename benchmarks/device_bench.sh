#!/usr/bin/env bash
# The device benchmark (issue 19): benchmarks/device_bench.py's points, each in its own process
# under a deadline, inside one budget sized for a 15-minute H200 lease (a cold start included).
#
#   benchmarks/device_bench.sh [OUT.jsonl]           # on the device machine: random SD 1.5, 512 px
#   benchmarks/device_bench.sh --dry-run [OUT]       # the tiny model, 2 x 2 steps, any machine (CI)
#
# Uses the machine's own python3 (PYTHON to override), which must have jax, flax and optax;
# torch, transformers and diffusers only for the PyTorch reference (the last point). diffusers,
# if missing, is installed from wheels carried in the git-ignored .cache/device_bench/wheels/
# (fill it here first: `pip download diffusers importlib_metadata --no-deps -d .cache/device_bench/wheels`).
# Environment: BUDGET_S (default 480) seconds for all points; POINTS, a comma-separated subset;
# CACHE_DIR (default .cache/device_bench) for the compilation cache and the profile.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DRY=()
if [ "${1:-}" = "--dry-run" ]; then DRY=(--dry-run --strict); shift; fi
OUT=${1:-device_bench.jsonl}
CACHE=.cache/device_bench
export PYTHONPATH="$PWD:$CACHE/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}

"$PYTHON" -c "import jax, flax, optax" || { echo "device_bench: $PYTHON lacks jax, flax or optax" >&2; exit 2; }
if ! "$PYTHON" -c "import diffusers" 2>/dev/null; then
    wheels=$(ls "$CACHE"/wheels/*.whl 2>/dev/null || true)
    if [ -n "$wheels" ]; then
        "$PYTHON" -m pip install -q --no-deps --no-index --target "$CACHE/site" $wheels
    else
        echo "device_bench: no diffusers and no wheels in $CACHE/wheels/: the PyTorch reference point will fail" >&2
    fi
fi
rm -f "$OUT"
exec "$PYTHON" benchmarks/device_bench.py "${DRY[@]}" --out "$OUT" --budget "${BUDGET_S:-480}" --points "${POINTS:-}" \
    --cache "${CACHE_DIR:-$CACHE}"
