"""nsa_ops.NSAAttention (docs/spec/nsa_layer.md) and its plain-PyTorch oracle (nsa_ops.reference, §7).

Part 1 checks the oracle on its own: the worked examples of the operator contracts it composes and of §9, and
two of its steps against per-entry loops written straight from the contracts' formulas. Part 2 checks the module
against the oracle (§9): forward and every gradient with per-element tolerances, the discrete block choice, the
auxiliary outputs, short and empty sequences, gradcheck, argument errors, determinism, torch.compile without
recompilation, and the training example in smoke mode.
"""

from __future__ import annotations

import math
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


@pytest.fixture(autouse=True)
def _one_thread():
    """The sizes here are tiny: one thread is fastest, and immune to spinning workers on a shared machine. (The
    determinism test sets its own thread counts.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# ----------------------------------------------------------------------------------------------------------------
# Part 2: the module against the oracle
# ----------------------------------------------------------------------------------------------------------------

# Configurations: (constructor sizes, batches). The batches mix long sequences (Sel_b >= K), short ones
# (Sel_b < K), sequences around l (l - 1, l, l + 1 tokens), tiny ones (S_b < l: C_b = 0) and empty ones.
CFG_A = dict(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim_qk=32, head_dim_v=16, compress_block_size=32,
             compress_stride=16, select_block_size=64, select_block_count=4, window_size=48)
CFG_B = dict(hidden_size=48, num_heads=2, num_kv_heads=1, head_dim_qk=16, head_dim_v=16, compress_block_size=16,
             compress_stride=16, select_block_size=32, select_block_count=3, window_size=20)
CASES = [
    ("A-mixed", CFG_A, [0, 300, 300, 390, 410]),
    ("A-around-l", CFG_A, [0, 31, 63, 95, 257]),
    ("B-mixed", CFG_B, [0, 15, 16, 17, 200, 200, 330]),
]


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |x| (float64; the subnormal spacing below the smallest normal)."""
    fi = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(x.double().abs().clamp_min(fi.tiny)))) * fi.eps


def _within_rule(name: str, got: torch.Tensor, ref: torch.Tensor, plain: torch.Tensor, dtype: torch.dtype) -> None:
    """docs/spec/nsa_layer.md §9, element by element: |got - ref| <= 2·E_plain + ulp_T(|ref|), where E_plain is the
    largest error of the plain same-dtype implementation over the tensor (FlashAttention's rule: twice the error of
    a plain implementation in the same dtype) and ulp_T(|ref|) is the rounding floor of the dtype at the element's
    magnitude (the final rounding alone costs half of it). No element is exempt. The fp32 cases make the rule sharp
    (E_plain is a few fp32 ulps of the largest elements); the bf16 cases check the low-precision paths."""
    ref = ref.double()
    err = (got.double() - ref).abs()
    e_plain = (plain.double() - ref).abs().max()
    bound = 2 * e_plain + _ulp(ref, dtype)
    bad = ~(err <= bound)
    if bad.any():
        i = int((err - bound).flatten().argmax())
        idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), err.shape))
        raise AssertionError(f"{name}: {int(bad.sum())} of {err.numel()} elements outside the bound; worst at {idx}: "
                             f"got {got.flatten()[i].item():.6e}, ref {ref.flatten()[i].item():.6e}, err "
                             f"{err.flatten()[i].item():.3e} > bound {bound.flatten()[i].item():.3e} (E_plain "
                             f"{e_plain.item():.3e})")


def _module(cfg, dtype, seed=0):
    torch.manual_seed(seed)
    m = nsa_ops.NSAAttention(**cfg, dtype=dtype)
    with torch.no_grad():       # gates and compression weights away from their symmetric initial values
        m.compress_weight_k.add_(torch.randn_like(m.compress_weight_k) * 0.02)
        m.compress_weight_v.add_(torch.randn_like(m.compress_weight_v) * 0.02)
        m.g_proj.weight.mul_(4)
    return m


def _run_module(m, x, cu, dO):
    m.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out, aux = m(x, cu, return_aux=True)
    out.backward(dO)
    # A parameter the output does not depend on (the compression weights when no sequence reaches l tokens) has
    # no gradient: its gradient is zero.
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for n, p in m.named_parameters()}
    grads["hidden_states"] = x.grad.detach().clone()
    return out.detach(), aux, grads


