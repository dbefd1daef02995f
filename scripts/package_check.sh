#!/usr/bin/env bash
# Packaging leg: checks that nsa-ops installs and works from its packages, not from the source tree.
#
#  1. C++: configures the core alone (no torch, tests or benchmarks) in build-pkg/cpp, installs it with
#     `cmake --install` into a temporary prefix, builds examples/cpp_demo against it with
#     find_package(nsa_ops CONFIG REQUIRED) and runs it (CPU backend vs reference on a causal bf16 case).
#  2. Python: builds the wheel with `pip wheel --no-build-isolation` (scikit-build-core, the .venv's torch)
#     into a temporary directory, installs it into a fresh virtual environment that sees the .venv's torch and
#     numpy through a .pth file (they must satisfy the wheel's requirements; nothing is downloaded or copied),
#     and from a directory outside the repository imports nsa_ops, checks that it and its library come from
#     the wheel's install, runs one call against the reference op and the console script.
#
# Needs scripts/setup.sh first (the .venv with torch); installs scikit-build-core into the .venv if missing.
# Prints `package leg: wheel OK (<wheel>), C++ find_package example OK` at the end. About 40 s on
# 2 cores from scratch, mostly compiling (build-pkg/ keeps the build folders: a rerun takes about 10 s).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
start=$(date +%s)
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || { echo "[package] no .venv: run scripts/setup.sh first" >&2; exit 1; }
TMP="$(mktemp -d "${TMPDIR:-/tmp}/nsa-package.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
GEN=()
GEN_NAME="Unix Makefiles"
if [ -x .venv/bin/ninja ]; then
  GEN=(-G Ninja -DCMAKE_MAKE_PROGRAM="$ROOT/.venv/bin/ninja"); GEN_NAME=Ninja
elif command -v ninja >/dev/null 2>&1; then
  GEN=(-G Ninja); GEN_NAME=Ninja
fi
JOBS="$(nproc)"
# quiet CMD...: runs CMD with its output kept in a log, printed (last 60 lines) only when CMD fails.
quiet() {
  local log="$TMP/step.log"
  if ! "$@" >"$log" 2>&1; then
    echo "[package] failed: $*" >&2
    tail -n 60 "$log" >&2
    return 1
  fi
}

# ------------------------------------------------------------------ 1. C++ package + find_package example
echo "== package: C++ (cmake --install, examples/cpp_demo)"
if [ -f build-pkg/cpp/CMakeCache.txt ] && ! grep -qx "CMAKE_GENERATOR:INTERNAL=$GEN_NAME" build-pkg/cpp/CMakeCache.txt; then
  rm -rf build-pkg/cpp  # made with another generator
fi
quiet cmake -S . -B build-pkg/cpp "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DNSA_ENABLE_TORCH=OFF \
  -DNSA_BUILD_TESTS=OFF -DNSA_BUILD_BENCH=OFF
quiet cmake --build build-pkg/cpp -j "$JOBS"
quiet cmake --install build-pkg/cpp --prefix "$TMP/prefix"
for f in lib/libnsa_core.a include/nsa/compress_attention.h lib/cmake/nsa_ops/nsa_opsConfig.cmake \
         lib/cmake/nsa_ops/nsa_opsConfigVersion.cmake lib/cmake/nsa_ops/nsa_opsTargets.cmake; do
  [ -f "$TMP/prefix/$f" ] || { echo "[package] missing from the install: $f" >&2; exit 1; }
done
quiet cmake -S examples/cpp_demo -B "$TMP/demo" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$TMP/prefix"
quiet cmake --build "$TMP/demo" -j "$JOBS"
"$TMP/demo/nsa_cpp_demo"
echo "[package] C++ leg done in $(( $(date +%s) - start )) s"

# ------------------------------------------------------------------ 2. wheel, installed into a fresh venv
echo "== package: wheel (pip wheel --no-build-isolation), installed into a fresh venv"
if ! "$PY" -c 'import scikit_build_core' 2>/dev/null; then
  echo "[package] installing scikit-build-core into .venv"
  "$PY" -m pip install -q scikit-build-core 2>&1 | grep -v "^WARNING: Location" || true
