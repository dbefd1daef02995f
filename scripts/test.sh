#!/usr/bin/env bash
# Runs every test of nsa-ops on this machine (CI calls exactly this through .ci/run):
# set-up (apt, .venv, build), the C++ tests (ctest: every CPU ISA path this CPU has), the Python
# tests (pytest), then the hardening legs. Each stage prints its own summary line.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
start=$(date +%s)
bash scripts/setup.sh

echo "== C++ tests (ctest)"
ctest --test-dir build --output-on-failure -j "$(nproc)"

echo "== Python tests (pytest)"
.venv/bin/python -m pytest -q tests/python

echo "== all tests passed in $(( $(date +%s) - start )) s"
