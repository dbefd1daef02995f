"""The compact benchmark behind ``python -m nsa_ops bench`` (self-contained: works from an installed wheel).

One causal sequence per case (docs/spec/compress_attention.md §9 masks, built with :func:`nsa_ops.make_atten_mask` and
:func:`nsa_ops.make_topk_mask`), swept over sequence lengths. Per case: the median time of the operator, its
useful throughput ``GFLOP/s = 2 * N1 * (D + D2) * visible pairs / s`` (visible pairs: (query row, compressed
token) pairs that atten_mask keeps; a fully masked row counts 0), and the time of the same computation written
as plain PyTorch (matmul, masked_fill, softmax, matmul, selection scores as a matmul, topk), measured in the
same process at the same thread count. The fuller benchmark of the source tree is bench/bench_forward.py
(``python -m nsa_ops bench --suite``).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
from typing import Callable, Optional

import torch

FLT_MAX = 3.4028234663852886e38
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass
class Case:
    tokens: int
    N1: int = 32
    N2: int = 2
    D: int = 192
    D2: int = 128
    dtype: str = "bf16"
    l: int = 32
    d: int = 16
    lp: int = 64
    K: int = 16

    @property
    def C(self) -> int:
        return (self.tokens - self.l) // self.d + 1 if self.tokens >= self.l else 0

    @property
    def M(self) -> int:
        return self.lp // self.d

    @property
    def Sel(self) -> int:
        return -(-self.C // self.M)

    def describe(self) -> str:
        return (f"T={self.tokens} C={self.C} Sel={self.Sel} N1={self.N1} N2={self.N2} D={self.D} D2={self.D2} "
                f"l={self.l} d={self.d} l'={self.lp} K={self.K} {self.dtype}")

    def check(self) -> None:
        if self.C < 1:
            raise ValueError(f"--seq-lens: {self.tokens} tokens give no compressed token (need >= l = {self.l})")
        if self.K > self.Sel:
            raise ValueError(f"--topk {self.K} exceeds the {self.Sel} selection blocks of {self.tokens} tokens "
                             f"(use more tokens or a smaller --topk)")


def make_inputs(case: Case, seed: int) -> dict:
    import nsa_ops

    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[case.dtype]
    x = dict(query=torch.randn(case.tokens, case.N1, case.D, generator=g).to(dt),
             key=torch.randn(case.C, case.N2, case.D, generator=g).to(dt),
             value=torch.randn(case.C, case.N2, case.D2, generator=g).to(dt))
    x["atten_mask"] = nsa_ops.make_atten_mask(case.tokens, case.C, case.l, case.d)
    x["topk_mask"] = nsa_ops.make_topk_mask(case.tokens, case.Sel, case.lp)
    x["scale"] = 1.0 / math.sqrt(case.D)
    return x


def visible_pairs(atten_mask: torch.Tensor) -> int:
    return int((~atten_mask).sum())


def useful_flop(case: Case, atten_mask: torch.Tensor) -> float:
    return 2.0 * case.N1 * (case.D + case.D2) * visible_pairs(atten_mask)


def _score_matrix(case: Case) -> torch.Tensor:
    """[C, Sel] fp32: the weight of compressed token c in the score of selection block k (docs/spec/compress_attention.md §3.5)."""
    M, N = case.M, case.l // case.d
    c = torch.arange(case.C).unsqueeze(1)
    k = torch.arange(case.Sel).unsqueeze(0)
    i = M * (k + 1) - c
    w = torch.minimum(torch.minimum(i + 1, torch.full_like(i, N)), M + N - 1 - i)
    return torch.where((i >= 0) & (i <= M + N - 2), w, 0).float()


def composition(case: Case, x: dict, chunk_rows: int, W: torch.Tensor) -> tuple:
    """The operator as plain PyTorch ops (one sequence), chunked over query rows to bound the score memory."""
    q, k, v = x["query"], x["key"], x["value"]
    dt = q.dtype
    T, G = case.tokens, case.N1 // case.N2
    out = torch.empty(T, case.N1, case.D2, dtype=dt)
    topk = torch.empty(T, case.N2, case.K, dtype=torch.int32)
    kT = k.permute(1, 2, 0)  # [N2, D, C]
    vv = v.permute(1, 0, 2)  # [N2, C, D2]
    for r0 in range(0, T, chunk_rows):
        r1 = min(T, r0 + chunk_rows)
        R = r1 - r0
        qh = q[r0:r1].reshape(R, case.N2, G, case.D).permute(1, 0, 2, 3).reshape(case.N2, R * G, case.D)
        S = torch.matmul(qh, kT).float().mul_(x["scale"]).view(case.N2, R, G, case.C)
        S.masked_fill_(x["atten_mask"][r0:r1].view(1, R, 1, case.C), -FLT_MAX)
        P = torch.softmax(S, dim=-1)
        O = torch.matmul(P.to(dt).view(case.N2, R * G, case.C), vv)
        out[r0:r1] = O.view(case.N2, R, G, case.D2).permute(1, 0, 2, 3).reshape(R, case.N1, case.D2)
        score = torch.matmul(P.sum(dim=2), W)
        score.masked_fill_(x["topk_mask"][r0:r1].unsqueeze(0), FLT_MAX)
        topk[r0:r1] = torch.topk(score, case.K, dim=-1).indices.permute(1, 0, 2).to(torch.int32)
    return out, topk


def time_fn(fn: Callable[[], object], warmup: int, repeat: int) -> tuple[float, list]:
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), runs


class Progress:
    """tqdm when it is installed (and wanted), else a plain textual bar on stderr."""

    def __init__(self, total: int, enabled: bool = True, use_tqdm: Optional[bool] = None):
        self.total, self.done, self.enabled = total, 0, enabled
        self.bar = None
        if enabled and use_tqdm is not False:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, unit="step", file=sys.stderr, leave=False)
        self.tty = sys.stderr.isatty()

    def step(self, text: str) -> None:
        """Announces the step about to run."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(text)
            return
        width = 24
        filled = width * self.done // max(1, self.total)
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {text}"
        if self.tty:
            sys.stderr.write("\r" + line.ljust(78)[:120])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def advance(self) -> None:
        self.done += 1
        if self.enabled and self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        elif self.tty:
            sys.stderr.write("\r" + " " * 78 + "\r")
            sys.stderr.flush()


