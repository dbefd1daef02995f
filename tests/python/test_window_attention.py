"""Sliding-window attention (docs/spec/window_attention.md): the drop-ins npu_fusion_attention /
npu_fusion_attention_grad and nsa_ops.sliding_window_attention against an independent plain-PyTorch model (a dense
masked softmax in fp64, written here from §4-§7), torch_npu's signatures, the errors of unsupported arguments, the
output tuples, opcheck, gradcheck in fp64, and torch.compile (fullgraph, forward and backward, no recompilation for
new lengths)."""

import inspect
import math

import pytest
import torch

import nsa_ops

FLT_MAX = torch.finfo(torch.float32).max
NO_LIMIT = 2147483647
E = inspect.Parameter.empty
MASK = nsa_ops.compressed_atten_mask()


# ------------------------------------------------------------------------------------------------ the fp64 model
def visible(sq, skv, mode, pre, nxt, mask):
    """[sq, skv] bool, True where local key j is visible to local query i (§4)."""
    if mask is None:
        return torch.ones(sq, skv, dtype=torch.bool)
    i = torch.arange(sq)[:, None]
    j = torch.arange(skv)[None, :]
    o = skv - sq
    pre, nxt = max(min(pre, 1 << 40), -(1 << 40)), max(min(nxt, 1 << 40), -(1 << 40))
    if mode == 0:
        return (mask[:sq, :skv] == 0) & (j >= i - pre) & (j <= i + nxt)
    if mode == 1:
        return mask[:sq, :skv] == 0
    if mode == 2:
        return j <= i
    if mode == 3:
        return j <= i + o
    return (j >= i + o - pre) & (j <= i + o + nxt)


def extents(lst):
    """(begin, length) per batch of a prefix-sum list with the trailing-zero convention of §3."""
    last = max([b for b, x in enumerate(lst) if x != 0], default=-1)
    out = []
    for b in range(len(lst)):
        if b > last:
            out.append((lst[last] if last >= 0 else 0, 0))
        else:
            begin = lst[b - 1] if b else 0
            out.append((begin, lst[b] - begin))
    return out


def model(q, k, v, scale, seq_q, seq_kv, mode=0, pre=NO_LIMIT, nxt=NO_LIMIT, mask=None, ip=0, round_p=True):
    """attention_out (fp64, before the final rounding), m and l per (row, head) ([T1, N1]), and the magnitudes
    sum |P||v| and max ulp(P)|v| per output element. Differentiable in q, k, v (P unrounded when round_p=False)."""
    dt = q.dtype
    T1, N1, _ = q.shape
    N2, Dv = k.shape[1], v.shape[2]
    G = N1 // N2
    out = torch.zeros(T1, N1, Dv, dtype=torch.float64)
    m_all = torch.zeros(T1, N1, dtype=torch.float64)
    l_all = torch.zeros(T1, N1, dtype=torch.float64)
    pv_abs = torch.zeros(T1, N1, Dv, dtype=torch.float64)
    flip = torch.zeros(T1, N1, Dv, dtype=torch.float64)
    rows = []
    low = dt in (torch.bfloat16, torch.float16)
    rnd = (lambda p: p.to(dt).double()) if (round_p and low) else (lambda p: p)
    s32 = float(torch.tensor(scale, dtype=torch.float32))
    for (q0, sq), (k0, skv) in zip(extents(seq_q), extents(seq_kv)):
        if sq == 0:
            continue
        qb = q[q0:q0 + sq].double().reshape(sq, N2, G, -1)
        kb, vb = k[k0:k0 + skv].double(), v[k0:k0 + skv].double()
        s = torch.einsum("sngd,cnd->sngc", qb, kb) * s32
        vis = visible(sq, skv, mode, pre, nxt, mask)[:, None, None, :]
        none = ~vis.any(dim=-1, keepdim=True)  # [sq, 1, 1, 1]
        s = s.masked_fill(~vis, -math.inf)
        m = s.amax(dim=-1, keepdim=True)
        m_safe = torch.where(none, torch.zeros_like(m), m)
        e = torch.exp(s - m_safe).masked_fill(~vis, 0.0)
        l = e.sum(dim=-1, keepdim=True)
        p = e / torch.where(none, torch.ones_like(l), l)
        o = torch.einsum("sngc,cne->snge", rnd(p), vb)
        pa = torch.einsum("sngc,cne->snge", rnd(p).abs(), vb.abs())
        ulp = torch.where(p > 0, torch.exp2(torch.floor(torch.log2(p.clamp_min(1e-300))) - (7 if dt == torch.bfloat16 else 10)),
                          torch.zeros_like(p)) if low else torch.zeros_like(p)
        fl = (ulp[..., None] * vb.abs().permute(1, 0, 2)[None, :, None]).amax(dim=3) if low else torch.zeros_like(o)
        pu = rnd(torch.tensor(1.0 / skv, dtype=torch.float64))
        uniform = (pu * vb).sum(dim=0)[None, :, None, :]  # [1, n2, 1, Dv]
        fill = torch.zeros_like(o) if ip == 2 else uniform.expand_as(o)
        o = torch.where(none, fill, o)
        rows.append((q0, sq, o.reshape(sq, N1, Dv)))
        m_all[q0:q0 + sq] = torch.where(none[..., 0], torch.full_like(m[..., 0], -FLT_MAX), m[..., 0]).reshape(sq, N1)
        l_fm = FLT_MAX if ip == 2 else float(skv)
        l_all[q0:q0 + sq] = torch.where(none[..., 0], torch.full_like(l[..., 0], l_fm), l[..., 0]).reshape(sq, N1)
        pv_abs[q0:q0 + sq] = torch.where(none, (pu * vb.abs()).sum(0)[None, :, None, :].expand_as(pa), pa).reshape(sq, N1, Dv)
        flip[q0:q0 + sq] = fl.reshape(sq, N1, Dv)
    out = torch.cat([r[2] for r in rows], dim=0) if rows else out
    return out, m_all, l_all, pv_abs, flip


