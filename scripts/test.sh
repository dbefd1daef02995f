#!/usr/bin/env bash
# Runs every test of nsa-ops on this machine (CI calls exactly this through .ci/run):
#   set-up (apt, .venv, build) -> C++ tests (ctest: every CPU ISA path this CPU has) -> Python tests
#   (pytest) -> aarch64 leg (cross-compiled C++ suite under qemu-user) -> packaging leg (wheel + C++
#   find_package example) -> CUDA compile-only leg (nvcc, sm_80/sm_90, kernels exercised by the CPU
#   emulation) -> hardening legs (sanitizers, fuzzing).
# Each stage prints its own summary line; the script stops at the first failure.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
start=$(date +%s)
stage() { echo; echo "== $1 ($(( $(date +%s) - start )) s so far)"; }

stage "set-up (scripts/setup.sh)"
bash scripts/setup.sh

LOGS="$(mktemp -d)"
stage "C++ tests (ctest)"
ctest --test-dir build --output-on-failure -j "$(nproc)" | tee "$LOGS/ctest.log"
cpp_passed=$(sed -n 's/.*tests passed, 0 tests failed out of \([0-9]*\).*/\1/p' "$LOGS/ctest.log" | tail -1)

stage "Python tests (pytest)"
.venv/bin/python -m pytest -q -p no:cacheprovider tests/python | tee "$LOGS/pytest.log"
py_passed=$(grep -Eo '[0-9]+ passed' "$LOGS/pytest.log" | tail -1 | grep -Eo '[0-9]+')

stage "sanitizer legs (scripts/sanitizers.sh)"
bash scripts/sanitizers.sh

stage "fuzz legs (scripts/fuzz.sh)"
bash scripts/fuzz.sh

stage "aarch64 leg (scripts/aarch64.sh)"
bash scripts/aarch64.sh

stage "packaging leg (scripts/package_check.sh)"
bash scripts/package_check.sh

stage "CUDA compile-only leg (scripts/cuda_compile.sh)"
bash scripts/cuda_compile.sh

echo
echo "== all tests and legs passed in $(( $(date +%s) - start )) s (C++: ${cpp_passed:-?} ctest tests, Python: ${py_passed:-?} pytest tests)"
echo "total: $(( ${cpp_passed:-0} + ${py_passed:-0} )) passed, 0 failed"
