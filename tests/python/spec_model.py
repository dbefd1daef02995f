"""An independent model of docs/spec/compress_attention.md §3/§4 in PyTorch fp64, written for this test suite
from the spec text (it shares no code with the C++ library), plus the checks that apply the comparison rules of
nsa_ops.tolerance to it.

Every float32 quantity of §3 is computed in float64: dot products, softmax, P.V, selection scores.
What §3 rounds is rounded: the scale is used as float32, P is rounded to the input dtype before P.V.
The output is returned unrounded (the comparison measures how far the operator is from it), with the
per-element bound of nsa_ops.tolerance.attention_out_bound beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nsa_ops import tolerance

FLT_MAX = float(torch.finfo(torch.float32).max)  # 3.4028234663852886e38
LOW_PRECISION = (torch.bfloat16, torch.float16)


def selection_weights(M: int, N: int) -> list[int]:
    """w_i = min(i+1, N, M+N-1-i), i in [0, M+N-1) (§3.5)."""
    return [min(i + 1, N, M + N - 1 - i) for i in range(M + N - 1)]


def pairwise_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """§3.6: pairwise over g in order, halving; an odd last element is carried up."""
    parts = list(parts)
    while len(parts) > 1:
        nxt = [parts[2 * i] + parts[2 * i + 1] for i in range(len(parts) // 2)]
        if len(parts) % 2:
            nxt.append(parts[-1])
        parts = nxt
    return parts[0]


def lengths(prefix: list[int]) -> list[int]:
    out, prev = [], 0
    for x in prefix:
        out.append(x - prev)
        prev = x
    return out


@dataclass
class ModelResult:
    attention_out: torch.Tensor  # [T, N1, D2] float64, not rounded to the dtype
    softmax_max: torch.Tensor    # [T, N1] float64 (natural layout)
    softmax_sum: torch.Tensor    # [T, N1] float64
    stats_max: torch.Tensor      # [T, N1, 8] float32 in the per-batch layout of §4
    stats_sum: torch.Tensor      # [T, N1, 8] float32
    scores: list[torch.Tensor]   # per batch: [N2, Sq_b, Sel_b] float64 final scores (forced = FLT_MAX)
    topk_indices: torch.Tensor   # [T, N2, K] int64
    uniform_rows: torch.Tensor   # [T] bool: rows whose P is uniform in every head (equal scores)
    out_bound: torch.Tensor      # [T, N1, D2] float64: tolerance.attention_out_bound of every element
    score_rel: list[torch.Tensor]  # per batch: [N2, Sq_b, 1] relative error bound of an fp32 score
    score_weight: int            # G * M * N: the total weight of the P values in one score


def model_forward(query, key, value, scale_value, head_num, compress_block_size, compress_stride,
                  select_block_size, select_block_count, topk_mask=None, atten_mask=None,
                  actual_seq_qlen=None, actual_cmp_seq_kvlen=None, actual_sel_seq_kvlen=None) -> ModelResult:
    dt = query.dtype
    T, N1, D = query.shape
    N2, D2 = key.shape[1], value.shape[2]
    assert head_num == N1 and N1 % N2 == 0
    G = N1 // N2
    l, d, lp, K = compress_block_size, compress_stride, select_block_size, select_block_count
    M, N = lp // d, l // d
    w = selection_weights(M, N)
    scale32 = torch.tensor(scale_value, dtype=torch.float32).item()  # §1: used as float32

    out = torch.zeros(T, N1, D2, dtype=torch.float64)
    out_bound = torch.zeros(T, N1, D2, dtype=torch.float64)
    score_rel = []
    smax = torch.zeros(T, N1, dtype=torch.float64)
    ssum = torch.zeros(T, N1, dtype=torch.float64)
    flat_max = torch.zeros(T * N1 * 8, dtype=torch.float32)
    flat_sum = torch.zeros(T * N1 * 8, dtype=torch.float32)
    topk = torch.zeros(T, N2, K, dtype=torch.int64)
    uniform = torch.zeros(T, dtype=torch.bool)
    scores = []
    q0 = c0 = 0
    for sq, C in zip(lengths(list(actual_seq_qlen)), lengths(list(actual_cmp_seq_kvlen))):
        Sel = -(-C // M)
        q = query[q0:q0 + sq].double()                                 # [sq, N1, D]
        k = key[c0:c0 + C].double().repeat_interleave(G, dim=1)        # [C, N1, D]: head h reads h // G
        v = value[c0:c0 + C].double().repeat_interleave(G, dim=1)      # [C, N1, D2]
        S = torch.einsum("shd,chd->hsc", q, k) * scale32               # §3.1, [N1, sq, C]
        dot_abs = torch.einsum("shd,chd->hsc", q.abs(), k.abs()) * abs(scale32)
        visible = torch.ones(1, sq, C, dtype=torch.bool)
        if atten_mask is not None:                                     # §3.2: replacement by -FLT_MAX
            visible = ~atten_mask[:sq, :C].bool().unsqueeze(0)
        p_err = tolerance.p_rel_error(S, dot_abs, visible.expand_as(S), D, dt)  # [N1, sq, 1]
        S = S.masked_fill(~visible, -FLT_MAX)
        # Rows whose scores are all equal (fully masked, or zero keys) have a uniform P: exact ties.
        uniform[q0:q0 + sq] = (S.amax(dim=-1) == S.amin(dim=-1)).all(dim=0)
        m = S.amax(dim=-1, keepdim=True)                               # §3.3
        E = torch.exp(S - m)
        lsum = E.sum(dim=-1, keepdim=True)
        P = E / lsum
        Pr = P.to(dt).double() if dt in LOW_PRECISION else P          # §3.4: cast(P)
        out[q0:q0 + sq] = torch.einsum("hsc,chd->shd", Pr, v)
        out_bound[q0:q0 + sq] = tolerance.attention_out_bound(
            out[q0:q0 + sq].permute(1, 0, 2), dt, P, v.permute(1, 0, 2).unsqueeze(1), p_err).permute(1, 0, 2)
        score_rel.append(p_err.view(N2, G, sq, 1).amax(dim=1) + tolerance.gamma(G * (M + N - 1) + 1, dt))
        smax[q0:q0 + sq] = m[..., 0].t()
        ssum[q0:q0 + sq] = lsum[..., 0].t()
        # §4: batch b at float 8*N1*q0, ordered [N1][Sq_b][8].
        base = 8 * N1 * q0
        flat_max[base:base + 8 * N1 * sq] = m.expand(N1, sq, 8).reshape(-1).float()
        flat_sum[base:base + 8 * N1 * sq] = lsum.expand(N1, sq, 8).reshape(-1).float()
        # §3.5: score_h[k] = sum_i w_i P[M(k+1) - i], P outside [0, C) is 0. Summed term by term in the
        # same order for every k (so that equal P windows give bitwise equal scores: exact ties).
        score_h = torch.zeros(N1, sq, Sel, dtype=torch.float64)
        for i, wi in enumerate(w):
            x = M * (torch.arange(Sel) + 1) - i
            valid = (x >= 0) & (x < C)
            score_h += torch.where(valid, P[..., x.clamp(0, C - 1)], 0.0) * wi
        score_h = score_h.view(N2, G, sq, Sel)
        score = pairwise_sum([score_h[:, g] for g in range(G)])         # §3.6, [N2, sq, Sel]
        if topk_mask is not None:                                      # §3.7
            score = score.masked_fill(topk_mask[:sq, :Sel].bool(), FLT_MAX)
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices  # §3.8
        topk[q0:q0 + sq] = order[..., :K].permute(1, 0, 2)
        scores.append(score)
        q0 += sq
        c0 += C
    return ModelResult(out, smax, ssum, flat_max.view(T, N1, 8), flat_sum.view(T, N1, 8), scores, topk, uniform,
                       out_bound, score_rel, G * M * N)


def plain_same_dtype(query, key, value, scale_value, atten_mask, actual_seq_qlen, actual_cmp_seq_kvlen):
    """A plain attention in the input dtype with ordinary torch ops (the "same-dtype" baseline of
    FlashAttention's error rule). Masked scores get the dtype's lowest finite value."""
    dt = query.dtype
    T, N1, _ = query.shape
    G = N1 // key.shape[1]
    out = torch.zeros(T, N1, value.shape[2], dtype=dt)
    q0 = c0 = 0
    for sq, C in zip(lengths(list(actual_seq_qlen)), lengths(list(actual_cmp_seq_kvlen))):
        if sq:
            q = query[q0:q0 + sq].transpose(0, 1)                              # [N1, sq, D]
            k = key[c0:c0 + C].repeat_interleave(G, dim=1).permute(1, 2, 0)    # [N1, D, C]
            v = value[c0:c0 + C].repeat_interleave(G, dim=1).transpose(0, 1)   # [N1, C, D2]
            S = torch.matmul(q, k) * scale_value
            if atten_mask is not None:
                S = S.masked_fill(atten_mask[:sq, :C].bool(), torch.finfo(dt).min)
            P = torch.softmax(S, dim=-1)
            out[q0:q0 + sq] = torch.matmul(P, v).transpose(0, 1)
        q0 += sq
        c0 += C
    return out


# ------------------------------------------------------------------------------------------- checks

def check_attention_out(got: torch.Tensor, res: ModelResult, plain: torch.Tensor, what: str = "") -> None:
    """Every element within tolerance.attention_out_bound of the model (a few ulps of its own magnitude, the
    fp32 accumulation term, the P rounding flips that P's fp32 error allows); and FlashAttention's rule: max
    |got - ref| <= 2 * max |plain - ref| + one rounding step at the output's magnitude."""
    ref = res.attention_out
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert torch.isfinite(got).all(), f"{what}: attention_out has non-finite values"
    if got.numel() == 0:
        return
    err = (got.double() - ref).abs()
    bad = err > res.out_bound
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} attention_out elements beyond their bound; first "
            f"[t, h, j] = {list(i)}: got {float(got[i])!r}, model {float(ref[i])!r}, error {float(err[i]):.3e} > "
            f"bound {float(res.out_bound[i]):.3e}; worst error / bound {float((err / res.out_bound).max()):.2f}")
    max_err = err.max().item()
    plain_err = (plain.double() - ref).abs().max().item()
    floor = torch.finfo(got.dtype).eps * max(ref.abs().max().item(), 1e-3)
    assert max_err <= 2 * plain_err + floor, (
        f"{what}: attention_out max error {max_err:.3e} > 2 x plain same-dtype error {plain_err:.3e} + floor {floor:.3e}")


