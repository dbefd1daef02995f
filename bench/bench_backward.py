#!/usr/bin/env python3
"""Backward benchmark of nsa_ops (docs/spec/compress_attention.md §7 gradients) on CPU (see bench/README.md, "Backward").

For each case: the time of our backward (torch.autograd.grad through nsa_ops.npu_nsa_compress_attention,
the graph kept between runs) and of forward + backward, their useful GFLOP/s and share of the machine's
peak, and the same two times for PyTorch autograd through the plain composition of the attention
(matmul, masked_fill(-FLT_MAX), softmax, P cast to the dtype, matmul), measured side by side in the same
process at the same thread count. Once per case our gradients are compared with the fp32 composition's.

    .venv/bin/python bench/bench_backward.py                       # bench-8k and varlen
    .venv/bin/python bench/bench_backward.py --markdown --repeat 7
    .venv/bin/python bench/bench_backward.py --cases bench-8k-fp32 --threads 1
    .venv/bin/python bench/bench_backward.py --list
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

FLT_MAX = bl.FLT_MAX

# ------------------------------------------------------------------------------------------------ cases
VARLEN = [1024, 2048, 3072, 4096]
CASES = {
    # One 8192-token sequence, C = 511; N1 = 32, N2 = 2 (G = 16); docs/spec/compress_attention.md §9 causal masks.
    "bench-8k": bl.make_case("bench-8k", "bf16", [8192], N1=32, N2=2),
    # Four causal sequences of 1k-4k tokens (C = 63, 127, 191, 255), masks built for the longest.
    "varlen": bl.make_case("varlen", "bf16", VARLEN, N1=32, N2=2),
    "bench-8k-fp16": bl.make_case("bench-8k-fp16", "fp16", [8192], N1=32, N2=2),
    "bench-8k-fp32": bl.make_case("bench-8k-fp32", "fp32", [8192], N1=32, N2=2),
    "bench-8k-g1": bl.make_case("bench-8k-g1", "bf16", [8192], N1=8, N2=8),
}
DEFAULT_CASES = ["bench-8k", "varlen"]


def flop_counts(case: bl.Case, atten_mask) -> tuple[float, float]:
    """(backward, forward) useful FLOP: 2 * N1 * (3D + 2D2) and 2 * N1 * (D + D2) per visible (query,
    compressed token) pair (benchlib.visible_pairs: fully masked rows count 0). The backward's five products
    per pair: S = q.k (D), dP = dO.v (D2), dV += P dO (D2), dK += dS q (D), dQ += dS k (D)."""
    pairs = bl.visible_pairs(case, atten_mask)
    return 2.0 * case.N1 * (3 * case.D + 2 * case.D2) * pairs, 2.0 * case.N1 * (case.D + case.D2) * pairs


# ------------------------------------------------------------------------------------------------ baseline
def composition_attention(case: bl.Case, x: bl.Inputs, q, k, v, row_chunk: int, exact: bool = False):
    """attention_out as plain differentiable PyTorch, per batch and chunk of query rows (q viewed
    [N2, rows*G, D], the G heads of a group stacked): S = matmul in the input dtype, .float() * scale,
    masked_fill(atten_mask, -FLT_MAX), softmax in fp32, P cast to the dtype, matmul with V.

    A fully masked row (docs/spec/compress_attention.md §5) gets P = 1/C from the softmax (every score is -FLT_MAX): its output is the
    mean of V, and masked_fill makes its scores constants, so autograd gives it dV = dO / C and zero dQ/dK:
    exactly docs/spec/compress_attention.md §7. exact=True: the same in fp32 from upcast inputs, P not rounded (the check's reference).
    """
    dt = q.dtype
    N2, G, D2 = case.N2, case.G, case.D2
    if exact:
        q, k, v = q.float(), k.float(), v.float()
    pieces = []
    q0s = [0] + x.seq_qlen[:-1]
    c0s = [0] + x.cmp_kvlen[:-1]
    for b, sq in enumerate(case.seq_lens):
        C, q0, c0 = case.cmp_lens[b], q0s[b], c0s[b]
        kT = k[c0:c0 + C].permute(1, 2, 0)  # [N2, D, C]
        vv = v[c0:c0 + C].permute(1, 0, 2)  # [N2, C, D2]
        for r0 in range(0, sq, row_chunk):
            r1 = min(r0 + row_chunk, sq)
            R = r1 - r0
            qh = q[q0 + r0:q0 + r1].reshape(R, N2, G, -1).permute(1, 0, 2, 3).reshape(N2, R * G, -1)
            S = torch.matmul(qh, kT).float() * x.scale
            S = S.view(N2, R, G, C)
            if x.atten_mask is not None:
                S = S.masked_fill(x.atten_mask[r0:r1, :C].bool().view(1, R, 1, C), -FLT_MAX)
            P = torch.softmax(S, dim=-1)
            if not exact:
                P = P.to(dt)
            O = torch.matmul(P.view(N2, R * G, C), vv)
            pieces.append(O.view(N2, R, G, D2).permute(1, 0, 2, 3).reshape(R, case.N1, D2))
    # the rows of a batch after each other, batches in order: the TND order of attention_out
    return torch.cat(pieces, dim=0)


# ------------------------------------------------------------------------------------------------ timing
# ------------------------------------------------------------------------------------------------ main
fmt_ms = bl.fmt_ms


def run_case(case: bl.Case, args, nsa_ops, peak: bl.Peak, threads: int) -> dict:
    t0 = time.perf_counter()
    x = bl.make_inputs(case, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    dout = torch.randn(case.T, case.N1, case.D2, generator=g, dtype=case.torch_dtype)
    bwd_flop, fwd_flop = flop_counts(case, x.atten_mask)
    chunk = bl.rows_per_chunk(case, args.chunk_mb)
    pk = peak.for_dtype(case.torch_dtype)
    print(f"\n== {case.name} ({case.dtype}): {case.shape_str()}", flush=True)
    print(f"   useful GFLOP: backward {bwd_flop / 1e9:.1f}, forward {fwd_flop / 1e9:.1f}; inputs made in "
          f"{time.perf_counter() - t0:.1f} s" + (f"; composition chunked by {chunk} query rows"
                                                 if chunk < max(case.seq_lens) else ""), flush=True)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x.query, x.key, x.value)]

    def ours_forward():
        return nsa_ops.npu_nsa_compress_attention(
            *leaves, x.scale, case.N1, case.l, case.d, case.lp, case.K, topk_mask=x.topk_mask,
            atten_mask=x.atten_mask, actual_seq_qlen=x.seq_qlen, actual_cmp_seq_kvlen=x.cmp_kvlen,
            actual_sel_seq_kvlen=x.sel_kvlen)[0]

    def comp_forward(exact=False):
        return composition_attention(case, x, *leaves, chunk, exact=exact)

    res = {"case": case.name, "dtype": case.dtype, "shape": case.shape_str(), "bwd_gflop": bwd_flop / 1e9,
           "fwd_gflop": fwd_flop / 1e9, "threads": threads}

    # Ours: backward alone on a kept graph, then forward + backward.
    out = ours_forward()
    ours_grads = torch.autograd.grad(out, leaves, dout, retain_graph=True)
    t_bwd = bl.time_fn(lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True), max(0, args.warmup - 1),
                       args.repeat, args.budget, threads)
    del out
    t_all = bl.time_fn(lambda: torch.autograd.grad(ours_forward(), leaves, dout), args.warmup, args.repeat,
                       args.budget, threads)
    for name, t, fl in (("bwd", t_bwd, bwd_flop), ("fwd_bwd", t_all, bwd_flop + fwd_flop)):
        res[f"ours_{name}_s"] = t.median
        res[f"ours_{name}_runs_s"] = t.runs
        res[f"ours_{name}_cpu_per_thread_s"] = t.cpu_per_thread
        res[f"ours_{name}_gflops"] = fl / t.median / 1e9
        res[f"ours_{name}_peak_share"] = fl / t.median / 1e9 / pk
        print(f"   ours {name + ':':<9}{fmt_ms(t.median):>8} ms  {fl / t.median / 1e9:7.1f} GFLOP/s  "
              f"{100 * fl / t.median / 1e9 / pk:5.1f}% of peak  (runs {', '.join(f'{r * 1e3:.0f}' for r in t.runs)} ms;"
              f" CPU time per thread {t.cpu_per_thread * 1e3:.0f} ms)", flush=True)

    # Check: our gradients against the fp32 composition's (all rows), relative to each gradient's largest value.
    chk = None
    if not args.no_check:
        ref = torch.autograd.grad(comp_forward(exact=True), leaves, dout.float())
        worst, parts = 0.0, []
        for name, a, r in zip(("dq", "dk", "dv"), ours_grads, ref):
            rel = float((a.float() - r).abs().max()) / max(float(r.abs().max()), 1e-30)
            worst = max(worst, rel)
            parts.append(f"{name} {rel:.2e}")
        # two units of the dtype's epsilon (the output rounding, P and dS rounded to bf16 on the pair path) plus
        # 1e-5 for fp32 sums in another order; catches wrong results, not last-bit differences (tests/ do that)
        bound = 2 * torch.finfo(case.torch_dtype).eps + 1e-5
        chk = {"max_rel_to_max": worst, "bound": bound, "ok": worst <= bound,
               "summary": "max |ours - fp32 composition| / max |ref|: " + ", ".join(parts)
                          + f" (bound {bound:.2g}) -> {'OK' if worst <= bound else 'MISMATCH'}"}
        print(f"   check: {chk['summary']}", flush=True)
        del ref
    res["check"] = chk
    del ours_grads

    # PyTorch autograd through the plain composition, same inputs, same threads.
    if not args.no_composition:
        try:
            out = comp_forward()
            t_cbwd = bl.time_fn(lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True), args.warmup,
                                args.repeat, args.budget, threads)
            del out
            t_call = bl.time_fn(lambda: torch.autograd.grad(comp_forward(), leaves, dout), args.warmup,
                                args.repeat, args.budget, threads)
            for name, t, ours in (("bwd", t_cbwd, t_bwd), ("fwd_bwd", t_call, t_all)):
                res[f"torch_{name}_s"] = t.median
                res[f"torch_{name}_runs_s"] = t.runs
                res[f"torch_{name}_cpu_per_thread_s"] = t.cpu_per_thread
                print(f"   torch {name + ':':<8}{fmt_ms(t.median):>8} ms  ours is {t.median / ours.median:5.1f}x faster "
                      f"(runs {', '.join(f'{r * 1e3:.0f}' for r in t.runs)} ms; CPU time per thread "
                      f"{t.cpu_per_thread * 1e3:.0f} ms, ratio {t.cpu_per_thread / ours.cpu_per_thread:.1f}x)",
                      flush=True)
        except Exception as e:  # e.g. out of memory
            res["torch_error"] = f"{type(e).__name__}: {e}"
            print(f"   torch composition: failed ({type(e).__name__}: {str(e)[:200]})", flush=True)
    return res


def table(results, markdown: bool) -> str:
    head = ["case", "dtype", "bwd GFLOP", "bwd ms", "bwd GFLOP/s", "bwd % peak", "fwd+bwd ms", "fwd+bwd GFLOP/s",
            "fwd+bwd % peak", "torch bwd ms", "vs torch bwd", "torch fwd+bwd ms", "vs torch fwd+bwd", "check"]
    rows = []
    for r in results:
        def ratio(name):
            t = r.get(f"torch_{name}_s")
            return "-" if t is None else f"{t / r[f'ours_{name}_s']:.1f}x"
        chk = r.get("check")
        rows.append([r["case"], r["dtype"], f"{r['bwd_gflop']:.1f}", fmt_ms(r["ours_bwd_s"]),
                     f"{r['ours_bwd_gflops']:.0f}", f"{100 * r['ours_bwd_peak_share']:.1f}", fmt_ms(r["ours_fwd_bwd_s"]),
                     f"{r['ours_fwd_bwd_gflops']:.0f}", f"{100 * r['ours_fwd_bwd_peak_share']:.1f}",
                     fmt_ms(r.get("torch_bwd_s")), ratio("bwd"), fmt_ms(r.get("torch_fwd_bwd_s")), ratio("fwd_bwd"),
                     "-" if chk is None else ("OK" if chk["ok"] else "MISMATCH")])
    return bl.render_table(head, rows, markdown)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.add_common_arguments(ap, "measurement", "skip the PyTorch autograd baseline")
    args = ap.parse_args(argv)
    if args.list:
        return bl.list_cases(CASES, lambda name: "default" if name in DEFAULT_CASES else "")
    names = bl.case_names(args.cases, CASES, DEFAULT_CASES)
    if names is None:
        return 2
    threads, nsa_ops, peak, header = bl.start(args, "measurement", "; CPU time per thread printed beside")
    results = [run_case(CASES[n], args, nsa_ops, peak, threads) for n in names]
    return bl.finish(args, header, peak, results, table(results, args.markdown),
                     "useful GFLOP: backward 2 * N1 * (3D + 2D2), forward 2 * N1 * (D + D2) per (query, compressed "
                     "token) pair not removed by atten_mask (fully masked rows count 0); % peak against the bf16 peak "
                     "for bf16, the fp32 FMA peak otherwise; 'vs torch' = time of PyTorch autograd through the plain "
                     "composition / our time.")


if __name__ == "__main__":
    sys.exit(main())
