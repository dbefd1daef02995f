#!/usr/bin/env python3
"""Benchmark of the KV compression operator (nsa_ops.npu_nsa_compress / npu_nsa_compress_grad,
docs/spec/compress.md) against the machine's measured memory bandwidth and a plain PyTorch composition.

The operator is memory-bound: per output element l multiply-adds, per input element l/d of them. Its figure of
merit is the rate at which it moves the bytes it must read and write:

    forward   bytes = (T*N*D + l*N + R*N*D) * s        read input and weight, write output
    backward  bytes = (R*N*D + T*N*D + l*N) * s        read grad, input and weight
                    + (T*N*D + l*N) * s                write input_grad and weight_grad
    GB/s = bytes / median time / 1e9                   (s = bytes per element: 2 for bf16)

(The fastest run is printed too: on a shared machine the median includes other processes' interference.)

Input rows that a window re-reads (l/d times each) come from the caches and are counted once, as is every row a
batch's tail leaves unread.

Memory bandwidth is measured in the same run, with the same threads, on arrays far larger than the caches
(--bw-mb, default 256 MB per array): a copy (dst.copy_(src): 2 x bytes moved) and a triad (a = b + s*c with
torch.add(out=): 3 x bytes); the larger of the two is the denominator of "% BW", measured before and after the
cases (the larger of both: a machine shared with other work has slow moments). The bench-8k cases fit in the L3
cache of most server CPUs, so they can run above the memory bandwidth; the bench-64k case (about 50 MB of input)
does not.

Outputs: nsa_ops takes CPU outputs of 4 MiB or more from its cache of freed blocks (NSA_CPU_OUTPUT_CACHE_MB,
docs/API.md "Memory"), so repeated calls write into the block the previous call freed; run with
NSA_CPU_OUTPUT_CACHE_MB=0 to time fresh pages (zeroed by the kernel at their first write) instead.

Baseline: the plain PyTorch composition a user would write: per batch, input.unfold(0, l, d) (windows as a view)
and torch.einsum("cndl,ln->cnd", windows, weight), concatenated; its backward is PyTorch autograd of that
composition (torch.autograd.grad with the same grad). "x torch" = baseline time / our time.

Usage:
    .venv/bin/python bench/bench_compress.py [--cases bench-8k-keys,...] [--threads N] [--repeat 9] [--markdown]
    .venv/bin/python bench/bench_compress.py --list
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Case:
    name: str
    seqs: tuple  # tokens per sequence
    N: int
    D: int
    l: int = 32
    d: int = 16
    dtype: str = "bf16"
    default: bool = True
    note: str = ""


CASES = [
    Case("bench-8k-keys", (8192,), 2, 192, note="keys of bench-8k (compress_attention's D = 192)"),
    Case("bench-8k-values", (8192,), 2, 128, note="values of bench-8k (D2 = 128)"),
    Case("varlen-keys", (1024, 2048, 3072, 4096), 2, 192, note="4 sequences, T = 10240"),
    Case("bench-64k-keys", (65536,), 2, 192, note="T = 65536: 50 MB of input, beyond the caches"),
    Case("bench-8k-keys-fp32", (8192,), 2, 192, dtype="fp32", default=False),
]


def import_nsa_ops():
    sys.path.insert(0, str(ROOT / "python"))
    try:
        import nsa_ops  # noqa: F401
    except Exception as e:  # ImportError, or the library failing to load
        print(f"ERROR: cannot import nsa_ops ({type(e).__name__}: {e}); build it with `bash scripts/setup.sh` "
              "or point NSA_OPS_LIB at a built libnsa_ops_torch.so", file=sys.stderr)
        sys.exit(2)
    return nsa_ops


def timed(fn, warmup: int, repeat: int, budget: float, min_time: float = 0.0) -> tuple[float, list]:
    """Median seconds of `repeat` runs after `warmup` runs, or of more runs while they add up to less than `min_time`
    seconds (sub-millisecond calls: a median of many runs, not of a few milliseconds that one burst of other work on a
    shared machine can cover); stops after `budget` seconds of runs. nsa_ops' own timer (imported with nsa_ops)."""
    from nsa_ops._bench import time_fn

    t = time_fn(fn, warmup, repeat, budget, min_time_s=min_time)
    return t.median, t.runs


