#!/usr/bin/env python3
"""Sliding-window attention benchmark of nsa_ops (docs/spec/window_attention.md) on CPU (see bench/README.md,
"Sliding-window attention").

For each case (NSA's window branch: D = 192, Dv = 128, window 512, bf16, one 8192-token sequence or four packed
sequences of 8192 tokens in all; N1 = 32 query heads over N2 = 2 key/value heads, or G = 1): the forward
(nsa_ops.sliding_window_attention) and the backward (torch.autograd.grad on a kept graph, i.e.
npu_fusion_attention_grad's work), their useful GFLOP/s and share of the machine's attainable peak, side by side
with torch's scaled_dot_product_attention (flash kernel) given the equivalent boolean band mask, and with dense
causal SDPA flash (is_causal=True) at the same lengths, in the same process at the same thread count. SDPA gets V
zero-padded to D inside the timed call (its flash kernel needs Dv = D) and enable_gqa=True.

Useful FLOP per visible (query, key) pair and query head: forward 2 (D + Dv) (q.k and p.v); backward 2 (3D + 2Dv)
(S = q.k, dP = dy.v, dV += P dy, dK += dS q, dQ += dS k: the five products of §7, without any recomputation; our
backward recomputes S and dP for the query tiles whose band straddles two of its key strips, which this count does
not credit). The peak is the larger of the bf16 dot-product and the fp32 FMA peaks (benchlib.get_peak).

    .venv/bin/python bench/bench_window_attention.py                    # the default cases
    .venv/bin/python bench/bench_window_attention.py --markdown --repeat 3
    .venv/bin/python bench/bench_window_attention.py --cases 8k-g1 --no-baselines
    .venv/bin/python bench/bench_window_attention.py --list
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402


@dataclasses.dataclass
class WCase:
    name: str
    seq_lens: list
    N1: int
    N2: int
    D: int = 192
    Dv: int = 128
    window: int = 512
    dtype: str = "bf16"

    @property
    def T(self) -> int:
        return sum(self.seq_lens)

    def shape_str(self) -> str:
        lens = self.seq_lens if len(self.seq_lens) <= 4 else f"{len(self.seq_lens)} seqs"
        return (f"T={self.T} {lens} N1={self.N1} N2={self.N2} (G={self.N1 // self.N2}) D={self.D} Dv={self.Dv} "
                f"window={self.window}")

    def visible_pairs(self) -> int:
        """(query, key) pairs of the band, per head: sum over rows of min(i + 1, window)."""
        w = self.window
        return sum(L * w - w * (w - 1) // 2 if L >= w else L * (L + 1) // 2 for L in self.seq_lens)

    def causal_pairs(self) -> int:
        return sum(L * (L + 1) // 2 for L in self.seq_lens)


VARLEN = [1024, 1536, 2560, 3072]  # 8192 tokens in all
CASES = {
    "8k": WCase("8k", [8192], 32, 2),
    "varlen": WCase("varlen", VARLEN, 32, 2),
    "8k-g1": WCase("8k-g1", [8192], 32, 32),
    "varlen-g1": WCase("varlen-g1", VARLEN, 32, 32),
    "8k-fp32": WCase("8k-fp32", [8192], 32, 2, dtype="fp32"),
}
DEFAULT_CASES = ["8k", "varlen", "8k-g1"]


def make_inputs(case: WCase, seed: int):
    g = torch.Generator().manual_seed(seed)
    dt = bl.DTYPES[case.dtype]
    q = torch.randn(case.T, case.N1, case.D, generator=g).to(dt)
    k = torch.randn(case.T, case.N2, case.D, generator=g).to(dt)
    v = torch.randn(case.T, case.N2, case.Dv, generator=g).to(dt)
    dy = torch.randn(case.T, case.N1, case.Dv, generator=g).to(dt)
    cu = torch.tensor([0] + torch.tensor(case.seq_lens).cumsum(0).tolist())
    return q, k, v, dy, cu


def sdpa_forward(case: WCase, q, k, v, cu, causal: bool, masks: dict):
    """attention_out [T, N1, Dv] by SDPA per sequence: the band as a boolean mask (True = attend), or is_causal."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    outs = []
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        for b, L in enumerate(case.seq_lens):
            s0 = int(cu[b])
            qb = q[s0:s0 + L].permute(1, 0, 2).unsqueeze(0)
            kb = k[s0:s0 + L].permute(1, 0, 2).unsqueeze(0)
            vb = F.pad(v[s0:s0 + L].permute(1, 0, 2).unsqueeze(0), (0, case.D - case.Dv))
            if causal:
                o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=case.D ** -0.5, enable_gqa=True)
            else:
                o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=masks[L], scale=case.D ** -0.5,
                                                   enable_gqa=True)
            outs.append(o[0, :, :, :case.Dv].permute(1, 0, 2))
    return torch.cat(outs, dim=0)


