#!/usr/bin/env bash
# Fuzz legs of nsa-ops, in one clang build (build-fuzz: clang++ -fsanitize=address,undefined, the library
# also with -fsanitize=fuzzer-no-link for coverage), through tests/stress/CMakeLists.txt:
#
#   (a) fuzz_backends: seeded random configurations, compress_attention_cpu on every ISA path this host runs
#       vs the fp64 model / fp32 reference (docs/CONTRIBUTING.md rules), NaN-in-masked-key and thread-count invariance.
#       Prints: fuzz leg: N configurations x M ISA paths, 0 mismatches (seed S)
#   (a2) fuzz_compress (where the compress operator is built): seeded random configurations of npu_nsa_compress /
#       npu_nsa_compress_grad on every ISA path, thread count and work split vs the reference (bitwise) and the fp64
#       model. Prints: fuzz_compress: N configurations x M ISA paths, 0 mismatches (seed S). Environment:
#       NSA_FUZZ_COMPRESS_SEED (default 20260301), NSA_FUZZ_COMPRESS_N (300), NSA_FUZZ_COMPRESS_SECONDS (100).
#   (a3) fuzz_select_attention (where the select_attention operator is built): seeded random configurations of
#       npu_nsa_select_attention and its grad on every ISA path, thread count and tile size vs the fp64 model.
#       Prints: fuzz leg (select_attention): N configurations x M ISA paths, 0 mismatches (seed S). Environment:
#       NSA_FUZZ_SELECT_SEED (default 20261130), NSA_FUZZ_SELECT_N (200), NSA_FUZZ_SELECT_SECONDS (100).
#   (b) fuzz_validate (libFuzzer): random bytes -> CompressAttentionParams backed by real buffers ->
#       validate / reference / cpu / backward; first the regression inputs of tests/fuzz/regressions, then a
#       time-bounded run. Prints: libfuzzer leg: 60 s, N executions, 0 crashes
#
# Environment: NSA_FUZZ_SEED (leg a's base seed: fixed by default, 20261125; "random" for a fresh one; always
# printed), NSA_FUZZ_N (configurations, default 300), NSA_LIBFUZZER_SECONDS (default 60), NSA_LIBFUZZER_RUNS (default 150000: whichever bound comes first), NSA_LIBFUZZER_SEED (default 20261125, see below),
# NSA_FUZZ_NEGATIVE_STRIDES (default 1: negative strides included, see below), NSA_JOBS (build parallelism).
# Artifacts (crash inputs) go to build-fuzz/artifacts/; reproduce one with
#   build-fuzz/fuzz/fuzz_validate build-fuzz/artifacts/crash-<hash>
# or with gcc: build-asan/fuzz_validate_replay <file> (scripts/sanitizers.sh builds it).
#
# Reproducible by default: the test command runs fuzz_backends and libFuzzer with fixed seeds, libFuzzer from a
# fresh corpus (the regression inputs), so a CI run explores the same inputs as the last local run and fails only
# on a change of the code, never on a new random find (a CI run on 2026-11-24 failed that way: libFuzzer's own random seed reached a
# harness overflow that no earlier run had). Exploration is separate and meant to run long:
#   NSA_FUZZ_SEED=random NSA_LIBFUZZER_SEED=random NSA_LIBFUZZER_SECONDS=1800 NSA_LIBFUZZER_CORPUS=build-fuzz/corpus \
#     scripts/fuzz.sh
# (random: libFuzzer's choice, printed; the corpus directory is kept and grows). Add what it finds to
# tests/fuzz/regressions/ once fixed.
#
# Negative strides: the API allows any int64 strides (torch never makes negative ones). The fuzzer once
# found src/ops/compress_attention/cpu_forward.cpp forming `base * dtype_size(dt)` in size_t (a wrapped offset for negative
# strides; fixed, replayed from tests/fuzz/regressions/validate_forward_negative_stride.bin);
# NSA_FUZZ_NEGATIVE_STRIDES=0 leaves them out.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
JOBS="${NSA_JOBS:-$(nproc)}"
DIR=build-fuzz
SECS="${NSA_LIBFUZZER_SECONDS:-60}"
export NSA_FUZZ_NEGATIVE_STRIDES="${NSA_FUZZ_NEGATIVE_STRIDES:-1}"
export ASAN_OPTIONS="${ASAN_OPTIONS:-halt_on_error=1:detect_leaks=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}"
CLANG="${NSA_FUZZ_CXX:-clang++}"
if ! command -v "$CLANG" >/dev/null 2>&1; then
  echo "fuzz: $CLANG not found (scripts/setup.sh installs clang and libclang-rt-14-dev)"
  exit 1
