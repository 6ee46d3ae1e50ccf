#!/usr/bin/env bash
# One prepared GPU check of bsfind (issue #18); scripts/gpu_check.py says what it runs.
#
#   scripts/gpu_check.sh OUTDIR                                     # on the GPU machine
#   PYTHON=.venv/bin/python scripts/gpu_check.sh --dry-run OUTDIR   # anywhere: CPU, tiny sizes
#
# Installs nothing and needs no network: $PYTHON (default python3) runs bsfind from this
# source tree. At most 8 files land in OUTDIR (default: a new temporary folder, printed);
# the whole check stays within --budget seconds (default 480).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
exec "$PYTHON" "$ROOT/scripts/gpu_check.py" "$@"