def band_mask(L: int, window: int) -> torch.Tensor:
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    return (j <= i) & (j > i - window)


def timed(fn, args, threads):
    return bl.time_fn(fn, args.warmup, args.repeat, args.budget, threads)


def run_case(case: WCase, args, nsa_ops, peak: bl.Peak, threads: int) -> dict:
    t0 = time.perf_counter()
    q, k, v, dy, cu = make_inputs(case, args.seed)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    pairs = case.visible_pairs() * case.N1
    fwd_flop, bwd_flop = 2.0 * (case.D + case.Dv) * pairs, 2.0 * (3 * case.D + 2 * case.Dv) * pairs
    pk = peak.for_dtype(bl.DTYPES[case.dtype])  # attainable peak of the input dtype (benchlib.Peak.for_dtype)
    print(f"\n== {case.name} ({case.dtype}): {case.shape_str()}", flush=True)
    print(f"   useful GFLOP: forward {fwd_flop / 1e9:.1f}, backward {bwd_flop / 1e9:.1f} ({pairs / 1e6:.1f} M visible "
          f"pairs x heads); inputs made in {time.perf_counter() - t0:.1f} s", flush=True)
    res = {"case": case.name, "dtype": case.dtype, "shape": case.shape_str(), "fwd_gflop": fwd_flop / 1e9,
           "bwd_gflop": bwd_flop / 1e9, "threads": threads, "peak": pk}

    def ours_forward():
        return nsa_ops.sliding_window_attention(*leaves, cu, case.window).attention_out

    def report(who, name, t, flop):
        res[f"{who}_{name}_s"] = t.median
        res[f"{who}_{name}_runs_s"] = t.runs
        res[f"{who}_{name}_cpu_per_thread_s"] = t.cpu_per_thread
        res[f"{who}_{name}_gflops"] = flop / t.median / 1e9
        print(f"   {who} {name}:{bl.fmt_ms(t.median):>9} ms {flop / t.median / 1e9:8.1f} useful GFLOP/s "
              f"{100 * flop / t.median / 1e9 / pk:5.1f}% of peak  (runs {', '.join(bl.fmt_ms(r) for r in t.runs)} ms; CPU "
              f"per thread {bl.fmt_ms(t.cpu_per_thread)} ms)", flush=True)

    with torch.no_grad():
        report("ours", "fwd", timed(lambda: nsa_ops.sliding_window_attention(q, k, v, cu, case.window), args, threads),
               fwd_flop)
    out = ours_forward()
    report("ours", "bwd", timed(lambda: torch.autograd.grad(out, leaves, dy, retain_graph=True), args, threads),
           bwd_flop)
    ours_out = out.detach()
    ours_grads = torch.autograd.grad(out, leaves, dy)
    del out

    if not args.no_baselines:
        masks = {L: band_mask(L, case.window) for L in set(case.seq_lens)}
        for who, causal in (("sdpa_band", False), ("sdpa_causal", True)):
            try:
                with torch.no_grad():
                    report(who, "fwd", timed(lambda: sdpa_forward(case, q, k, v, cu, causal, masks), args, threads),
                           fwd_flop)
                o = sdpa_forward(case, *leaves, cu, causal, masks)
                report(who, "bwd", timed(lambda: torch.autograd.grad(o, leaves, dy, retain_graph=True), args, threads),
                       bwd_flop)
                if not causal and not args.no_check:
                    # ours against SDPA with the band mask (both in the input dtype): outputs and gradients, max
                    # difference relative to the largest value; bound: four units of the dtype's epsilon
                    ref = (o.detach(),) + torch.autograd.grad(o, leaves, dy)
                    worst, parts = 0.0, []
                    for nm, a, r in zip(("out", "dq", "dk", "dv"), (ours_out,) + tuple(ours_grads), ref):
                        rel = float((a.float() - r.float()).abs().max()) / max(float(r.float().abs().max()), 1e-30)
                        worst = max(worst, rel)
                        parts.append(f"{nm} {rel:.1e}")
                    bound = 4 * torch.finfo(q.dtype).eps
                    res["check"] = {"max_rel_to_max": worst, "bound": bound, "ok": worst <= bound,
                                    "summary": "max |ours - SDPA band| / max |SDPA band|: " + ", ".join(parts)
                                               + f" (bound {bound:.2g}) -> {'OK' if worst <= bound else 'MISMATCH'}"}
                    print(f"   check: {res['check']['summary']}", flush=True)
                del o
            except Exception as e:  # e.g. out of memory
                res[f"{who}_error"] = f"{type(e).__name__}: {e}"
                print(f"   {who}: failed ({type(e).__name__}: {str(e)[:200]})", flush=True)
    return res


