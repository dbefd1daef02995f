"""Benchmark pieces of nsa_ops, in one place: the compact benchmark behind ``python -m nsa_ops bench`` (works
from an installed wheel) and the source tree's bench/ scripts (bench/benchlib.py imports them from here).

* :class:`Case` / :func:`make_case`: shapes, per-batch lengths and masks of one benchmark case;
  :func:`make_inputs`: seeded standard-normal inputs with the masks of docs/spec/compress_attention.md §9
  (:func:`nsa_ops.make_atten_mask`, :func:`nsa_ops.make_topk_mask`);
* :func:`useful_flop` (``2 * N1 * (D + D2) * visible pairs``: (query row, compressed token) pairs that atten_mask
  keeps; a fully masked row counts 0), :func:`dense_flop`;
* :func:`composition`: the operator written as plain PyTorch (matmul, masked_fill, softmax, matmul, selection
  scores as a matmul with the [C, Sel] weights of §3.5, topk), the baseline a user would write, and with
  ``exact=True`` a closer-to-§3 fp32 variant used as a sanity check;
* :func:`time_fn`: median wall time of runs after warm-up (with a time budget), and their process CPU time;
* :func:`run` / :func:`table` / :func:`plot`: the compact benchmark (one causal sequence per length, the
  operator against the composition, same process, same thread count).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
from typing import Callable, Optional

import torch

from .masks import compressed_lengths, make_atten_mask, make_topk_mask, prefix_sums

FLT_MAX = 3.4028234663852886e38
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------------------ cases
@dataclasses.dataclass
class Case:
    name: str
    dtype: str                 # bf16 | fp16 | fp32
    seq_lens: list             # query tokens per batch (Sq_b)
    cmp_lens: list             # compressed tokens per batch (C_b)
    N1: int
    N2: int
    D: int = 192
    D2: int = 128
    l: int = 32
    d: int = 16
    lp: int = 64
    K: int = 16
    masks: bool = True         # §9 causal atten_mask + topk_mask (1 initial, 2 local blocks)
    note: str = ""

    @property
    def M(self) -> int:
        return self.lp // self.d

    @property
    def N(self) -> int:
        return self.l // self.d

    @property
    def G(self) -> int:
        return self.N1 // self.N2

    @property
    def sel_lens(self) -> list:
        return [-(-c // self.M) for c in self.cmp_lens]

    @property
    def T(self) -> int:
        return sum(self.seq_lens)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def shape_str(self) -> str:
        sq = "+".join(str(s) for s in self.seq_lens)
        c = "+".join(str(s) for s in self.cmp_lens)
        return (f"T={sq} C={c} N1={self.N1} N2={self.N2} D={self.D} D2={self.D2} "
                f"l={self.l} d={self.d} l'={self.lp} K={self.K}{' masks' if self.masks else ''}")

    def check(self) -> None:
        """ValueError, in the compact benchmark's option names, for a case the operator would reject."""
        for tokens, c in zip(self.seq_lens, self.cmp_lens):
            if c < 1:
                raise ValueError(f"--seq-lens: {tokens} tokens give no compressed token (need >= l = {self.l})")
        for tokens, sel in zip(self.seq_lens, self.sel_lens):
            if self.K > sel:
                raise ValueError(f"--topk {self.K} exceeds the {sel} selection blocks of {tokens} tokens "
                                 f"(use more tokens or a smaller --topk)")


def make_case(name: str, dtype: str, seq_lens: list, N1: int, N2: int, masks: bool = True,
              cmp_lens: Optional[list] = None, **kw) -> Case:
    """A case whose compressed lengths are those of its sequences (:func:`nsa_ops.compressed_lengths`) unless
    ``cmp_lens`` gives them."""
    if cmp_lens is None:
        cmp_lens = compressed_lengths(list(seq_lens), kw.get("l", 32), kw.get("d", 16))
    return Case(name=name, dtype=dtype, seq_lens=list(seq_lens), cmp_lens=list(cmp_lens), N1=N1, N2=N2,
                masks=masks, **kw)


