#!/usr/bin/env bash
# Sanitizer legs of nsa-ops (docs/CONTRIBUTING.md: "ASan + UBSan and TSan runs with zero reports; a planted bug must be
# caught, so that zero means something"). Two builds of the torch-free library and every C++ test
# through tests/stress/CMakeLists.txt (the root project as a subdirectory plus the hardening programs):
#
#   build-asan  -DNSA_SANITIZE=address,undefined (+ -D_GLIBCXX_ASSERTIONS), torch and bench off
#               planted_oob (heap over-read) and planted_ub (signed overflow) MUST be reported;
#               ctest: the full C++ suite (tests/cpp); fuzz_backends (a short run, fixed seed), stress_threads,
#               offsets64 (views with element offsets > 2^31), fuzz_validate_replay (tests/fuzz/regressions),
#               fuzz_compress (a short run, fixed seed; where the compress operator is built),
#               fuzz_select_attention (a short run, fixed seed; where the select_attention operator is built)
#   build-tsan  -DNSA_SANITIZE=thread, NSA_NUM_THREADS=4 (every default-threaded call uses 4 workers)
#               planted_race (two std::threads, no lock) MUST be reported;
#               ctest: the full C++ suite (the CPU backend uses std::thread only, no OpenMP: TSan sees all);
#               stress_threads (concurrent callers x worker threads, bitwise vs serial)
#
# Each leg prints one summary line, e.g.
#   sanitizer leg asan+ubsan: 79 tests + 4 programs, 0 reports; planted bugs caught (oob, ub) [93 s]
# and the script fails if a leg fails. Options (environment): NSA_SAN_CXX (compiler, default c++),
# NSA_SAN_LEGS ("asan tsan"), NSA_JOBS (build/ctest parallelism, default nproc).
# Logs: build-asan/sanitizer-logs/, build-tsan/sanitizer-logs/.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
JOBS="${NSA_JOBS:-$(nproc)}"
CXX_BIN="${NSA_SAN_CXX:-c++}"
LEGS="${NSA_SAN_LEGS:-asan tsan}"
GEN=()
if [ -x .venv/bin/ninja ]; then GEN=(-G Ninja -DCMAKE_MAKE_PROGRAM="$ROOT/.venv/bin/ninja"); fi
CMAKE=cmake
if [ -x .venv/bin/cmake ]; then CMAKE=.venv/bin/cmake; fi
CTEST=ctest
if [ -x .venv/bin/ctest ]; then CTEST=.venv/bin/ctest; fi

# Sanitizer runtime options: stop at the first report, full stacks, symbolized where possible.
export ASAN_OPTIONS="${ASAN_OPTIONS:-abort_on_error=0:halt_on_error=1:detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}"
export TSAN_OPTIONS="${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1}"

REPORT_RE='ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:|WARNING: ThreadSanitizer|ERROR: ThreadSanitizer'
status=0
summaries=()

# configure + build one sanitizer tree; $1 = dir, $2 = NSA_SANITIZE value, $3 = extra CXX flags
build_tree() {
  local dir="$1" san="$2" flags="$3"
  mkdir -p "$dir"
  "$CMAKE" -S tests/stress -B "$dir" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER="$CXX_BIN" \
    -DCMAKE_CXX_FLAGS="$flags" -DNSA_SANITIZE="$san" -DNSA_ENABLE_TORCH=OFF -DNSA_BUILD_BENCH=OFF \
    -DNSA_BUILD_TESTS=ON -DNSA_LIBFUZZER=OFF >"$dir/configure.log" 2>&1 || { cat "$dir/configure.log"; return 1; }
  "$CMAKE" --build "$dir" -j "$JOBS" >"$dir/build.log" 2>&1 || { tail -50 "$dir/build.log"; return 1; }
}

# runs a planted bug: it must exit non-zero AND print the sanitizer's report ($3: regex)
planted() {
  local bin="$1" log="$2" want="$3"
  "$bin" >"$log" 2>&1
  local rc=$?
  if [ "$rc" -ne 0 ] && grep -Eq "$want" "$log"; then return 0; fi
  echo "  planted bug $(basename "$bin") NOT caught (exit $rc, report /$want/ $(grep -Ecq "$want" "$log" && echo found || echo missing)); log: $log"
  return 1
}