def table(results, markdown: bool) -> str:
    """Wall-clock figures, and the same from the CPU time per thread (what a run on a busy machine still measures
    well: the time the threads actually computed); 'vs SDPA' ratios from the CPU times."""
    head = ["case", "fwd ms", "fwd CPU ms/thread", "fwd GFLOP/s (CPU)", "fwd % peak (CPU)", "bwd ms",
            "bwd CPU ms/thread", "bwd GFLOP/s (CPU)", "bwd % peak (CPU)", "SDPA band fwd / bwd CPU ms/thread",
            "vs SDPA band fwd / bwd", "SDPA causal fwd / bwd CPU ms/thread", "vs SDPA causal fwd / bwd", "check"]
    rows = []
    for r in results:
        def cpu(who, name):
            return r.get(f"{who}_{name}_cpu_per_thread_s")

        def pair(who):
            a, b = cpu(who, "fwd"), cpu(who, "bwd")
            return "-" if a is None or b is None else f"{bl.fmt_ms(a)} / {bl.fmt_ms(b)}"

        def ratio(who):
            a, b = cpu(who, "fwd"), cpu(who, "bwd")
            if a is None or b is None:
                return "-"
            return f"{a / cpu('ours', 'fwd'):.1f}x / {b / cpu('ours', 'bwd'):.1f}x"

        def rate(name):  # useful GFLOP per second of CPU time of all threads together
            return r[f"{name}_gflop"] / cpu("ours", name) / r["threads"]
        chk = r.get("check")
        rows.append([r["case"], bl.fmt_ms(r["ours_fwd_s"]), bl.fmt_ms(cpu("ours", "fwd")), f"{rate('fwd') * r['threads']:.0f}",
                     f"{100 * rate('fwd') * r['threads'] / r['peak']:.1f}", bl.fmt_ms(r["ours_bwd_s"]),
                     bl.fmt_ms(cpu("ours", "bwd")), f"{rate('bwd') * r['threads']:.0f}",
                     f"{100 * rate('bwd') * r['threads'] / r['peak']:.1f}", pair("sdpa_band"), ratio("sdpa_band"),
                     pair("sdpa_causal"), ratio("sdpa_causal"), "-" if chk is None else ("OK" if chk["ok"] else "MISMATCH")])
    return bl.render_table(head, rows, markdown)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.add_common_arguments(ap, "measurement", "(unused here)")
    ap.add_argument("--no-baselines", action="store_true", help="skip the SDPA baselines (and the check)")
    args = ap.parse_args(argv)
    if args.list:
        for name, c in CASES.items():
            print(f"{name:<11} {c.dtype:<5} {'default' if name in DEFAULT_CASES else '':<8} {c.shape_str()}")
        return 0
    names = bl.case_names(args.cases, CASES, DEFAULT_CASES)
    if names is None:
        return 2
    threads, nsa_ops, peak, header = bl.start(args, "measurement", "; CPU time per thread printed beside")
    results = [run_case(CASES[n], args, nsa_ops, peak, threads) for n in names]
    return bl.finish(args, header, peak, results, table(results, args.markdown),
                     "useful GFLOP: forward 2 N1 (D + Dv), backward 2 N1 (3D + 2Dv) per visible (query, key) pair of the "
                     "window; GFLOP/s (CPU) = useful GFLOP / (CPU time per thread) (the rate of all threads had they "
                     "run undisturbed; the wall-clock rate is printed per case above); % peak against max(bf16 "
                     "dot-product peak, fp32 FMA peak); 'vs SDPA' = SDPA's CPU time / ours (SDPA band: flash with the "
                     "boolean band mask; SDPA causal: flash with is_causal, the whole causal triangle); backward = "
                     "torch.autograd.grad on a kept graph.")


if __name__ == "__main__":
    sys.exit(main())