def check_stats(got_max: torch.Tensor, got_sum: torch.Tensor, res: ModelResult, what: str = "") -> None:
    """softmax_max / softmax_sum in the §4 layout, element by element within tolerance.STATS_RTOL (plus
    STATS_MAX_ATOL for maxima near 0)."""
    assert got_max.dtype == torch.float32 and got_sum.dtype == torch.float32
    assert got_max.shape == res.stats_max.shape and got_sum.shape == res.stats_sum.shape
    for name, got, want, atol in (("softmax_max", got_max, res.stats_max, tolerance.STATS_MAX_ATOL),
                                  ("softmax_sum", got_sum, res.stats_sum, 0.0)):
        bad = tolerance.stats_errors(got, want, atol=atol)
        if bad.any():
            i = tuple(bad.nonzero()[0].tolist())
            raise AssertionError(f"{what} {name}: {int(bad.sum())} elements beyond rtol {tolerance.STATS_RTOL:g}; "
                                 f"first {list(i)}: got {float(got[i])!r}, model {float(want[i])!r}")


def check_topk(got: torch.Tensor, res: ModelResult, actual_seq_qlen, K: int, *, exact: bool = False,
               what: str = "") -> None:
    """topk_indices by tolerance.topk_slot_errors against the model's scores: in range, no duplicates; the
    model's score at every returned index equals the model's k-th score within the score tolerance; the index
    is the model's wherever that score is separated from its neighbours or forced, and in rows whose P is
    uniform (equal scores there are equal in fp32 too: the §3.8 index order is required; everywhere when
    `exact`); blocks of score 0 in ascending order."""
    assert got.dtype == torch.int32, got.dtype
    assert got.shape[-1] == K, (got.shape, K)
    q0 = 0
    for b, sq in enumerate(lengths(list(actual_seq_qlen))):
        score = res.scores[b]                                  # [N2, sq, Sel]
        g = got[q0:q0 + sq].permute(1, 0, 2)                   # [N2, sq, K]
        ex = res.uniform_rows[q0:q0 + sq].view(1, sq, 1) | exact
        bad, reason = tolerance.topk_slot_errors(g, score, res.score_rel[b], res.score_weight, exact=ex)
        if bad.any():
            n2, s, slot = bad.nonzero()[0].tolist()
            want = torch.sort(score[n2, s], descending=True, stable=True)
            raise AssertionError(
                f"{what}: batch {b}: topk_indices wrong at {int(bad.sum())} slots ({reason}); first (n2, s, slot) = "
                f"{(n2, s, slot)}: got {g[n2, s].tolist()}, model order {want.indices[:K + 2].tolist()} with scores "
                f"{[float(x) for x in want.values[:K + 2]]}, scores at got "
                f"{[float(score[n2, s][x]) if 0 <= x < score.shape[-1] else None for x in g[n2, s].tolist()]}")
        q0 += sq
