"""How far an output of compressed attention may be from the fp64 model of docs/spec/compress_attention.md §3.

The one place where nsa-ops writes its comparison rules down: the Python test suite (tests/python) checks the
operator against its fp64 model with them, and ``python -m nsa_ops check`` (:func:`nsa_ops.golden.compare`)
checks another implementation's outputs (e.g. the NPU's) with them. Every bound is per element; no element is
ever counted out.

Notation: u is the unit roundoff of the arithmetic of §3: 2^-24 (float32) for bf16, fp16 and fp32 inputs, 2^-53
for the fp64 testing extension (computed in fp64 throughout); ``gamma(n) = n u / (1 - n u)`` bounds the
relative error of a sum or dot product of n terms accumulated in any order (relative to the sum of the terms'
magnitudes). For one row (query position, query head) of §3 with visible entries c (atten_mask not set):

* **Scores** (§3.1): ``|s_c - S_c| <= dS_c = gamma(D + 1) |scale| sum_i |q_i k_ci| + u |S_c|`` (the fp32 dot
  product, then the multiplication by the scale). Masked scores are replaced exactly (§3.2): no error.
* **P** (§3.3): an fp32 P has a relative error of at most :func:`p_rel_error`
  ``= 4 max_c dS_c + 2 u max_c |S_c - m| + gamma(C) + 17 u``: the errors of s_c and of m move exp(s_c - m), the
  subtraction rounds, exp is taken as accurate to 8 ulps, the sum l has C terms, and the division rounds.
* **attention_out** (§3.4), element j: :func:`attention_out_bound` ``= e_j + OUT_ULPS ulp_dtype(|o_j| + e_j)``
  with ``e_j = gamma(C + 1) sum_c |cast(P_c)| |v_cj|`` (the fp32 sum of P.V in any order) ``+`` the effect of
  P's own error: for bf16/fp16, a P_c whose exact value lies within that error of a rounding midpoint of the
  dtype may be rounded to either neighbour by an fp32 implementation, which moves the output by
  ``ulp_dtype(P_c) |v_cj|`` (each such P_c counts once; every other P_c rounds exactly as the model's); for
  fp32 and fp64 inputs P is not rounded and its relative error enters as ``p_rel_error sum_c P_c |v_cj|``.
  The ulp term is the final rounding to nearest (half an ulp at the magnitude of the value rounded).
* **Selection scores** (§3.5, §3.6): sums of non-negative terms, so an fp32 score has a relative error of at
  most ``max_g p_rel_error + gamma(G (M + N - 1) + 1)``, plus an absolute ``SCORE_UNDERFLOW`` per unit of
  weight (``G M N`` in all) where a P underflows in fp32. Two scores within twice that are a near tie
  (:func:`score_tolerance`).
* **topk_indices** (§3.8), slot by slot (:func:`topk_slot_errors`): the model's score at the returned index
  equals the model's k-th largest score within the score tolerance, and the index is the model's own wherever
  that score is separated from its neighbours in the sorted order by more than the tolerance, or wherever the
  caller knows the ties to be exact (equal scores order by index, §3.8): forced blocks (§3.7), and blocks whose
  model score is exactly 0 (ascending among themselves, §5). Indices lie in [0, Sel_b) with no duplicates.
* **softmax_max / softmax_sum** (§3.9): ``|got - model| <= STATS_RTOL |model|`` (plus ``STATS_MAX_ATOL`` for
  maxima near 0, where the fp32 dot product cancels).
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = [
    "U32",
    "unit_roundoff",
    "OUT_ULPS",
    "STATS_RTOL",
    "STATS_MAX_ATOL",
    "SCORE_UNDERFLOW",
    "gamma",
    "ulp",
    "ulp_distance",
    "round_to",
    "score_errors",
    "p_rel_error",
    "flip_mask",
    "attention_out_bound",
    "score_tolerance",
    "stats_errors",
    "topk_slot_errors",
]

U32 = 2.0 ** -24                 # unit roundoff of float32
U64 = 2.0 ** -53                 # unit roundoff of float64
OUT_ULPS = 0.5                   # attention_out: the final rounding to nearest in the dtype (§3.4)
STATS_RTOL = 1e-5                # softmax_max / softmax_sum, relative
STATS_MAX_ATOL = 1e-6            # softmax_max near 0 (cancellation in the fp32 dot product)
SCORE_UNDERFLOW = 2.0 ** -126   # per unit of weight: a P that underflows in fp32 (below the smallest normal)
EXP_ULPS = 8                     # accuracy assumed of an fp32 exp

FLT_MAX = 3.4028234663852886e38
LOW_PRECISION = (torch.bfloat16, torch.float16)

# Integer type of each dtype's bit pattern (ulp distances).
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}


def unit_roundoff(dtype: torch.dtype) -> float:
    """u of §3's arithmetic for inputs of ``dtype``: float32's, or float64's for the fp64 extension."""
    return U64 if dtype == torch.float64 else U32