def _run_reference(m, x, cu, dO, topk, dtype):
    params = {n: p.detach().to(dtype).requires_grad_(True) for n, p in m.named_parameters()}
    xr = x.detach().to(dtype).requires_grad_(True)
    res = nsa_layer_reference(params, xr, cu, m.config, topk_override=topk, dtype=dtype)
    res.output.backward(dO.to(dtype))
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.detach() for n, p in params.items()}
    grads["hidden_states"] = xr.grad.detach()
    return res, grads


@pytest.mark.parametrize("name,cfg,cu,dtype",
                         [c + (dt,) for c in CASES for dt in (torch.float32, torch.bfloat16)]
                         + [CASES[0] + (torch.float16,)],
                         ids=[f"{c[0]}-{n}" for c in CASES for n in ("fp32", "bf16")] + [f"{CASES[0][0]}-fp16"])
def test_module_matches_reference_forward_and_gradients(name, cfg, cu, dtype):
    """Output, aux branch outputs, and the gradients of all seven parameters and of the input, against the float64
    oracle fed the module's own block choice, within §9's rule (plain same-dtype implementation: the oracle's
    code evaluated in the module's dtype, with the same choice)."""
    m = _module(cfg, dtype)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(cu[-1], cfg["hidden_size"], generator=g).to(dtype)
    dO = torch.randn(cu[-1], cfg["hidden_size"], generator=g).to(dtype)
    out, aux, grads = _run_module(m, x, cu, dO)
    ref, ref_grads = _run_reference(m, x, cu, dO, aux.topk_indices, F64)
    plain, plain_grads = _run_reference(m, x, cu, dO, aux.topk_indices, dtype)
    assert out.dtype == dtype and out.shape == (cu[-1], cfg["hidden_size"])
    _within_rule("output", out, ref.output, plain.output, dtype)
    for branch in ("o_cmp", "o_slc", "o_swa"):
        _within_rule(branch, getattr(aux, branch), getattr(ref, branch), getattr(plain, branch), dtype)
    for pname in PARAMETER_NAMES + ("hidden_states",):
        _within_rule(f"grad {pname}", grads[pname], ref_grads[pname], plain_grads[pname], dtype)


def _oracle_choice_from_module_tensors(m, x, cu):
    """The oracle's selection scores computed from the module's own (rounded) q, kc and vc, so that they differ from
    the operator's only by its fp32 arithmetic (compress_attention.md §3); plus those tensors' fp64 copies."""
    with torch.no_grad():
        T = x.shape[0]
        q = m.q_proj(x).view(T, m.num_heads, m.head_dim_qk)
        k = m.k_proj(x).view(T, m.num_kv_heads, m.head_dim_qk)
        v = m.v_proj(x).view(T, m.num_kv_heads, m.head_dim_v)
        kc, cu_cmp = nsa_ops.compress(k, m.compress_weight_k, cu_seqlens=cu,
                                      compress_block_size=m.compress_block_size, compress_stride=m.compress_stride)
        vc, _ = nsa_ops.compress(v, m.compress_weight_v, cu_seqlens=cu,
                                 compress_block_size=m.compress_block_size, compress_stride=m.compress_stride)
    br = compressed_branch(q.double(), kc.double(), vc.double(), cu, list(cu_cmp), l=m.compress_block_size,
                           d=m.compress_stride, lp=m.select_block_size, K=m.select_block_count,
                           scale=1.0 / math.sqrt(m.head_dim_qk))
    return br, q.double(), kc.double(), list(cu_cmp)


U32 = 2.0 ** -24           # unit roundoff of float32


def _gamma(n: int) -> float:
    """Relative error bound of an n-term fp32 sum or dot product, in any order."""
    return n * U32 / (1 - n * U32)


