#!/usr/bin/env python3
"""Forward benchmark of nsa_ops.npu_nsa_compress_attention on CPU (see bench/README.md).

For each case: time of our operator (median of runs after warm-up), useful GFLOP/s, share of the
machine's peak (bench/peak_probe), and the time of two baselines measured side by side in the same
process at the same thread count: (a) the plain PyTorch composition of the operator and (b)
torch.nn.functional.scaled_dot_product_attention (attention only), as is and with V zero-padded so
that torch's CPU flash kernel runs. Once per case our outputs are checked against a fp32 composition
closer to docs/spec/compress_attention.md §3 (max abs diff of attention_out, top-k agreement, statistics).

    .venv/bin/python bench/bench_forward.py                  # default cases
    .venv/bin/python bench/bench_forward.py --cases bench-8k --markdown
    .venv/bin/python bench/bench_forward.py --full           # + the seed example (T = 65536): slow
    .venv/bin/python bench/bench_forward.py --list
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

# ------------------------------------------------------------------------------------------------ cases
VARLEN = [1024, 2048, 3072, 4096]
CASES = {
    # One 8192-token sequence, C = floor((8192 - 32)/16) + 1 = 511, Sel = 128; G = 16.
    "bench-8k": bl.make_case("bench-8k", "bf16", [8192], N1=32, N2=2),
    "bench-8k-g1": bl.make_case("bench-8k-g1", "bf16", [8192], N1=8, N2=8),
    "bench-8k-fp16": bl.make_case("bench-8k-fp16", "fp16", [8192], N1=32, N2=2),
    "bench-8k-fp32": bl.make_case("bench-8k-fp32", "fp32", [8192], N1=32, N2=2),
    # Four sequences of 1k-4k tokens (C = 63, 127, 191, 255); masks built for the longest.
    "varlen-g16": bl.make_case("varlen-g16", "bf16", VARLEN, N1=32, N2=2),
    "varlen-g1": bl.make_case("varlen-g1", "bf16", VARLEN, N1=8, N2=8),
    # The seed example of torch_npu's documentation: query [65536, 64, 192], key [4096, 4, 192], value [4096, 4, 128], no masks.
    "seed-full": bl.make_case("seed-full", "bf16", [65536], N1=64, N2=4, masks=False, cmp_lens=[4096]),
}
DEFAULT_CASES = ["bench-8k", "bench-8k-g1", "varlen-g16", "varlen-g1", "bench-8k-fp32"]
FULL_CASES = ["seed-full"]


# ------------------------------------------------------------------------------------------------ check
def check(case: bl.Case, x: bl.Inputs, ours, row_chunk: int, full_rows_limit: int) -> dict:
    """Our outputs vs the fp32 composition (benchlib.composition(exact=True)).

    All rows when T <= full_rows_limit, else the first and last 1024 query rows of every batch.
    Figures: max |out - ref| (and the largest |ref|), the share of (row, KV head) top-k lists identical
    to the reference's, whether the others pick blocks of equal score (within 1e-4 relative: near-ties
    may order differently), indices in range and distinct, and the largest relative difference of
    softmax_max / softmax_sum.
    """
    out, topk, smax, ssum = ours
    ranges, rows = None, []
    q0s = [0] + x.seq_qlen[:-1]
    if case.T <= full_rows_limit:
        rows = list(range(case.T))
        sampled = "all rows"
    else:
        ranges = []
        for b, sq in enumerate(case.seq_lens):
            spans = [(0, min(1024, sq)), (max(0, sq - 1024), sq)]
            if spans[1][0] < spans[0][1]:
                spans = [(0, sq)]
            for a, e in spans:
                for r0 in range(a, e, row_chunk):
                    r1 = min(r0 + row_chunk, e)
                    ranges.append((b, r0, r1))
                    rows.extend(range(q0s[b] + r0, q0s[b] + r1))
        sampled = f"{len(rows)} of {case.T} rows (first/last 1024 per batch)"
    ref_out, ref_topk, ref_m, ref_l, ref_sc = bl.composition(case, x, row_chunk, exact=True, row_ranges=ranges)
    r = torch.tensor(rows, dtype=torch.long)
    o, ro = out[r].float(), ref_out[r].float()
    out_diff = float((o - ro).abs().max())
    ref_max = float(ro.abs().max())

    ti, rti, sc = topk[r].long(), ref_topk[r].long(), ref_sc[r]
    identical = (ti == rti).all(dim=-1)
    # Range: index < Sel_b of the row's batch.
    sel_of_row = torch.empty(case.T, dtype=torch.long)
    for b, sq in enumerate(case.seq_lens):
        sel_of_row[q0s[b]:q0s[b] + sq] = case.sel_lens[b]
    in_range = bool(((ti >= 0) & (ti < sel_of_row[r].view(-1, 1, 1))).all())
    distinct = bool((ti.sort(dim=-1).values.diff(dim=-1) != 0).all()) if case.K > 1 else True
    ours_s = sc.gather(-1, ti.clamp(0, sc.shape[-1] - 1))
    ref_s = sc.gather(-1, rti)
    gap = (ours_s - ref_s).abs() / ref_s.abs().clamp(min=1.0)
    gap = torch.where(ours_s == ref_s, torch.zeros_like(gap), gap)  # FLT_MAX == FLT_MAX
    equal_score = (gap <= 1e-4).all(dim=-1)

    # Statistics: the per-batch layout of docs/spec/compress_attention.md §4, first of the 8 copies.
    def dense(stats):
        flat, parts = stats.reshape(-1), []
        for b, sq in enumerate(case.seq_lens):
            base = 8 * case.N1 * q0s[b]
            parts.append(flat[base:base + 8 * case.N1 * sq].view(case.N1, sq, 8)[:, :, 0].t())
        return torch.cat(parts, dim=0)

    def rel(a, b):
        d = (a - b).abs() / b.abs().clamp(min=1.0)
        return float(torch.where(a == b, torch.zeros_like(d), d).max())

    m_diff = rel(dense(smax)[r], ref_m[r])
    l_diff = rel(dense(ssum)[r], ref_l[r])
    res = {
        "rows": sampled,
        "out_max_abs_diff": out_diff,
        "out_ref_max_abs": ref_max,
        "topk_identical": float(identical.float().mean()),
        "topk_equal_score": float(equal_score.float().mean()),
        "topk_in_range": in_range,
        "topk_distinct": distinct,
        "softmax_max_rel_diff": m_diff,
        "softmax_sum_rel_diff": l_diff,
    }
    # attention_out: a loose bound (4 units of the dtype's epsilon at the largest |ref|) that catches
    # wrong results, not the last rounding difference (tests/ hold the tight tolerances).
    out_tol = 4 * torch.finfo(case.torch_dtype).eps * max(1.0, ref_max)
    res["out_tol"] = out_tol
    ok = (out_diff <= out_tol and in_range and distinct and res["topk_equal_score"] == 1.0 and m_diff < 1e-4
          and l_diff < 1e-4)
    res["ok"] = ok
    res["summary"] = (f"out max|diff| {out_diff:.3g} (|ref| <= {ref_max:.3g}, bound {out_tol:.2g}); top-k identical "
                      f"{100 * res['topk_identical']:.2f}%, equal-score {100 * res['topk_equal_score']:.2f}%"
                      f"{'' if in_range and distinct else ', BAD INDICES'}; stats rel diff max {m_diff:.2g}, "
                      f"sum {l_diff:.2g} [{sampled}] -> {'OK' if ok else 'MISMATCH'}")
    return res


# ------------------------------------------------------------------------------------------------ main
fmt_ms = bl.fmt_ms


def fmt_ratio(base, ours):
    return "-" if base is None or not ours else f"{base / ours:.1f}x"


def run_case(case: bl.Case, args, nsa_ops, peak: bl.Peak) -> dict:
    t0 = time.perf_counter()
    x = bl.make_inputs(case, args.seed)
    flop = bl.useful_flop(case, x.atten_mask)
    dflop = bl.dense_flop(case)
    chunk = bl.rows_per_chunk(case, args.chunk_mb)
    chunked = chunk < max(case.seq_lens)
    print(f"\n== {case.name} ({case.dtype}): {case.shape_str()}", flush=True)
    print(f"   useful {flop / 1e9:.1f} GFLOP (dense {dflop / 1e9:.1f}); inputs made in "
          f"{time.perf_counter() - t0:.1f} s" + (f"; baselines chunked by {chunk} query rows "
                                                 f"(score block <= {args.chunk_mb:.0f} MB)" if chunked else ""),
          flush=True)

    def ours_fn():
        return nsa_ops.npu_nsa_compress_attention(
            x.query, x.key, x.value, x.scale, case.N1, case.l, case.d, case.lp, case.K,
            topk_mask=x.topk_mask, atten_mask=x.atten_mask, actual_seq_qlen=x.seq_qlen,
            actual_cmp_seq_kvlen=x.cmp_kvlen, actual_sel_seq_kvlen=x.sel_kvlen)

    # First call: a warm-up whose result is checked.
    t1 = time.perf_counter()
    first = ours_fn()
    first_s = time.perf_counter() - t1
    chk = None
    if not args.no_check:
        chk = check(case, x, first, chunk, args.full_check_rows)
        print(f"   check: {chk['summary']}", flush=True)
    del first
    t_ours = bl.time_fn(ours_fn, max(0, args.warmup - 1), args.repeat, args.budget)
    gflops = flop / t_ours.median / 1e9
    share = gflops / peak.for_dtype(case.torch_dtype)
    print(f"   ours:        {fmt_ms(t_ours.median):>9} ms  {gflops:7.1f} GFLOP/s  {100 * share:5.1f}% of peak "
          f"(runs {', '.join(f'{r * 1e3:.1f}' for r in t_ours.runs)} ms; first call {first_s * 1e3:.1f} ms)",
          flush=True)

    res = {"case": case.name, "dtype": case.dtype, "shape": case.shape_str(), "useful_gflop": flop / 1e9,
           "dense_gflop": dflop / 1e9, "ours_s": t_ours.median, "ours_runs_s": t_ours.runs,
           "gflops": gflops, "peak_share": share, "chunk_rows": chunk if chunked else None, "check": chk}
    baselines = []
    if not args.no_composition:
        baselines.append(("composition", lambda: bl.composition(case, x, chunk)))
    if not args.no_sdpa:
        baselines.append(("sdpa", lambda: bl.sdpa(case, x, chunk)))
    if not args.no_flash:
        baselines.append(("sdpa_flash_padv", lambda: bl.sdpa(case, x, None, pad_v=True)))
    for name, fn in baselines:
        try:
            t = bl.time_fn(fn, args.warmup, args.repeat, args.budget)
            res[name + "_s"] = t.median
            res[name + "_runs_s"] = t.runs
            print(f"   {name + ':':<17}{fmt_ms(t.median):>8} ms  ours is {t.median / t_ours.median:5.1f}x faster "
                  f"({flop / t.median / 1e9:.1f} useful GFLOP/s)", flush=True)
        except Exception as e:  # e.g. out of memory, or a kernel torch does not have
            res[name + "_s"] = None
            res[name + "_error"] = f"{type(e).__name__}: {e}"
            print(f"   {name}: failed ({type(e).__name__}: {str(e)[:200]})", flush=True)
    return res


def table(results, peak: bl.Peak, markdown: bool) -> str:
    head = ["case", "dtype", "useful GFLOP", "ours ms", "GFLOP/s", "% peak", "composition ms", "vs comp.",
            "SDPA ms", "vs SDPA", "SDPA flash (V padded) ms", "vs flash", "check"]
    rows = []
    for r in results:
        chk = r.get("check")
        rows.append([r["case"], r["dtype"], f"{r['useful_gflop']:.1f}", fmt_ms(r["ours_s"]), f"{r['gflops']:.1f}",
                     f"{100 * r['peak_share']:.1f}",
                     fmt_ms(r.get("composition_s")), fmt_ratio(r.get("composition_s"), r["ours_s"]),
                     fmt_ms(r.get("sdpa_s")), fmt_ratio(r.get("sdpa_s"), r["ours_s"]),
                     fmt_ms(r.get("sdpa_flash_padv_s")), fmt_ratio(r.get("sdpa_flash_padv_s"), r["ours_s"]),
                     "-" if chk is None else ("OK" if chk["ok"] else "MISMATCH")])
    return bl.render_table(head, rows, markdown)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="add the full seed example (seed-full; slow)")
    ap.add_argument("--full-check-rows", type=int, default=16384,
                    help="check every row when T is at most this, else a sample (default 16384)")
    ap.add_argument("--no-sdpa", action="store_true", help="skip baseline (b), SDPA as is")
    ap.add_argument("--no-flash", action="store_true", help="skip baseline (b'), SDPA flash with V padded")
    bl.add_common_arguments(ap, "method", "skip baseline (a), the PyTorch composition")
    args = ap.parse_args(argv)

    if args.list:
        return bl.list_cases(CASES, lambda name: "default" if name in DEFAULT_CASES else
                             ("--full" if name in FULL_CASES else ""))
    names = bl.case_names(args.cases, CASES, DEFAULT_CASES, FULL_CASES if args.full else ())
    if names is None:
        return 2
    _, nsa_ops, peak, header = bl.start(args, "method")
    results = [run_case(CASES[n], args, nsa_ops, peak) for n in names]
    return bl.finish(args, header, peak, results, table(results, peak, args.markdown),
                     "useful GFLOP = 2 * N1 * (D + D2) * (query, compressed token) pairs not removed by atten_mask "
                     "(fully masked rows count 0); % peak against the bf16 peak for bf16, the fp32 FMA peak "
                     "otherwise; 'vs X' = time of X / our time.")


if __name__ == "__main__":
    sys.exit(main())
