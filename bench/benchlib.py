"""Shared pieces of the Python benchmarks (bench_forward.py, seed_example.py); see bench/README.md.

* importing nsa_ops from <repo>/python, with a clear message when it cannot be imported;
* the machine's peak (bench/peak_probe --json, else nominal figures);
* benchmark cases (shapes, lengths, masks) and their useful FLOP count;
* the plain PyTorch composition of the operator (the baseline a user would write) and a closer-to-SPEC
  fp32 variant of it used as the sanity check;
* scaled_dot_product_attention baselines;
* timing (median of runs after warm-up, with a time budget).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
FLT_MAX = torch.finfo(torch.float32).max

# Nominal peaks of the reference machine kind (DESIGN-NOTES.md: 2 Zen 4 cores at ~3.6 GHz), used only
# when peak_probe is not built. Measure: a Zen 5 core does two 512-bit vdpbf16ps per cycle, not one.
NOMINAL_PEAK = {"bf16": 465.0, "fp32": 231.0}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------------------ nsa_ops
def add_common_arguments(ap, unit: str, composition_help: str) -> None:
    """The options bench_forward.py and bench_backward.py share: threads, timing, inputs, baselines' chunking,
    the check, output formats and the peak. `unit` names what one timing measures ("method", "measurement")."""
    ap.add_argument("--threads", type=int, default=None, help="threads for torch and the operator (default: all)")
    ap.add_argument("--warmup", type=int, default=1, help=f"warm-up runs per {unit} (default 1)")
    ap.add_argument("--repeat", type=int, default=5, help=f"measured runs per {unit}, median kept (default 5)")
    ap.add_argument("--budget", type=float, default=20.0,
                    help=f"stop measuring a {unit} after this many seconds of measured runs (default 20)")
    ap.add_argument("--chunk-mb", type=float, default=1024.0,
                    help="baselines: chunk query rows so one fp32 score block stays under this (default 1024)")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the inputs")
    ap.add_argument("--no-check", action="store_true", help="skip the check against the fp32 composition")
    ap.add_argument("--no-composition", action="store_true", help=composition_help)
    ap.add_argument("--markdown", action="store_true", help="print the summary table in markdown")
    ap.add_argument("--json-out", help="write every figure to this JSON file")
    ap.add_argument("--peak-json", help="read the peak from a saved `peak_probe --json` output")
    ap.add_argument("--no-probe", action="store_true", help="do not run peak_probe (use nominal peaks)")
    ap.add_argument("--fresh-peak", action="store_true",
                    help="use this run's probe only, not the best of earlier runs (build/bench/peak_cache.json)")
    ap.add_argument("--peak-bf16", type=float, help="bf16 peak in GFLOP/s (overrides the probe)")
    ap.add_argument("--peak-fp32", type=float, help="fp32 peak in GFLOP/s (overrides the probe)")


def import_nsa_ops():
    """Imports nsa_ops from <repo>/python; exits with a clear message (status 2) when that fails."""
    sys.path.insert(0, str(ROOT / "python"))
    try:
        import nsa_ops  # noqa: F401
    except Exception as e:  # ImportError, or the library failing to load
        print(f"ERROR: cannot import nsa_ops ({type(e).__name__}: {e})", file=sys.stderr)
        print("       nsa_ops lives in <repo>/python and loads build/torch_binding/libnsa_ops_torch.so;"
              " build it with `bash scripts/setup.sh`.", file=sys.stderr)
        sys.exit(2)
    return nsa_ops


def git_describe() -> str:
    """Short commit of the working tree (+ '-dirty'), for the record of which backend was measured."""
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def isa_str(nsa_ops) -> str:
    """The CPU backend's active ISA path (and the detected one), from nsa_ops.cpu_isa() when it exists."""
    env = os.environ.get("NSA_CPU_ISA")
    try:
        detected, active = nsa_ops.cpu_isa()
        s = f"ISA {active}" + (f" (detected {detected})" if detected != active else "")
    except Exception:
        s = "ISA unknown"
    return s + (f", NSA_CPU_ISA={env}" if env else "")