def measure_bandwidth(torch, mb: float, repeat: int) -> dict:
    """Copy and triad rates (GB/s) on float32 arrays of `mb` MB each, with torch's threads."""
    n = int(mb * 1e6 / 4)
    a, b, c = (torch.empty(n, dtype=torch.float32) for _ in range(3))
    b.fill_(1.0)
    c.fill_(2.0)
    a.fill_(0.0)
    t_copy, _ = timed(lambda: a.copy_(b), 2, repeat, 10.0)
    t_triad, _ = timed(lambda: torch.add(b, c, alpha=3.0, out=a), 2, repeat, 10.0)
    copy = 2 * n * 4 / t_copy / 1e9
    triad = 3 * n * 4 / t_triad / 1e9
    return {"copy": copy, "triad": triad, "best": max(copy, triad), "array_mb": mb}


def composition_forward(torch, x, w, l, d, lens):
    """The baseline: unfold + einsum per batch (the windows are a view; einsum does the reduction)."""
    outs, prev = [], 0
    for end in lens:
        if end - prev >= l:
            outs.append(torch.einsum("cndl,ln->cnd", x[prev:end].unfold(0, l, d), w))
        prev = end
    return torch.cat(outs) if outs else x.new_zeros(0, x.shape[1], x.shape[2])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", help="comma-separated case names (default: the default cases)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--threads", type=int, default=None, help="threads for torch and the operator (default: all)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=15, help="measured runs, median kept (default 15)")
    ap.add_argument("--budget", type=float, default=10.0, help="seconds of measured runs per measurement")
    ap.add_argument("--min-time", type=float, default=0.3,
                    help="seconds of measured runs at least, per measurement of nsa_ops (more runs than --repeat for "
                         "short calls; default 0.3)")
    ap.add_argument("--bw-mb", type=float, default=256.0, help="MB per array of the bandwidth measurement")
    ap.add_argument("--no-composition", action="store_true", help="skip the PyTorch composition baseline")
    ap.add_argument("--markdown", action="store_true", help="print the summary table in markdown")
    ap.add_argument("--json-out", help="write the machine, the bandwidth and every row to this JSON file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stat", choices=("median", "best"), default="median",
                    help="which time GB/s, %% BW and the ratio use (default median; best = the fastest run, for "
                         "machines shared with other work)")
    args = ap.parse_args()

    if args.list:
        for c in CASES:
            print(f"{c.name:20s} seqs={list(c.seqs)} N={c.N} D={c.D} l={c.l} d={c.d} {c.dtype}"
                  f"{'' if c.default else ' (not default)'}  {c.note}")
        return 0
    if args.threads:
        os.environ["NSA_NUM_THREADS"] = str(args.threads)
    nsa_ops = import_nsa_ops()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.cases.split(",") if args.cases else [c.name for c in CASES if c.default]
    by_name = {c.name: c for c in CASES}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        print(f"unknown case(s) {unknown}; --list shows them", file=sys.stderr)
        return 2

    detected, active = nsa_ops.cpu_isa()
    print(f"# nsa_ops compress benchmark: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads, CPU ISA {active} (detected {detected}), torch {torch.__version__}")
    bw = measure_bandwidth(torch, args.bw_mb, 9)
    print(f"# memory bandwidth ({bw['array_mb']:.0f} MB arrays): copy {bw['copy']:.1f} GB/s, triad "
          f"{bw['triad']:.1f} GB/s; % BW below is relative to {bw['best']:.1f} GB/s (the table: to the larger of this "
          f"and a measurement after the cases)")

    rows = []
    gen = torch.Generator().manual_seed(args.seed)
    for name in names:
        c = by_name[name]
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[c.dtype]
        es = torch.finfo(dtype).bits // 8
        lens = torch.tensor(c.seqs).cumsum(0).tolist()
        T = lens[-1]
        x = torch.randn(T, c.N, c.D, generator=gen).to(dtype)
        w = (torch.randn(c.l, c.N, generator=gen) / c.l).to(dtype)
        out = nsa_ops.npu_nsa_compress(x, w, c.l, c.d, actual_seq_len=lens)
        R = out.shape[0]
        g = torch.randn(R, c.N, c.D, generator=gen).to(dtype)
        # sanity check against the composition in fp64 (the §9 rule is tested elsewhere; here a loose bound)
        ref = composition_forward(torch, x.double(), w.double(), c.l, c.d, lens)
        err = (out.double() - ref).abs().max().item()
        scale = ref.abs().max().item()
        if err > 1e-2 * scale + 1e-6:
            print(f"CHECK FAILED for {name}: max error {err} (scale {scale})", file=sys.stderr)
            return 1

        fwd_bytes = (T * c.N * c.D + c.l * c.N + R * c.N * c.D) * es
        bwd_bytes = (R * c.N * c.D + 2 * T * c.N * c.D + 2 * c.l * c.N) * es
        t_fwd, runs_fwd = timed(lambda: nsa_ops.npu_nsa_compress(x, w, c.l, c.d, actual_seq_len=lens),
                                args.warmup, args.repeat, args.budget, args.min_time)
        t_bwd, runs_bwd = timed(lambda: nsa_ops.npu_nsa_compress_grad(g, x, w, c.l, c.d, actual_seq_len=lens),
                                args.warmup, args.repeat, args.budget, args.min_time)
        t_cf = t_cb = float("nan")
        tc_best = {"forward": float("nan"), "backward": float("nan")}
        if not args.no_composition:
            t_cf, runs = timed(lambda: composition_forward(torch, x, w, c.l, c.d, lens), 1,
                               max(3, args.repeat // 3), args.budget)
            tc_best["forward"] = min(runs)
            xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
            co = composition_forward(torch, xr, wr, c.l, c.d, lens)
            t_cb, runs = timed(lambda: torch.autograd.grad(co, (xr, wr), g, retain_graph=True), 1,
                               max(3, args.repeat // 3), args.budget)
            tc_best["backward"] = min(runs)
        for kind, t, runs, nbytes, tc in (("forward", t_fwd, runs_fwd, fwd_bytes, t_cf),
                                          ("backward", t_bwd, runs_bwd, bwd_bytes, t_cb)):
            median = t
            if args.stat == "best":
                t, tc = min(runs), tc_best[kind]
            gbs = nbytes / t / 1e9
            rows.append(dict(case=name, dtype=c.dtype, T=T, N=c.N, D=c.D, R=R, kind=kind, ms=median * 1e3,
                             best_ms=min(runs) * 1e3, mb=nbytes / 1e6, gbs=gbs, pct=100 * gbs / bw["best"],
                             torch_ms=tc * 1e3, speedup=tc / t))
            print(f"{name:18s} {kind:8s} {median * 1e3:8.3f} ms (best {min(runs) * 1e3:.3f})  {nbytes / 1e6:7.1f} MB  "
                  f"{gbs:6.1f} GB/s {100 * gbs / bw['best']:5.0f} % BW   torch {tc * 1e3:8.2f} ms  x{tc / t:6.1f}",
                  flush=True)

    # On a machine whose bandwidth others share, one measurement can catch a slow moment and overstate the shares:
    # the table divides by the larger of the measurements before and after the cases.
    bw_after = measure_bandwidth(torch, args.bw_mb, 9)
    bw["before"], bw["after"] = bw["best"], bw_after["best"]
    if bw_after["best"] > bw["best"]:
        bw.update(copy=bw_after["copy"], triad=bw_after["triad"], best=bw_after["best"])
    for r in rows:
        r["pct"] = 100 * r["gbs"] / bw["best"]
    print(f"# memory bandwidth after the cases: copy {bw_after['copy']:.1f} GB/s, triad {bw_after['triad']:.1f} GB/s; "
          f"% BW in the table is relative to the larger, {bw['best']:.1f} GB/s")
    print()
    head = ["case", "dtype", "T", "N x D", "pass", "ms (median)", "best ms", "MB moved", "GB/s", "% BW", "torch ms",
            "x torch"]
    if args.stat == "best":
        head[-4:] = ["GB/s (best)", "% BW (best)", "torch best ms", "x torch (best)"]
    lines = []
    for r in rows:
        lines.append([r["case"], r["dtype"], str(r["T"]), f"{r['N']} x {r['D']}", r["kind"], f"{r['ms']:.3f}",
                      f"{r['best_ms']:.3f}", f"{r['mb']:.1f}", f"{r['gbs']:.1f}", f"{r['pct']:.0f}",
                      f"{r['torch_ms']:.2f}", f"{r['speedup']:.1f}"])
    if args.json_out:
        import json

        with open(args.json_out, "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "isa": {"detected": detected, "active": active}, "torch": torch.__version__,
                       "bandwidth": bw, "stat": args.stat, "rows": rows}, f, indent=1)
    if args.markdown:
        print(f"- {torch.get_num_threads()} threads, CPU ISA {active}, torch {torch.__version__}")
        print(f"- measured bandwidth: copy {bw['copy']:.1f} GB/s, triad {bw['triad']:.1f} GB/s "
              f"({torch.get_num_threads()} threads, {bw['array_mb']:.0f} MB arrays; the larger of {bw['before']:.1f} "
              f"before and {bw['after']:.1f} GB/s after the cases); GB/s, % BW and x torch from the {args.stat} time\n")
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" for _ in head) + "|")
        for ln in lines:
            print("| " + " | ".join(ln) + " |")
    else:
        widths = [max(len(h), *(len(ln[i]) for ln in lines)) for i, h in enumerate(head)]
        print("  ".join(h.ljust(wd) for h, wd in zip(head, widths)))
        for ln in lines:
            print("  ".join(v.ljust(wd) for v, wd in zip(ln, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
