#!/usr/bin/env bash
# One-time (idempotent) set-up on a fresh Debian machine: apt packages, the .venv at the repo root
# with PyTorch 2.13.0 (CPU) and the Python tools, and the CMake build in build/ (core library,
# C++ tests, PyTorch binding). Sourced or run by scripts/main.sh and scripts/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# --- system packages (Debian): compilers, CMake, GoogleTest, clang (libFuzzer, sanitizers), valgrind (the cache
#     simulator of bench/decode_traffic.py)
APT_PKGS="build-essential cmake libgtest-dev clang libclang-rt-14-dev valgrind"
missing=""
for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  echo "[setup] apt-get install$missing"
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q $missing >/dev/null
fi

# --- Python virtual environment (.venv at the repo root), Python 3.11
PY=""
for cand in python3.11 python3; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    PY="$cand"; break
  fi
done
[ -n "$PY" ] || { echo "[setup] Python 3.11 is required" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
# requirements.txt pins torch==2.13.0 (the CPU build on this machine's disk); pip skips what is there.
.venv/bin/pip install -q -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c 'import torch, numpy, pytest' >/dev/null
# The package is importable from any directory after set-up: a .pth file puts python/ (nsa_ops) on the venv's
# path (an editable install without a build step; the operator library is found in build/, see _lib.py).
SITE="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$ROOT/python" > "$SITE/nsa_ops_repo.pth"

# --- CMake build: core, tests, bench, PyTorch binding
TORCH_PREFIX="$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')"
GEN=""
if [ -x .venv/bin/ninja ]; then GEN="-G Ninja -DCMAKE_MAKE_PROGRAM=$ROOT/.venv/bin/ninja"; fi
# Torch_DIR names the .venv's torch package outright; the binding links only that torch's libraries, even
# where another torch is installed (Debian's libtorch-dev in /usr/lib: torch_binding/CMakeLists.txt).
if [ ! -f build/CMakeCache.txt ]; then
  cmake -S . -B build $GEN -DCMAKE_BUILD_TYPE=Release -DNSA_ENABLE_TORCH=ON \
    -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DTorch_DIR="$TORCH_PREFIX/Torch" \
    -DPython3_EXECUTABLE="$ROOT/.venv/bin/python" >/dev/null
fi
cmake --build build -j "$(nproc)"
# A binding that resolves c10/torch outside the .venv's torch crashes on its first error: stop here instead.
if ! .venv/bin/python tests/python/test_binding_deps.py build/torch_binding/libnsa_ops_torch.so >/dev/null; then
  echo "[setup] build/torch_binding/libnsa_ops_torch.so does not link the .venv's torch only (above)" >&2
  exit 1
fi