def set_threads(n: Optional[int]) -> int:
    """Uses n threads in torch and in the operator (NSA_NUM_THREADS); default: every core."""
    n = n or os.cpu_count() or 1
    os.environ["NSA_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    return n


# ------------------------------------------------------------------------------------------------ peak
@dataclasses.dataclass
class Peak:
    bf16: float          # GFLOP/s, vdpbf16ps on all threads
    fp32: float          # GFLOP/s, fp32 FMA on all threads
    source: str          # how it was obtained (one line)
    probe: Optional[dict] = None  # peak_probe's JSON when measured

    def for_dtype(self, dtype: torch.dtype) -> float:
        """bf16 peak for bf16 inputs; fp32 FMA peak for fp16/fp32 (no fp16 dot-product instruction here)."""
        return self.bf16 if dtype == torch.bfloat16 else self.fp32

    def describe(self) -> str:
        return f"peak bf16 {self.bf16:.0f} GFLOP/s, fp32 {self.fp32:.0f} GFLOP/s ({self.source})"


def find_peak_probe() -> Optional[Path]:
    for cand in (ROOT / "build" / "bench" / "peak_probe", ROOT / "build" / "peak_probe"):
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    found = shutil.which("peak_probe")
    return Path(found) if found else None


PEAK_CACHE = ROOT / "build" / "bench" / "peak_cache.json"


def merge_with_cache(data: dict, cache_path: Path = PEAK_CACHE) -> tuple[dict, bool]:
    """Per-kernel maximum of this probe and the earlier ones on the same CPU model and thread count
    (stored in cache_path, updated). A peak is a property of the machine: a run on a machine busy with
    other work measures less, never more, so the best figure seen is the better estimate.
    Returns (merged data, whether an earlier figure was higher)."""
    key = f"{data.get('cpu', '?')}|{data['threads']}"
    try:
        with open(cache_path) as f:
            cache = json.load(f)
    except Exception:
        cache = {}
    old = cache.get(key)
    merged = json.loads(json.dumps(data))
    used_old = False
    if old:
        for name, k in merged["kernels"].items():
            o = old["kernels"].get(name)
            if not (k.get("supported") and o and o.get("supported")):
                continue
            for f in ("gflops_1t", "gflops_all"):
                if o[f] > k[f]:
                    k[f], used_old = o[f], True
    peaks = {"bf16": None, "fp32": None}
    for k in merged["kernels"].values():
        if k.get("supported"):
            cur = peaks[k["kind"]]
            peaks[k["kind"]] = k["gflops_all"] if cur is None else max(cur, k["gflops_all"])
    merged["peak_gflops"] = peaks
    cache[key] = merged
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        with open(cache_path, "w") as f:
            json.dump(cache, f, indent=1)
    except OSError:
        pass
    return merged, used_old


def get_peak(threads: int, peak_json: Optional[str] = None, probe: bool = True,
             bf16: Optional[float] = None, fp32: Optional[float] = None, use_cache: bool = True) -> Peak:
    """The machine's peak: --peak-bf16/--peak-fp32 overrides, else a saved or fresh peak_probe --json
    (a fresh one merged with the best earlier figures, see merge_with_cache), else the nominal
    figures (with a note saying so)."""
    data, source = None, None
    if peak_json:
        with open(peak_json) as f:
            data = json.load(f)
        source = f"peak_probe JSON {peak_json}"
    elif probe:
        exe = find_peak_probe()
        if exe is not None:
            try:
                out = subprocess.run([str(exe), "--json", "--threads", str(threads), "--seconds", "0.2",
                                      "--repeats", "5"], capture_output=True, text=True, check=True, timeout=120)
                data = json.loads(out.stdout)
                source = f"measured now by {exe.relative_to(ROOT) if exe.is_relative_to(ROOT) else exe}"
                if use_cache:
                    now = dict(data["peak_gflops"])
                    data, used_old = merge_with_cache(data)
                    if used_old:
                        source += (f" (now: bf16 {now['bf16'] or 0:.0f}, fp32 {now['fp32'] or 0:.0f}; best of "
                                   f"earlier runs kept, {PEAK_CACHE.relative_to(ROOT)})")
            except Exception as e:  # keep going with the nominal figures
                print(f"note: peak_probe failed ({e}); using nominal peaks", file=sys.stderr)
    pb = pf = None
    if data is not None:
        pb, pf = data["peak_gflops"].get("bf16"), data["peak_gflops"].get("fp32")
        used = [k.get("instr", name) for name, k in data["kernels"].items() if k.get("supported")]
        source += (f", {data['threads']} threads, chains of {' / '.join(used) or 'no supported kernel'}, best of "
                   f"{data['repeats']} x {data['seconds']:.2f} s, clock ~{data['clock_ghz_est']:.2f} GHz")
        if pb is None and pf is not None:
            # no vdpbf16ps on this CPU (AVX2 only, or AVX-512 without BF16): bf16 inputs are widened to
            # fp32 and run on the FMA units, so the fp32 FMA rate is their peak
            pb = pf
            source += "; no bf16 dot-product instruction here: bf16 peak = fp32 FMA peak"
        busy = []
        for name, k in data["kernels"].items():
            if k.get("supported") and k["gflops_all"] < 0.8 * data["threads"] * k["gflops_1t"]:
                busy.append(name)
        if busy:
            source += f"; WARNING: all-core figure < 0.8 x threads x 1-thread for {', '.join(busy)} (busy machine?)"
    if pb is None or pf is None:
        why = ("--no-probe" if not probe and not peak_json else
               "peak_probe not built: cmake --build build --target peak_probe" if find_peak_probe() is None
               else "peak_probe gave no figure")
        note = f"nominal Zen 4 figures of DESIGN-NOTES.md; {why}"
        pb = pb if pb is not None else NOMINAL_PEAK["bf16"]
        pf = pf if pf is not None else NOMINAL_PEAK["fp32"]
        source = source + "; " + note if source else note
    if bf16 is not None or fp32 is not None:
        pb, pf = bf16 or pb, fp32 or pf
        source = "given on the command line" + (f" (probe: {source})" if data else "")
    return Peak(bf16=float(pb), fp32=float(pf), source=source, probe=data)


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
    masks: bool = True         # SPEC §9 causal atten_mask + topk_mask (1 initial, 2 local blocks)
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


def compressed_len(tokens: int, l: int, d: int) -> int:
    """C = floor((L - l) / d) + 1: complete compression windows of a sequence of L tokens."""
    return (tokens - l) // d + 1 if tokens >= l else 0


def make_case(name: str, dtype: str, seq_lens: list, N1: int, N2: int, masks: bool = True,
              cmp_lens: Optional[list] = None, **kw) -> Case:
    l, d = kw.get("l", 32), kw.get("d", 16)
    if cmp_lens is None:
        cmp_lens = [compressed_len(s, l, d) for s in seq_lens]
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


def _prefix(xs: list) -> list:
    out, acc = [], 0
    for x in xs:
        acc += x
        out.append(acc)
    return out


def make_atten_mask(max_sq: int, max_c: int, l: int, d: int) -> torch.Tensor:
    """SPEC §9: True (removed) where compressed token i ends after query t: i*d + l - 1 > t."""
    t = torch.arange(max_sq).unsqueeze(1)
    i = torch.arange(max_c).unsqueeze(0)
    return i * d + (l - 1) > t


def make_topk_mask(max_sq: int, max_sel: int, lp: int) -> torch.Tensor:
    """SPEC §9: force block 0 and the 2 local blocks {t//l' - 1, t//l'}."""
    cur = (torch.arange(max_sq) // lp).unsqueeze(1)
    k = torch.arange(max_sel).unsqueeze(0)
    return (k < 1) | ((k <= cur) & (k > cur - 2))


def make_inputs(case: Case, seed: int, nsa_ops=None) -> Inputs:
    """Seeded standard-normal q/k/v in the case's dtype; masks from nsa_ops' helpers when available
    (they follow SPEC §9), else from the local copies above (identical definitions)."""
    g = torch.Generator().manual_seed(seed)
    dt = case.torch_dtype
    q = torch.randn(case.T, case.N1, case.D, generator=g, dtype=dt)
    T2 = sum(case.cmp_lens)
    k = torch.randn(T2, case.N2, case.D, generator=g, dtype=dt)
    v = torch.randn(T2, case.N2, case.D2, generator=g, dtype=dt)
    am = tm = None
    if case.masks:
        max_sq, max_c, max_sel = max(case.seq_lens), max(case.cmp_lens), max(case.sel_lens)
        if nsa_ops is not None and hasattr(nsa_ops, "make_atten_mask"):
            am = nsa_ops.make_atten_mask(max_sq, max_c, case.l, case.d)
            tm = nsa_ops.make_topk_mask(max_sq, max_sel, case.lp)
        else:
            am = make_atten_mask(max_sq, max_c, case.l, case.d)
            tm = make_topk_mask(max_sq, max_sel, case.lp)
    return Inputs(q, k, v, 1.0 / math.sqrt(case.D), am, tm, _prefix(case.seq_lens), _prefix(case.cmp_lens),
                  _prefix(case.sel_lens))


# ------------------------------------------------------------------------------------------------ FLOPs
def visible_pairs(case: Case, atten_mask: Optional[torch.Tensor]) -> int:
    """(query row, compressed token) pairs of one head that atten_mask does not remove, over all batches.

    A fully masked row counts 0: its output is the mean of V (SPEC §5), no q.k product is needed.
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
    """[C, Sel] fp32 matrix of SPEC §3.5: W[c, k] = w_i with i = M(k+1) - c, w_i = min(i+1, N, M+N-1-i)
    for 0 <= i <= M+N-2, else 0. Then score_h = P @ W."""
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
    of a group) @ W ([C, Sel], SPEC §3.5); masked_fill(+FLT_MAX) for forced blocks; torch.topk.

    exact=True (the sanity check; closer to SPEC §3): S from the inputs upcast to fp32 (exact products,
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


def sdpa(case: Case, x: Inputs, row_chunk: Optional[int], pad_v: bool = False) -> torch.Tensor:
    """scaled_dot_product_attention per batch (attention only, no selection): q viewed [1, N1, rows, D],
    k/v [1, N2, C, *], enable_gqa=True, attn_mask = ~atten_mask (SDPA's True means "attend").

    pad_v=False: the call as is; with D2 != D torch's CPU flash kernel refuses and SDPA runs the math
    path, which materialises [N1, rows, C]: so rows are chunked (row_chunk). pad_v=True: V zero-padded
    to D (the padding done inside the timed call) so that the flash kernel runs; no chunking needed.
    """
    q, k, v = x.query, x.key, x.value
    T, N1, D = q.shape
    out = torch.empty(T, N1, case.D2, dtype=q.dtype)
    q0s = [0] + x.seq_qlen[:-1]
    c0s = [0] + x.cmp_kvlen[:-1]
    for b, sq in enumerate(case.seq_lens):
        C = case.cmp_lens[b]
        q0, c0 = q0s[b], c0s[b]
        kb = k[c0:c0 + C].permute(1, 0, 2).unsqueeze(0)
        vb = v[c0:c0 + C].permute(1, 0, 2).unsqueeze(0)
        if pad_v and case.D2 != D:
            vb = F.pad(vb, (0, D - case.D2))
        step = sq if (pad_v or row_chunk is None) else row_chunk
        for r0 in range(0, sq, step):
            r1 = min(r0 + step, sq)
            qb = q[q0 + r0:q0 + r1].permute(1, 0, 2).unsqueeze(0)
            mask = None if x.atten_mask is None else ~x.atten_mask[r0:r1, :C].bool()
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=x.scale, enable_gqa=True)
            out[q0 + r0:q0 + r1] = o[0, :, :, :case.D2].permute(1, 0, 2)
    return out


# ------------------------------------------------------------------------------------------------ timing
@dataclasses.dataclass
class Timing:
    median: float       # seconds
    runs: list          # every measured run, seconds
    warmup: int


def time_fn(fn: Callable[[], object], warmup: int, repeat: int, budget_s: float) -> Timing:
    """Median of up to `repeat` runs after `warmup` runs; stops early once `budget_s` seconds of
    measured runs have passed (at least one measured run). The result of each run is dropped."""
    for _ in range(warmup):
        fn()
    runs = []
    spent = 0.0
    while len(runs) < max(1, repeat):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        runs.append(dt)
        spent += dt
        if spent >= budget_s:
            break
    return Timing(statistics.median(runs), runs, warmup)
