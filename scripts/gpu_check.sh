#!/usr/bin/env bash
# The GPU check (docs/gpu.md), from the repository root of a fresh GPU machine:
#
#   bash scripts/gpu_check.sh OUT_DIR [CIFAR10_JPG_TARBALL] [gpu_check.py options]
#
# Installs hydra-core, omegaconf and antlr4 from the wheels in .whl/ when the machine lacks them
# (into a folder of its own, put first on PYTHONPATH), then runs scripts/gpu_check.py, which bounds
# every part with its own time limit and writes OUT_DIR/summary.json plus a few logs. The outer
# `timeout` is a last resort only: gpu_check.py ends everything itself by --hard-limit-s.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
if [ $# -lt 1 ]; then
    echo "usage: bash scripts/gpu_check.sh OUT_DIR [CIFAR10_JPG_TARBALL] [gpu_check.py options]" >&2
    exit 2
fi
OUT=$1
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
LOG="$OUT/gpu_check.log"

if ! "$PYTHON" -c "import hydra, omegaconf" 2>/dev/null; then
    if compgen -G ".whl/*.whl" > /dev/null; then
        SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
        echo "installing $(cd .whl && ls *.whl | tr '\n' ' ')into $SITE" >> "$LOG"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            .whl/*.whl >> "$LOG" 2>&1 || echo "installing the wheels failed (see above)" >> "$LOG"
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "hydra-core and omegaconf are missing and .whl/ holds no wheels: the benchmark and the" \
             "real-data run will fail (docs/gpu.md says which wheels to carry)" | tee -a "$LOG" >&2
    fi
fi
export PYTHONUNBUFFERED=1
# The commit, where git knows it (a checkout copied without .git does not: pass --commit SHA then).
COMMIT=$(git rev-parse --verify -q HEAD 2>/dev/null)
exec timeout --kill-after=20 "${GPU_CHECK_OUTER_LIMIT_S:-540}" "$PYTHON" scripts/gpu_check.py \
    ${COMMIT:+--commit "$COMMIT"} "$@"