fi
GEN=()
if [ -x .venv/bin/ninja ]; then GEN=(-G Ninja -DCMAKE_MAKE_PROGRAM="$ROOT/.venv/bin/ninja"); fi
CMAKE=cmake
if [ -x .venv/bin/cmake ]; then CMAKE=.venv/bin/cmake; fi
status=0
summaries=()

t0=$SECONDS
echo "== fuzz build ($CLANG, $DIR)"
mkdir -p "$DIR"
"$CMAKE" -S tests/stress -B "$DIR" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER="$CLANG" \
  -DCMAKE_CXX_FLAGS="-fsanitize=fuzzer-no-link" -DNSA_SANITIZE=address,undefined -DNSA_ENABLE_TORCH=OFF \
  -DNSA_BUILD_BENCH=OFF -DNSA_BUILD_TESTS=OFF -DNSA_LIBFUZZER=ON -DNSA_HARDEN_PROGRAMS=ON \
  >"$DIR/configure.log" 2>&1 || { cat "$DIR/configure.log"; exit 1; }
targets=(fuzz_validate fuzz_backends)
# fuzz_compress exists where the compress operator is built (NSA_OPERATORS)
if "$CMAKE" --build "$DIR" --target help 2>/dev/null | grep -q 'fuzz_compress'; then targets+=(fuzz_compress); fi
# fuzz_select_attention exists where the select_attention operator is built
if "$CMAKE" --build "$DIR" --target help 2>/dev/null | grep -q 'fuzz_select_attention'; then targets+=(fuzz_select_attention); fi
"$CMAKE" --build "$DIR" -j "$JOBS" --target "${targets[@]}" >"$DIR/build.log" 2>&1 \
  || { tail -50 "$DIR/build.log"; exit 1; }
echo "  built in $((SECONDS - t0)) s"

# ------------------------------------------------------------------ (a) backends vs references
t1=$SECONDS
echo "== fuzz leg (fuzz_backends, every ISA path vs the fp64 model)"
NSA_FUZZ_N="${NSA_FUZZ_N:-300}" NSA_FUZZ_SECONDS="${NSA_FUZZ_SECONDS:-110}" "$DIR/fuzz_backends" >"$DIR/fuzz_backends.log" 2>&1
rc=$?
grep -E "^(fuzz_backends|MISMATCH|  )" "$DIR/fuzz_backends.log" | head -40
line="$(grep -E '^fuzz leg:' "$DIR/fuzz_backends.log" | tail -1)"
if [ "$rc" -ne 0 ] || [ -z "$line" ]; then
  status=1
  tail -20 "$DIR/fuzz_backends.log"
  line="${line:-fuzz leg: FAILED (exit $rc)} FAILED (log: $DIR/fuzz_backends.log)"
fi
line="$line [$((SECONDS - t1)) s]"
summaries+=("$line")
echo "$line"

# ------------------------------------------------------------------ (a2) the compress operator vs its reference
if [ -x "$DIR/fuzz_compress" ]; then
  t1=$SECONDS
  echo "== fuzz leg (fuzz_compress, every ISA path and thread count vs the reference and the fp64 model)"
  NSA_FUZZ_SEED="${NSA_FUZZ_COMPRESS_SEED:-20260301}" NSA_FUZZ_N="${NSA_FUZZ_COMPRESS_N:-300}" \
    NSA_FUZZ_SECONDS="${NSA_FUZZ_COMPRESS_SECONDS:-100}" "$DIR/fuzz_compress" >"$DIR/fuzz_compress.log" 2>&1
  rc=$?
  grep -E "^(MISMATCH|  )" "$DIR/fuzz_compress.log" | head -40
  line="$(grep -E '^fuzz_compress: [0-9]+ configurations x' "$DIR/fuzz_compress.log" | tail -1)"
  if [ "$rc" -ne 0 ] || [ -z "$line" ]; then
    status=1
    tail -20 "$DIR/fuzz_compress.log"
    line="${line:-fuzz_compress: FAILED (exit $rc)} FAILED (log: $DIR/fuzz_compress.log)"
  fi
  line="$line [$((SECONDS - t1)) s]"
  summaries+=("$line")
  echo "$line"
fi

