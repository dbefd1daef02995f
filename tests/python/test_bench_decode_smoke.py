"""Smoke test of bench/bench_decode.py --quick: one tiny decode case end to end (the four decode operators, their
amortised step, the dense / SDPA baselines over the gathered paged cache) with every figure it promises
(bench/README.md, "Decode (paged caches)"). Figures are not checked (performance is the benchmarks' business)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_decode.py"
PARTS = ["compress (window completes)", "compress (none completes)", "compress_attention_infer",
         "select_attention_infer", "paged_window_attention", "step (completing)", "dense (gather + matmul)",
         "sdpa + gather", "sdpa (gathered cache)"]


def run_bench(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *argv], capture_output=True, text=True, timeout=240)


def test_bench_decode_quick(tmp_path):
    out = tmp_path / "decode.json"
    proc = run_bench("--quick", "--threads", "1", "--json-out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (r,) = json.loads(out.read_text())["results"]
    assert r["case"] == "quick" and list(r["times"]) == PARTS
    for t in r["times"].values():
        assert t["median_s"] > 0 and t["cpu_per_thread_s"] >= 0 and t["n_runs"] == 1 and t["min_s"] == t["median_s"]
    assert r["nsa_tokens"] == {"selected": 256, "window": 128, "compressed": 63}   # K l', w, (S - l) / d + 1
    assert r["nsa_bytes"] == 2 * (447 + 2 * 32 / 16) * 512 and r["dense_bytes"] == 2 * 1024 * 512
    assert r["nsa_step_s"] > 0 and r["nsa_gbps"] > 0 and r["traffic_bound"] > 0
    assert "copy bandwidth" in proc.stdout and "load average" in proc.stdout and "vs dense" in proc.stdout


def test_bench_decode_rejects_unknown_case():
    proc = run_bench("--cases", "64k-b1", "--no-probe")
    assert proc.returncode == 2 and "unknown case(s): 64k-b1" in proc.stderr
