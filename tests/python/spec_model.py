"""An independent model of SPEC.md §3/§4 in PyTorch fp64, written for this test suite from the spec text
(it shares no code with the C++ library), plus the comparison rules of STYLE.md.

Every float32 quantity of §3 is computed in float64: dot products, softmax, P.V, selection scores.
What §3 rounds is rounded: the scale is used as float32, P is rounded to the input dtype before P.V.
The output is returned unrounded (the comparison measures how far the operator is from it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
        if atten_mask is not None:                                     # §3.2: replacement by -FLT_MAX
            S = S.masked_fill(atten_mask[:sq, :C].bool(), -FLT_MAX)
        # Rows whose scores are all equal (fully masked, or zero keys) have a uniform P: exact ties.
        uniform[q0:q0 + sq] = (S.amax(dim=-1) == S.amin(dim=-1)).all(dim=0)
        m = S.amax(dim=-1, keepdim=True)                               # §3.3
        E = torch.exp(S - m)
        lsum = E.sum(dim=-1, keepdim=True)
        P = E / lsum
        Pr = P.to(dt).double() if dt in LOW_PRECISION else P          # §3.4: cast(P)
        out[q0:q0 + sq] = torch.einsum("hsc,chd->shd", Pr, v)
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
    return ModelResult(out, smax, ssum, flat_max.view(T, N1, 8), flat_sum.view(T, N1, 8), scores, topk, uniform)


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

def check_attention_out(got: torch.Tensor, ref: torch.Tensor, plain: torch.Tensor, what: str = "") -> None:
    """FlashAttention's rule: max |got - ref| <= 2 * max |plain - ref| + floor (one rounding step at the
    output's magnitude)."""
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert torch.isfinite(got).all(), f"{what}: attention_out has non-finite values"
    if got.numel() == 0:
        return
    err = (got.double() - ref).abs().max().item()
    plain_err = (plain.double() - ref).abs().max().item()
    floor = torch.finfo(got.dtype).eps * max(ref.abs().max().item(), 1e-3)
    assert err <= 2 * plain_err + floor, (
        f"{what}: attention_out max error {err:.3e} > 2 x plain same-dtype error {plain_err:.3e} + floor {floor:.3e}")
    if got.dtype in LOW_PRECISION:
        # Most elements sit within one rounding step of the model, which rounds P as §3.4 does. (The rule
        # above alone does not notice a missing cast(P): that leaves ~5-10% of the elements several steps off.)
        eps = torch.finfo(got.dtype).eps
        step = eps * ref.abs() + eps * 1e-3 * ref.abs().max()
        frac = ((got.double() - ref).abs() > step).double().mean().item()
        assert frac <= 0.01, f"{what}: {frac:.2%} of attention_out is more than a rounding step from the model"


def check_stats(got_max: torch.Tensor, got_sum: torch.Tensor, res: ModelResult, what: str = "") -> None:
    """softmax_max / softmax_sum in the §4 layout, rtol 1e-5 (a tiny atol for maxima near 0)."""
    assert got_max.dtype == torch.float32 and got_sum.dtype == torch.float32
    assert got_max.shape == res.stats_max.shape and got_sum.shape == res.stats_sum.shape
    torch.testing.assert_close(got_max, res.stats_max, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} softmax_max: {m}")
    torch.testing.assert_close(got_sum, res.stats_sum, rtol=1e-5, atol=0.0, msg=lambda m: f"{what} softmax_sum: {m}")


def check_topk(got: torch.Tensor, res: ModelResult, actual_seq_qlen, K: int, *, exact: bool = False,
               rel_tol: float = 1e-5, what: str = "") -> None:
    """topk_indices: in range, no duplicates; identical to the model at every position whose score is
    separated from its neighbours in the sorted order by more than the tolerance (or is forced, or sits in
    a row whose P is uniform, where ties are exact by construction; everywhere when `exact`); elsewhere
    the scores at the returned indices equal the model's top-k scores within the tolerance."""
    assert got.dtype == torch.int32, got.dtype
    q0 = 0
    for b, sq in enumerate(lengths(list(actual_seq_qlen))):
        score = res.scores[b]                                  # [N2, sq, Sel]
        Sel = score.shape[-1]
        g = got[q0:q0 + sq].permute(1, 0, 2).long()            # [N2, sq, K]
        assert ((g >= 0) & (g < Sel)).all(), f"{what}: batch {b}: topk index outside [0, {Sel})"
        srt = g.sort(dim=-1).values
        assert (srt[..., 1:] != srt[..., :-1]).all(), f"{what}: batch {b}: duplicate topk indices"
        sorted_sc, sorted_idx = torch.sort(score, dim=-1, descending=True, stable=True)
        top = sorted_sc[..., :K]
        tol = rel_tol * top.abs() + 1e-7 * score.shape[0]
        got_sc = score.gather(-1, g)
        bad = (got_sc - top).abs() > tol
        assert not bad.any(), (f"{what}: batch {b}: scores at returned indices differ from the model's top-k "
                               f"at {bad.nonzero()[:5].tolist()}")
        inf = torch.full_like(top[..., :1], float("inf"))
        gap_prev = torch.cat([inf, top[..., :-1] - top[..., 1:]], dim=-1)
        nxt = sorted_sc[..., 1:K + 1]
        if nxt.shape[-1] < K:
            nxt = torch.cat([nxt, torch.full_like(top[..., :1], -float("inf"))], dim=-1)
        gap_next = top - nxt
        strict = (gap_prev > tol) & (gap_next > tol) | (top == FLT_MAX)
        strict |= res.uniform_rows[q0:q0 + sq].view(1, sq, 1)
        if exact:
            strict |= True
        mism = strict & (g != sorted_idx[..., :K])
        assert not mism.any(), (f"{what}: batch {b}: topk differs from the model at (n2, s, slot) "
                                f"{mism.nonzero()[:5].tolist()}: got {g[mism][:5].tolist()}, "
                                f"want {sorted_idx[..., :K][mism][:5].tolist()}")
        q0 += sq
