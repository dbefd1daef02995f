#!/usr/bin/env bash
# aarch64 leg: the torch-free library and its C++ suite (tests/cpp, every operator in NSA_OPERATORS)
# cross-compiled for 64-bit Arm Linux with Debian's cross compiler and run under qemu-user on this host.
# On aarch64 only the scalar path exists (the x86 kernel sources are compiled on x86 only), so the suite
# checks the scalar kernels, the references and every argument rule as built by another compiler target.
#
#  1. apt packages (when missing): g++-aarch64-linux-gnu, qemu-user, libgtest-dev (its sources in
#     /usr/src/googletest; no download other than apt).
#  2. GoogleTest built from /usr/src/googletest for aarch64 and installed into build-aarch64/googletest
#     (once; the project's tests/cpp then finds it with find_package(GTest) through GTest_DIR).
#  3. build-aarch64: cmake/toolchain-aarch64.cmake, torch binding and benchmarks off, all operators.
#  4. nsa_cpp_tests run by `qemu-aarch64 -L /usr/aarch64-linux-gnu`, split into NSA_JOBS GoogleTest
#     shards run side by side (GTEST_TOTAL_SHARDS / GTEST_SHARD_INDEX): the whole suite but the tests
#     qemu-user itself cannot run (QEMU_EXCLUDED below, each with its reason; they run in the native suite).
#
# Prints one summary line:
#   aarch64 leg (qemu-user): N tests passed, 0 failed, S skipped, E not run under qemu [T s]
# (skipped: GTEST_SKIP in the suite, e.g. x86-only checks). Environment: NSA_AARCH64_FILTER (a --gtest_filter;
# default: every test), NSA_JOBS (build jobs and test shards, default nproc). Logs: build-aarch64/aarch64-logs/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
start=$(date +%s)
JOBS="${NSA_JOBS:-$(nproc)}"
FILTER="${NSA_AARCH64_FILTER:-*}"
# Tests qemu-user cannot run:
#   ParallelLoops.ForkedChildRunsLoops: qemu-user 7.2 (Debian 12) aborts with "cpu_exec: assertion failed:
#   (cpu == current_cpu)" when a process forked while another of its threads is alive starts a thread; a
#   12-line program without nsa-ops (one live thread, fork, std::thread in the child) fails the same way.
QEMU_EXCLUDED="ParallelLoops.ForkedChildRunsLoops"
case "$FILTER" in
  *-*) FILTER="$FILTER:$QEMU_EXCLUDED" ;;
  *) FILTER="$FILTER-$QEMU_EXCLUDED" ;;
esac
TRIPLE=aarch64-linux-gnu
SYSROOT=/usr/$TRIPLE
BUILD="$ROOT/build-aarch64"
fail() { echo "aarch64 leg (qemu-user): FAILED ($1) [$(( $(date +%s) - start )) s]" >&2; exit 1; }

# --- 1. cross compiler, qemu-user, GoogleTest sources
APT_PKGS="g++-$TRIPLE qemu-user libgtest-dev"
missing=""
for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  echo "[aarch64] apt-get install$missing"
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q $missing >/dev/null
fi
command -v "$TRIPLE-g++" >/dev/null || fail "no $TRIPLE-g++"
command -v qemu-aarch64 >/dev/null || fail "no qemu-aarch64"
[ -f /usr/src/googletest/CMakeLists.txt ] || fail "no /usr/src/googletest (libgtest-dev)"

GEN=()
GEN_NAME="Unix Makefiles"
if [ -x .venv/bin/ninja ]; then
  GEN=(-G Ninja -DCMAKE_MAKE_PROGRAM="$ROOT/.venv/bin/ninja"); GEN_NAME=Ninja
elif command -v ninja >/dev/null 2>&1; then
  GEN=(-G Ninja); GEN_NAME=Ninja
fi
TOOLCHAIN="$ROOT/cmake/toolchain-aarch64.cmake"
mkdir -p "$BUILD/aarch64-logs"
LOGS="$BUILD/aarch64-logs"
# A build folder made with another generator cannot be reused.
for d in "$BUILD/googletest-build" "$BUILD/project"; do
  if [ -f "$d/CMakeCache.txt" ] && ! grep -qx "CMAKE_GENERATOR:INTERNAL=$GEN_NAME" "$d/CMakeCache.txt"; then
    rm -rf "$d"
  fi
done

