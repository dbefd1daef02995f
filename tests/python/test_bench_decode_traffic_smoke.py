"""Smoke test of the decode memory-traffic measurement (bench/decode_traffic.cpp, bench/decode_traffic.py; bench/README.md,
"Decode memory traffic"): the step program's token counts, and one tiny step in valgrind's cache simulator, whose
counts must obey what a cold cache implies (the compressed attention's tokens come from memory)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXE = ROOT / "build" / "bench" / "decode_traffic"
SCRIPT = ROOT / "bench" / "decode_traffic.py"
TOKEN = 2 * (192 + 128) * 2          # N2 (D + Dv) bf16 values
PARTS = {"compress_infer": 32, "compress_attention_infer": (1056 - 32) // 16 + 1,   # l raw tokens; C
         "select_attention_infer": 1024, "paged_window_attention": 512}           # min(K l', S); min(w, S)


def test_step_program_counts_and_times():
    if not EXE.exists():
        pytest.fail(f"{EXE} is not built (scripts/setup.sh builds it)")
    proc = subprocess.run([str(EXE), "--context", "1056", "--batch", "2", "--threads", "2", "--repeat", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    parts = {m.group(1): int(m.group(2)) for m in re.finditer(r"^part (\S+) (\d+)$", proc.stdout, re.M)}
    assert parts == {p: 2 * n * TOKEN for p, n in PARTS.items()}
    assert f"step tokens {sum(parts.values())}" in proc.stdout
    times = re.findall(r"^time (\S+) ([0-9.]+) ms$", proc.stdout, re.M)
    assert [t[0] for t in times] == list(PARTS) and all(float(t[1]) > 0 for t in times)


def test_step_program_rejects_bad_context():
    proc = subprocess.run([str(EXE), "--context", "1000"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--context" in proc.stderr


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not installed (scripts/setup.sh installs it)")
def test_cache_simulation_of_a_tiny_step(tmp_path):
    out = tmp_path / "traffic.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cases", "quick", "--json-out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (r,) = json.loads(out.read_text())["results"]
    assert r["case"] == "quick" and list(r["parts"]) == list(PARTS)
    for name, v in r["parts"].items():
        assert v["token_bytes"] == 2 * PARTS[name] * TOKEN
        assert v["instructions"] > 0 and v["read_bytes"] >= 0 and v["write_alloc_bytes"] >= 0
    cmp = r["parts"]["compress_attention_infer"]
    # cold cache: every compressed token but the one compress_infer has just written comes from memory
    assert cmp["read_bytes"] >= cmp["token_bytes"] - 2 * TOKEN
    assert r["step"]["token_bytes"] == sum(v["token_bytes"] for v in r["parts"].values())
    assert "traffic / tokens" in proc.stdout