@dataclasses.dataclass
class Inputs:
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scale: float
    atten_mask: Optional[torch.Tensor]
    topk_mask: Optional[torch.Tensor]
    seq_qlen: list   # prefix sums (the operator's actual_seq_qlen)
    cmp_kvlen: list
    sel_kvlen: list


def make_inputs(case: Case, seed: int) -> Inputs:
    """Seeded standard-normal q/k/v drawn in the case's dtype (query, key, value in that order); the §9 masks
    built for the longest sequence; scale 1/sqrt(D)."""
    g = torch.Generator().manual_seed(seed)
    dt = case.torch_dtype
    q = torch.randn(case.T, case.N1, case.D, generator=g, dtype=dt)
    T2 = sum(case.cmp_lens)
    k = torch.randn(T2, case.N2, case.D, generator=g, dtype=dt)
    v = torch.randn(T2, case.N2, case.D2, generator=g, dtype=dt)
    am = tm = None
    if case.masks:
        max_sq, max_c, max_sel = max(case.seq_lens), max(case.cmp_lens), max(case.sel_lens)
        am = make_atten_mask(max_sq, max_c, case.l, case.d)
        tm = make_topk_mask(max_sq, max_sel, case.lp)
    return Inputs(q, k, v, 1.0 / math.sqrt(case.D), am, tm, prefix_sums(case.seq_lens), prefix_sums(case.cmp_lens),
                  prefix_sums(case.sel_lens))


# ------------------------------------------------------------------------------------------------ FLOPs
def visible_pairs(case: Case, atten_mask: Optional[torch.Tensor]) -> int:
    """(query row, compressed token) pairs of one head that atten_mask does not remove, over all batches.

    A fully masked row counts 0: its output is the mean of V (§5), no q.k product is needed.
    Without a mask every pair is visible: sum_b Sq_b * C_b.
    """
    total = 0
    for sq, c in zip(case.seq_lens, case.cmp_lens):
        if atten_mask is None:
            total += sq * c
        else:
            total += int((~atten_mask[:sq, :c].bool()).sum())
    return total


def useful_flop(case: Case, atten_mask: Optional[torch.Tensor]) -> float:
    """2 * N1 * (D + D2) * visible pairs: one multiply-add per element of q.k (D) and of P.v (D2).

    Softmax, selection scores and top-k are O(C) per row and are not counted (less than 1% here).
    """
    return 2.0 * case.N1 * (case.D + case.D2) * visible_pairs(case, atten_mask)


def dense_flop(case: Case) -> float:
    """The same count with every pair visible (what a dense implementation does)."""
    return 2.0 * case.N1 * (case.D + case.D2) * sum(s * c for s, c in zip(case.seq_lens, case.cmp_lens))


# ------------------------------------------------------------------------------------------------ composition
_W_CACHE: dict = {}


def score_weights(C: int, Sel: int, M: int, N: int) -> torch.Tensor:
    """[C, Sel] fp32 matrix of §3.5: W[c, k] = w_i with i = M(k+1) - c, w_i = min(i+1, N, M+N-1-i) for
    0 <= i <= M+N-2, else 0. Then score_h = P @ W."""
    key = (C, Sel, M, N)
    if key not in _W_CACHE:
        c = torch.arange(C).unsqueeze(1)
        k = torch.arange(Sel).unsqueeze(0)
        i = M * (k + 1) - c
        w = torch.minimum(torch.minimum(i + 1, torch.full_like(i, N)), M + N - 1 - i)
        _W_CACHE[key] = torch.where((i >= 0) & (i <= M + N - 2), w, 0).to(torch.float32)
    return _W_CACHE[key]


