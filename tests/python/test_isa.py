"""Every CPU instruction-set path of the CPU backend, capped with NSA_CPU_ISA (read once per process, so
each path runs in a subprocess) over a few cases of the shape matrix, the reference vectors and the subnormal
bf16 case of test_hostile.py. A cap above what this CPU has runs the best path it has (the log names the active
one)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import nsa_ops

HERE = Path(__file__).resolve().parent
SELECT = "(cpu and (varlen or strided or causal-2seq or C-edges or ties or G8 or l48 or fp64)) or subnormal"


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512bf16"])
def test_isa_path(isa):
    env = dict(os.environ, NSA_CPU_ISA=isa)
    if nsa_ops.library_path():
        env["NSA_OPS_LIB"] = nsa_ops.library_path()
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(HERE / "test_forward.py"),
           str(HERE / "test_vectors.py"), str(HERE / "test_hostile.py"), "-k", SELECT]
    r = subprocess.run(cmd, env=env, cwd=str(HERE), capture_output=True, text=True, timeout=600)
    tail = (r.stdout + r.stderr)[-3000:]
    assert r.returncode == 0, f"NSA_CPU_ISA={isa}:\n{tail}"
    assert "passed" in r.stdout and "active" in r.stdout, tail
    header = next((line for line in r.stdout.splitlines() if line.startswith("nsa_ops:")), "")
    print(header)
    order = ["scalar", "avx2", "avx512", "avx512bf16"]
    detected, _ = nsa_ops.cpu_isa()
    want = order[min(order.index(isa), order.index(detected))]
    assert header.endswith(f"active {want}"), header
    # test_hostile.py's subnormal case: the strict expected failure of the avx512bf16 path (a documented
    # deviation, docs/spec/compress_attention.md §11), a pass on every other path.
    summary = r.stdout.strip().splitlines()[-1]
    assert ("1 xfailed" in summary) == (want == "avx512bf16"), summary