def ulp(dt, x):
    bits = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24, torch.float64: 53}[dt]
    emin = {torch.bfloat16: -126, torch.float16: -14, torch.float32: -126, torch.float64: -1022}[dt]
    e = torch.floor(torch.log2(x.abs().clamp_min(1e-300))) + 1
    return torch.exp2(torch.clamp(e, min=emin + 1) - bits)


def stats_rows(stat, seq_q, N1, layout):
    """[T1, N1] from a [T1, N1, 8] statistics tensor in the given layout (element 0 of each row)."""
    flat = stat.reshape(-1)
    T1 = stat.shape[0]
    if layout == "TND":
        return flat.reshape(T1, N1, 8)[:, :, 0].double()
    out = torch.empty(T1, N1, dtype=torch.float64)
    for q0, sq in extents(seq_q):
        if sq:
            out[q0:q0 + sq] = flat[8 * N1 * q0: 8 * N1 * (q0 + sq)].reshape(N1, sq, 8)[:, :, 0].t().double()
    return out


def check_against_model(res, q, k, v, scale, seq_q, seq_kv, mode, pre, nxt, mask, ip, layout, plain=None):
    out, smax, ssum = res[:3]
    dt = q.dtype
    mo, mm, ml, pv_abs, flip = model(q, k, v, scale, seq_q, seq_kv, mode, pre, nxt, mask, ip)
    ref = mo.to(dt).double() if dt != torch.float64 else mo
    if plain is None:  # the plain same-dtype implementation: the library's fp32 reference
        plain = torch.ops.nsa.window_attention_reference(q, k, v, q.shape[1], scale, mask, mode, pre, nxt, ip, seq_q,
                                                         seq_kv, layout)[0]
    plain_err = (plain.double() - ref).abs().max().item()
    acc = 16 * (2.0 ** -23) if dt != torch.float64 else 1e-13
    tol = 2 * plain_err + ulp(dt, ref) + acc * pv_abs + 2 * flip
    err = (out.double() - ref).abs()
    assert out.dtype == dt and out.shape == ref.shape
    assert bool((err <= tol).all()), f"max excess {(err - tol).max().item()} (plain error {plain_err})"
    gm, gl = stats_rows(smax, seq_q, q.shape[1], layout), stats_rows(ssum, seq_q, q.shape[1], layout)
    assert torch.allclose(gm, mm, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gl, ml, rtol=1e-5, atol=0)