def rows_per_chunk(case: Case, chunk_mb: float) -> int:
    """Query rows per chunk so that one fp32 score block [N1, rows, maxC] stays within chunk_mb."""
    per_row = case.N1 * max(case.cmp_lens) * 4
    return max(1, min(max(case.seq_lens), int(chunk_mb * 2**20) // per_row))


def composition(case: Case, x: Inputs, row_chunk: int, exact: bool = False,
                row_ranges: Optional[list] = None):
    """The operator written as plain PyTorch, per batch and per chunk of query rows.

    exact=False (the timed baseline, what a user would write): S = matmul in the input dtype (fp32
    accumulation inside, result rounded to the dtype) then .float() * scale; masked_fill(-FLT_MAX);
    softmax in fp32; P cast to the dtype; matmul with V; selection scores as P (summed over the G heads
    of a group) @ W ([C, Sel], §3.5); masked_fill(+FLT_MAX) for forced blocks; torch.topk.

    exact=True (the sanity check; closer to §3): S from the inputs upcast to fp32 (exact products,
    fp32 sums), P rounded to the dtype then multiplied with V in fp32 and rounded once, top-k by a stable
    descending sort (ties: smaller index first); also returns the statistics m and l_sum.

    row_ranges: optional list of (b, r0, r1) to compute only those query rows (check of big cases).
    Returns (out [T, N1, D2], topk [T, N2, K] int32, m [T, N1] or None, lsum [T, N1] or None, scores
    [T, N2, maxSel] or None); rows outside row_ranges are left uninitialised.
    """
    q, k, v = x.query, x.key, x.value
    dt = q.dtype
    T, N1, D = q.shape
    N2, G, D2, K = case.N2, case.G, case.D2, case.K
    out = torch.empty(T, N1, D2, dtype=dt)
    topk = torch.empty(T, N2, K, dtype=torch.int32)
    m_all = torch.empty(T, N1) if exact else None
    l_all = torch.empty(T, N1) if exact else None
    sc_all = torch.zeros(T, N2, max(case.sel_lens)) if exact else None
    if row_ranges is None:
        row_ranges = [(b, r0, min(r0 + row_chunk, sq)) for b, sq in enumerate(case.seq_lens)
                      for r0 in range(0, sq, row_chunk)]
    q0s = [0] + x.seq_qlen[:-1]
    c0s = [0] + x.cmp_kvlen[:-1]
    for b, r0, r1 in row_ranges:
        C, Sel = case.cmp_lens[b], case.sel_lens[b]
        q0, c0 = q0s[b], c0s[b]
        R = r1 - r0
        kT = k[c0:c0 + C].permute(1, 2, 0)   # [N2, D, C]
        vv = v[c0:c0 + C].permute(1, 0, 2)   # [N2, C, D2]
        qh = q[q0 + r0:q0 + r1].reshape(R, N2, G, D).permute(1, 0, 2, 3).reshape(N2, R * G, D)
        if exact:
            S = torch.matmul(qh.float(), kT.float()).mul_(x.scale)
        else:
            S = torch.matmul(qh, kT).float().mul_(x.scale)
        S = S.view(N2, R, G, C)
        if x.atten_mask is not None:
            S.masked_fill_(x.atten_mask[r0:r1, :C].bool().view(1, R, 1, C), -FLT_MAX)
        if exact:
            m = S.amax(dim=-1, keepdim=True)
            E = torch.exp(S - m)
            lsum = E.sum(dim=-1, keepdim=True)
            P = E.div_(lsum)
            m_all[q0 + r0:q0 + r1] = m.squeeze(-1).permute(1, 0, 2).reshape(R, N1)
            l_all[q0 + r0:q0 + r1] = lsum.squeeze(-1).permute(1, 0, 2).reshape(R, N1)
            O = torch.matmul(P.to(dt).float().view(N2, R * G, C), vv.float()).to(dt)
        else:
            P = torch.softmax(S, dim=-1)
            O = torch.matmul(P.to(dt).view(N2, R * G, C), vv)
        out[q0 + r0:q0 + r1] = O.view(N2, R, G, D2).permute(1, 0, 2, 3).reshape(R, N1, D2)
        score = torch.matmul(P.sum(dim=2), score_weights(C, Sel, case.M, case.N))  # [N2, R, Sel]
        if x.topk_mask is not None:
            score.masked_fill_(x.topk_mask[r0:r1, :Sel].bool().unsqueeze(0), FLT_MAX)
        if exact:
            idx = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :K]
            sc_all[q0 + r0:q0 + r1, :, :Sel] = score.permute(1, 0, 2)
        else:
            idx = torch.topk(score, K, dim=-1).indices
        topk[q0 + r0:q0 + r1] = idx.permute(1, 0, 2).to(torch.int32)
    return out, topk, m_all, l_all, sc_all


# ------------------------------------------------------------------------------------------------ timing
@dataclasses.dataclass
class Timing:
    median: float       # wall seconds
    runs: list          # every measured run, wall seconds
    cpu: list           # process CPU seconds of each measured run
    warmup: int
    threads: int

    @property
    def cpu_per_thread(self) -> float:
        """Median process CPU seconds / threads (what a quiet machine would take at best)."""
        return statistics.median(self.cpu) / max(1, self.threads)


def time_fn(fn: Callable[[], object], warmup: int, repeat: int, budget_s: float = math.inf,
            threads: Optional[int] = None, min_time_s: float = 0.0) -> Timing:
    """Median wall time of up to `repeat` runs after `warmup` runs, or of more runs while they add up to less than
    `min_time_s` seconds (short calls: a median of many runs, which one burst of other work on a shared machine does
    not move); stops early once `budget_s` seconds of measured runs have passed (at least one measured run). The
    result of each run is dropped. threads (for cpu_per_thread): default torch.get_num_threads()."""
    for _ in range(warmup):
        fn()
    runs, cpus, spent = [], [], 0.0
    while len(runs) < max(1, repeat) or spent < min_time_s:
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        runs.append(dt)
        cpus.append(dc)
        spent += dt
        if spent >= budget_s:
            break
    return Timing(statistics.median(runs), runs, cpus, warmup,
                  threads if threads is not None else torch.get_num_threads())


# ------------------------------------------------------------------------------------------------ compact run
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
    """The compact benchmark: per case (one sequence each, see :func:`make_case`), the operator's median time
    and useful GFLOP/s, and with ``baseline`` the composition's, chunked so that its three fp32 [N1, rows, C]
    blocks (scores, exponentials, P) stay within ``chunk_mb`` together."""
    from .ops.compress_attention import npu_nsa_compress_attention

    for c in cases:
        c.check()
    steps = len(cases) * (2 if baseline else 1)
    bar = Progress(steps, progress, use_tqdm)
    results = []
    try:
        for case in cases:
            x = make_inputs(case, seed)
            flop = useful_flop(case, x.atten_mask)

            def ours():
                return npu_nsa_compress_attention(
                    x.query, x.key, x.value, x.scale, case.N1, case.l, case.d, case.lp, case.K,
                    topk_mask=x.topk_mask, atten_mask=x.atten_mask, actual_seq_qlen=x.seq_qlen,
                    actual_cmp_seq_kvlen=x.cmp_kvlen)

            bar.step(f"T={case.T}: nsa_ops")
            t_ours = time_fn(ours, warmup, repeat)
            bar.advance()
            res = {"tokens": case.T, "shape": case.shape_str(), "useful_gflop": flop / 1e9, "ours_s": t_ours.median,
                   "ours_runs_s": t_ours.runs, "gflops": flop / t_ours.median / 1e9, "composition_s": None,
                   "composition_gflops": None, "speedup": None}
            if baseline:
                chunk = rows_per_chunk(case, chunk_mb / 3)
                bar.step(f"T={case.T}: PyTorch composition")
                t_comp = time_fn(lambda: composition(case, x, chunk), warmup, repeat)
                bar.advance()
                res.update(composition_s=t_comp.median, composition_runs_s=t_comp.runs,
                           composition_gflops=flop / t_comp.median / 1e9, speedup=t_comp.median / t_ours.median)
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
