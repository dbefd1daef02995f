#!/usr/bin/env python3
"""Decode-step benchmark of nsa_ops over paged caches (docs/spec/decode.md) on CPU (see bench/README.md,
"Decode (paged caches)").

One NSA decode step (decode.md §1), one new token per sequence, every sequence at the same context S:
  compress_infer for K and for V (only sequences whose length completes a window of l tokens do work: timed
  both when every sequence completes one and when none does; amortised = (complete + (d - 1) none) / d),
  compress_attention_infer over the C = (S - l) / d + 1 compressed tokens (also picks the top-K blocks),
  select_attention_infer over the K blocks of l' raw tokens, paged_window_attention over the last w tokens.
The projections and the gate (a few element-wise ops on [B, N1, Dv]) are left out.

Baselines on the same paged raw cache ([num_pages, P, N2, D] / [.., Dv], bf16, pages shuffled):
  dense    plain PyTorch: gather the S tokens of each sequence through the block table, then q.k^T, softmax (fp32),
           p.v for the new token (grouped heads, N1 / N2 query heads per KV head);
  sdpa+g   the same gather, then torch's scaled_dot_product_attention (enable_gqa);
  sdpa     SDPA alone over the already gathered [B, N2, S, D] cache (the attention without the gather).

Tokens read per step and their bytes (N2 (D + Dv) bf16 values per raw or compressed token): NSA reads
min(K l', S) selected + min(w, S) window + C compressed tokens (+ 2 l raw tokens for the compression of K and V on
a completing step); the baselines read S. Effective GB/s = those bytes / wall time. The memory-traffic target
("within 2x of the bytes the tokens occupy") is checked against a measured copy bandwidth (the larger of two
measurements, before and after the cases): traffic bound =
copy GB/s x NSA step time / bytes (the bytes the machine could have moved in that time, an upper bound on the
traffic; <= 2 meets the target).

    .venv/bin/python bench/bench_decode.py                 # 8k, 32k, 128k x batch 1, 8
    .venv/bin/python bench/bench_decode.py --quick         # tiny shapes, seconds
    .venv/bin/python bench/bench_decode.py --cases 128k-b1,128k-b8 --markdown
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402


@dataclasses.dataclass
class DCase:
    name: str
    S: int               # context per sequence, the new token included
    B: int               # batch
    N1: int = 32         # query heads
    N2: int = 2          # KV heads
    D: int = 192
    Dv: int = 128
    l: int = 32          # compression window
    d: int = 16          # compression stride
    lp: int = 64         # selection block l'
    K: int = 16          # selected blocks
    w: int = 512         # sliding window
    P: int = 64          # raw page size
    Pc: int = 64         # compressed page size
    dtype: str = "bf16"

    @property
    def C(self) -> int:
        return (self.S - self.l) // self.d + 1

    def shape_str(self) -> str:
        return (f"S={self.S} B={self.B} N1={self.N1} N2={self.N2} D={self.D} Dv={self.Dv} l={self.l} d={self.d} "
                f"l'={self.lp} K={self.K} w={self.w} P={self.P} Pc={self.Pc}")

    def token_bytes(self) -> int:
        return self.N2 * (self.D + self.Dv) * 2

    def nsa_tokens(self) -> dict:
        return {"selected": min(self.K * self.lp, self.S), "window": min(self.w, self.S), "compressed": self.C}


def _sizes(S):
    return {f"{S // 1024}k-b{B}": DCase(f"{S // 1024}k-b{B}", S, B) for B in (1, 8)}


CASES = {**_sizes(8192), **_sizes(32768), **_sizes(131072),
         "quick": DCase("quick", 1024, 2, N1=8, N2=2, D=64, Dv=64, K=4, w=128, P=32, Pc=16)}
DEFAULT_CASES = [n for n in CASES if n != "quick"]


def make_inputs(c: DCase, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    bf = torch.bfloat16
    pages = -(-c.S // c.P)                       # raw pages per sequence
    cpages = -(-c.C // c.Pc)                     # compressed pages per sequence
    perm = torch.randperm(c.B * pages, generator=g).to(torch.int32)
    cperm = torch.randperm(c.B * cpages, generator=g).to(torch.int32)
    x = {
        "k_cache": torch.randn(c.B * pages, c.P, c.N2, c.D, generator=g).to(bf),
        "v_cache": torch.randn(c.B * pages, c.P, c.N2, c.Dv, generator=g).to(bf),
        "bt": perm.view(c.B, pages).contiguous(),
        "cmp_k": torch.randn(c.B * cpages * c.Pc, c.N2, c.D, generator=g).to(bf),
        "cmp_v": torch.randn(c.B * cpages * c.Pc, c.N2, c.Dv, generator=g).to(bf),
        "cbt": cperm.view(c.B, cpages).contiguous(),
        "w_k": (torch.rand(c.l, c.N2, generator=g) / c.l).to(bf),
        "w_v": (torch.rand(c.l, c.N2, generator=g) / c.l).to(bf),
        "q": torch.randn(c.B, 1, c.N1, c.D, generator=g).to(bf),
        "cpages": cpages,
    }
    # slot of the compressed token c = (S - l) // d that a completing step writes (decode.md §1)
    ci = c.C - 1
    x["slots"] = (x["cbt"][:, ci // c.Pc].to(torch.int64) * c.Pc + ci % c.Pc).to(torch.int32)
    return x


def nsa_parts(c: DCase, x: dict, nsa_ops) -> dict:
    """The callables of one NSA decode step, by part."""
    B, scale = c.B, c.D ** -0.5
    lens, lens_none = [c.S] * B, [c.S - 1] * B     # (S - l) % d == 0: a window completes; S - 1: none does
    assert (c.S - c.l) % c.d == 0
    q3 = x["q"].view(B, c.N1, c.D)
    kc = x["cmp_k"].view(x["cpages"] * B, c.Pc, c.N2 * c.D)
    vc = x["cmp_v"].view(x["cpages"] * B, c.Pc, c.N2 * c.Dv)
    topk = {}

    def compress(seq_lens):
        def f():
            nsa_ops.npu_nsa_compress_infer(x["k_cache"], x["w_k"], x["slots"], c.l, c.d, c.P, block_table=x["bt"],
                                           actual_seq_len=seq_lens, cache=x["cmp_k"])
            nsa_ops.npu_nsa_compress_infer(x["v_cache"], x["w_v"], x["slots"], c.l, c.d, c.P, block_table=x["bt"],
                                           actual_seq_len=seq_lens, cache=x["cmp_v"])
        return f

    def cmp_attn():
        out, tk = nsa_ops.npu_nsa_compress_attention_infer(
            q3, kc, vc, scale, c.N1, c.N2, c.lp, c.K, c.Pc, c.l, c.d, block_table=x["cbt"],
            actual_cmp_seq_kvlen=[c.C] * B)
        topk["t"] = tk
        return out

    cmp_attn()

    def sel_attn():
        return nsa_ops.npu_nsa_select_attention_infer(
            x["q"], x["k_cache"], x["v_cache"], topk["t"].view(B, 1, c.N2, c.K), scale, c.N1, c.N2, c.lp, c.K, c.P,
            block_table=x["bt"], actual_seq_kvlen=lens)

    def win_attn():
        return nsa_ops.paged_window_attention(q3, x["k_cache"], x["v_cache"], x["bt"], lens, c.w)

    def step():      # a completing step: the four operators in decode order
        compress(lens)()
        cmp_attn()
        sel_attn()
        win_attn()

    return {"compress (window completes)": compress(lens), "compress (none completes)": compress(lens_none),
            "compress_attention_infer": cmp_attn, "select_attention_infer": sel_attn,
            "paged_window_attention": win_attn, "step (completing)": step}


def gather(c: DCase, x: dict):
    """[B, S, N2, D] and [B, S, N2, Dv]: each sequence's tokens through its block table."""
    k = x["k_cache"][x["bt"].long()].reshape(c.B, -1, c.N2, c.D)[:, :c.S]
    v = x["v_cache"][x["bt"].long()].reshape(c.B, -1, c.N2, c.Dv)[:, :c.S]
    return k, v