def _score_rel_error(q, kc, cu, cu_cmp, m):
    """Per (row, KV head): a bound of the relative error of an fp32 selection score (compress_attention.md §3.1-§3.6).
    Score c of a row: |s_c - S_c| <= dS_c = gamma(D+1)·scale·sum|q||k| + u|S_c| (dot product, then the scale). Every
    P of the row then has a relative error of at most 4·max dS + 2u·max|S - m| + gamma(C) + 17u (the errors of s
    and of the maximum m inside exp, the subtraction, exp taken as accurate to 8 ulps, the C-term sum and the
    division); the weighted block sum and the group sum over G heads add gamma(G(M+N-1)+1)."""
    T, N1, D = q.shape
    N2 = kc.shape[1]
    G, M, N = N1 // N2, m.select_block_size // m.compress_stride, m.compress_block_size // m.compress_stride
    scale = float(torch.tensor(1.0 / math.sqrt(D), dtype=torch.float32))
    rel = torch.zeros(T, N2, 1, dtype=F64)
    for b in range(len(cu) - 1):
        s0, S, c0, C = cu[b], cu[b + 1] - cu[b], cu_cmp[b], cu_cmp[b + 1] - cu_cmp[b]
        if S == 0 or C == 0:
            continue
        qb, kb = q[s0:s0 + S], kc[c0:c0 + C].repeat_interleave(G, dim=1)
        sc = torch.einsum("shd,chd->shc", qb, kb) * scale
        dot_abs = torch.einsum("shd,chd->shc", qb.abs(), kb.abs()) * scale
        visible = ~(torch.arange(C)[None, :] * m.compress_stride + m.compress_block_size - 1
                    > torch.arange(S)[:, None]).unsqueeze(1).expand_as(sc)
        dS = torch.where(visible, _gamma(D + 1) * dot_abs + U32 * sc.abs(), torch.zeros_like(sc)).amax(-1)
        top = torch.where(visible, sc, torch.full_like(sc, -float("inf"))).amax(-1, keepdim=True)
        spread = torch.where(visible, (sc - top).abs(), torch.zeros_like(sc)).amax(-1).nan_to_num(nan=0.0)
        p_rel = 4 * dS + 2 * U32 * spread + _gamma(C) + 17 * U32           # [S, N1]; 0-visible rows: P exact
        rel[s0:s0 + S, :, 0] = p_rel.view(S, N2, G).amax(2) + _gamma(G * (M + N - 1) + 1)
    return rel, G * M * N


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,cfg,cu", CASES, ids=[c[0] for c in CASES])
def test_block_choice_against_oracle(name, cfg, cu, dtype):
    """§9: aux.topk_indices against the oracle's own choice. Per row and KV head with C_b > 0: exactly K_b indices,
    ascending, then -1; each chosen block's oracle score is within the fp32 tolerance of the oracle's K_b-th best;
    where the K_b-th and (K_b+1)-th scores are separated by more than the tolerance the set is the oracle's; exact
    ties (forced blocks, blocks whose score is exactly 0) are resolved by the smaller index as the oracle does.
    C_b = 0 rows hold [0, -1, ...]."""
    m = _module(cfg, dtype, seed=1)
    x = torch.randn(cu[-1], cfg["hidden_size"], generator=torch.Generator().manual_seed(8)).to(dtype)
    with torch.no_grad():
        _, aux = m(x, cu, return_aux=True)
    br, q, kc, cu_cmp = _oracle_choice_from_module_tensors(m, x, cu)
    rel, weight = _score_rel_error(q, kc, cu, cu_cmp, m)
    K, M = m.select_block_count, m.select_block_size // m.compress_stride
    got = aux.topk_indices.long()
    assert aux.topk_indices.dtype == torch.int32 and got.shape == (cu[-1], m.num_kv_heads, K)
    checked_separated = 0
    for b in range(len(cu) - 1):
        s0, S, C = cu[b], cu[b + 1] - cu[b], cu_cmp[b + 1] - cu_cmp[b]
        if S == 0:
            continue
        rows = got[s0:s0 + S]
        if C == 0:
            assert (rows[..., 0] == 0).all() and (rows[..., 1:] == -1).all(), f"batch {b}"
            continue
        Sel = -(-C // M)
        K_b = min(K, Sel)
        chosen = rows[..., :K_b]
        assert (rows[..., K_b:] == -1).all() and (chosen >= 0).all() and (chosen < Sel).all(), f"batch {b}"
        assert (chosen.diff(dim=-1) > 0).all(), f"batch {b}: not strictly ascending"
        scores = br.scores[s0:s0 + S, :, :Sel]                              # forced blocks: +inf
        srt = torch.sort(scores, dim=-1, descending=True, stable=True)
        kth = srt.values[..., K_b - 1:K_b]
        nxt = srt.values[..., K_b:K_b + 1] if Sel > K_b else torch.full_like(kth, -float("inf"))
        tol = 2 * (rel[s0:s0 + S] * kth.abs().nan_to_num(posinf=0.0) + weight * 2.0 ** -126)
        got_scores = scores.gather(-1, chosen)
        ok_score = (got_scores >= kth - tol) | (got_scores == kth)
        assert ok_score.all(), f"batch {b}: a chosen block scores below the oracle's K_b-th by more than the tolerance"
        want = torch.sort(srt.indices[..., :K_b], dim=-1).values
        separated = (kth - nxt > tol) | (torch.isinf(kth) & ~torch.isinf(nxt))
        exact_tie = (kth == nxt) & (torch.isinf(kth) | (kth == 0))          # equal in fp32 too: by index
        strict = (separated | exact_tie).expand_as(chosen)
        assert (chosen == want)[strict].all(), f"batch {b}: choice differs from the oracle's where it is determined"
        checked_separated += int(separated.sum())
        # Forced blocks that are candidates are present (when K_b leaves room for all of them).
        s = torch.arange(S)
        for blk in (torch.zeros_like(s), s // m.select_block_size, s // m.select_block_size - 1):
            cand = (blk >= 0) & (blk < Sel) & (K_b >= 3)
            present = (chosen == blk.view(S, 1, 1)).any(-1)
            assert present[cand].all(), f"batch {b}: a forced block is missing"
    assert checked_separated > 0


@pytest.mark.parametrize("name,cfg,cu", CASES[:2], ids=[c[0] for c in CASES[:2]])
def test_aux_outputs(name, cfg, cu):
    """NSAAux (§1): gates = sigmoid(fp32(g_proj(x))) as [T, N1, 3]; o_cmp zero on rows s < l - 1 and for C_b = 0;
    the output is exactly o_proj(rne(g_cmp·o_cmp + g_slc·o_slc + g_swa·o_swa)) of the aux tensors (§4 step 6)."""
    m = _module(cfg, torch.bfloat16)
    x = torch.randn(cu[-1], cfg["hidden_size"], generator=torch.Generator().manual_seed(9)).bfloat16()
    with torch.no_grad():
        out, aux = m(x, cu, return_aux=True)
        T, N1, Dv = cu[-1], m.num_heads, m.head_dim_v
        assert aux.gates.dtype == torch.float32 and aux.gates.shape == (T, N1, 3)
        want = torch.sigmoid(m.g_proj(x).double()).view(T, N1, 3)        # an fp32 sigmoid: within 2 ulps
        assert ((aux.gates.double() - want).abs() <= 2 * 2.0 ** -24 * want).all()
        for o in (aux.o_cmp, aux.o_slc, aux.o_swa):
            assert o.dtype == torch.bfloat16 and o.shape == (T, N1, Dv)
        g = aux.gates
        o = (g[..., 0:1] * aux.o_cmp.float() + g[..., 1:2] * aux.o_slc.float() + g[..., 2:3] * aux.o_swa.float())
        assert torch.equal(out, m.o_proj(o.bfloat16().reshape(T, N1 * Dv)))
        assert torch.equal(out, m(x, cu))                                   # return_aux changes nothing
        for other in (tuple(cu), torch.tensor(cu, dtype=torch.int32), torch.tensor(cu, dtype=torch.int64)):
            assert torch.equal(out, m(x, other))                            # lists, tuples and tensors alike
    for b in range(len(cu) - 1):
        s0, S = cu[b], cu[b + 1] - cu[b]
        zero_rows = min(S, m.compress_block_size - 1)
        assert (aux.o_cmp[s0:s0 + zero_rows] == 0).all()
        if S >= m.compress_block_size:
            assert (aux.o_cmp[s0 + zero_rows:s0 + S].abs().sum((1, 2)) > 0).all()


def test_only_short_and_empty_sequences():
    """Every sequence shorter than l (no compressed token anywhere, R = 0) or empty, and T = 0 altogether: o_cmp = 0,
    indices [0, -1, ...], finite gradients; the result equals the oracle's."""
    cfg = CFG_A
    m = _module(cfg, torch.float64)
    cu = [0, 0, 31, 36, 36]                                                 # 31 < l = 32 and 5 tokens
    x = torch.randn(cu[-1], cfg["hidden_size"], dtype=F64, generator=torch.Generator().manual_seed(10))
    dO = torch.randn_like(x)
    out, aux, grads = _run_module(m, x, cu, dO)
    assert (aux.o_cmp == 0).all() and (aux.topk_indices[..., 0] == 0).all() and (aux.topk_indices[..., 1:] == -1).all()
    ref, ref_grads = _run_reference(m, x, cu, dO, None, F64)
    assert torch.allclose(out, ref.output, rtol=1e-12, atol=1e-13)
    # fp64 gradients: the attention operators' backwards recompute P from their float32 softmax statistics
    # (select_attention.md §5, window_attention.md §5), so they carry float32-level relative errors.
    for pname in PARAMETER_NAMES + ("hidden_states",):
        err = (grads[pname] - ref_grads[pname]).abs().max()
        assert err <= 2.0 ** -20 * ref_grads[pname].abs().max(), (pname, err)
    assert (grads["compress_weight_k"] == 0).all() and (grads["compress_weight_v"] == 0).all()
    out0 = m(x[:0], [0, 0])
    assert out0.shape == (0, cfg["hidden_size"])
    out0, aux0 = m(x[:0], torch.tensor([0]).repeat(3), return_aux=True)
    assert out0.shape == (0, cfg["hidden_size"]) and aux0.topk_indices.shape == (0, 2, 4)


def test_gradcheck_fp64():
    """torch.autograd.gradcheck of the fp64 module with respect to the input and all seven parameters, on a tiny
    configuration where every batch selects all its blocks (K_b = Sel_b: the discrete choice cannot flip under the
    finite-difference perturbation), with one sequence shorter than l."""
    cfg = dict(hidden_size=8, num_heads=2, num_kv_heads=1, head_dim_qk=4, head_dim_v=4, compress_block_size=16,
               compress_stride=16, select_block_size=16, select_block_count=3, window_size=6)
    m = _module(cfg, torch.float64)
    cu = torch.tensor([0, 40, 49])                                          # C = 2, Sel = 2 < K; then 9 < l tokens
    x = torch.randn(49, 8, dtype=F64, generator=torch.Generator().manual_seed(11), requires_grad=True)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in m.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x, cu))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
    # The exact Jacobian of a few entries too (slow mode, one input at a time kept small).
    assert torch.autograd.gradcheck(lambda w: f(x.detach(), *params[:5], w, params[6]), (params[5],), eps=1e-6,
                                    atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_heads=3, num_kv_heads=2), "num_heads"),
    (dict(head_dim_v=48), "head_dim_v"),
    (dict(compress_block_size=24), "compress_block_size"),
    (dict(compress_stride=8), "compress_stride"),
    (dict(compress_stride=80, compress_block_size=80, select_block_size=80), "compress_stride"),
    (dict(select_block_size=72), "select_block_size"),
    (dict(compress_block_size=48, select_block_size=32), "select_block_size"),
    (dict(compress_block_size=16, compress_stride=32), "compress_block_size"),
    (dict(select_block_size=144), "select_block_size"),
    (dict(compress_stride=32, compress_block_size=32, select_block_size=48), "select_block_size"),
    (dict(select_block_count=0), "select_block_count"),
    (dict(select_block_count=33), "select_block_count"),
    (dict(window_size=0), "window_size"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_kv_heads=0), "num_kv_heads"),
    (dict(head_dim_qk=-1), "head_dim_qk"),
])
def test_constructor_errors_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        nsa_ops.NSAAttention(**{**CFG_A, **kwargs})


