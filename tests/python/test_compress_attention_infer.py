"""nsa_ops.npu_nsa_compress_attention_infer (torch.ops.nsa.compress_attention_infer): docs/spec/decode.md §3.

An independent fp64 model (NumPy loops over the paged compressed cache through the block table), the §5 worked
example, random TND / BSND cases (G = 1 and G > 1, D != Dv, P = 1 and P not dividing C_b, shuffled pages, -1
padding in the tables, MTP causality) on the CPU backend and the reference against the model (§6), the drop-in's
signature and defaults, argument errors naming the argument, the raising backward, opcheck, torch.compile.
"""

import inspect
import math

import numpy as np
import pytest
import torch

import nsa_ops

FLT_MAX = float(np.finfo(np.float32).max)


def model(q_rows, key, value, table, qlen, clen, slen, N2, l, d, lp, K, scale, mtp, dtype):
    """§3 in fp64 for the query rows of each batch (q_rows[b][i]: [N1, D]); returns per (b, i): out [N1, Dv],
    tolerance [N1, Dv], scores per n2 (Sel' values, +inf forced) and the scores' relative tolerance."""
    k = key.double().numpy()
    v = value.double().numpy()
    P = k.shape[1]
    D = k.shape[2] // N2
    Dv = v.shape[2] // N2
    M, Nn = lp // d, l // d
    w = [min(i + 1, Nn, M + Nn - 1 - i) for i in range(M + Nn - 1)]
    eps = 2.0**-24 if dtype != torch.float64 else 2.0**-53
    low = dtype in (torch.bfloat16, torch.float16)
    ulp = (lambda x: np.spacing(np.float32(np.abs(x))).astype(np.float64) * (2.0**16 if dtype == torch.bfloat16 else 2.0**13)) \
        if low else (lambda x: np.spacing(np.abs(x).astype(np.float32)).astype(np.float64) if dtype == torch.float32
                     else np.spacing(np.abs(x)))
    res = {}
    for b, C in enumerate(clen):
        sel = math.ceil(((C - 1) * d + l) / lp)
        kc = np.stack([k[table[b][c // P], c % P] for c in range(C)]).reshape(C, N2, D)
        vc = np.stack([v[table[b][c // P], c % P] for c in range(C)]).reshape(C, N2, Dv)
        for i in range(qlen[b]):
            q = q_rows[b][i].double().numpy()
            N1 = q.shape[0]
            G = N1 // N2
            out = np.zeros((N1, Dv))
            tol = np.zeros((N1, Dv))
            scores, rtol = [], []
            for n2 in range(N2):
                total = np.zeros(sel)
                worst = 0.0
                for g in range(G):
                    h = n2 * G + g
                    terms = q[h][None, :] * kc[:, n2, :]
                    worst = max(worst, np.abs(terms).sum(1).max() * abs(scale))
                    S = terms.sum(1) * scale
                    if mtp:
                        pos = slen[b] - qlen[b] + i
                        S = np.where(np.arange(C) * d + l - 1 > pos, -FLT_MAX, S)
                    e = np.exp(S - S.max())
                    p = e / e.sum()
                    pr = torch.tensor(p).to(dtype).double().numpy() if dtype != torch.float64 else p
                    out[h] = pr @ vc[:, n2, :]
                    rel = 16 * eps + 4 * D * eps * worst
                    flip = (ulp(p)[:, None] * np.abs(vc[:, n2, :])).max(0) if low else 0
                    tol[h] = ulp(out[h]) + (16 * eps + rel) * (np.abs(p)[:, None] * np.abs(vc[:, n2, :])).sum(0) + 2 * flip
                    for kk in range(sel):
                        for t, wt in enumerate(w):
                            x = M * (kk + 1) - t
                            if 0 <= x < C:
                                total[kk] += wt * p[x]
                total[0] = np.inf
                total[max(sel - 2, 0)] = np.inf
                total[sel - 1] = np.inf
                scores.append(total)
                rtol.append(64 * eps + 8 * D * eps * worst)
            res[(b, i)] = (out, tol, scores, rtol)
    return res


def check(result, md, qlen, K, bsnd, Sq=1):
    out, idx = result
    row = 0
    for b in range(len(qlen)):
        for i in range(Sq if bsnd else qlen[b]):
            o = out[b, i] if bsnd else out[row]
            ix = idx[b, i] if bsnd else idx[row]
            row += 1
            if i >= qlen[b]:  # BSND padding rows
                assert torch.all(o == 0) and torch.all(ix == -1)
                continue
            mo, mt, scores, rtol = md[(b, i)]
            err = np.abs(o.double().numpy() - mo)
            assert np.all(err <= mt), f"attention_out (b={b}, i={i}) off by {err.max()} > {mt[err > mt].min()}"
            for n2, (sc, rt) in enumerate(zip(scores, rtol)):
                order = np.argsort(-sc, kind="stable")
                got = ix[n2].tolist()
                sel = len(sc)
                assert got[sel:] == [-1] * max(0, K - sel)
                assert len(set(got[:min(K, sel)])) == min(K, sel)
                for j in range(min(K, sel)):
                    e = sc[order[j]]
                    if np.isinf(e):
                        assert got[j] == order[j]
                    else:
                        assert abs(sc[got[j]] - e) <= rt * abs(e) + 1e-30, (b, i, n2, j, got, order[:K])


def make_case(dtype, layout, N1, N2, D, Dv, P, l, d, lp, K, qlen, clen, mtp, Sq=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    need = [(c + P - 1) // P for c in clen]
    num_pages = sum(need) + 2
    perm = torch.randperm(num_pages, generator=g).tolist()
    maxp = max(need) + 2
    table, k0 = [], 0
    for n in need:
        table.append(perm[k0:k0 + n] + [-1] * (maxp - n))
        k0 += n
    key = (torch.rand(num_pages, P, N2 * D, generator=g) * 3 - 1.5).to(dtype)
    value = (torch.rand(num_pages, P, N2 * Dv, generator=g) * 3 - 1.5).to(dtype)
    # S_b consistent with C_b; even batches end exactly on a window (their MTP tokens before the last are masked
    # from the last compressed token), odd ones a random distance past it
    slen = [(c - 1) * d + l + (0 if b % 2 == 0 else int(torch.randint(d, (1,), generator=g))) for b, c in enumerate(clen)]
    B = len(clen)
    if layout == "TND":
        query = (torch.rand(sum(qlen), N1, D, generator=g) * 3 - 1.5).to(dtype)
        offs = np.cumsum([0] + qlen)
        q_rows = [[query[offs[b] + i] for i in range(qlen[b])] for b in range(B)]
    else:
        query = (torch.rand(B, Sq, N1, D, generator=g) * 3 - 1.5).to(dtype)
        q_rows = [[query[b, i] for i in range(qlen[b])] for b in range(B)]
    kwargs = dict(layout=layout, atten_mask=torch.ones(1, dtype=torch.bool) if mtp else None,
                  block_table=torch.tensor(table, dtype=torch.int32), actual_seq_qlen=qlen, actual_cmp_seq_kvlen=clen,
                  actual_sel_seq_kvlen=slen)
    args = (query, key, value, 1 / math.sqrt(D), N1, N2, lp, K, P, l, d)
    md = model(q_rows, key, value, table, qlen, clen, slen, N2, l, d, lp, K, 1 / math.sqrt(D),
               mtp and max(qlen) > 1, dtype)
    return args, kwargs, md


CASES = [
    # layout, N1, N2, D, Dv, P, l, d, lp, K, qlen, clen, mtp, Sq
    ("TND", 2, 2, 24, 16, 5, 32, 16, 64, 4, [1, 1, 1], [7, 33, 70], False, 1),
    ("TND", 4, 1, 32, 32, 1, 32, 16, 64, 3, [2, 3, 1], [5, 40, 2], True, 1),
    ("BSND", 4, 2, 19, 12, 16, 32, 16, 64, 5, [3, 1, 2], [50, 9, 130], True, 3),
    ("TND", 3, 1, 16, 8, 7, 4, 2, 8, 40, [1, 2], [150, 61], False, 1),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_random_vs_model(dtype, case):
    layout, N1, N2, D, Dv, P, l, d, lp, K, qlen, clen, mtp, Sq = CASES[case]
    args, kwargs, md = make_case(dtype, layout, N1, N2, D, Dv, P, l, d, lp, K, qlen, clen, mtp, Sq, seed=case)
    got = nsa_ops.npu_nsa_compress_attention_infer(*args, **kwargs)
    check(got, md, qlen, K, layout == "BSND", Sq)
    ref = torch.ops.nsa.compress_attention_infer_reference(*args, **kwargs)
    check(ref, md, qlen, K, layout == "BSND", Sq)
    # lengths as tensors (the .tensor_lengths overload): the same bits
    tk = dict(kwargs, **{k: torch.tensor(kwargs[k], dtype=torch.int32) for k in
                         ("actual_seq_qlen", "actual_cmp_seq_kvlen", "actual_sel_seq_kvlen")})
    got_t = nsa_ops.npu_nsa_compress_attention_infer(*args, **tk)
    assert torch.equal(got_t[0], got[0]) and torch.equal(got_t[1], got[1])


def test_worked_example_section5():
    """§5: C_0 = 4 (S_0 = 80), l = 32, d = 16, l' = 64: Sel' = 2, topk [0, 1] (K = 2) and [0, 1, -1] (K = 3); MTP with
    q_0 = 2: token 0 (position 78) does not see compressed token 3, token 1 sees all four."""
    key = torch.zeros(2, 2, 8)  # zero keys: equal scores, P uniform over the visible tokens
    value = torch.ones(2, 2, 8)
    value[0, 1] = 100.0  # compressed token 3 = page table[1] = 0, row 1
    table = torch.tensor([[1, 0]], dtype=torch.int32)
    q = torch.randn(2, 1, 8)
    for K, want in ((2, [0, 1]), (3, [0, 1, -1])):
        out, idx = nsa_ops.npu_nsa_compress_attention_infer(
            q, key, value, 0.5, 1, 1, 64, K, 2, 32, 16, atten_mask=torch.tensor([True]), block_table=table,
            actual_seq_qlen=[2], actual_cmp_seq_kvlen=[4], actual_sel_seq_kvlen=[80])
        assert idx.tolist() == [[want], [want]]
        assert torch.allclose(out[0], torch.ones(1, 8))  # mean of tokens 0..2
        assert torch.equal(out[1], torch.full((1, 8), 25.75))  # (1 + 1 + 1 + 100) / 4


def test_signature_matches_torch_npu():
    sig = inspect.signature(nsa_ops.npu_nsa_compress_attention_infer)
    assert list(sig.parameters) == [
        "query", "key", "value", "scale_value", "head_num", "key_value_head_num", "select_block_size",
        "select_block_count", "page_block_size", "compress_block_size", "compress_stride", "layout", "atten_mask",
        "block_table", "topk_mask", "actual_seq_qlen", "actual_cmp_seq_kvlen", "actual_sel_seq_kvlen"]
    kw = {n: p.default for n, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY}
    assert kw == {"layout": "TND", "atten_mask": None, "block_table": None, "topk_mask": None,
                  "actual_seq_qlen": None, "actual_cmp_seq_kvlen": None, "actual_sel_seq_kvlen": None}
    sig = inspect.signature(nsa_ops.npu_nsa_compress_infer)
    assert list(sig.parameters) == ["input", "weight", "slot_mapping", "compress_block_size", "compress_stride",
                                    "page_block_size", "block_table", "actual_seq_len", "cache"]
    assert sig.parameters["cache"].kind == inspect.Parameter.KEYWORD_ONLY


def _small():
    return make_case(torch.float32, "TND", 4, 2, 16, 8, 4, 32, 16, 64, 2, [2, 1], [6, 9], True, seed=3)[:2]


@pytest.mark.parametrize("change,message", [
    (dict(layout="BSH"), 'layout must be "TND" or "BSND"'),
    (dict(block_table=None), "block_table must be given"),
    (dict(actual_cmp_seq_kvlen=None), "actual_cmp_seq_kvlen must be given"),
    (dict(actual_sel_seq_kvlen=None), "actual_sel_seq_kvlen must be given"),
    (dict(actual_seq_qlen=[1, 1]), "query (TND) must have T = sum(actual_seq_qlen) = 2 rows, got T = 3"),
    (dict(actual_cmp_seq_kvlen=[6, 0]), "actual_cmp_seq_kvlen[1] must be >= 1"),
    (dict(actual_sel_seq_kvlen=[200, 160]), "actual_cmp_seq_kvlen[0] (6) must equal (S_b - l) / d + 1"),
    (dict(block_table=torch.tensor([[0, 1, 2, -1, -1], [3, -1, 5, -1, -1]], dtype=torch.int32)),
     "block_table[1, 1] = -1 must be a page of key/value"),
    (dict(block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)), "which need page index 2"),
    (dict(block_table=torch.tensor([[0, 1, 2], [3, 4, 5]])), "block_table must be an int32 tensor"),
])
def test_argument_errors(change, message):
    args, kwargs = _small()
    kwargs.update(change)
    with pytest.raises(RuntimeError) as e:
        nsa_ops.npu_nsa_compress_attention_infer(*args, **kwargs)
    assert message in str(e.value)


@pytest.mark.parametrize("index,value,message", [
    (4, 3, "head_num (3) must equal the number of query heads N1"),
    (5, 3, "must be a positive multiple of key_value_head_num (3)"),
    (8, 8, "page_block_size (8) must equal key.shape[1]"),
    (6, 40, "select_block_size (40) must be a multiple of compress_stride (16)"),
    (7, 0, "select_block_count must be >= 1"),
    (10, 0, "compress_stride must be >= 1"),
])
def test_argument_errors_positional(index, value, message):
    args, kwargs = _small()
    args = list(args)
    args[index] = value
    with pytest.raises(RuntimeError) as e:
        nsa_ops.npu_nsa_compress_attention_infer(*args, **kwargs)
    assert message in str(e.value)


def test_backward_raises():
    """No derivative (§3): the forward runs on tensors that require grad; a backward through it raises."""
    args, kwargs = _small()
    q = args[0].clone().requires_grad_()
    out, idx = nsa_ops.npu_nsa_compress_attention_infer(q, *args[1:], **kwargs)
    assert out.requires_grad and not idx.requires_grad
    with pytest.raises(RuntimeError, match="has no derivative"):
        out.sum().backward()


@pytest.mark.parametrize("tensor_lengths", [False, True])
def test_opcheck(tensor_lengths):
    args, kwargs = _small()
    op = torch.ops.nsa.compress_attention_infer.default
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if tensor_lengths:
        op = torch.ops.nsa.compress_attention_infer.tensor_lengths
        kwargs = dict(kwargs, **{k: torch.tensor(kwargs[k]) for k in
                                 ("actual_seq_qlen", "actual_cmp_seq_kvlen", "actual_sel_seq_kvlen")})
        utils += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(op, args, kwargs, test_utils=utils)
    # BSND shapes through the Meta kernel
    bargs, bkw = make_case(torch.float32, "BSND", 2, 1, 8, 8, 4, 32, 16, 64, 3, [2, 1], [3, 5], False, Sq=2)[:2]
    torch.library.opcheck(torch.ops.nsa.compress_attention_infer.default, bargs, bkw,
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_decode_steps():
    """torch.compile (fullgraph, dynamic) over decode steps whose lengths are tensors: results equal eager."""
    args, kwargs = _small()
    tk = {k: torch.tensor(kwargs[k]) for k in ("actual_seq_qlen", "actual_cmp_seq_kvlen", "actual_sel_seq_kvlen")}

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(q, k, v, table, mask, ql, cl, sl):
        return nsa_ops.npu_nsa_compress_attention_infer(q, k, v, 0.25, 4, 2, 64, 2, 4, 32, 16, atten_mask=mask,
                                                        block_table=table, actual_seq_qlen=ql,
                                                        actual_cmp_seq_kvlen=cl, actual_sel_seq_kvlen=sl)

    eager = nsa_ops.npu_nsa_compress_attention_infer(args[0], args[1], args[2], 0.25, 4, 2, 64, 2, 4, 32, 16,
                                                     **kwargs)
    out = step(args[0], args[1], args[2], kwargs["block_table"], kwargs["atten_mask"], tk["actual_seq_qlen"],
               tk["actual_cmp_seq_kvlen"], tk["actual_sel_seq_kvlen"])
    assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_equals_training_attention_out(dtype):
    """Decode consistency: for one query token and the full compressed sequence (no mask), attention_out is the
    training operator's (npu_nsa_compress_attention, compress_attention.md §3 steps 1-4: the same rne(P).V rule),
    within the attention tolerance; the decode forced blocks lead the top-k."""
    N1, N2, D, Dv, C, P = 4, 2, 32, 16, 37, 8
    g = torch.Generator().manual_seed(11)
    q = (torch.rand(1, N1, D, generator=g) * 2 - 1).to(dtype)
    kc = (torch.rand(C, N2, D, generator=g) * 2 - 1).to(dtype)
    vc = (torch.rand(C, N2, Dv, generator=g) * 2 - 1).to(dtype)
    pages = (C + P - 1) // P
    perm = torch.randperm(pages + 1, generator=g)[:pages]
    key = torch.zeros(pages + 1, P, N2 * D, dtype=dtype)
    value = torch.zeros(pages + 1, P, N2 * Dv, dtype=dtype)
    for c in range(C):
        key[perm[c // P], c % P] = kc[c].reshape(-1)
        value[perm[c // P], c % P] = vc[c].reshape(-1)
    scale = 1 / math.sqrt(D)
    out, idx = nsa_ops.npu_nsa_compress_attention_infer(
        q, key, value, scale, N1, N2, 64, 4, P, 32, 16, block_table=perm.to(torch.int32)[None, :],
        actual_cmp_seq_kvlen=[C])
    train = nsa_ops.npu_nsa_compress_attention(q, kc, vc, scale, N1, 32, 16, 64, 4, actual_seq_qlen=[1],
                                               actual_cmp_seq_kvlen=[C])[0]
    tol = 2 * torch.finfo(dtype).eps * vc.float().abs().max() + (0 if dtype == torch.float32 else 2**-8)
    assert (out.float() - train.float()).abs().max() <= tol
    sel = math.ceil(((C - 1) * 16 + 32) / 64)
    assert idx[0, :, :3].tolist() == [[0, sel - 2, sel - 1]] * N2


def test_compile_new_lengths_do_not_recompile():
    """Decode steps with new lengths (same tensor shapes) reuse one compiled graph (.tensor_lengths overload)."""
    import torch._dynamo.testing

    args, kwargs = _small()
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def step(q, k, v, table, mask, ql, cl, sl):
        return nsa_ops.npu_nsa_compress_attention_infer(q, k, v, 0.25, 4, 2, 64, 2, 4, 32, 16, atten_mask=mask,
                                                        block_table=table, actual_seq_qlen=ql,
                                                        actual_cmp_seq_kvlen=cl, actual_sel_seq_kvlen=sl)

    compiled = torch.compile(step, backend=cnt, fullgraph=True)
    for cl in ([6, 9], [5, 8], [6, 7]):
        sl = [(c - 1) * 16 + 32 for c in cl]
        t = [torch.tensor(x) for x in (kwargs["actual_seq_qlen"], cl, sl)]
        got = compiled(args[0], args[1], args[2], kwargs["block_table"], kwargs["atten_mask"], *t)
        want = step(args[0], args[1], args[2], kwargs["block_table"], kwargs["atten_mask"], *t)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert cnt.frame_count == 1


def test_decode_step_composition_section1():
    """§1 steps 2-3 with the cache geometry of §1: compress_infer writes compressed token c of batch b into slot
    bt_cmp[b, c // P_cmp] * P_cmp + c % P_cmp of a [num_slots, N2, D] cache, which compress_attention_infer reads as
    [num_pages, P_cmp, N2 * D]. After decoding S tokens one at a time, attention_out equals the training path
    (npu_nsa_compress over the whole sequence, then npu_nsa_compress_attention for the last token) in fp32."""
    l, d, lp, K, P, P_cmp, N1, N2, D, S = 32, 16, 64, 2, 5, 3, 4, 2, 16, 150
    g = torch.Generator().manual_seed(21)
    k_seq = torch.rand(S, N2, D, generator=g) * 2 - 1
    v_seq = torch.rand(S, N2, D, generator=g) * 2 - 1
    w_k = torch.rand(l, N2, generator=g)
    w_v = torch.rand(l, N2, generator=g)
    q = torch.rand(1, N1, D, generator=g) * 2 - 1
    raw_pages = (S + P - 1) // P
    perm = torch.randperm(raw_pages, generator=g)
    k_raw = torch.zeros(raw_pages, P, N2, D)
    v_raw = torch.zeros(raw_pages, P, N2, D)
    C = (S - l) // d + 1
    cmp_pages = (C + P_cmp - 1) // P_cmp
    bt_cmp = (torch.randperm(cmp_pages + 2, generator=g)[:cmp_pages]).to(torch.int32)
    cache_k = torch.zeros((cmp_pages + 2) * P_cmp, N2, D)
    cache_v = torch.zeros_like(cache_k)
    table = perm.to(torch.int32)[None, :]
    for s in range(1, S + 1):
        p = s - 1  # §1 step 1: the new token's raw key and value
        k_raw[perm[p // P], p % P] = k_seq[p]
        v_raw[perm[p // P], p % P] = v_seq[p]
        c = max(s - l, 0) // d
        slot = torch.tensor([int(bt_cmp[c // P_cmp]) * P_cmp + c % P_cmp], dtype=torch.int32)
        for raw, w, cache in ((k_raw, w_k, cache_k), (v_raw, w_v, cache_v)):  # §1 step 2
            nsa_ops.npu_nsa_compress_infer(raw, w, slot, l, d, P, block_table=table, actual_seq_len=[s], cache=cache)
    num_pages = cache_k.shape[0] // P_cmp
    out, idx = nsa_ops.npu_nsa_compress_attention_infer(  # §1 step 3
        q, cache_k.view(num_pages, P_cmp, N2 * D), cache_v.view(num_pages, P_cmp, N2 * D), 0.25, N1, N2, lp, K,
        P_cmp, l, d, block_table=bt_cmp[None, :], actual_cmp_seq_kvlen=[C])
    kc = nsa_ops.npu_nsa_compress(k_seq, w_k, l, d, actual_seq_len=[S])
    vc = nsa_ops.npu_nsa_compress(v_seq, w_v, l, d, actual_seq_len=[S])
    assert torch.equal(cache_k[bt_cmp.long().repeat_interleave(P_cmp) * P_cmp + torch.arange(cmp_pages * P_cmp) % P_cmp][:C],
                       kc)  # the training rows, bitwise (fp32: no rounding)
    train = nsa_ops.npu_nsa_compress_attention(q, kc, vc, 0.25, N1, l, d, lp, K, actual_seq_qlen=[1],
                                               actual_cmp_seq_kvlen=[C])[0]
    assert torch.allclose(out, train, rtol=0, atol=1e-6)
    sel = math.ceil(((C - 1) * d + l) / lp)
    assert idx[0, :, :K].tolist() == [[0, sel - 2, sel - 1][:K]] * N2