def run(cases: list, *, warmup: int = 1, repeat: int = 3, baseline: bool = True, seed: int = 0,
        chunk_mb: float = 256.0, progress: bool = True, use_tqdm: Optional[bool] = None) -> list:
    import nsa_ops

    for c in cases:
        c.check()
    steps = len(cases) * (2 if baseline else 1)
    bar = Progress(steps, progress, use_tqdm)
    results = []
    try:
        for case in cases:
            x = make_inputs(case, seed)
            flop = useful_flop(case, x["atten_mask"])

            def ours():
                return nsa_ops.npu_nsa_compress_attention(
                    x["query"], x["key"], x["value"], x["scale"], case.N1, case.l, case.d, case.lp, case.K,
                    topk_mask=x["topk_mask"], atten_mask=x["atten_mask"], actual_seq_qlen=[case.tokens],
                    actual_cmp_seq_kvlen=[case.C])

            bar.step(f"T={case.tokens}: nsa_ops")
            t_ours, runs = time_fn(ours, warmup, repeat)
            bar.advance()
            res = {"tokens": case.tokens, "shape": case.describe(), "useful_gflop": flop / 1e9, "ours_s": t_ours,
                   "ours_runs_s": runs, "gflops": flop / t_ours / 1e9, "composition_s": None,
                   "composition_gflops": None, "speedup": None}
            if baseline:
                W = _score_matrix(case)
                chunk = max(1, min(case.tokens, int(chunk_mb * 2**20) // (case.N1 * case.C * 4 * 3)))
                bar.step(f"T={case.tokens}: PyTorch composition")
                t_comp, runs_c = time_fn(lambda: composition(case, x, chunk, W), warmup, repeat)
                bar.advance()
                res.update(composition_s=t_comp, composition_runs_s=runs_c, composition_gflops=flop / t_comp / 1e9,
                           speedup=t_comp / t_ours)
            results.append(res)
    finally:
        bar.close()
    return results


def _ms(t: Optional[float]) -> str:
    return "-" if t is None else f"{t * 1e3:.1f}"


def table(results: list) -> str:
    head = ["tokens", "useful GFLOP", "nsa_ops ms", "GFLOP/s", "composition ms", "composition GFLOP/s", "speed-up"]
    rows = [[str(r["tokens"]), f"{r['useful_gflop']:.2f}", _ms(r["ours_s"]), f"{r['gflops']:.1f}",
             _ms(r["composition_s"]), "-" if r["composition_gflops"] is None else f"{r['composition_gflops']:.1f}",
             "-" if r["speedup"] is None else f"{r['speedup']:.1f}x"] for r in results]
    w = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w[i]) for i, h in enumerate(head))]
    lines += ["  ".join(c.rjust(w[i]) for i, c in enumerate(row)) for row in rows]
    return "\n".join(lines)


def plot(results: list, path, title: str) -> None:
    from .viz import require_matplotlib

    Figure, FigureCanvasAgg, _ = require_matplotlib()
    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = [r["tokens"] for r in results]
    ax.plot(xs, [r["gflops"] for r in results], "o-", label="nsa_ops (torch.ops.nsa.compress_attention)")
    if any(r["composition_gflops"] for r in results):
        ax.plot(xs, [r["composition_gflops"] or float("nan") for r in results], "s--",
                label="plain PyTorch composition")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("useful GFLOP/s  (2·N1·(D+D2)·visible pairs / s)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