@pytest.mark.parametrize("kwargs,message", [(dict(hidden_size=64.0), "hidden_size"),
                                            (dict(window_size=True), "window_size"),
                                            (dict(num_heads="4"), "num_heads")])
def test_constructor_type_errors_name_the_argument(kwargs, message):
    with pytest.raises(TypeError, match=message):
        nsa_ops.NSAAttention(**{**CFG_A, **kwargs})


def test_forward_argument_errors():
    m = nsa_ops.NSAAttention(**CFG_A)
    x = torch.randn(40, 64)
    for bad_x, message in ((torch.randn(40, 32), "hidden_states"), (torch.randn(40, 64, 1), "hidden_states"),
                           (x.double(), "hidden_states"), ([1.0], "hidden_states")):
        with pytest.raises((ValueError, TypeError), match=message):
            m(bad_x, [0, 40])
    for cu, message in (([0, 20, 30], "cu_seqlens\\[-1\\]"), ([5, 40], "start with 0"),
                        ([0, 30, 20, 40], "non-decreasing"), ([40], "B\\+1"), (torch.tensor([0.0, 40.0]), "integer"),
                        (torch.tensor([[0, 40]]), "1-D"), ("0,40", "cu_seqlens")):
        with pytest.raises((ValueError, TypeError), match=message):
            m(x, cu)


