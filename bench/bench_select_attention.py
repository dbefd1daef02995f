#!/usr/bin/env python3
"""Benchmark of selected attention (nsa_ops.npu_nsa_select_attention and its backward) on CPU; see bench/README.md,
section "Selected attention".

For each case: our forward, our backward (torch.autograd.grad through the drop-in, the graph kept between runs) and
forward + backward, their useful GFLOP/s and share of the machine's peak, side by side (same process, same thread
count) with
  (a) the plain PyTorch composition: per chunk of query rows, the selected blocks' keys and values gathered
      ([rows, N2, K l', D]), S = (q @ k^T).float() * scale, masked_fill(invisible, -FLT_MAX), softmax in fp32,
      P.to(dtype) @ v; its autograd for the backward;
  (b) torch's scaled_dot_product_attention with the equivalent boolean mask (query row t, head h attends to the key
      positions its KV head selected, causal), per chunk of query rows (with D != Dv torch takes its math path);
  (c) dense causal SDPA at the same T (flash: V zero-padded to D so that torch's CPU flash kernel runs), the
      attention that selected attention replaces.
The indices are those of the NSA pipeline on the same inputs: keys and values compressed (nsa_ops.compress with a
mean-pooling weight where the operator exists, else mean pooling in PyTorch; l = 32, d = 16), then
nsa_ops.compress_attention with the causal masks of docs/spec/compress_attention.md §9 (make_atten_mask,
make_topk_mask) returns topk_indices [T, N2, K].

    .venv/bin/python bench/bench_select_attention.py                 # bench-8k and bench-8k-g1
    .venv/bin/python bench/bench_select_attention.py --markdown --repeat 7
    .venv/bin/python bench/bench_select_attention.py --cases bench-2k --threads 1
    .venv/bin/python bench/bench_select_attention.py --list
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402

FLT_MAX = torch.finfo(torch.float32).max


@dataclasses.dataclass
class Case:
    name: str
    dtype: str
    T: int        # tokens of the single sequence (queries = keys = values: self-attention)
    N1: int
    N2: int
    D: int = 192
    Dv: int = 128
    lp: int = 64  # select_block_size l'
    K: int = 16   # select_block_count
    l: int = 32   # compress_block_size (the indices' pipeline)
    d: int = 16   # compress_stride

    @property
    def G(self) -> int:
        return self.N1 // self.N2

    def shape_str(self) -> str:
        return (f"T={self.T} N1={self.N1} N2={self.N2} D={self.D} Dv={self.Dv} l'={self.lp} K={self.K} causal "
                f"(indices: compress l={self.l} d={self.d} + compress_attention with the §9 masks)")


CASES = {
    "bench-8k": Case("bench-8k", "bf16", 8192, 32, 2),
    "bench-8k-g1": Case("bench-8k-g1", "bf16", 8192, 8, 8),
    "bench-2k": Case("bench-2k", "bf16", 2048, 32, 2),
    "bench-8k-fp32": Case("bench-8k-fp32", "fp32", 8192, 32, 2),
}
DEFAULT_CASES = ["bench-8k", "bench-8k-g1"]


# ------------------------------------------------------------------------------------------------ inputs
@dataclasses.dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    idx: torch.Tensor       # [T, N2, K] int32 from compress_attention
    scale: float
    mask: torch.Tensor      # the §9 atten_mask of compress_attention; passed to select attention as its switch
    pairs: int              # visible (query row, head, key) entries: sum over (t, h) of |E(t, h // G)|
    vis: torch.Tensor       # [T, N2, K l'] visibility of each slot position (§3)
    pos: torch.Tensor       # [T, N2, K l'] key position of each slot position (clamped)


def make_inputs(case: Case, seed: int, nsa_ops) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    dt = bl.DTYPES[case.dtype]
    T, N1, N2, D, Dv, l, d, lp, K = case.T, case.N1, case.N2, case.D, case.Dv, case.l, case.d, case.lp, case.K
    q = torch.randn(T, N1, D, generator=g, dtype=dt)
    k = torch.randn(T, N2, D, generator=g, dtype=dt)
    v = torch.randn(T, N2, Dv, generator=g, dtype=dt)
    C = (T - l) // d + 1
    if hasattr(nsa_ops, "compress"):  # the NSA pipeline's own compression, with a mean-pooling weight
        kc = nsa_ops.compress(k, torch.full((l, N2), 1.0 / l, dtype=dt), cu_seqlens=[0, T], compress_block_size=l,
                              compress_stride=d).output
        vc = nsa_ops.compress(v, torch.full((l, N2), 1.0 / l, dtype=dt), cu_seqlens=[0, T], compress_block_size=l,
                              compress_stride=d).output
    else:
        win = torch.arange(C).unsqueeze(1) * d + torch.arange(l)
        kc = k.float()[win].mean(dim=1).to(dt)
        vc = v.float()[win].mean(dim=1).to(dt)
    sel = -(-C // (lp // d))
    am = nsa_ops.make_atten_mask(T, C, l, d)
    tm = nsa_ops.make_topk_mask(T, sel, lp)
    scale = 1.0 / math.sqrt(D)
    idx = nsa_ops.compress_attention(q, kc, vc, cu_seqlens_q=[0, T], cu_seqlens_cmp=[0, C], compress_block_size=l,
                                     compress_stride=d, select_block_size=lp, select_block_count=K, scale=scale,
                                     atten_mask=am, topk_mask=tm).topk_indices
    pos = idx.long().unsqueeze(-1) * lp + torch.arange(lp)
    vis = (idx.long().unsqueeze(-1) >= 0) & (pos < T) & (pos <= torch.arange(T).view(T, 1, 1, 1))
    pos, vis = pos.clamp(0, T - 1).reshape(T, N2, K * lp), vis.reshape(T, N2, K * lp)
    return Inputs(q, k, v, idx, scale, am, int(vis.sum()) * case.G, vis, pos)


# ------------------------------------------------------------------------------------------------ baselines
# Each baseline computes the rows [r0, r1) of attention_out from q (those rows only), k and v; the driver loops over
# chunks of rows (so that the gathered blocks, the scores and, for the backward, the autograd graph of one chunk
# are alive at a time).
def composition_rows(case: Case, x: Inputs, q, k, v, r0: int, r1: int) -> torch.Tensor:
    """The plain PyTorch composition (module doc, (a)) for query rows [r0, r1); q holds those rows."""
    N2, G, D, Dv, E = case.N2, case.G, case.D, case.Dv, case.K * case.lp
    R = r1 - r0
    heads = torch.arange(N2).view(1, N2, 1)
    kg = k[x.pos[r0:r1], heads].reshape(R * N2, E, D)                        # gathered keys
    vg = v[x.pos[r0:r1], heads].reshape(R * N2, E, Dv)
    S = torch.matmul(q.reshape(R * N2, G, D), kg.transpose(1, 2)).float() * x.scale  # [R N2, G, E]
    S = S.masked_fill(~x.vis[r0:r1].reshape(R * N2, 1, E), -FLT_MAX)
    P = torch.softmax(S, dim=-1).to(q.dtype)
    return torch.matmul(P, vg).reshape(R, N2 * G, Dv)


def sdpa_masked_rows(case: Case, x: Inputs, q, k, v, r0: int, r1: int) -> torch.Tensor:
    """scaled_dot_product_attention with the equivalent boolean mask (module doc, (b)) for query rows [r0, r1)."""
    T, N2, G = case.T, case.N2, case.G
    R = r1 - r0
    hit = torch.zeros(N2, R, T, dtype=torch.uint8)
    hit.scatter_add_(2, x.pos[r0:r1].permute(1, 0, 2), x.vis[r0:r1].permute(1, 0, 2).to(torch.uint8))
    m = (hit > 0).repeat_interleave(G, dim=0).unsqueeze(0)                   # [1, N1, R, T]: attend where selected
    o = F.scaled_dot_product_attention(q.permute(1, 0, 2).unsqueeze(0), k.permute(1, 0, 2).unsqueeze(0),
                                       v.permute(1, 0, 2).unsqueeze(0), attn_mask=m, scale=x.scale, enable_gqa=True)
    return o[0].permute(1, 0, 2)


def sdpa_dense_flash(case: Case, x: Inputs, q, k, v) -> torch.Tensor:
    """Dense causal SDPA over all T keys (module doc, (c)): V zero-padded to D inside the call so that the CPU
    flash kernel runs."""
    vp = F.pad(v, (0, case.D - case.Dv)) if case.Dv != case.D else v
    o = F.scaled_dot_product_attention(q.permute(1, 0, 2).unsqueeze(0), k.permute(1, 0, 2).unsqueeze(0),
                                       vp.permute(1, 0, 2).unsqueeze(0), is_causal=True, scale=x.scale, enable_gqa=True)
    return o[0].permute(1, 0, 2)[..., : case.Dv]


# ------------------------------------------------------------------------------------------------ measurement
def ours(nsa_ops, case: Case, x: Inputs, q, k, v):
    return nsa_ops.npu_nsa_select_attention(q, k, v, x.idx, x.scale, case.N1, case.lp, case.K, atten_mask=x.mask,
                                            actual_seq_qlen=[case.T], actual_seq_kvlen=[case.T])[0]


def timed(fn, args, baseline: bool = False):
    """Ours: --warmup and --repeat; the baselines (seconds to minutes per call): no warm-up, --baseline-repeat."""
    try:
        if baseline:
            return bl.time_fn(fn, 0, args.baseline_repeat, args.budget), None
        return bl.time_fn(fn, args.warmup, args.repeat, args.budget), None
    except Exception as e:  # e.g. out of memory
        return None, f"{type(e).__name__}: {str(e)[:200]}"


def report(name: str, res: dict) -> dict:
    for kind in ("fwd", "bwd", "fwdbwd"):
        t = res.get(kind)
        if t is not None:
            print(f"   {name + ' ' + kind + ':':<34}{bl.fmt_ms(t.median):>9} ms  (CPU per thread "
                  f"{bl.fmt_ms(t.cpu_per_thread)} ms; runs {', '.join(bl.fmt_ms(r) for r in t.runs)})", flush=True)
        elif res.get(kind + "_error"):
            print(f"   {name} {kind}: failed ({res[kind + '_error']})", flush=True)
    return res


def measure_whole(name: str, make_out, x: Inputs, dout: torch.Tensor, args, baseline: bool = False) -> dict:
    """One call over all rows: forward; backward = torch.autograd.grad on a graph built once (retain_graph);
    forward + backward."""
    res = {}
    qkv = [t.detach().clone().requires_grad_(True) for t in (x.q, x.k, x.v)]
    res["fwd"], res["fwd_error"] = timed(lambda: make_out(*[t.detach() for t in qkv]), args, baseline)
    if res["fwd"] is not None:
        out = make_out(*qkv)
        res["bwd"], res["bwd_error"] = timed(lambda: torch.autograd.grad(out, qkv, dout, retain_graph=True), args,
                                             baseline)
        del out
        res["fwdbwd"], res["fwdbwd_error"] = timed(lambda: torch.autograd.grad(make_out(*qkv), qkv, dout), args,
                                                   baseline)
    return report(name, res)


def measure_chunked(name: str, rows_fn, x: Inputs, dout: torch.Tensor, rows: int, args, bwd: bool = True) -> dict:
    """Chunks of `rows` query rows: forward (no graph); forward + backward with each chunk's autograd graph freed
    after its backward (the gradients of k and v accumulate, each chunk's q rows are their own leaf); backward =
    (forward + backward) - forward."""
    T = x.q.shape[0]
    res = {}

    def fwd():
        with torch.no_grad():
            return torch.cat([rows_fn(x.q[r0:min(T, r0 + rows)], x.k, x.v, r0, min(T, r0 + rows))
                              for r0 in range(0, T, rows)])

    def fwdbwd():
        k, v = (t.detach().clone().requires_grad_(True) for t in (x.k, x.v))
        dq = torch.empty_like(x.q)
        for r0 in range(0, T, rows):
            r1 = min(T, r0 + rows)
            qc = x.q[r0:r1].detach().clone().requires_grad_(True)
            torch.autograd.backward(rows_fn(qc, k, v, r0, r1), dout[r0:r1])
            dq[r0:r1] = qc.grad
        return dq, k.grad, v.grad

    res["fwd"], res["fwd_error"] = timed(fwd, args, baseline=True)
    if bwd and res["fwd"] is not None:
        res["fwdbwd"], res["fwdbwd_error"] = timed(fwdbwd, args, baseline=True)
        if res["fwdbwd"] is not None:
            f, fb = res["fwd"], res["fwdbwd"]
            res["bwd"] = bl.Timing(max(fb.median - f.median, 0.0), [max(fb.median - f.median, 0.0)],
                                   [max(statistics.median(fb.cpu) - statistics.median(f.cpu), 0.0)], 0, fb.threads)
    return report(name, res)


def check(case: Case, x: Inputs, got: torch.Tensor) -> dict:
    """Our attention_out against the composition computed from fp32 inputs on the first and last 512 rows: max
    |diff| <= 4 eps of the dtype at the largest |ref| (catches wrong results; tests/ hold the tight bounds)."""
    diffs, refmax = [], 0.0
    for r0 in (0, max(0, case.T - 512)):
        r1 = min(case.T, r0 + 512)
        ref = composition_rows(case, x, x.q.float()[r0:r1], x.k.float(), x.v.float(), r0, r1)
        diffs.append((got.float()[r0:r1] - ref).abs().max().item())
        refmax = max(refmax, ref.abs().max().item())
    diff, bound = max(diffs), 4 * torch.finfo(got.dtype).eps * refmax
    print(f"   check: max |ours - fp32 composition| = {diff:.3g} (bound {bound:.3g}) on the first and last 512 rows",
          flush=True)
    return {"ok": diff <= bound, "max_abs_diff": diff, "bound": bound}


def run_case(case: Case, args, nsa_ops, peak: bl.Peak) -> dict:
    print(f"\n== {case.name}: {case.shape_str()}, {case.dtype}", flush=True)
    x = make_inputs(case, args.seed, nsa_ops)
    dt = x.q.dtype
    fwd_flop = 2.0 * x.pairs * (case.D + case.Dv)
    bwd_flop = 2.0 * x.pairs * (3 * case.D + 2 * case.Dv)
    pk = peak.for_dtype(dt)  # attainable peak of the input dtype (benchlib.Peak.for_dtype)
    print(f"   visible entries {x.pairs} ({x.pairs / (case.T * case.N1):.0f} per query row and head); useful GFLOP: "
          f"forward {fwd_flop / 1e9:.1f}, backward {bwd_flop / 1e9:.1f}", flush=True)
    dout = torch.randn(case.T, case.N1, case.Dv, generator=torch.Generator().manual_seed(args.seed + 1)).to(dt)
    # composition: one chunk's gathered blocks (dtype) and fp32 scores / probabilities within --chunk-mb
    per_row = case.N2 * case.K * case.lp * ((case.D + case.Dv) * x.q.element_size() + 3 * 4 * case.G)
    rows = max(1, min(case.T, int(args.chunk_mb * 2**20 // per_row)))
    res = {"case": case.name, "dtype": case.dtype, "T": case.T, "N1": case.N1, "N2": case.N2, "pairs": x.pairs,
           "fwd_gflop": fwd_flop / 1e9, "bwd_gflop": bwd_flop / 1e9, "peak": pk}
    m = measure_whole("ours", lambda q, k, v: ours(nsa_ops, case, x, q, k, v), x, dout, args)
    res["ours"] = m
    if not args.no_check:
        res["check"] = check(case, x, ours(nsa_ops, case, x, x.q, x.k, x.v))
    if not args.no_composition:
        res["composition"] = measure_chunked(f"composition (chunks of {rows} rows)",
                                             lambda q, k, v, r0, r1: composition_rows(case, x, q, k, v, r0, r1), x, dout,
                                             rows, args)
    if not args.no_sdpa:
        srows = max(1, min(case.T, int(args.chunk_mb * 2**20 // (case.N1 * case.T * 13))))
        res["sdpa_masked"] = measure_chunked(f"SDPA masked (chunks of {srows} rows)",
                                             lambda q, k, v, r0, r1: sdpa_masked_rows(case, x, q, k, v, r0, r1), x,
                                             dout, srows, args, bwd=not args.sdpa_no_bwd)
    if not args.no_flash:
        res["sdpa_flash"] = measure_whole("dense causal SDPA flash", lambda q, k, v: sdpa_dense_flash(case, x, q, k, v),
                                          x, dout, args, baseline=True)
    for kind, flop in (("fwd", fwd_flop), ("bwd", bwd_flop), ("fwdbwd", fwd_flop + bwd_flop)):
        t = m.get(kind)
        if t is not None:
            res[kind + "_gflops"] = flop / t.median / 1e9
            res[kind + "_peak_share"] = flop / t.median / 1e9 / pk
    return res


_JSON_THREADS = [1]  # thread count of a --table-from file without it per timing (its header's)


def _wall_cpu(t) -> tuple:
    """(median wall seconds, median process CPU seconds per thread) of a Timing or of its JSON form."""
    if t is None:
        return None, None
    if isinstance(t, dict):
        return t["median_s"], statistics.median(t["cpu_s"]) / max(1, t.get("threads", _JSON_THREADS[0]))
    return t.median, t.cpu_per_thread


def table(results: list, markdown: bool) -> str:
    """One row per case and pass. Times as 'wall / CPU per thread' (ms); GFLOP/s and % peak at both; ratios of the
    baselines' times to ours at both."""
    def both(r, who, kind):
        return _wall_cpu(r.get(who, {}).get(kind))

    def pair_ms(w, c):
        return "-" if w is None else f"{bl.fmt_ms(w)} / {bl.fmt_ms(c)}"

    def pair_ratio(r, who, kind):
        (a, ac), (b, bc) = both(r, who, kind), both(r, "ours", kind)
        if a is None or b is None or not b or not bc:
            return "-"
        return f"{a / b:.1f}x / {ac / bc:.1f}x"

    head = ["case", "pass", "useful GFLOP", "ours ms (wall / CPU)", "GFLOP/s (wall / CPU)", "% peak (wall / CPU)",
            "composition ms", "vs comp.", "SDPA masked ms", "vs SDPA", "dense causal flash ms", "vs flash", "check"]
    rows = []
    for r in results:
        for kind, label, flop in (("fwd", "forward", r["fwd_gflop"]), ("bwd", "backward", r["bwd_gflop"]),
                                  ("fwdbwd", "fwd+bwd", r["fwd_gflop"] + r["bwd_gflop"])):
            w, c = both(r, "ours", kind)
            chk = r.get("check") if kind == "fwd" else None
            rows.append([r["case"], label, f"{flop:.1f}", pair_ms(w, c),
                         "-" if not w else f"{flop / w:.0f} / {flop / c:.0f}",
                         "-" if not w else f"{100 * flop / w / r['peak']:.1f} / {100 * flop / c / r['peak']:.1f}",
                         pair_ms(*both(r, "composition", kind)), pair_ratio(r, "composition", kind),
                         pair_ms(*both(r, "sdpa_masked", kind)), pair_ratio(r, "sdpa_masked", kind),
                         pair_ms(*both(r, "sdpa_flash", kind)), pair_ratio(r, "sdpa_flash", kind),
                         "-" if chk is None else ("OK" if chk["ok"] else "MISMATCH")])
    return bl.render_table(head, rows, markdown)


def jsonable(results: list) -> list:
    def conv(o):
        if isinstance(o, bl.Timing):
            return {"median_s": o.median, "runs_s": o.runs, "cpu_s": o.cpu, "threads": o.threads}
        if isinstance(o, dict):
            return {k: conv(v) for k, v in o.items()}
        return o
    return [conv(r) for r in results]


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-sdpa", action="store_true", help="skip baseline (b), SDPA with the boolean mask")
    ap.add_argument("--sdpa-no-bwd", action="store_true", help="baseline (b): forward only")
    ap.add_argument("--no-flash", action="store_true", help="skip baseline (c), dense causal SDPA flash")
    ap.add_argument("--baseline-repeat", type=int, default=1,
                    help="measured runs of each baseline, no warm-up (default 1: they take seconds to minutes)")
    bl.add_common_arguments(ap, "measurement", "skip baseline (a), the PyTorch composition")
    ap.add_argument("--table-from", metavar="JSON", help="print the summary table of an earlier --json-out and exit")
    args = ap.parse_args(argv)
    if args.table_from:
        import json
        import re
        with open(args.table_from) as f:
            saved = json.load(f)
        found = re.search(r"(\d+) threads", saved["header"][0])
        _JSON_THREADS[0] = int(found.group(1)) if found else 1
        print("\n".join(("- " if args.markdown else "") + h for h in saved["header"]) + "\n")
        print(table(saved["results"], args.markdown))
        return 0
    if args.list:
        return bl.list_cases(CASES, lambda n: "default" if n in DEFAULT_CASES else "")
    names = bl.case_names(args.cases, CASES, DEFAULT_CASES)
    if names is None:
        return 2
    _, nsa_ops, peak, header = bl.start(args, "measurement")
    header.append(f"% peak against the larger of the bf16 dot-product and fp32 FMA peaks: "
                  f"{max(peak.bf16, peak.fp32):.0f} GFLOP/s; baselines: {args.baseline_repeat} run(s) each, no warm-up")
    results = [run_case(CASES[n], args, nsa_ops, peak) for n in names]
    return bl.finish(args, header, peak, jsonable(results), table(results, args.markdown),
                     "useful GFLOP: forward 2 (D + Dv) x visible (query row, head, key) entries, backward "
                     "2 (3 D + 2 Dv) x the same entries (S, dP, dQ, dK, dV; our backward also recomputes S and dP "
                     "for dK / dV, not counted); % peak: GFLOP/s over the larger of the bf16 and fp32 peaks; "
                     "'vs X' = time of X / our time. Ours and dense flash: backward = torch.autograd.grad on a graph "
                     "built once, fwd+bwd = both; composition and masked SDPA run in chunks of query rows, their "
                     "backward = (fwd+bwd) - fwd. 'wall / CPU': the median wall time and the median process CPU time "
                     "per thread of the same runs (what a quiet machine gives at best; on a machine shared with other "
                     "work the wall time can be several times it), and the figures computed from each.")


if __name__ == "__main__":
    sys.exit(main())