# counts sanitizer reports in files
count_reports() { cat "$@" 2>/dev/null | grep -Ec "$REPORT_RE" || true; }

# ctest over a tree; prints the number of tests run; fails on any failure
run_ctest() {
  local dir="$1" log="$2"
  "$CTEST" --test-dir "$dir" -j "$JOBS" --timeout 900 --output-on-failure >"$log" 2>&1
  local rc=$?
  grep -Eo 'tests passed.* out of [0-9]+' "$log" | tail -1 | awk '{print $NF}' >"$log.count"
  return $rc
}

leg_asan() {
  local t0=$SECONDS dir=build-asan fail=0
  echo "== sanitizer leg asan+ubsan ($CXX_BIN, $dir)"
  build_tree "$dir" "address,undefined" "-D_GLIBCXX_ASSERTIONS" || { summaries+=("sanitizer leg asan+ubsan: BUILD FAILED"); return 1; }
  local logs="$dir/sanitizer-logs"
  rm -rf "$logs"; mkdir -p "$logs"
  # the library itself must be instrumented (not only the test programs)
  local inst
  inst=$(nm "$dir/nsa/libnsa_core.a" 2>/dev/null | grep -Ec '__asan_report_load|__ubsan_handle_' || true)
  if [ "${inst:-0}" -eq 0 ]; then echo "  libnsa_core.a carries no ASan/UBSan instrumentation"; fail=1; fi
  local caught="oob, ub"
  planted "$dir/planted_oob" "$logs/planted_oob.log" 'AddressSanitizer: heap-buffer-overflow' || { fail=1; caught="NOT ALL"; }
  planted "$dir/planted_ub" "$logs/planted_ub.log" 'runtime error: signed integer overflow' || { fail=1; caught="NOT ALL"; }
  run_ctest "$dir" "$logs/ctest.log" || { echo "  ctest failed: $logs/ctest.log"; grep -E "Failed|\*\*\*" "$logs/ctest.log" | head -20; fail=1; }
  local ntests; ntests=$(cat "$logs/ctest.log.count" 2>/dev/null); ntests=${ntests:-0}
  # the hardening programs (short runs: the full fuzz leg is scripts/fuzz.sh)
  NSA_FUZZ_N="${NSA_SAN_FUZZ_N:-100}" NSA_FUZZ_SECONDS=120 "$dir/fuzz_backends" >"$logs/fuzz_backends.log" 2>&1 || { echo "  fuzz_backends failed:"; tail -20 "$logs/fuzz_backends.log"; fail=1; }
  "$dir/stress_threads" >"$logs/stress_threads.log" 2>&1 || { echo "  stress_threads failed:"; tail -20 "$logs/stress_threads.log"; fail=1; }
  "$dir/offsets64" >"$logs/offsets64.log" 2>&1 || { echo "  offsets64 failed:"; tail -20 "$logs/offsets64.log"; fail=1; }
  NSA_FUZZ_NEGATIVE_STRIDES=0 "$dir/fuzz_validate_replay" tests/fuzz/regressions/validate_*.bin >"$logs/fuzz_validate_replay.log" 2>&1 || { echo "  fuzz_validate_replay failed:"; tail -20 "$logs/fuzz_validate_replay.log"; fail=1; }
  local progs="fuzz_backends stress_threads offsets64" nprog=4
  if [ -x "$dir/fuzz_compress" ]; then  # built when the compress operator is (a short run, fixed seed)
    NSA_FUZZ_N="${NSA_SAN_FUZZ_COMPRESS_N:-40}" NSA_FUZZ_SECONDS=120 "$dir/fuzz_compress" >"$logs/fuzz_compress.log" 2>&1 || { echo "  fuzz_compress failed:"; tail -20 "$logs/fuzz_compress.log"; fail=1; }
    progs="$progs fuzz_compress"; nprog=$((nprog + 1))
  fi
  if [ -x "$dir/fuzz_select_attention" ]; then  # built when the select_attention operator is (a short run, fixed seed)
    NSA_FUZZ_N="${NSA_SAN_FUZZ_SELECT_N:-30}" NSA_FUZZ_SECONDS=120 "$dir/fuzz_select_attention" >"$logs/fuzz_select_attention.log" 2>&1 || { echo "  fuzz_select_attention failed:"; tail -20 "$logs/fuzz_select_attention.log"; fail=1; }
    progs="$progs fuzz_select_attention"; nprog=$((nprog + 1))
  fi
  for f in $progs; do echo "  $(tail -1 "$logs/$f.log")"; done
  local reports; reports=$(count_reports "$logs"/ctest.log "$dir"/Testing/Temporary/LastTest.log "$logs"/fuzz_backends.log "$logs"/stress_threads.log "$logs"/offsets64.log "$logs"/fuzz_validate_replay.log "$logs"/fuzz_compress.log "$logs"/fuzz_select_attention.log)
  [ "$reports" -eq 0 ] || fail=1
  local line="sanitizer leg asan+ubsan: $ntests tests (full C++ suite) + $nprog programs, $reports reports; planted bugs caught ($caught) [$((SECONDS - t0)) s]"
  [ "$fail" -eq 0 ] || line="$line FAILED (logs: $logs)"
  summaries+=("$line")
  echo "$line"
  return $fail
}