def test_parameters_and_initialisation():
    """§2: names, shapes, nn.Linear defaults drawn in the table's order from the global generator, compression
    weights 1/l; seeding before construction reproduces the module."""
    cfg = CFG_A
    H, N1, N2, Dqk, Dv, l = 64, 4, 2, 32, 16, 32
    torch.manual_seed(123)
    m = nsa_ops.NSAAttention(**cfg)
    torch.manual_seed(123)
    want = [torch.nn.Linear(H, N1 * Dqk, bias=False).weight, torch.nn.Linear(H, N2 * Dqk, bias=False).weight,
            torch.nn.Linear(H, N2 * Dv, bias=False).weight, torch.nn.Linear(H, 3 * N1, bias=False).weight,
            torch.nn.Linear(N1 * Dv, H, bias=False).weight]
    params = dict(m.named_parameters())
    assert set(params) == set(PARAMETER_NAMES) and len(params) == 7
    for name, w in zip(PARAMETER_NAMES[:5], want):
        assert torch.equal(params[name], w), name
    for name in PARAMETER_NAMES[5:]:
        assert params[name].shape == (l, N2) and (params[name] == 1.0 / l).all()
    assert not any(mod.bias is not None for mod in (m.q_proj, m.k_proj, m.v_proj, m.g_proj, m.o_proj))
    torch.manual_seed(123)
    again = nsa_ops.NSAAttention(**cfg)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values()))
    mb = nsa_ops.NSAAttention(**cfg, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in mb.parameters())
    assert m.config == cfg


