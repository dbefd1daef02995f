#!/usr/bin/env python3
"""The seed example of torch_npu's documentation, on CPU (see bench/README.md).

    query [65536, 64, 192], key [4096, 4, 192], value [4096, 4, 128], bf16, scale 1/sqrt(192),
    l = 32, d = 16, l' = 64, K = 16, actual_seq_qlen = [65536], actual_cmp_seq_kvlen = [4096],
    actual_sel_seq_kvlen = [1024], no masks; seeded standard-normal inputs.

Prints the output shapes and dtypes, a checksum of each output, the time, the useful GFLOP/s and the
share of the machine's bf16 peak. `--tokens N` runs a reduced size: T = N query tokens with C = N/16
compressed tokens (the example's ratio) and Sel = ceil(C/4).

Size by default (DEFAULT_TOKENS below, or the environment variable NSA_SEED_TOKENS): "auto" times a
small calibration call and runs the full size when it is estimated to take under --time-limit seconds
(60), else the largest power-of-two T that is; "full" always runs the full size; a number runs that T.

    .venv/bin/python bench/seed_example.py              # default size (full; see DEFAULT_TOKENS)
    .venv/bin/python bench/seed_example.py --full       # full size whatever it costs
    .venv/bin/python bench/seed_example.py --tokens 8192
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

# The default size: "auto", "full" or a token count. "full": the full example takes about 15 s on the
# project's 2-core machine (README, Performance).
DEFAULT_TOKENS = "full"

FULL_T, FULL_C = 65536, 4096
N1, N2, D, D2 = 64, 4, 192, 128
L, STRIDE, LP, K = 32, 16, 64, 16
CAL_T = 2048          # calibration size of "auto" (C = 128)
MIN_T = 1024          # Sel = ceil((T/16)/4) must be >= K = 16


def sizes(T: int) -> tuple[int, int]:
    """(C, Sel) for T query tokens: the example's C = T/16 (4096 for 65536), Sel = ceil(C/4)."""
    C = FULL_C if T == FULL_T else T // 16
    return C, -(-C // (LP // STRIDE))


def make_inputs(T: int, dtype: torch.dtype, seed: int):
    C, _ = sizes(T)
    torch.manual_seed(seed)
    q = torch.randn(T, N1, D, dtype=dtype)
    k = torch.randn(C, N2, D, dtype=dtype)
    v = torch.randn(C, N2, D2, dtype=dtype)
    return q, k, v


def call(nsa_ops, q, k, v):
    T, C = q.shape[0], k.shape[0]
    _, Sel = sizes(T)
    return nsa_ops.npu_nsa_compress_attention(
        q, k, v, 1.0 / math.sqrt(D), N1, L, STRIDE, LP, K,
        actual_seq_qlen=[T], actual_cmp_seq_kvlen=[C], actual_sel_seq_kvlen=[Sel])


def checksum(t: torch.Tensor) -> str:
    """sum and sum of |x| in float64 (NaN/inf left out and counted; ints: int64 sums), and the first 16
    hex digits of sha256 of the bytes (equal across thread counts: every output element has one writer)."""
    t = t.contiguous()
    digest = hashlib.sha256(t.view(torch.uint8).numpy()).hexdigest()[:16]
    if t.dtype.is_floating_point:
        # In chunks through NumPy: torch's bf16 -> float64 reductions are ~10x slower on this CPU.
        total = abs_total = 0.0
        nonfinite = 0
        for chunk in t.reshape(-1).split(1 << 22):
            x = chunk.float().numpy()
            total += float(np.sum(x, dtype=np.float64))
            abs_total += float(np.sum(np.abs(x), dtype=np.float64))
            nonfinite += x.size - int(np.count_nonzero(np.isfinite(x)))
        s = f"sum={total:.6e} abs_sum={abs_total:.6e}"
        if nonfinite:
            s += f" NONFINITE={nonfinite}"
    else:
        x = t.long()
        weights = torch.arange(x.shape[-1], dtype=torch.long) + 1  # order-sensitive
        s = f"sum={int(x.sum())} weighted_sum={int((x * weights).sum())}"
    return f"{s} sha256[:16]={digest}"


def choose_tokens(spec: str, nsa_ops, dtype, seed: int, limit: float) -> tuple[int, str]:
    spec = spec.strip().lower()
    if spec == "full":
        return FULL_T, "full size"
    if spec != "auto":
        T = int(spec)
        if T < MIN_T:
            raise SystemExit(f"--tokens must be >= {MIN_T} (K = {K} needs Sel = ceil(T/64) >= {K}), got {T}")
        return T, f"--tokens {T}" if T != FULL_T else "full size"
    q, k, v = make_inputs(CAL_T, dtype, seed)
    call(nsa_ops, q, k, v)  # warm-up
    t0 = time.perf_counter()
    call(nsa_ops, q, k, v)
    t_cal = time.perf_counter() - t0
    work_cal = CAL_T * sizes(CAL_T)[0]

    def est(T):
        return t_cal * T * sizes(T)[0] / work_cal

    why = f"auto: T={CAL_T} took {t_cal * 1e3:.1f} ms -> full size estimated {est(FULL_T):.0f} s"
    if est(FULL_T) <= limit:
        return FULL_T, why + f" <= {limit:.0f} s: full size"
    T = FULL_T // 2
    while T > CAL_T and est(T) > limit:
        T //= 2
    return T, why + f" > {limit:.0f} s: T={T} (estimated {est(T):.0f} s; --full for the full size)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = os.environ.get("NSA_SEED_TOKENS", DEFAULT_TOKENS)
    ap.add_argument("--tokens", default=default,
                    help=f"query tokens: auto, full or a number >= {MIN_T} (default {default!r})")
    ap.add_argument("--full", action="store_true", help="the full size (T = 65536), same as --tokens full")
    ap.add_argument("--time-limit", type=float, default=60.0, help="auto: the largest estimated time (s)")
    ap.add_argument("--dtype", choices=list(bl.DTYPES), default="bf16", help="input dtype (the example: bf16)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed runs at the chosen size first (default 0)")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs, median reported (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (torch.manual_seed)")
    ap.add_argument("--peak-json", help="read the peak from a saved `peak_probe --json` output")
    ap.add_argument("--no-probe", action="store_true", help="do not run peak_probe (use nominal peaks)")
    ap.add_argument("--fresh-peak", action="store_true",
                    help="use this run's probe only, not the best of earlier runs (build/bench/peak_cache.json)")
    args = ap.parse_args(argv)
    if args.full:
        args.tokens = "full"

    threads = bl.set_threads(args.threads)
    nsa_ops = bl.import_nsa_ops()
    dtype = bl.DTYPES[args.dtype]
    peak = bl.get_peak(threads, args.peak_json, not args.no_probe, use_cache=not args.fresh_peak)
    print(f"NSA compressed attention: the seed example of torch_npu's documentation on CPU (nsa_ops {bl.git_describe()}, torch "
          f"{torch.__version__}, {threads} threads, {bl.isa_str(nsa_ops)})")
    print(peak.describe())

    T, why = choose_tokens(args.tokens, nsa_ops, dtype, args.seed, args.time_limit)
    C, Sel = sizes(T)
    print(f"size: {why}")
    t0 = time.perf_counter()
    q, k, v = make_inputs(T, dtype, args.seed)
    print(f"inputs (seed {args.seed}, made in {time.perf_counter() - t0:.1f} s): query {list(q.shape)}, "
          f"key {list(k.shape)}, value {list(v.shape)}, {dtype}; scale_value = 1/sqrt({D}), head_num = {N1}, "
          f"compress_block_size = {L}, compress_stride = {STRIDE}, select_block_size = {LP}, "
          f"select_block_count = {K}, actual_seq_qlen = [{T}], actual_cmp_seq_kvlen = [{C}], "
          f"actual_sel_seq_kvlen = [{Sel}], no masks")

    sq, sk, sv = make_inputs(MIN_T, dtype, args.seed)  # load/initialise everything on a small call
    call(nsa_ops, sq, sk, sv)
    del sq, sk, sv
    for _ in range(args.warmup):
        call(nsa_ops, q, k, v)
    times, outs = [], None
    for _ in range(max(1, args.repeat)):
        outs = None
        t0 = time.perf_counter()
        outs = call(nsa_ops, q, k, v)
        times.append(time.perf_counter() - t0)
    t = sorted(times)[len(times) // 2]

    names = ["attention_out", "topk_indices", "softmax_max", "softmax_sum"]
    print("outputs:")
    t0 = time.perf_counter()
    for name, o in zip(names, outs):
        print(f"  {name:<14} {str(list(o.shape)):<17} {str(o.dtype):<15} {checksum(o)}")
    print(f"  (checksums in {time.perf_counter() - t0:.1f} s)")
    flop = 2.0 * N1 * (D + D2) * T * C  # no mask: every (query, compressed token) pair is visible
    gflops = flop / t / 1e9
    print(f"time: {t:.3f} s" + (f" (median of {len(times)}: {', '.join(f'{x:.3f}' for x in times)})"
                                if len(times) > 1 else "") +
          f"; useful {flop / 1e12:.2f} TFLOP = 2*N1*(D+D2)*T*C -> {gflops:.1f} GFLOP/s, "
          f"{100 * gflops / peak.for_dtype(dtype):.1f}% of the {'bf16' if dtype == torch.bfloat16 else 'fp32'} "
          f"peak ({peak.for_dtype(dtype):.0f} GFLOP/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