leg_tsan() {
  local t0=$SECONDS dir=build-tsan fail=0
  echo "== sanitizer leg tsan ($CXX_BIN, $dir)"
  build_tree "$dir" "thread" "" || { summaries+=("sanitizer leg tsan: BUILD FAILED"); return 1; }
  local logs="$dir/sanitizer-logs"
  rm -rf "$logs"; mkdir -p "$logs"
  local inst
  inst=$(nm "$dir/nsa/libnsa_core.a" 2>/dev/null | grep -Ec '__tsan_(read|write)' || true)
  if [ "${inst:-0}" -eq 0 ]; then echo "  libnsa_core.a carries no TSan instrumentation"; fail=1; fi
  local caught="race"
  planted "$dir/planted_race" "$logs/planted_race.log" 'WARNING: ThreadSanitizer: data race' || { fail=1; caught="NOT CAUGHT"; }
  NSA_NUM_THREADS=4 run_ctest "$dir" "$logs/ctest.log" || { echo "  ctest failed: $logs/ctest.log"; grep -E "Failed|\*\*\*" "$logs/ctest.log" | head -20; fail=1; }
  local ntests; ntests=$(cat "$logs/ctest.log.count" 2>/dev/null); ntests=${ntests:-0}
  NSA_STRESS_ROUNDS="${NSA_SAN_STRESS_ROUNDS:-16}" "$dir/stress_threads" >"$logs/stress_threads.log" 2>&1 || { echo "  stress_threads failed:"; tail -20 "$logs/stress_threads.log"; fail=1; }
  echo "  $(tail -1 "$logs/stress_threads.log")"
  local reports; reports=$(count_reports "$logs"/ctest.log "$dir"/Testing/Temporary/LastTest.log "$logs"/stress_threads.log)
  [ "$reports" -eq 0 ] || fail=1
  local line="sanitizer leg tsan: $ntests tests (full C++ suite, NSA_NUM_THREADS=4) + stress_threads, $reports reports; planted bug caught ($caught) [$((SECONDS - t0)) s]"
  [ "$fail" -eq 0 ] || line="$line FAILED (logs: $logs)"
  summaries+=("$line")
  echo "$line"
  return $fail
}

for leg in $LEGS; do
  case "$leg" in
    asan) leg_asan || status=1 ;;
    tsan) leg_tsan || status=1 ;;
    *) echo "unknown leg $leg (asan, tsan)"; status=1 ;;
  esac
done
echo "== sanitizer summary"
for s in "${summaries[@]}"; do echo "$s"; done
exit $status