def dense(c: DCase, x: dict):
    k, v = gather(c, x)
    G = c.N1 // c.N2
    q = x["q"].view(c.B, c.N2, G, c.D)
    s = torch.matmul(q, k.permute(0, 2, 3, 1)).float() * c.D ** -0.5        # [B, N2, G, S]
    p = torch.softmax(s, dim=-1).to(v.dtype)
    return torch.matmul(p, v.permute(0, 2, 1, 3))                          # [B, N2, G, Dv]


def sdpa_gathered(c: DCase, x: dict, kv=None):
    if kv is None:
        k, v = gather(c, x)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    else:
        k, v = kv
    q = x["q"].view(c.B, c.N1, 1, c.D)
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def copy_bandwidth(threads: int, mb: int) -> float:
    """GB/s of a large tensor copy (bytes read + bytes written) / time: the machine's streaming rate."""
    src = torch.ones(mb * (1 << 20) // 2, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = bl.time_fn(lambda: dst.copy_(src), 1, 5, 10.0, threads)
    return 2 * src.numel() * 2 / t.median / 1e9


def run_case(c: DCase, args, nsa_ops, threads: int, bw: float) -> dict:
    t0 = time.perf_counter()
    x = make_inputs(c, args.seed)
    tb = c.token_bytes()
    cache_gb = x["k_cache"].numel() * 2 / 1e9 + x["v_cache"].numel() * 2 / 1e9
    print(f"\n== {c.name}: {c.shape_str()}\n   raw cache {cache_gb:.2f} GB, {tb} bytes per token; inputs made in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    res = {"case": c.name, "shape": c.shape_str(), "S": c.S, "B": c.B, "threads": threads, "token_bytes": tb,
           "times": {}}

    def timed(label, fn, min_time=0.0):
        try:
            t = bl.time_fn(fn, args.warmup, args.repeat, args.budget, threads, min_time)
        except (MemoryError, RuntimeError) as e:     # e.g. SDPA's math path at 128k: allocation refused
            res.setdefault("errors", {})[label] = str(e).splitlines()[0][:300]
            print(f"   {label:<30} failed: {res['errors'][label]}", flush=True)
            return None
        # every run of a short call is hundreds of numbers: the record keeps the count, the fastest and the median
        res["times"][label] = {"median_s": t.median, "cpu_per_thread_s": t.cpu_per_thread, "min_s": min(t.runs),
                               "n_runs": len(t.runs)}
        print(f"   {label:<30} {t.median * 1e3:>10.3f} ms   (CPU/thread {t.cpu_per_thread * 1e3:.3f} ms)",
              flush=True)
        return t

    parts = nsa_parts(c, x, nsa_ops)
    for label, fn in parts.items():  # sub-millisecond calls: runs adding up to at least --min-time
        timed(label, fn, args.min_time)
    T = {k: v["median_s"] for k, v in res["times"].items()}
    Tc = {k: v["cpu_per_thread_s"] for k, v in res["times"].items()}
    amort = lambda t: (t["compress (window completes)"] + (c.d - 1) * t["compress (none completes)"]) / c.d  # noqa
    attn = ("compress_attention_infer", "select_attention_infer", "paged_window_attention")
    res["nsa_step_s"] = sum(T[k] for k in attn) + amort(T)          # amortised step (sum of the parts' medians)
    res["nsa_step_cpu_s"] = sum(Tc[k] for k in attn) + amort(Tc)
    toks = c.nsa_tokens()
    res["nsa_tokens"] = toks
    res["nsa_bytes"] = c.B * (sum(toks.values()) * tb + 2 * c.l * tb / c.d)   # + the compression's amortised reads
    res["dense_bytes"] = c.B * c.S * tb
    res["nsa_gbps"] = res["nsa_bytes"] / res["nsa_step_s"] / 1e9
    res["traffic_bound"] = bw * res["nsa_step_s"] / (res["nsa_bytes"] / 1e9)
    print(f"   NSA step (amortised compression)   {bl.fmt_ms(res['nsa_step_s']):>9} ms   "
          f"(CPU/thread {bl.fmt_ms(res['nsa_step_cpu_s'])} ms); tokens read {toks} = "
          f"{res['nsa_bytes'] / 1e6:.1f} MB, {res['nsa_gbps']:.1f} GB/s effective", flush=True)
    if not args.no_baselines:
        timed("dense (gather + matmul)", lambda: dense(c, x))
        timed("sdpa + gather", lambda: sdpa_gathered(c, x))
        k, v = gather(c, x)
        kv = (k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous())
        del k, v
        timed("sdpa (gathered cache)", lambda: sdpa_gathered(c, x, kv))
        del kv
    return res


def table(results, markdown: bool) -> str:
    head = ["case", "NSA ms", "NSA CPU ms", "tok/s", "NSA tokens", "NSA MB", "GB/s", "traffic bound",
            "dense ms", "sdpa+g ms", "sdpa ms", "dense tokens", "dense MB", "vs dense", "vs sdpa+g", "vs sdpa",
            "vs dense (CPU)"]
    rows = []
    for r in results:
        T = {k: v["median_s"] for k, v in r["times"].items()}
        Tc = {k: v["cpu_per_thread_s"] for k, v in r["times"].items()}
        n = r["nsa_step_s"]
        dn = "dense (gather + matmul)"

        def ms(k):
            return bl.fmt_ms(T.get(k))

        def ratio(k):
            return f"{T[k] / n:.1f}x" if k in T else "-"
        rows.append([r["case"], f"{n * 1e3:.2f}", f"{r['nsa_step_cpu_s'] * 1e3:.2f}", f"{r['B'] / n:.0f}",
                     str(sum(r["nsa_tokens"].values())), f"{r['nsa_bytes'] / 1e6:.1f}", f"{r['nsa_gbps']:.1f}",
                     f"{r['traffic_bound']:.1f}x", ms("dense (gather + matmul)"), ms("sdpa + gather"),
                     ms("sdpa (gathered cache)"), str(r["S"]), f"{r['dense_bytes'] / 1e6:.0f}",
                     ratio("dense (gather + matmul)"), ratio("sdpa + gather"), ratio("sdpa (gathered cache)"),
                     f"{Tc[dn] / r['nsa_step_cpu_s']:.1f}x" if dn in Tc else "-"])
    return bl.render_table(head, rows, markdown)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.add_common_arguments(ap, "measurement", "(unused here)")
    ap.add_argument("--quick", action="store_true", help="the tiny 'quick' case, 1 run, no probe (seconds)")
    ap.add_argument("--no-baselines", action="store_true", help="skip the dense / SDPA baselines")
    ap.add_argument("--bw-mb", type=int, default=512, help="size of the copy that measures the bandwidth (MB)")
    ap.add_argument("--min-time", type=float, default=0.5,
                    help="seconds of measured runs at least per NSA part (more runs than --repeat for short calls; "
                         "default 0.5)")
    ap.add_argument("--table-from", help="print the summary table of an earlier --json-out file and exit")
    args = ap.parse_args(argv)
    if args.table_from:
        print(table(json.loads(Path(args.table_from).read_text())["results"], args.markdown))
        return 0
    if args.list:
        return bl.list_cases(CASES, lambda n: "default" if n in DEFAULT_CASES else "")
    if args.quick:
        args.cases, args.repeat, args.warmup, args.no_probe, args.bw_mb, args.min_time = "quick", 1, 1, True, 16, 0.0
    names = bl.case_names(args.cases, CASES, DEFAULT_CASES)
    if names is None:
        return 2
    threads, nsa_ops, peak, header = bl.start(args, "measurement", "; CPU time per thread printed beside")
    bw_before = copy_bandwidth(threads, args.bw_mb)
    try:
        load = "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = "load average unknown"
    print(f"copy bandwidth before the cases {bw_before:.1f} GB/s", flush=True)
    results = [run_case(CASES[n], args, nsa_ops, threads, bw_before) for n in names]
    # On a machine whose bandwidth others share, one measurement can catch a slow moment and make the bound look
    # better than it is: the bound uses the larger of the measurements before and after the cases.
    bw_after = copy_bandwidth(threads, args.bw_mb)
    bw = max(bw_before, bw_after)
    for res in results:
        res["traffic_bound"] = bw * res["nsa_step_s"] / (res["nsa_bytes"] / 1e9)
        res["copy_gbps"] = bw
    header.append(f"copy bandwidth {bw:.1f} GB/s (read + write, {args.bw_mb} MB; the larger of {bw_before:.1f} before "
                  f"and {bw_after:.1f} after the cases); {load}")
    print(header[-1], flush=True)
    return bl.finish(args, header, peak, results, table(results, args.markdown),
                     "NSA ms = compress_attention_infer + select_attention_infer + paged_window_attention + the "
                     "compress_infer of K and V amortised over d steps ((completing + (d-1) non-completing) / d), "
                     "sum of the parts' medians, projections and gate excluded; tok/s = batch / NSA ms; NSA tokens = "
                     "min(K l', S) + min(w, S) + C per sequence (bytes add the 2 l raw tokens of the compression / "
                     "d); MB and tokens: all sequences of the step (tokens: per sequence); GB/s = NSA MB / NSA ms; traffic bound = copy "
                     "GB/s x NSA time / NSA bytes (<= 2x meets the target); dense = gather through the block table + "
                     "matmul-softmax-matmul in PyTorch, sdpa+g = gather + SDPA, sdpa = SDPA over the gathered cache; "
                     "'vs' = baseline ms / NSA ms (wall); 'vs dense (CPU)' = the same ratio of CPU "
                     "time per thread.")


if __name__ == "__main__":
    sys.exit(main())