# --- 2. GoogleTest for aarch64 (static, gtest + gtest_main, no gmock)
GTEST_PREFIX="$BUILD/googletest"
GTEST_DIR="$(ls -d "$GTEST_PREFIX"/lib*/cmake/GTest 2>/dev/null | head -1 || true)"
if [ -z "$GTEST_DIR" ]; then
  echo "[aarch64] building GoogleTest from /usr/src/googletest"
  if ! { cmake -S /usr/src/googletest -B "$BUILD/googletest-build" "${GEN[@]}" \
           -DCMAKE_TOOLCHAIN_FILE="$TOOLCHAIN" -DCMAKE_BUILD_TYPE=Release -DBUILD_GMOCK=OFF -DINSTALL_GTEST=ON \
           -DCMAKE_INSTALL_PREFIX="$GTEST_PREFIX" \
         && cmake --build "$BUILD/googletest-build" -j "$JOBS" \
         && cmake --install "$BUILD/googletest-build"; } >"$LOGS/googletest.log" 2>&1; then
    cat "$LOGS/googletest.log" >&2
    fail "GoogleTest build"
  fi
  GTEST_DIR="$(ls -d "$GTEST_PREFIX"/lib*/cmake/GTest | head -1)"
fi

# --- 3. the library and the C++ suite for aarch64
# -U NSA_OPERATORS: the cache entry is recreated from the root CMakeLists' full operator list at every run,
# so an operator added since the last run is built and tested too.
echo "[aarch64] building build-aarch64/project ($TRIPLE-g++ $("$TRIPLE-g++" -dumpversion))"
if ! { cmake -S . -B "$BUILD/project" "${GEN[@]}" -U NSA_OPERATORS \
         -DCMAKE_TOOLCHAIN_FILE="$TOOLCHAIN" -DCMAKE_BUILD_TYPE=Release \
         -DNSA_ENABLE_TORCH=OFF -DNSA_ENABLE_CUDA=OFF -DNSA_BUILD_BENCH=OFF -DNSA_BUILD_TESTS=ON \
         -DGTest_DIR="$GTEST_DIR" \
       && cmake --build "$BUILD/project" -j "$JOBS" --target nsa_cpp_tests; } >"$LOGS/build.log" 2>&1; then
  cat "$LOGS/build.log" >&2
  fail "build"
fi
grep -E "warning:" "$LOGS/build.log" >&2 || true
TESTS="$BUILD/project/tests/cpp/nsa_cpp_tests"
# The program must be an aarch64 executable (not a host build that happens to run).
machine=$(readelf -h "$TESTS" | sed -n 's/^ *Machine: *//p')
[ "$machine" = "AArch64" ] || fail "nsa_cpp_tests is built for '$machine', not AArch64"
operators=$(sed -n 's/^NSA_OPERATORS:STRING=//p' "$BUILD/project/CMakeCache.txt")

# --- 4. the suite under qemu-user, in JOBS shards side by side
QEMU=(qemu-aarch64 -L "$SYSROOT")
echo "[aarch64] running nsa_cpp_tests under qemu-user (operators: $operators; filter: $FILTER; $JOBS shards)"
pids=()
for ((i = 0; i < JOBS; i++)); do
  GTEST_TOTAL_SHARDS=$JOBS GTEST_SHARD_INDEX=$i "${QEMU[@]}" "$TESTS" --gtest_filter="$FILTER" \
    >"$LOGS/shard$i.log" 2>&1 & pids+=($!)
done
ok=1
for ((i = 0; i < JOBS; i++)); do
  wait "${pids[$i]}" || ok=0
done
passed=0; failed=0; skipped=0
for ((i = 0; i < JOBS; i++)); do
  log="$LOGS/shard$i.log"
  p=$(sed -n 's/^\[  PASSED  \] \([0-9]*\) tests\{0,1\}\..*/\1/p' "$log" | tail -1)
  f=$(sed -n 's/^\[  FAILED  \] \([0-9]*\) tests\{0,1\}, listed below.*/\1/p' "$log" | tail -1)
  k=$(sed -n 's/^\[  SKIPPED \] \([0-9]*\) tests\{0,1\}, listed below.*/\1/p' "$log" | tail -1)
  skipped=$(( skipped + ${k:-0} ))
  # A shard that neither passed nor failed cleanly (crash, qemu error) counts as a failure.
  if [ -z "$p" ]; then ok=0; cat "$log" >&2; continue; fi
  passed=$(( passed + p )); failed=$(( failed + ${f:-0} ))
  [ -z "$f" ] || grep -E "^\[  FAILED  \]" "$log" >&2
done
[ "$passed" -gt 0 ] || ok=0
n_excluded=$(echo "$QEMU_EXCLUDED" | tr ':' '\n' | grep -c .)
summary="aarch64 leg (qemu-user): $passed tests passed, $failed failed, $skipped skipped, $n_excluded not run under qemu"
summary="$summary [$(( $(date +%s) - start )) s]"
if [ $ok = 1 ] && [ "$failed" = 0 ]; then
  echo "$summary"
else
  echo "$summary" >&2
  fail "nsa_cpp_tests; logs in build-aarch64/aarch64-logs"
fi