def _forward_backward(m, x, cu, dO):
    out, aux, grads = _run_module(m, x, cu, dO)
    return [out, aux.topk_indices, aux.o_cmp, aux.o_slc, aux.o_swa] + [grads[n] for n in sorted(grads)]


def test_deterministic_across_runs_and_thread_counts():
    """§9: bitwise equal outputs, indices and gradients for repeated runs and for 1 and 2 threads."""
    cfg, cu = CFG_A, [0, 300, 300, 390, 410]
    m = _module(cfg, torch.bfloat16, seed=3)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(cu[-1], cfg["hidden_size"], generator=g).bfloat16()
    dO = torch.randn(cu[-1], cfg["hidden_size"], generator=g).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _forward_backward(m, x, cu, dO)
        torch.set_num_threads(2)
        two = _forward_backward(m, x, cu, dO)
        again = _forward_backward(m, x, cu, dO)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(one, two, again):
        assert torch.equal(a, b) and torch.equal(b, c)


@pytest.mark.parametrize("dtype,cu", [(torch.bfloat16, [0, 5, 135, 305, 395, 415]),
                                      (torch.float32, [0, 130, 300, 390, 410])], ids=["bf16", "fp32"])
def test_sequence_alone_equals_sequence_in_batch(dtype, cu):
    """§9: a sequence's output rows, indices, gates, branch outputs and input gradient do not depend on the other
    sequences of the batch (bitwise). The q/k/v/g/o projections are torch's nn.Linear: its fp32 CPU GEMM gives
    row-dependent last bits for calls with fewer than about 12 rows, so the fp32 case keeps every sequence longer
    than that (the bf16 case includes a 5-token sequence)."""
    cfg = CFG_A
    m = _module(cfg, dtype, seed=4)
    g = torch.Generator().manual_seed(13)
    x = torch.randn(cu[-1], cfg["hidden_size"], generator=g).to(dtype)
    dO = torch.randn(cu[-1], cfg["hidden_size"], generator=g).to(dtype)
    full = _run_module(m, x, cu, dO)
    for b in range(len(cu) - 1):
        s0, s1 = cu[b], cu[b + 1]
        alone = _run_module(m, x[s0:s1], [0, s1 - s0], dO[s0:s1])
        assert torch.equal(alone[0], full[0][s0:s1]), f"sequence {b}: output"
        for field in nsa_ops.NSAAux._fields:
            assert torch.equal(getattr(alone[1], field), getattr(full[1], field)[s0:s1]), f"sequence {b}: {field}"
        assert torch.equal(alone[2]["hidden_states"], full[2]["hidden_states"][s0:s1]), f"sequence {b}: dx"


