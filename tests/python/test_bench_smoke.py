"""Smoke tests of the benchmark scripts of bench/ that have a quick mode: they run end to end at tiny sizes and
report what they promise (bench/README.md). Figures are not checked (performance is the benchmarks' business)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAYER_BENCH = REPO / "bench" / "bench_nsa_layer.py"


def run_bench(*argv: str, timeout: float = 240.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LAYER_BENCH), *argv], capture_output=True, text=True,
                          timeout=timeout)


def test_bench_nsa_layer_quick(tmp_path):
    """--quick: the three variants (NSAAttention, dense SDPA layer, reference composition), each in its own process,
    each with a forward + backward time, its CPU time and its memory figures."""
    out = tmp_path / "layer.json"
    proc = run_bench("--quick", "--json-out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [(r["case"], r["variant"]) for r in results] == [("quick", "nsa"), ("quick", "dense"),
                                                              ("quick", "reference")]
    for r in results:
        assert "error" not in r, r
        assert r["wall_s"] > 0 and r["cpu_per_thread_s"] > 0 and len(r["runs_s"]) == 1
        assert 0 < r["base_rss_kb"] <= r["peak_rss_kb"]
        assert r["saved_bytes"] > 0                      # autograd kept activations for the backward
    assert "quick" in proc.stdout and "peak RSS MB" in proc.stdout


def test_bench_nsa_layer_rejects_unknown_names():
    proc = run_bench("--variants", "nsa,sparse", "--no-probe")
    assert proc.returncode == 2 and "unknown variant(s): sparse" in proc.stderr
    proc = run_bench("--cases", "64k", "--no-probe")
    assert proc.returncode == 2 and "unknown case(s): 64k" in proc.stderr


COMPRESS_BENCH = REPO / "bench" / "bench_compress.py"


def test_bench_compress_small(tmp_path):
    """bench_compress.py on one small case: both passes timed and checked against the composition, the bandwidth
    measured before and after the cases, and % BW relative to the larger of the two."""
    out = tmp_path / "compress.json"
    proc = subprocess.run([sys.executable, str(COMPRESS_BENCH), "--cases", "varlen-keys", "--threads", "1",
                           "--repeat", "3", "--min-time", "0", "--bw-mb", "16", "--json-out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    bw = data["bandwidth"]
    assert bw["best"] == max(bw["before"], bw["after"]) > 0
    assert [(r["case"], r["kind"]) for r in data["rows"]] == [("varlen-keys", "forward"), ("varlen-keys", "backward")]
    for r in data["rows"]:
        assert r["ms"] > 0 and r["gbs"] > 0 and r["speedup"] > 0
        assert abs(r["pct"] - 100 * r["gbs"] / bw["best"]) < 1e-9