# ------------------------------------------------------------------ (a3) selected attention vs its fp64 model
if [ -x "$DIR/fuzz_select_attention" ]; then
  t1=$SECONDS
  echo "== fuzz leg (fuzz_select_attention, every ISA path, thread count and tile size vs the fp64 model)"
  NSA_FUZZ_SEED="${NSA_FUZZ_SELECT_SEED:-20261130}" NSA_FUZZ_N="${NSA_FUZZ_SELECT_N:-200}" \
    NSA_FUZZ_SECONDS="${NSA_FUZZ_SELECT_SECONDS:-100}" "$DIR/fuzz_select_attention" >"$DIR/fuzz_select_attention.log" 2>&1
  rc=$?
  grep -E "^(MISMATCH|  )" "$DIR/fuzz_select_attention.log" | head -40
  line="$(grep -E '^fuzz leg \(select_attention\):' "$DIR/fuzz_select_attention.log" | tail -1)"
  if [ "$rc" -ne 0 ] || [ -z "$line" ]; then
    status=1
    tail -20 "$DIR/fuzz_select_attention.log"
    line="${line:-fuzz leg (select_attention): FAILED (exit $rc)} FAILED (log: $DIR/fuzz_select_attention.log)"
  fi
  line="$line [$((SECONDS - t1)) s]"
  summaries+=("$line")
  echo "$line"
fi

# ------------------------------------------------------------------ (b) libFuzzer
t2=$SECONDS
echo "== libfuzzer leg (fuzz_validate, $SECS s)"
ART="$DIR/artifacts/"
CORPUS="${NSA_LIBFUZZER_CORPUS:-$DIR/corpus-ci}"
SEED="${NSA_LIBFUZZER_SEED:-20261125}"
rm -rf "$ART"
if [ -z "${NSA_LIBFUZZER_CORPUS:-}" ]; then rm -rf "$CORPUS"; fi  # fresh: the same run on every machine
mkdir -p "$ART" "$CORPUS"
regress=(tests/fuzz/regressions/validate_*.bin)
if ! "$DIR/fuzz/fuzz_validate" -artifact_prefix="$ART" "${regress[@]}" >"$DIR/regressions.log" 2>&1; then
  status=1
  echo "  a regression input fails again:"
  grep -E "runtime error|ERROR|SUMMARY|fuzz_validate:|Running" "$DIR/regressions.log" | head -20
fi
echo "  ${#regress[@]} regression inputs replayed"
seed_arg=()
if [ "$SEED" != "random" ]; then seed_arg=(-seed="$SEED"); fi
"$DIR/fuzz/fuzz_validate" "${seed_arg[@]}" -max_total_time="$SECS" -runs="${NSA_LIBFUZZER_RUNS:-150000}" -timeout=30 -rss_limit_mb=2048 -max_len=512 \
  -print_final_stats=1 -artifact_prefix="$ART" "$CORPUS" tests/fuzz/regressions >"$DIR/libfuzzer.log" 2>&1
rc=$?
runs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$DIR/libfuzzer.log" | grep -Eo '[0-9]+$' | tail -1)
[ -n "$runs" ] || runs=$(grep -Eo 'Done [0-9]+ runs' "$DIR/libfuzzer.log" | grep -Eo '[0-9]+' | tail -1)
seed=$(grep -Eo 'INFO: Seed: [0-9]+' "$DIR/libfuzzer.log" | grep -Eo '[0-9]+$' | head -1)
crashes=$(find "$ART" -type f | wc -l)
stats=$(grep -E '^fuzz_validate stats:' "$DIR/libfuzzer.log" | tail -1 | sed 's/^fuzz_validate stats: //')
if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then
  status=1
  grep -E "runtime error|ERROR|SUMMARY|fuzz_validate:|Test unit written" "$DIR/libfuzzer.log" | head -20
fi
line="libfuzzer leg: $SECS s, ${runs:-0} executions, $crashes crashes (seed ${seed:-?}; corpus $(find "$CORPUS" -type f | wc -l) inputs; $stats)"
[ "$rc" -eq 0 ] && [ "$crashes" -eq 0 ] || line="$line FAILED (exit $rc; log $DIR/libfuzzer.log, inputs $ART)"
line="$line [$((SECONDS - t2)) s]"
summaries+=("$line")
echo "$line"

echo "== fuzz summary ($((SECONDS - t0)) s including the build)"
for s in "${summaries[@]}"; do echo "$s"; done
exit $status
