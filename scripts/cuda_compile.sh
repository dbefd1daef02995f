#!/usr/bin/env bash
# CI compile-only leg of the CUDA backend: configures build-cuda (CUDA on, torch off, bench off) for
# sm_80 and sm_90, (re)compiles the CUDA library with the ptxas resource report on, builds its test program,
# runs the tests that need no GPU (argument checks; the others skip with their reason when there is no
# device), then runs the whole CUDA test suite with the kernels executed by the CPU emulation of
# tests/cuda/emu (twice: H100 shared-memory limit, and 48 KB, which forces multi-chunk score rows), and
# prints one summary line:
#   cuda compile leg: OK (sm_80, sm_90), N kernels, S spilling, emulated tests passed (2 limits), T s
# It fails when a kernel is missing for one architecture. Environment: NVCC (default: nvcc on PATH, else
# /usr/local/cuda/bin/nvcc), JOBS (default 2).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
start=$(date +%s)
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
JOBS="${JOBS:-2}"
[ -x "$NVCC" ] || { echo "cuda compile leg: FAILED (no nvcc at $NVCC)" >&2; exit 1; }

GEN=""
if [ -x .venv/bin/ninja ]; then GEN="-G Ninja -DCMAKE_MAKE_PROGRAM=$ROOT/.venv/bin/ninja"; fi
if [ ! -f build-cuda/CMakeCache.txt ]; then
  cmake -S . -B build-cuda $GEN -DCMAKE_BUILD_TYPE=Release -DNSA_ENABLE_CUDA=ON -DNSA_ENABLE_TORCH=OFF \
    -DNSA_BUILD_TESTS=ON -DNSA_BUILD_BENCH=OFF -DCMAKE_CUDA_COMPILER="$NVCC" \
    -DCMAKE_CUDA_ARCHITECTURES="80;90" -DNSA_CUDA_PTXAS_VERBOSE=ON >/dev/null
fi
# Recompile the CUDA sources every time so that ptxas reports on every kernel.
find build-cuda/src/cuda/CMakeFiles/nsa_cuda.dir -name "*.o" -delete 2>/dev/null || true
LOG=build-cuda/cuda_compile.log
if ! cmake --build build-cuda -j "$JOBS" --target nsa_cuda nsa_cuda_tests nsa_cuda_emu_tests >"$LOG" 2>&1; then
  cat "$LOG" >&2
  echo "cuda compile leg: FAILED (build)" >&2
  exit 1
fi
grep -E "warning|error" "$LOG" | grep -v "^ptxas info" >&2 || true

n80=$(grep -c "Compiling entry function .* for 'sm_80'" "$LOG" || true)
n90=$(grep -c "Compiling entry function .* for 'sm_90'" "$LOG" || true)
spills=$(grep -E "[1-9][0-9]* bytes spill stores" "$LOG" | grep -vc " 0 bytes spill stores" || true)
if [ "$n80" -eq 0 ] || [ "$n80" != "$n90" ]; then
  echo "cuda compile leg: FAILED (kernels compiled: sm_80 $n80, sm_90 $n90)" >&2
  exit 1
fi
# No GPU needed: the device tests skip (and print why); the argument tests run.
if ! build-cuda/tests/cuda/nsa_cuda_tests >build-cuda/cuda_tests.log 2>&1; then
  cat build-cuda/cuda_tests.log >&2
  echo "cuda compile leg: FAILED (nsa_cuda_tests)" >&2
  exit 1
fi
# The kernels' logic, run by the CPU emulation: both shared-memory limits at once (single-threaded each).
EMU=build-cuda/tests/cuda/emu/nsa_cuda_emu_tests
NSA_EMU_SMEM_OPTIN=232448 "$EMU" >build-cuda/emu_h100.log 2>&1 & p1=$!
NSA_EMU_SMEM_OPTIN=49152 "$EMU" >build-cuda/emu_48k.log 2>&1 & p2=$!
ok=1
wait $p1 || { cat build-cuda/emu_h100.log >&2; ok=0; }
wait $p2 || { cat build-cuda/emu_48k.log >&2; ok=0; }
[ $ok = 1 ] || { echo "cuda compile leg: FAILED (emulated CUDA tests)" >&2; exit 1; }
echo "cuda compile leg: OK (sm_80, sm_90), $n80 kernels, $spills spilling, emulated tests passed (2 limits), $(( $(date +%s) - start )) s"