def gamma(n, dtype: torch.dtype = torch.float32) -> float:
    """Bound of the relative error of an n-term sum or dot product (any order): n u / (1 - n u)."""
    u = unit_roundoff(dtype)
    return n * u / (1.0 - n * u)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at magnitude |x| (float64 tensor): 2^floor(log2|x|) * eps, and the subnormal
    spacing below the smallest normal number (also for x = 0)."""
    fi = torch.finfo(dtype)
    a = x.double().abs()
    binade = torch.exp2(torch.floor(torch.log2(a.clamp_min(fi.tiny))))
    return binade * fi.eps


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (float64) rounded to ``dtype`` (to nearest even) and back to float64."""
    return x.to(dtype).double() if dtype != torch.float64 else x.double()


def _ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns mapped to integers whose difference counts ulps (sign-magnitude -> two's complement)."""
    bits = t.contiguous().view(_BITS[t.dtype]).to(torch.int64)
    if t.dtype == torch.float64:
        mag = bits & 0x7FFFFFFFFFFFFFFF
    else:
        mag = bits & ((1 << (torch.finfo(t.dtype).bits - 1)) - 1)
    return torch.where(bits < 0, -mag, bits)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units in the last place of their (common) dtype, int64; NaN against NaN is 0, NaN against a
    number is 2^40."""
    d = (_ordered_bits(a) - _ordered_bits(b)).abs()
    na, nb = torch.isnan(a), torch.isnan(b)
    d = torch.where(na & nb, torch.zeros_like(d), d)
    return torch.where(na ^ nb, torch.full_like(d, 1 << 40), d)


def score_errors(S: torch.Tensor, dot_abs: torch.Tensor, visible: torch.Tensor, D: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """Bound of |s_c - S_c| for a computed score (§3.1): gamma(D + 1) dot_abs + u |S|, 0 where masked.

    S: exact scores (float64, already multiplied by the float32 scale); dot_abs: |scale| sum_i |q_i k_ci| of the
    same shape; visible: bool, False where atten_mask replaces the score; dtype: the inputs' dtype."""
    err = gamma(D + 1, dtype) * dot_abs + unit_roundoff(dtype) * S.abs()
    return torch.where(visible, err, torch.zeros_like(err))


def p_rel_error(S: torch.Tensor, dot_abs: torch.Tensor, visible: torch.Tensor, D: int,
                dtype: torch.dtype) -> torch.Tensor:
    """Per row (last dimension = the C entries of the row): the bound of the relative error of every P_c
    computed as §3.1-§3.3 say, for inputs of ``dtype`` (see the module doc). Shape: S's with the last dimension
    kept as 1."""
    C = S.shape[-1]
    u = unit_roundoff(dtype)
    dS = (score_errors(S, dot_abs, visible, D, dtype).amax(dim=-1, keepdim=True) if C
          else S.new_zeros(S.shape[:-1] + (1,)))
    m = torch.where(visible, S, torch.full_like(S, -float("inf"))).amax(dim=-1, keepdim=True) if C else dS
    spread = torch.where(visible, (S - m).abs(), torch.zeros_like(S)).amax(dim=-1, keepdim=True) if C else dS
    spread = torch.nan_to_num(spread, nan=0.0)  # a fully masked row: m = -inf, every P exact (1/C)
    return 4 * dS + 2 * u * spread + gamma(C, dtype) + (2 * EXP_ULPS + 1) * u


def flip_mask(p: torch.Tensor, dtype: torch.dtype, rel_err: torch.Tensor) -> torch.Tensor:
    """True where P (exact, float64) lies within ``rel_err * P`` of a rounding midpoint of ``dtype``: an fp32 P
    with that relative error may round to either neighbour (§3.4). Always False for fp32/fp64."""
    if dtype not in LOW_PRECISION:
        return torch.zeros_like(p, dtype=torch.bool)
    spacing = ulp(p, dtype)
    to_midpoint = 0.5 * spacing - (p - round_to(p, dtype)).abs()
    return to_midpoint <= rel_err * p.abs()


def attention_out_bound(ref: torch.Tensor, dtype: torch.dtype, p: torch.Tensor, v: torch.Tensor,
                        p_err: torch.Tensor, *, ulps: float = OUT_ULPS) -> torch.Tensor:
    """Per-element bound of |attention_out - ref| (see the module doc).

    ref: the model's output (float64; P rounded as §3.4 when dtype is bf16/fp16), shape [..., D2];
    p: the model's exact P, [..., C]; v: the values, [..., C, D2] (leading dimensions broadcast against p's);
    p_err: :func:`p_rel_error` of the rows, [..., 1]."""
    av = v.double().abs()
    low = dtype in LOW_PRECISION
    pr = round_to(p, dtype) if low else p
    C = p.shape[-1]
    e = gamma(C + 1, dtype) * _matvec(pr.abs(), av)
    if low:
        flips = torch.where(flip_mask(p, dtype, p_err), ulp(p, dtype), torch.zeros_like(p))
        e = e + _matvec(flips, av)
    else:
        e = e + p_err * _matvec(p.abs(), av)
    return e + ulps * ulp(ref.abs() + e, dtype)


def _matvec(w: torch.Tensor, av: torch.Tensor) -> torch.Tensor:
    """sum_c w[..., c] av[..., c, j] -> [..., j]."""
    return torch.matmul(w.unsqueeze(-2), av).squeeze(-2)


def score_tolerance(top: torch.Tensor, rel: torch.Tensor, weight: float) -> torch.Tensor:
    """How far apart two model scores may be and still be a near tie for an fp32 implementation: twice the error
    bound of one score (relative ``rel``, plus the underflow term of P values of total weight ``weight``, G M N
    for a group score). 0 for infinite (forced, §3.7) scores."""
    tol = 2 * (rel * top.abs() + weight * SCORE_UNDERFLOW)
    return torch.where(torch.isinf(top), torch.zeros_like(tol), tol)


def stats_errors(got: torch.Tensor, want: torch.Tensor, *, rtol: float = STATS_RTOL, atol: float = 0.0) -> torch.Tensor:
    """True where ``|got - want| > rtol |want| + atol`` (NaN equals NaN; use atol=STATS_MAX_ATOL for maxima)."""
    g, w = got.double(), want.double()
    same = (g == w) | (torch.isnan(g) & torch.isnan(w))
    return ~(same | ((g - w).abs() <= rtol * w.abs() + atol))


def topk_slot_errors(got: torch.Tensor, scores: torch.Tensor, rel: torch.Tensor, weight: float, *,
                     exact: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, str]:
    """The rule for topk_indices, slot by slot.

    got: returned indices [..., K] (any integer type); scores: the model's final scores [..., Sel] (float64,
    forced blocks +FLT_MAX or +inf); rel: relative error bound of one fp32 score, broadcast to [..., 1]
    (:func:`p_rel_error` max over the group + gamma(G (M + N - 1) + 1)); weight: G M N; exact: optional bool [..., 1] or [..., K], True
    where the caller knows equal model scores to be equal in fp32 too (then the §3.8 index order is required).

    Returns (bad [..., K] bool, reason): a slot is bad when its index is out of range or repeated, when the
    model's score at it differs from the model's slot-th largest by more than the tolerance, or when that score
    is separated from its neighbours by more than the tolerance (or is forced, or exact) and the index is not
    the model's, or when blocks of model score exactly 0 are not in ascending order (§5). reason names the first kind of failure found ("" when none)."""
    K, Sel = got.shape[-1], scores.shape[-1]
    g = got.long()
    in_range = (g >= 0) & (g < Sel)
    gc = g.clamp(0, max(Sel - 1, 0))
    srt = gc.sort(dim=-1)
    dup_sorted = torch.zeros_like(g, dtype=torch.bool)
    dup_sorted[..., 1:] = srt.values[..., 1:] == srt.values[..., :-1]
    dup = torch.zeros_like(dup_sorted).scatter(-1, srt.indices, dup_sorted)
    sorted_sc, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    kk = min(K, Sel)
    top = torch.full(g.shape, -float("inf"), dtype=torch.float64)
    want = torch.full_like(g, -1)
    top[..., :kk] = sorted_sc[..., :kk]
    want[..., :kk] = order[..., :kk]
    tol = score_tolerance(top, rel, weight)
    got_sc = scores.gather(-1, gc)
    close = (got_sc == top) | ((got_sc - top).abs() <= tol)
    inf = torch.full_like(top[..., :1], float("inf"))
    gap_prev = torch.cat([inf, top[..., :-1] - top[..., 1:]], dim=-1)
    nxt = torch.full_like(top, -float("inf"))
    n_next = min(K, Sel - 1)
    if n_next > 0:
        nxt[..., :n_next] = sorted_sc[..., 1:n_next + 1]
    gap_next = top - nxt
    forced = torch.isinf(top) | (top == FLT_MAX)
    strict = ((gap_prev > tol) & (gap_next > tol)) | forced
    if exact is not None:
        strict = strict | exact
    wrong = strict & (g != want)
    # Blocks whose model score is exactly 0 (no visible P: exactly 0 in fp32 too) tie exactly: ascending (§5).
    zero = got_sc == 0
    seen = torch.where(zero, g, torch.full_like(g, -1)).cummax(dim=-1).values
    prev = torch.cat([torch.full_like(g[..., :1], -1), seen[..., :-1]], dim=-1)
    zero_order = zero & (g < prev)
    reason = ("index outside [0, Sel)" if (~in_range).any() else "duplicate index" if dup.any() else
              "score at the returned index differs from the model's top-k score" if (~close).any() else
              "index differs from the model's where the score is separated, forced or an exact tie" if wrong.any()
              else "zero-score blocks not in ascending order" if zero_order.any() else "")
    return (~in_range) | dup | ~close | wrong | zero_order, reason
