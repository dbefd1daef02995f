#!/usr/bin/env bash
# The main job: set the machine up (scripts/setup.sh: apt packages, .venv, pip, CMake build of the
# library, the PyTorch binding and bench/peak_probe; idempotent), then run the seed example of torch_npu's documentation on CPU
# (bench/seed_example.py): output shapes, dtypes and checksums, time, GFLOP/s and share of peak.
#
#   bash scripts/main.sh                  # default size (see bench/seed_example.py: DEFAULT_TOKENS)
#   bash scripts/main.sh --full           # the full example (T = 65536) whatever it costs
#   bash scripts/main.sh --tokens 8192    # a reduced size
#   NSA_SEED_TOKENS=full bash scripts/main.sh
# Arguments are passed to bench/seed_example.py (--help lists them).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

echo "[main] setup (scripts/setup.sh)"
bash "$ROOT/scripts/setup.sh"

echo "[main] seed example (bench/seed_example.py $*)"
exec "$ROOT/.venv/bin/python" "$ROOT/bench/seed_example.py" "$@"
