#!/usr/bin/env python3
"""Memory traffic of one NSA decode step, measured in valgrind's cache simulator (see bench/README.md, "Decode
memory traffic").

Runs build/bench/decode_traffic (bench/decode_traffic.cpp: the four decode operators of one completing step over
paged bf16 caches, the shapes of bench_decode.py) under ``valgrind --tool=callgrind --cache-sim=yes`` with a
first-level data cache and a last-level cache (LL) of this machine's sizes (from /sys, else 48 KiB and 32 MiB),
a cold LL at the start of the step (the program reads a buffer four times the LL first: in a model, the other layers
run between two steps of one layer), and reads one dump per operator. An LL miss is a line that came from memory:

  read traffic  = LL read misses x 64 bytes (DLmr: loads whose line was in no cache)
  write-allocate = LL write misses x 64 bytes (DLmw: stores whose line was in no cache; read from memory first)

and compares their sum with the bytes of the tokens the operator must read (bench_decode.py's count: selected,
window and compressed tokens, N2 (D + Dv) bf16 values each, and the l raw tokens of the compression). The lines a step
leaves dirty are written back later; callgrind does not count them (they are at most the write-allocated lines plus
the outputs).

Valgrind executes no AVX-512, so the library runs its AVX2 path under it (cpuid as valgrind reports it). The
AVX-512 BF16 path reads the same cache rows, in place, without the AVX2 path's packed fp32 copies of the selected and
window rows (src/ops/select_attention_infer/paged.h, attend_in_place): its traffic is at most the AVX2 path's.

    .venv/bin/python bench/decode_traffic.py                      # 8k, 32k, 128k x batch 1, 8
    .venv/bin/python bench/decode_traffic.py --cases 8k-b1 --markdown
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {f"{S // 1024}k-b{B}": (S, B) for S in (8192, 32768, 131072) for B in (1, 8)}
QUICK = {"quick": (1056, 2)}  # a tiny step (seconds under valgrind): the test suite's smoke run
PARTS = ["compress_infer", "compress_attention_infer", "select_attention_infer", "paged_window_attention"]


def cache_size(level: int, default: int) -> tuple[int, int]:
    """(bytes, ways) of the data or unified cache of `level` on cpu0, from /sys (default: (default, 16))."""
    for idx in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            lv = int(Path(idx, "level").read_text())
            kind = Path(idx, "type").read_text().strip()
            if lv != level or kind not in ("Data", "Unified"):
                continue
            size = Path(idx, "size").read_text().strip()
            n = int(size[:-1]) * (1 << 10 if size.endswith("K") else 1 << 20) if size[-1] in "KM" else int(size)
            ways = int(Path(idx, "ways_of_associativity").read_text())
            return n, ways
        except (OSError, ValueError):
            continue
    return default, 16


def valid_geometry(size: int, ways: int, line: int = 64) -> tuple[int, int]:
    """callgrind needs a power-of-two number of sets: the largest such cache of these ways not above size."""
    sets = max(1, size // (ways * line))
    sets = 1 << (sets.bit_length() - 1)
    return sets * ways * line, ways


def parse_dump(path: str) -> tuple[str, dict]:
    text = Path(path).read_text(errors="replace")
    trig = re.search(r"^desc: Trigger: Client Request: (\S+)", text, re.M)
    events = re.search(r"^events: (.*)$", text, re.M)
    summ = re.search(r"^summary: (.*)$", text, re.M)
    if not (trig and events and summ):
        return "", {}
    return trig.group(1), dict(zip(events.group(1).split(), (int(v) for v in summ.group(1).split())))


def run_case(name: str, exe: Path, threads: int, d1: tuple, ll: tuple) -> dict:
    S, B = {**CASES, **QUICK}[name]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["valgrind", "--tool=callgrind", "--cache-sim=yes", f"--D1={d1[0]},{d1[1]},64",
               f"--LL={ll[0]},{ll[1]},64", "--instr-atstart=no", f"--callgrind-out-file={tmp}/cg.%p",
               str(exe), "--context", str(S), "--batch", str(B), "--threads", str(threads), "--repeat", "1",
               "--flush-mb", str(4 * ll[0] >> 20)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{name}: valgrind failed ({r.returncode}):\n{r.stderr[-2000:]}")
        tokens = {m.group(1): int(m.group(2)) for m in re.finditer(r"^part (\S+) (\d+)$", r.stdout, re.M)}
        dumps = dict(parse_dump(f) for f in glob.glob(f"{tmp}/cg.*"))
    parts = {}
    for p in PARTS:
        ev = dumps.get(p)
        if ev is None:
            raise RuntimeError(f"{name}: no callgrind dump for {p}")
        rd, wr = ev["DLmr"] * 64, ev["DLmw"] * 64
        parts[p] = {"token_bytes": tokens[p], "read_bytes": rd, "write_alloc_bytes": wr, "instructions": ev["Ir"]}
    tot = {k: sum(v[k] for v in parts.values()) for k in ("token_bytes", "read_bytes", "write_alloc_bytes")}
    return {"case": name, "S": S, "B": B, "parts": parts, "step": tot}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated, of " + ", ".join([*CASES, *QUICK]))
    ap.add_argument("--threads", type=int, default=2, help="worker threads of the library (valgrind runs them "
                    "one at a time; the simulated caches are shared)")
    ap.add_argument("--exe", default=str(ROOT / "build" / "bench" / "decode_traffic"))
    ap.add_argument("--json-out", help="write the results here")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        print("decode_traffic.py: valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    exe = Path(args.exe)
    if not exe.exists():
        print(f"decode_traffic.py: {exe} not built (cmake --build build --target decode_traffic)", file=sys.stderr)
        return 2
    d1 = valid_geometry(*cache_size(1, 48 << 10))
    ll = valid_geometry(*cache_size(3, 32 << 20))
    print(f"simulated caches: D1 {d1[0] >> 10} KiB {d1[1]}-way, LL {ll[0] >> 20} MiB {ll[1]}-way, 64-byte lines; "
          f"cold LL at the start of the step; library path: AVX2 (valgrind runs no AVX-512)")
    results = []
    for name in [c for c in args.cases.split(",") if c]:
        if name not in CASES and name not in QUICK:
            print(f"decode_traffic.py: unknown case {name}", file=sys.stderr)
            return 2
        res = run_case(name, exe, args.threads, d1, ll)
        results.append(res)
        for p, v in res["parts"].items():
            print(f"   {name:8} {p:26} tokens {v['token_bytes'] / 1e6:8.3f} MB   read {v['read_bytes'] / 1e6:8.3f} MB"
                  f"   write-allocate {v['write_alloc_bytes'] / 1e6:7.3f} MB")
    head = ["case", "token MB", "read MB", "write-alloc MB", "traffic / tokens", "with write-backs <=",
            "compress_attention_infer read / tokens", "select read+alloc / tokens", "window read+alloc / tokens"]
    rows = []
    for r in results:
        t, p = r["step"], r["parts"]

        def ratio(v: dict, alloc: bool = True) -> str:
            return f"{(v['read_bytes'] + (v['write_alloc_bytes'] if alloc else 0)) / v['token_bytes']:.2f}"
        rows.append([r["case"], f"{t['token_bytes'] / 1e6:.2f}", f"{t['read_bytes'] / 1e6:.2f}",
                     f"{t['write_alloc_bytes'] / 1e6:.2f}", ratio(t),
                     f"{(t['read_bytes'] + 2 * t['write_alloc_bytes']) / t['token_bytes']:.2f}",
                     ratio(p["compress_attention_infer"], False), ratio(p["select_attention_infer"]),
                     ratio(p["paged_window_attention"])])
    print()
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        print("  ".join(h.ljust(w[i]) for i, h in enumerate(head)))
        for row in rows:
            print("  ".join(c.ljust(w[i]) for i, c in enumerate(row)))
    print("\ntraffic = read + write-allocate bytes (LL misses x 64) of the whole step; tokens = the bytes of the "
          "selected, window and compressed tokens and of the compression's l raw tokens (bench_decode.py); "
          "'with write-backs <=' adds the write-allocated lines once more (each may be written back later); the "
          "target is traffic / tokens <= 2.")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"d1": d1, "ll": ll, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