fi
t1=$(date +%s)
"$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$TMP/dist" \
  --config-settings=build-dir="$ROOT/build-pkg/wheel" . 2>&1 | grep -v "^WARNING: Location" || true
WHEEL="$(ls "$TMP"/dist/nsa_ops-*.whl 2>/dev/null | head -n 1)"
[ -n "$WHEEL" ] || { echo "[package] pip wheel produced no wheel" >&2; exit 1; }
"$PY" - "$WHEEL" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["nsa_ops/__init__.py", "nsa_ops/cli.py", "nsa_ops/libnsa_ops_torch.so"]
missing = [n for n in need if n not in names]
assert not missing, f"wheel lacks {missing}"
stray = [n for n in names if n.endswith((".a", ".h", ".cmake"))]
assert not stray, f"the wheel carries the C++ package: {stray}"
EOF
echo "[package] built $(basename "$WHEEL") in $(( $(date +%s) - t1 )) s"

# A fresh venv that sees the .venv's packages (torch, numpy) through a .pth file, after its own
# site-packages: they satisfy the wheel's requirements (nothing is downloaded or copied), and nsa_ops can
# only come from the wheel just installed.
"$PY" -m venv "$TMP/venv"
VPY="$TMP/venv/bin/python"
VSITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
"$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))' > "$VSITE/_nsa_package_check_base.pth"
# --force-reinstall: install here even if some nsa-ops is visible through the .pth (pip leaves that one alone);
# the wheel's requirements are checked against what the venv sees below.
"$VPY" -m pip install -q --no-deps --force-reinstall "$WHEEL" 2>&1 | grep -v "^WARNING: Location" || true
cd "$TMP"  # away from the source tree: nsa_ops must come from the installed package
env -u NSA_OPS_LIB "$VPY" - "$VSITE" <<'EOF'
import os, subprocess, sys
import torch
import nsa_ops
where = os.path.realpath(sys.argv[1])
pkg = os.path.realpath(os.path.dirname(nsa_ops.__file__))
lib = os.path.realpath(nsa_ops.library_path())
assert pkg.startswith(where), f"nsa_ops imported from {pkg}, not from the installed {where}"
assert os.path.dirname(lib) == pkg, f"operator library {lib} is not the one inside the package {pkg}"
from importlib.metadata import requires, version
from packaging.requirements import Requirement
for text in requires("nsa-ops") or []:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # optional extras
    have = version(req.name)
    assert req.specifier.contains(have, prereleases=True), f"requirement {text} not met: {req.name} {have}"
T, C = 256, 15
g = torch.Generator().manual_seed(0)
q = torch.randn(T, 4, 64, generator=g).bfloat16()
k = torch.randn(C, 2, 64, generator=g).bfloat16()
v = torch.randn(C, 2, 32, generator=g).bfloat16()
am = nsa_ops.make_atten_mask(T, C, 32, 16)
tm = nsa_ops.make_topk_mask(T, 4, 64)
args = (q, k, v, 0.125, 4, 32, 16, 64, 2, tm, am, [T], [C], None)
out = nsa_ops.npu_nsa_compress_attention(*args)
ref = torch.ops.nsa.compress_attention_reference(*args)
assert torch.equal(out[1], ref[1]), "topk_indices differ from the reference"
torch.testing.assert_close(out[2], ref[2], rtol=1e-5, atol=1e-6)
assert (out[0].float() - ref[0].float()).abs().max() < 0.05
for cmd in ([sys.executable, "-m", "nsa_ops", "--version"],
            [os.path.join(os.path.dirname(sys.executable), "nsa-ops"), "--help"]):
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, (cmd, r.stderr)
print(f"[package] installed nsa_ops OK: {pkg} (library {os.path.basename(lib)}), attention_out "
      f"{list(out[0].shape)}, topk_indices {list(out[1].shape)}")
EOF
cd "$ROOT"
echo "[package] finished in $(( $(date +%s) - start )) s"
echo "package leg: wheel OK ($(basename "$WHEEL")), C++ find_package example OK"
