"""nsa_ops.NSAAttention (docs/spec/nsa_layer.md) and its plain-PyTorch oracle (nsa_ops.reference, §7).

Part 1 checks the oracle on its own: the worked examples of the operator contracts it composes and of §9, and
two of its steps against per-entry loops written straight from the contracts' formulas. Part 2 checks the module
against the oracle (§9): forward and every gradient with per-element tolerances, the discrete block choice, the
auxiliary outputs, short and empty sequences, gradcheck, argument errors, determinism, torch.compile without
recompilation, and the training example in smoke mode.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nsa_ops
from nsa_ops.reference import (
    PARAMETER_NAMES,
    compress_tokens,
    compressed_branch,
    nsa_layer_reference,
    selected_branch,
    window_branch,
)

REPO = Path(__file__).resolve().parents[2]
F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------------
# Part 1: the oracle on its own
# ----------------------------------------------------------------------------------------------------------------

def test_reference_compress_worked_examples():
    """docs/spec/compress.md §8 A (by hand) and C (a leading empty batch and a short one)."""
    x = torch.tensor([1.0, 2.0, 3.0], dtype=F64).view(3, 1, 1)
    w = torch.tensor([[0.5], [0.25]], dtype=F64)
    out, cu_cmp = compress_tokens(x, w, [0, 3], 2, 1)
    assert out.flatten().tolist() == [1.0, 1.75] and cu_cmp == [0, 2]

    torch.manual_seed(0)
    x = torch.randn(49, 2, 3, dtype=F64)
    w = torch.randn(32, 2, dtype=F64)
    out, cu_cmp = compress_tokens(x, w, [0, 0, 5, 49], 32, 16)
    assert cu_cmp == [0, 0, 0, 1] and out.shape == (1, 2, 3)
    want = torch.einsum("wn,wnj->nj", w, x[5:37])
    assert torch.allclose(out[0], want, rtol=1e-14, atol=0)


def test_reference_select_worked_example():
    """docs/spec/select_attention.md §10: cases i-iv, the future-only and all-empty rows, and the gradients."""
    S = 10
    q = torch.ones(S, 1, 1, dtype=F64)
    k = torch.zeros(S, 1, 1, dtype=F64, requires_grad=True)
    v = torch.arange(S, dtype=F64).view(S, 1, 1).requires_grad_(True)

    def row5(indices):
        topk = torch.full((S, 1, 3), -1)
        topk[5, 0] = torch.tensor(indices)
        return selected_branch(q, k, v, topk, [0, S], lp=4, scale=1.0)

    for indices, want in (([1, 0, 2], 2.5), ([1, 1, 0], 3.0), ([0, 1, 2], 2.5)):
        assert row5(indices)[5].item() == pytest.approx(want, abs=1e-15)
    for indices in ([2, 1, 2], [-1, -1, -1]):
        topk = torch.full((S, 1, 3), -1)
        topk[1, 0] = torch.tensor(indices)
        assert selected_branch(q, k, v, topk, [0, S], lp=4, scale=1.0)[1].item() == 0.0

    # Gradients with dO[5] = 1: case i, then case iii.
    kg, vg = torch.autograd.grad(row5([1, 0, 2])[5].sum(), (k, v))
    assert torch.allclose(kg.flatten()[:6], torch.tensor([-5, -3, -1, 1, 3, 5], dtype=F64) / 12, atol=1e-15)
    assert torch.allclose(vg.flatten()[:6], torch.full((6,), 1 / 6, dtype=F64), atol=1e-15)
    assert kg.flatten()[6:].abs().max() == 0 and vg.flatten()[6:].abs().max() == 0
    kg, vg = torch.autograd.grad(row5([1, 1, 0])[5].sum(), (k, v))
    assert torch.allclose(kg.flatten()[:6], torch.tensor([-3 / 8, -2 / 8, -1 / 8, 0, 0.25, 0.5], dtype=F64),
                          atol=1e-15)
    assert torch.allclose(vg.flatten()[:6], torch.tensor([1 / 8] * 4 + [2 / 8] * 2, dtype=F64), atol=1e-15)


def test_reference_window_worked_example():
    """docs/spec/window_attention.md §10: window 3 over 5 tokens; with equal scores each row averages its keys."""
    q, k = torch.zeros(5, 1, 1, dtype=F64), torch.zeros(5, 1, 1, dtype=F64)
    v = torch.eye(5, dtype=F64).view(5, 1, 5)
    P = window_branch(q, k, v, [0, 5], window=3, scale=1.0)[:, 0]
    seen = [{0}, {0, 1}, {0, 1, 2}, {1, 2, 3}, {2, 3, 4}]
    for i, keys in enumerate(seen):
        want = torch.tensor([1.0 / len(keys) if j in keys else 0.0 for j in range(5)], dtype=F64)
        assert torch.allclose(P[i], want, atol=1e-15)


def test_reference_section9_table():
    """docs/spec/nsa_layer.md §9: C_b, Sel_b, K_b, padding and forced blocks for [4096, 600, 20] tokens (sizes
    reduced to N1 = N2 = 1, D = 1, which leaves the counts and the discrete structure unchanged)."""
    torch.manual_seed(1)
    cu = [0, 4096, 4696, 4716]
    k = torch.randn(4716, 1, 1, dtype=F64)
    v = torch.randn(4716, 1, 1, dtype=F64)
    q = torch.randn(4716, 1, 1, dtype=F64)
    w = torch.full((32, 1), 1 / 32, dtype=F64)
    kc, cu_cmp = compress_tokens(k, w, cu, 32, 16)
    vc, _ = compress_tokens(v, w, cu, 32, 16)
    assert kc.shape == (291, 1, 1) and cu_cmp == [0, 255, 291, 291]
    br = compressed_branch(q, kc, vc, cu, cu_cmp, l=32, d=16, lp=64, K=16, scale=1.0)
    topk = br.topk_indices[:, 0]
    assert (topk[:4096] >= 0).all() and (topk[:4096].diff(dim=-1) > 0).all()                   # 16 ascending
    assert (topk[4096:4696, :9] == torch.arange(9)).all() and (topk[4096:4696, 9:] == -1).all()  # all 9, then -1
    assert (topk[4696:, 0] == 0).all() and (topk[4696:, 1:] == -1).all()
    assert (br.o_cmp[:31] == 0).all() and (br.o_cmp[31] != 0).all()
    assert (br.o_cmp[4096:4096 + 31] == 0).all() and (br.o_cmp[4696:] == 0).all()
    # Row s = 100 of batch 0 sees compressed tokens 0..4 and has blocks {0, 1} forced (score +inf).
    assert torch.isinf(br.scores[100, 0, :2]).all() and not torch.isinf(br.scores[100, 0, 2:]).any()
    assert {0, 1} <= set(topk[100].tolist())
    # Block scores of row 100: only blocks 0 and 1 hold visible compressed tokens (0..4).
    assert (br.scores[100, 0, 2:] == 0).all()
    # Batch 1's tail (local 576..599) cannot select block 9: it is not a candidate.
    assert topk[4096 + 576:4696].max() == 8


def _loop_select(q, k, v, topk, S, lp, scale):
    """select_attention.md §3-§4 entry by entry (one batch, causal, fp64): a list of (position) per slot entry."""
    T, N1, _ = q.shape
    N2 = k.shape[1]
    G = N1 // N2
    out = torch.zeros(T, N1, v.shape[2], dtype=F64)
    for s in range(T):
        for h in range(N1):
            n2 = h // G
            entries = [int(x) * lp + r for x in topk[s, n2].tolist() if x != -1 for r in range(lp)]
            entries = [p for p in entries if p < S and p <= s]
            if not entries:
                continue
            sc = torch.stack([(q[s, h] * k[p, n2]).sum() * scale for p in entries])
            P = torch.softmax(sc, dim=0)
            out[s, h] = sum(P[i] * v[p, n2] for i, p in enumerate(entries))
    return out


def test_reference_selected_branch_matches_entry_loop():
    """Random indices with duplicates, -1 and future blocks; partial last block; G = 2."""
    torch.manual_seed(2)
    S, N1, N2, D, Dv, lp, K = 37, 4, 2, 5, 3, 8, 4
    q, k, v = torch.randn(S, N1, D, dtype=F64), torch.randn(S, N2, D, dtype=F64), torch.randn(S, N2, Dv, dtype=F64)
    topk = torch.randint(-1, -(-S // lp), (S, N2, K))
    topk[3, 0] = torch.tensor([0, 0, -1, 4])
    got = selected_branch(q, k, v, topk, [0, S], lp=lp, scale=0.7)
    want = _loop_select(q, k, v, topk, S, lp, 0.7)
    assert torch.allclose(got, want, rtol=1e-13, atol=1e-14)


def test_reference_compressed_scores_match_double_sum():
    """compress_attention.md §3.5 in its first form, score_h[k] = sum_{m<M} sum_{n<N} P[M(k+1) - m - n], against the
    oracle's weighted form, on rows that see some tokens (l = 32, d = 16, l' = 64: M = 4, N = 2; and l = d)."""
    torch.manual_seed(3)
    for l, d, lp in ((32, 16, 64), (16, 16, 32), (64, 16, 64)):
        S, N1, N2, D = 300, 2, 1, 4
        C = (S - l) // d + 1
        q, kc = torch.randn(S, N1, D, dtype=F64), torch.randn(C, N2, D, dtype=F64)
        vc = torch.randn(C, N2, D, dtype=F64)
        br = compressed_branch(q, kc, vc, [0, S], [0, C], l=l, d=d, lp=lp, K=1, scale=0.5)
        M, N = lp // d, l // d
        Sel = -(-C // M)
        logits = torch.einsum("shd,cd->shc", q, kc[:, 0]) * 0.5
        hidden = torch.arange(C)[None, :] * d + l - 1 > torch.arange(S)[:, None]
        P = torch.softmax(logits.masked_fill(hidden[:, None, :], -3.4028234663852886e38), dim=-1)
        for s in (l - 1, 100, 200, 299):
            cur = s // lp
            for kk in range(Sel):
                forced = kk < 1 or cur - 2 < kk <= cur
                total = sum(P[s, h, x] for h in range(N1) for m in range(M) for n in range(N)
                            if 0 <= (x := M * (kk + 1) - m - n) < C)
                got = br.scores[s, 0, kk]
                assert math.isinf(got) if forced else abs(got - total) <= 1e-14, (l, d, lp, s, kk)


def _params64(seed, cfg):
    g = torch.Generator().manual_seed(seed)
    H, N1, N2, Dqk, Dv, l = (cfg[n] for n in ("hidden_size", "num_heads", "num_kv_heads", "head_dim_qk",
                                              "head_dim_v", "compress_block_size"))
    shapes = {"q_proj.weight": (N1 * Dqk, H), "k_proj.weight": (N2 * Dqk, H), "v_proj.weight": (N2 * Dv, H),
              "g_proj.weight": (3 * N1, H), "o_proj.weight": (H, N1 * Dv), "compress_weight_k": (l, N2),
              "compress_weight_v": (l, N2)}
    return {n: (torch.randn(shapes[n], generator=g, dtype=F64) / math.sqrt(shapes[n][1])).requires_grad_(True)
            for n in PARAMETER_NAMES}


SMALL = dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim_qk=16, head_dim_v=16, compress_block_size=32,
             compress_stride=16, select_block_size=64, select_block_count=4, window_size=48)


def test_reference_layer_mixed_batch_gradients_finite():
    """Long, short (C_b < K·M), tiny (S_b < l) and empty sequences: finite output and gradients for every
    parameter; rows of the tiny sequence have o_cmp = 0 and indices [0, -1, ...]."""
    p = _params64(4, SMALL)
    cu = [0, 300, 300, 390, 410, 410]
    x = torch.randn(410, 32, dtype=F64, generator=torch.Generator().manual_seed(5))
    res = nsa_layer_reference(p, x, cu, SMALL)
    assert res.output.shape == (410, 32) and torch.isfinite(res.output).all()
    res.output.square().sum().backward()
    for name in PARAMETER_NAMES:
        assert torch.isfinite(p[name].grad).all() and p[name].grad.abs().sum() > 0, name
    assert (res.o_cmp[390:410] == 0).all() and (res.topk_indices[390:410, :, 0] == 0).all()
    assert (res.topk_indices[390:410, :, 1:] == -1).all()
    # Batch 2 (90 tokens): C = 4, Sel = 1 < K: one block, then -1.
    assert (res.topk_indices[300:390, :, 0] == 0).all() and (res.topk_indices[300:390, :, 1:] == -1).all()