def make_inputs(dtype, sq, skv, N1=4, N2=2, D=24, Dv=16, seed=0, extra=2):
    g = torch.Generator().manual_seed(seed)
    T1, T2 = sum(sq), sum(skv) + extra
    q = torch.randn(T1, N1, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(T2, N2, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(T2, N2, Dv, generator=g, dtype=torch.float64).to(dtype)
    seq_q = torch.tensor(sq).cumsum(0).tolist()
    seq_kv = torch.tensor(skv).cumsum(0).tolist()
    return q, k, v, seq_q, seq_kv


def random_mask(rows, cols, p, p_full, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(rows, cols, generator=g) < p
    full = torch.rand(rows, generator=g) < p_full
    return m | full[:, None]


def call(q, k, v, seq_q, seq_kv, mode=0, pre=NO_LIMIT, nxt=NO_LIMIT, mask=None, ip=0, layout="", scale=0.3, **kw):
    return nsa_ops.npu_fusion_attention(q, k, v, q.shape[1], "TND", atten_mask=mask, scale=scale, pre_tockens=pre,
                                        next_tockens=nxt, inner_precise=ip, actual_seq_qlen=seq_q,
                                        actual_seq_kvlen=seq_kv, sparse_mode=mode, softmax_layout=layout, **kw)


# ------------------------------------------------------------------------------------------------ forward vs model
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
def test_modes_against_model(dtype):
    q, k, v, sq, skv = make_inputs(dtype, [21, 0, 30, 9], [25, 3, 30, 12], seed=1)
    sq, skv = sq + [0, 0], skv + [0, 0]  # trailing empty batches
    for mode, pre, nxt, layout in [(2, NO_LIMIT, NO_LIMIT, ""), (3, NO_LIMIT, NO_LIMIT, "TND"), (4, 0, 0, ""),
                                   (4, 6, 0, "TND"), (4, 100, 2, ""), (4, 5, -2, "TND")]:
        if mode == 4 and nxt < 0:  # Sq_b - next <= Skv_b
            q, k, v, sq, skv = make_inputs(dtype, [21, 0, 30, 9], [25, 3, 32, 12], seed=2)
        if True:
            res = call(q, k, v, sq, skv, mode, pre, nxt, MASK, 0, layout)
            check_against_model(res, q, k, v, 0.3, sq, skv, mode, pre, nxt, MASK, 0, layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ip", [0, 1, 2])
def test_explicit_masks_and_rows_without_keys(dtype, ip):
    q, k, v, sq, skv = make_inputs(dtype, [13, 0, 22], [17, 3, 20], N1=6, N2=2, D=20, Dv=12, seed=3)
    mask = random_mask(22, 20, 0.3, 0.2, seed=4)
    for mode, pre, nxt in [(1, NO_LIMIT, NO_LIMIT), (0, 4, 2), (0, NO_LIMIT, NO_LIMIT)]:
        res = call(q, k, v, sq, skv, mode, pre, nxt, mask.to(torch.uint8) if mode else mask, ip, "TND")
        check_against_model(res, q, k, v, 0.3, sq, skv, mode, pre, nxt, mask, ip, "TND")


def test_no_mask_is_full_attention_whatever_the_mode():
    q, k, v, sq, skv = make_inputs(torch.float32, [10, 14], [12, 14], seed=5)
    full = call(q, k, v, sq, skv)
    for mode, pre, nxt in [(2, NO_LIMIT, NO_LIMIT), (3, NO_LIMIT, NO_LIMIT), (4, 2, 0), (1, NO_LIMIT, NO_LIMIT)]:
        res = call(q, k, v, sq, skv, mode, pre, nxt)
        assert torch.equal(res[0], full[0]) and torch.equal(res[1], full[1])


def test_worked_example_window_3():
    # §10: 5 tokens, window 3: rows see {0}, {0,1}, {0,1,2}, {1,2,3}, {2,3,4}; one-hot values read them off.
    q = torch.zeros(5, 1, 5)
    k = torch.eye(5)[:, None, :]
    v = torch.eye(5)[:, None, :]
    out = call(q, k, v, [5], [5], 4, 2, 0, MASK)[0][:, 0]
    sees = [{0}, {0, 1}, {0, 1, 2}, {1, 2, 3}, {2, 3, 4}]
    want = torch.tensor([[1.0 / len(s) if j in s else 0.0 for j in range(5)] for s in sees])
    assert torch.equal(out, want.float())
    # Sq = 2, Skv = 5 (o = 3)
    q2 = torch.zeros(2, 1, 5)
    for mode, pre, nxt, mask, rows in [(2, NO_LIMIT, NO_LIMIT, MASK, [{0}, {0, 1}]),
                                       (3, NO_LIMIT, NO_LIMIT, MASK, [{0, 1, 2, 3}, {0, 1, 2, 3, 4}]),
                                       (4, 1, 0, MASK, [{2, 3}, {3, 4}]),
                                       (0, 1, 0, torch.zeros(2, 5, dtype=torch.bool), [{0}, {0, 1}])]:
        out = call(q2, k, v, [2], [5], mode, pre, nxt, mask)[0][:, 0]
        want = torch.tensor([[1.0 / len(s) if j in s else 0.0 for j in range(5)] for s in rows])
        assert torch.equal(out, want.float()), mode
    with pytest.raises(RuntimeError, match="next_tockens"):  # Sq = 5, Skv = 2, mode 4, next 0
        call(torch.zeros(5, 1, 5), k[:2], v[:2], [5], [2], 4, 1, 0, MASK)


# ------------------------------------------------------------------------------------------------ drop-in contract
FWD_PARAMS = [("query", E), ("key", E), ("value", E), ("head_num", E), ("input_layout", E), ("pse", None),
              ("padding_mask", None), ("atten_mask", None), ("scale", 1.0), ("keep_prob", 1.0),
              ("pre_tockens", 2147483647), ("next_tockens", 2147483647), ("inner_precise", 0), ("prefix", None),
              ("actual_seq_qlen", None), ("actual_seq_kvlen", None), ("sparse_mode", 0), ("gen_mask_parallel", True),
              ("sync", False), ("softmax_layout", ""), ("sink", None), ("dropout_mask", None), ("seed", 0),
              ("offset", 0)]
GRAD_PARAMS = [("query", E), ("key", E), ("value", E), ("dy", E), ("head_num", E), ("input_layout", E),
               ("pse", None), ("padding_mask", None), ("atten_mask", None), ("softmax_max", None),
               ("softmax_sum", None), ("softmax_in", None), ("attention_in", None), ("scale_value", 1.0),
               ("keep_prob", 1.0), ("pre_tockens", 2147483647), ("next_tockens", 2147483647), ("inner_precise", 0),
               ("seed", 0), ("offset", 0), ("numels", 0), ("prefix", None), ("actual_seq_qlen", None),
               ("actual_seq_kvlen", None), ("sparse_mode", 0), ("gen_mask_parallel", True), ("sync", False),
               ("softmax_layout", ""), ("sink", None)]


def test_signatures_equal_torch_npu():
    sig = inspect.signature(nsa_ops.npu_fusion_attention)
    assert [(p.name, p.default) for p in sig.parameters.values()] == FWD_PARAMS
    assert all(p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD for p in sig.parameters.values())
    sig = inspect.signature(nsa_ops.npu_fusion_attention_grad)
    assert [(p.name, p.default) for p in sig.parameters.values()] == GRAD_PARAMS
    kinds = [p.kind for p in sig.parameters.values()]
    assert kinds[:6] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 6
    assert kinds[6:] == [inspect.Parameter.KEYWORD_ONLY] * (len(GRAD_PARAMS) - 6)
    sig = inspect.signature(nsa_ops.sliding_window_attention)
    assert list(sig.parameters) == ["query", "key", "value", "cu_seqlens", "window", "scale"]
    assert sig.parameters["scale"].kind == inspect.Parameter.KEYWORD_ONLY and sig.parameters["scale"].default is None


def test_output_tuple_and_numels():
    q, k, v, sq, skv = make_inputs(torch.bfloat16, [3, 2], [3, 2], N1=4, N2=2)
    res = call(q, k, v, sq, skv, seed=17, offset=5)  # [3, 5] twice: numels 4 (9 + 4) = 52
    assert len(res) == 7
    assert res[3].shape == (0,) and res[3].dtype == torch.bfloat16
    assert res[4:] == (17, 5, 52)
    q1, k1, v1, _, _ = make_inputs(torch.float32, [2, 3, 4], [2, 3, 4], N1=1, N2=1)
    lists = [2, 5, 9, 0, 0]
    res = call(q1, k1, v1, lists, lists)
    assert res[6] == 110  # torch_npu's formula on the lists as given (§10)
    res_t = call(q1, k1, v1, torch.tensor(lists), torch.tensor(lists, dtype=torch.int32))
    assert isinstance(res_t[6], torch.Tensor) and res_t[6].dim() == 0 and int(res_t[6]) == 110
    assert torch.equal(res_t[0], res[0])
    # older torch_npu releases: positional calls up to sync
    old = nsa_ops.npu_fusion_attention(q1, k1, v1, 1, "TND", None, None, None, 0.3, 1.0, NO_LIMIT, NO_LIMIT, 0, None,
                                       lists, lists, 0, True, False)
    assert torch.equal(old[0], res[0])


def test_unsupported_arguments_are_named():
    q, k, v, sq, skv = make_inputs(torch.float32, [6], [6])
    x = torch.zeros(1)
    bad = [(dict(input_layout="BSH"), ValueError, "input_layout"), (dict(input_layout=3), TypeError, "input_layout"),
           (dict(pse=x), ValueError, "pse"), (dict(padding_mask=x), ValueError, "padding_mask"),
           (dict(prefix=[1]), ValueError, "prefix"), (dict(sink=x), ValueError, "sink"),
           (dict(dropout_mask=x), ValueError, "dropout_mask"), (dict(keep_prob=0.9), ValueError, "keep_prob"),
           (dict(softmax_layout="BSND"), ValueError, "softmax_layout"),
           (dict(softmax_layout="tnd"), ValueError, "softmax_layout"),
           (dict(gen_mask_parallel=1), TypeError, "gen_mask_parallel"), (dict(sync="no"), TypeError, "sync"),
           (dict(seed=0.5), TypeError, "seed"), (dict(offset=None), TypeError, "offset"),
           (dict(head_num=4.0), TypeError, "head_num"), (dict(pre_tockens=2**64), ValueError, "pre_tockens"),
           (dict(actual_seq_qlen=None), ValueError, "actual_seq_qlen"),
           (dict(actual_seq_kvlen=None), ValueError, "actual_seq_kvlen"),
           (dict(sparse_mode=6), RuntimeError, "sparse_mode"), (dict(inner_precise=3), RuntimeError, "inner_precise"),
           (dict(scale=float("nan")), RuntimeError, "scale"), (dict(head_num=2), RuntimeError, "head_num"),
           (dict(sparse_mode=4, atten_mask=torch.ones(2048, 2048, dtype=torch.bool)), RuntimeError, "atten_mask"),
           (dict(sparse_mode=0, atten_mask=torch.zeros(5, 6, dtype=torch.bool)), RuntimeError, "atten_mask"),
           (dict(atten_mask=torch.zeros(6, 6)), RuntimeError, "atten_mask"),
           (dict(actual_seq_qlen=[5]), RuntimeError, "actual_seq_qlen"),
           (dict(actual_seq_kvlen=[9]), RuntimeError, "actual_seq_kvlen"),
           (dict(sparse_mode=4, atten_mask=MASK, pre_tockens=-1), RuntimeError, "pre_tockens")]
    for kw, exc, name in bad:
        args = dict(query=q, key=k, value=v, head_num=4, input_layout="TND", actual_seq_qlen=sq, actual_seq_kvlen=skv)
        args.update(kw)
        with pytest.raises(exc, match=name):
            nsa_ops.npu_fusion_attention(**args)
            print("accepted:", kw)
    ok = call(q, k, v, sq, skv)
    for kw in [dict(input_layout="tnd"), dict(gen_mask_parallel=False, sync=True), dict(seed=2**40, offset=-3)]:
        args = dict(query=q, key=k, value=v, head_num=4, input_layout="TND", actual_seq_qlen=sq, actual_seq_kvlen=skv,
                    scale=0.3)
        args.update(kw)
        assert torch.equal(nsa_ops.npu_fusion_attention(**args)[0], ok[0])


def test_grad_requires_forward_outputs_and_names_arguments():
    q, k, v, sq, skv = make_inputs(torch.float32, [6], [6])
    out, smax, ssum = call(q, k, v, sq, skv)[:3]
    base = dict(atten_mask=None, softmax_max=smax, softmax_sum=ssum, attention_in=out, scale_value=0.3,
                actual_seq_qlen=sq, actual_seq_kvlen=skv)
    for missing in ("softmax_max", "softmax_sum", "attention_in"):
        with pytest.raises(ValueError, match=missing):
            nsa_ops.npu_fusion_attention_grad(q, k, v, out, 4, "TND", **dict(base, **{missing: None}))
    for kw, exc, name in [(dict(pse=q), ValueError, "pse"), (dict(keep_prob=0.5), ValueError, "keep_prob"),
                          (dict(numels=1.5), TypeError, "numels"), (dict(softmax_layout="x"), ValueError, "softmax_layout"),
                          (dict(softmax_max=smax.double()), RuntimeError, "softmax_max"),
                          (dict(attention_in=out[:, :, :3]), RuntimeError, "attention_in"),
                          (dict(sparse_mode=7), RuntimeError, "sparse_mode")]:
        with pytest.raises(exc, match=name):
            nsa_ops.npu_fusion_attention_grad(q, k, v, out, 4, "TND", **dict(base, **kw))
    with pytest.raises(RuntimeError, match="dy"):
        nsa_ops.npu_fusion_attention_grad(q, k, v, out[:5], 4, "TND", **base)
    res = nsa_ops.npu_fusion_attention_grad(q, k, v, out, 4, "TND", softmax_in=torch.empty(0), seed=3, offset=4,
                                            numels=torch.tensor(36), **base)
    assert len(res) == 5
    assert res[3].shape == (0,) and res[3].dtype == torch.float32 and res[4].shape == (0,)
    assert res[4].dtype == torch.float32


# ------------------------------------------------------------------------------------------------ sliding window
def test_sliding_window_equals_drop_in_mode_4():
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v, seq, _ = make_inputs(dtype, [37, 0, 70, 9], [37, 0, 70, 9], N1=8, N2=2, D=32, Dv=16, seed=8, extra=0)
        cu = [0] + seq
        for window in (1, 5, 64, 1000):
            want = call(q, k, v, seq, seq, 4, window - 1, 0, MASK, 0, "TND", scale=0.2)[:3]
            for c in (cu, tuple(cu), torch.tensor(cu), torch.tensor(cu, dtype=torch.int32)):
                got = nsa_ops.sliding_window_attention(q, k, v, c, window, scale=0.2)
                assert isinstance(got, nsa_ops.WindowAttentionOutput)
                for a, b in zip(got, want):
                    assert torch.equal(a, b)
        # window >= every length: plain causal attention (mode 3 with Sq = Skv)
        causal = call(q, k, v, seq, seq, 3, NO_LIMIT, NO_LIMIT, MASK, 0, "TND", scale=0.2)[0]
        assert torch.equal(nsa_ops.sliding_window_attention(q, k, v, cu, 70, scale=0.2).attention_out, causal)
    default = nsa_ops.sliding_window_attention(q, k, v, cu, 4)
    assert torch.equal(default.attention_out, nsa_ops.sliding_window_attention(q, k, v, cu, 4, scale=32 ** -0.5)[0])


def test_sliding_window_errors():
    q, k, v, seq, _ = make_inputs(torch.float32, [6, 4], [6, 4], extra=0)
    for cu, exc in [([1, 6, 10], ValueError), ([0, 6, 9], ValueError), ([0, 7, 6, 10], ValueError), ([10], ValueError),
                    (torch.tensor([1, 6, 10]), RuntimeError), (torch.tensor([0, 6, 9]), RuntimeError),
                    (torch.tensor([[0, 6, 10]]), RuntimeError), (torch.tensor([0.0, 6, 10]), RuntimeError)]:
        with pytest.raises(exc, match="cu_seqlens"):
            nsa_ops.sliding_window_attention(q, k, v, cu, 3)
    for w, exc in [(0, ValueError), (-2, ValueError), (2.5, TypeError)]:
        with pytest.raises(exc, match="window"):
            nsa_ops.sliding_window_attention(q, k, v, [0, 6, 10], w)
    with pytest.raises(RuntimeError, match="window"):
        torch.ops.nsa.sliding_window_attention(q, k, v, torch.tensor([0, 6, 10]), 0, 0.3)
    with pytest.raises(RuntimeError, match="key"):
        nsa_ops.sliding_window_attention(q, k[:9], v[:9], [0, 6, 10], 3)
    with pytest.raises(ValueError, match="scale"):
        nsa_ops.sliding_window_attention(q, k, v, [0, 6, 10], 3, scale=float("inf"))


# ------------------------------------------------------------------------------------------------ gradients
def grads(fn, q, k, v, dy):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    return torch.autograd.grad(fn(q, k, v), (q, k, v), dy)


@pytest.mark.parametrize("entry", ["dropin", "dropin_tensor_lengths", "sliding", "sliding_tensor", "mask_mode_1"])
def test_gradcheck_fp64(entry):
    q, k, v, seq, _ = make_inputs(torch.float64, [5, 0, 4], [5, 0, 4], N1=2, N2=1, D=3, Dv=2, seed=9, extra=0)
    mask = random_mask(5, 5, 0.4, 0.3, seed=10)

    def f(q, k, v):
        if entry == "dropin":
            return call(q, k, v, seq, seq, 4, 2, 1, MASK)[0]
        if entry == "dropin_tensor_lengths":
            return call(q, k, v, torch.tensor(seq), torch.tensor(seq), 3, NO_LIMIT, NO_LIMIT, MASK, 0, "TND")[0]
        if entry == "sliding":
            return nsa_ops.sliding_window_attention(q, k, v, [0] + seq, 3).attention_out
        if entry == "sliding_tensor":
            return nsa_ops.sliding_window_attention(q, k, v, torch.tensor([0] + seq), 3).attention_out
        return call(q, k, v, seq, seq, 1, NO_LIMIT, NO_LIMIT, mask, 0)[0]

    inputs = tuple(x.detach().clone().requires_grad_(True) for x in (q, k, v))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_grads_against_model_and_grad_drop_in(dtype):
    q, k, v, sq, skv = make_inputs(dtype, [33, 0, 20], [40, 4, 26], N1=6, N2=2, D=24, Dv=16, seed=11)
    mode, pre, nxt = 4, 9, 1
    out, smax, ssum = call(q, k, v, sq, skv, mode, pre, nxt, MASK)[:3]
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64).to(dtype)
    got = grads(lambda a, b, c: call(a, b, c, sq, skv, mode, pre, nxt, MASK)[0], q, k, v, dy)
    # the grad drop-in with the forward's outputs gives the same tensors as autograd
    direct = nsa_ops.npu_fusion_attention_grad(q, k, v, dy, 6, "TND", atten_mask=MASK, softmax_max=smax,
                                               softmax_sum=ssum, attention_in=out, scale_value=0.3, pre_tockens=pre,
                                               next_tockens=nxt, actual_seq_qlen=sq, actual_seq_kvlen=skv,
                                               sparse_mode=mode)
    for a, b in zip(got, direct[:3]):
        assert torch.equal(a, b)
    ref = grads(lambda a, b, c: model(a, b, c, 0.3, sq, skv, mode, pre, nxt, MASK, 0, round_p=False)[0],
                q.double(), k.double(), v.double(), dy.double())
    plain = grads(lambda a, b, c: model(a, b, c, 0.3, sq, skv, mode, pre, nxt, MASK, 0, round_p=False)[0].to(dtype),
                  q.float(), k.float(), v.float(), dy.float())
    floor = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for name, g, r, p in zip("qkv", got, ref, plain):
        assert g.dtype == dtype and g.shape == r.shape
        err = (g.double() - r).abs().max().item()
        err_plain = (p.double().to(dtype).double() - r).abs().max().item()
        assert err <= 3 * err_plain + floor * max(r.abs().max().item(), 1.0), f"d{name}: {err} vs plain {err_plain}"
    # key rows past max(actual_seq_kvlen) get zero gradient; the statistics carry none
    assert torch.count_nonzero(got[1][skv[-1]:]) == 0 and torch.count_nonzero(got[2][skv[-1]:]) == 0
    qs = q.detach().clone().requires_grad_(True)
    o2, m2, s2 = call(qs, k, v, sq, skv, mode, pre, nxt, MASK)[:3]
    (gq,) = torch.autograd.grad(m2.sum() + s2.sum() + o2.sum() * 0, (qs,), allow_unused=True)
    assert gq is None or torch.count_nonzero(gq) == 0


def test_rows_without_keys_gradients():
    q, k, v, sq, skv = make_inputs(torch.float64, [5], [4], N1=2, N2=1, D=3, Dv=3, seed=13)
    mask = torch.zeros(5, 4, dtype=torch.bool)
    mask[2] = True
    dy = torch.zeros(5, 2, 3, dtype=torch.float64)
    dy[2] = 1.0
    for ip, share in ((0, 2 / 4), (2, 0.0)):
        dq, dk, dv = grads(lambda a, b, c: call(a, b, c, sq, skv, 1, NO_LIMIT, NO_LIMIT, mask, ip)[0], q, k, v, dy)
        assert torch.count_nonzero(dq) == 0 and torch.count_nonzero(dk) == 0
        assert torch.equal(dv[:4], torch.full((4, 1, 3), share, dtype=torch.float64))


def test_double_backward_raises():
    q, k, v, seq, _ = make_inputs(torch.float64, [6], [6], extra=0)
    q.requires_grad_(True)
    out = nsa_ops.sliding_window_attention(q, k, v, [0, 6], 2).attention_out
    (dq,) = torch.autograd.grad(out.sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(dq.sum(), (q,))


def test_deterministic_over_thread_counts():
    q, k, v, seq, _ = make_inputs(torch.bfloat16, [90, 61], [90, 61], N1=8, N2=2, D=32, Dv=16, extra=0)
    dy = torch.randn(151, 8, 16).bfloat16()
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(grads(lambda a, b, c: nsa_ops.sliding_window_attention(a, b, c, [0] + seq, 17)[0], q, k, v,
                                 dy) + (nsa_ops.sliding_window_attention(q, k, v, [0] + seq, 17)[0],))
    finally:
        torch.set_num_threads(before)
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ torch.library
def _op_cases():
    q, k, v, seq, _ = make_inputs(torch.float32, [9, 0, 6], [9, 0, 6], extra=0)
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    args = (q, k, v, 4, 0.3, random_mask(9, 9, 0.2, 0.0, 15), 0, 3, 0, 0, seq, seq, "TND")
    targs = args[:10] + (torch.tensor(seq), torch.tensor(seq), "TND")
    margs = (q, k, v, 4, 0.3, random_mask(9, 9, 0.3, 0.2, 14), 1, NO_LIMIT, NO_LIMIT, 0, seq, seq, "")
    return [(torch.ops.nsa.window_attention.default, args), (torch.ops.nsa.window_attention.tensor_lengths, targs),
            (torch.ops.nsa.window_attention.default, margs),
            (torch.ops.nsa.sliding_window_attention.default, (q, k, v, torch.tensor([0] + seq), 4, 0.3))]


@pytest.mark.parametrize("case", range(4))
def test_opcheck(case):
    op, args = _op_cases()[case]
    torch.library.opcheck(op, args)


def test_opcheck_backward_ops():
    torch.manual_seed(20261130)  # dy below is drawn from the global generator
    q, k, v, seq, _ = make_inputs(torch.float32, [9, 6], [9, 6], extra=1)
    mask = random_mask(9, 9, 0.3, 0.2, 16)
    out, smax, ssum = call(q, k, v, seq, seq, 1, NO_LIMIT, NO_LIMIT, mask)[:3]
    dy = torch.randn_like(out)
    torch.library.opcheck(torch.ops.nsa.window_attention_backward.default,
                          (dy, q, k, v, out, smax, ssum, 4, 0.3, mask, 1, NO_LIMIT, NO_LIMIT, 0, seq, seq, ""))
    torch.library.opcheck(torch.ops.nsa.window_attention_backward.tensor_lengths,
                          (dy, q, k, v, out, smax, ssum, 4, 0.3, mask, 1, NO_LIMIT, NO_LIMIT, 0, torch.tensor(seq),
                           torch.tensor(seq), ""))
    out, smax, ssum = call(q, k, v, seq, seq, 4, 3, 0, MASK)[:3]
    q2, k2, v2 = q, k[:15], v[:15]
    o2, m2, s2 = nsa_ops.sliding_window_attention(q2, k2, v2, [0] + seq, 4, scale=0.3)
    torch.library.opcheck(torch.ops.nsa.sliding_window_attention_backward.default,
                          (dy, q2, k2, v2, o2, m2, s2, torch.tensor([0] + seq), 4, 0.3))
    # the backward ops agree with their plain-loop reference
    ref = torch.ops.nsa.window_attention_backward_reference(dy, q, k, v, out, smax, ssum, 4, 0.3, MASK, 4, 3, 0, 0,
                                                            seq, seq, "")
    cpu = torch.ops.nsa.window_attention_backward(dy, q, k, v, out, smax, ssum, 4, 0.3, MASK, 4, 3, 0, 0, seq, seq, "")
    for a, b in zip(cpu, ref):
        # fp32 sums in another order: a few ulps of each element plus an accumulation term of the gradient's scale
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * max(1.0, b.abs().max().item()) * 8)


def test_meta_shapes():
    q = torch.empty(300, 8, 40, dtype=torch.bfloat16, device="meta")
    k = torch.empty(310, 2, 40, dtype=torch.bfloat16, device="meta")
    v = torch.empty(310, 2, 24, dtype=torch.bfloat16, device="meta")
    out, smax, ssum = call(q, k, v, [100, 300], [110, 310], 4, 5, 0, MASK.to("meta"))[:3]
    assert (out.shape, out.dtype, out.device.type) == ((300, 8, 24), torch.bfloat16, "meta")
    assert smax.shape == (300, 8, 8) and ssum.dtype == torch.float32


@pytest.mark.parametrize("aot", [False, True])
def test_compile_fullgraph_forward_backward_without_recompiling(aot):
    import torch._dynamo

    torch._dynamo.reset()
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        if aot:
            from torch._dynamo.backends.common import aot_autograd

            return aot_autograd(fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g)(gm, example_inputs)
        return gm

    def step(q, k, v, cu, seq):
        a = nsa_ops.sliding_window_attention(q, k, v, cu, 5, scale=0.25).attention_out
        b = nsa_ops.npu_fusion_attention(q, k, v, 4, "TND", atten_mask=MASK, scale=0.25, pre_tockens=2,
                                         next_tockens=0, actual_seq_qlen=seq, actual_seq_kvlen=seq, sparse_mode=4)
        return a.float().square().sum() + b[0].float().sum() + b[6]

    compiled = torch.compile(step, backend=backend, fullgraph=True)
    for lens in [(30, 20, 10), (10, 40, 10), (5, 5, 50)]:
        q, k, v, seq, _ = make_inputs(torch.float32, list(lens), list(lens), extra=0)
        cu = torch.tensor([0] + seq)
        qs, ks, vs = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
        loss = compiled(qs, ks, vs, cu, cu[1:])
        loss.backward()
        qe, ke, ve = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
        loss_e = step(qe, ke, ve, cu, cu[1:])
        loss_e.backward()
        assert torch.equal(loss, loss_e)
        for x, y in zip((qs, ks, vs), (qe, ke, ve)):
            assert torch.equal(x.grad, y.grad)
    assert len(compiles) == 1, f"expected one compilation, got {len(compiles)}"