def test_compile_does_not_recompile_for_new_lengths():
    """§12 item 8: torch.compile(fullgraph=True) of forward + backward with cu_seqlens as a tensor compiles once for
    every batch composition with the same T and B (sequences shorter than l, empty ones and long ones included) and
    gives the eager results bit for bit (aot_eager backend: the same kernels). A new number of sequences changes the
    tensor's shape: dynamo's automatic dynamic shapes then compile once more, with B symbolic, and never again."""
    import torch._dynamo

    cfg = CFG_B
    m = _module(cfg, torch.float32, seed=5)
    T = 200
    same_b = [[0, 15, 16, 200], [0, 100, 190, 200], [0, 120, 120, 200], [0, 0, 0, 200]]
    other_b = [[0, 50, 200], [0, 10, 60, 70, 90, 200]]
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        from torch._dynamo.backends.common import aot_autograd
        return aot_autograd(fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g)(gm, example_inputs)

    def step(x, cu):
        out, aux = m(x, cu, return_aux=True)
        return out, aux.topk_indices

    torch._dynamo.reset()
    try:
        compiled = torch.compile(step, backend=backend, fullgraph=True)
        g = torch.Generator().manual_seed(14)
        x = torch.randn(T, cfg["hidden_size"], generator=g)
        dO = torch.randn(T, cfg["hidden_size"], generator=g)
        for i, composition in enumerate(same_b + other_b):
            want = _run_module(m, x, composition, dO)
            m.zero_grad(set_to_none=True)
            xc = x.clone().requires_grad_(True)
            out, topk = compiled(xc, torch.tensor(composition, dtype=torch.int64))
            out.backward(dO)
            assert torch.equal(out, want[0]) and torch.equal(topk, want[1].topk_indices), composition
            assert torch.equal(xc.grad, want[2]["hidden_states"]), composition
            for n, p in m.named_parameters():
                assert torch.equal(p.grad, want[2][n]), (composition, n)
            if i == len(same_b) - 1:
                assert len(compiles) == 1, f"{len(compiles)} compilations for one T and B"
        assert len(compiles) == 2, f"{len(compiles)} compilations for one T and three values of B"
    finally:
        torch._dynamo.reset()


def test_opcheck_of_the_compile_path_operators():
    """torch.library.opcheck of the two operators behind the compiled path (schema, autograd registration, fake
    kernels against the real ones, AOT dispatch), on a batch with a sequence shorter than l and two K_b groups."""
    g = torch.Generator().manual_seed(15)
    T, cu = 120, torch.tensor([0, 15, 16, 120])
    q = torch.randn(T, 2, 16, generator=g, requires_grad=True)
    k = torch.randn(T, 1, 16, generator=g, requires_grad=True)
    v = torch.randn(T, 1, 16, generator=g, requires_grad=True)
    wk = torch.rand(16, 1, generator=g).requires_grad_(True)
    wv = torch.rand(16, 1, generator=g).requires_grad_(True)
    scalars = (16, 16, 32, 3, 0.25)
    res = torch.library.opcheck(torch.ops.nsa.layer_compressed_branch.default, (q, k, v, wk, wv, cu) + scalars)
    assert all(r == "SUCCESS" for r in res.values()), res
    grad = torch.randn(T, 2, 16, generator=g)
    res = torch.library.opcheck(torch.ops.nsa.layer_compressed_branch_backward.default,
                                (grad,) + tuple(t.detach() for t in (q, k, v, wk, wv)) + (cu,) + scalars)
    assert all(r == "SUCCESS" for r in res.values()), res


def test_train_tiny_lm_smoke(capsys):
    """examples/train_tiny_lm.py --smoke (run in this process): a few steps of both models at tiny sizes, finite
    losses, both summaries printed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_tiny_lm", REPO / "examples" / "train_tiny_lm.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    for kind in ("nsa", "dense"):
        assert f"{kind}:" in out and "validation loss" in out, out
