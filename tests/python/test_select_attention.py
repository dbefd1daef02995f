"""Selected attention through PyTorch (docs/spec/select_attention.md): the drop-ins' signatures and the op schemas,
the forward against an independent plain-PyTorch fp64 model (gather + matmul / softmax) with the per-element
bounds of nsa_ops.tolerance, the Pythonic API, lengths as lists and tensors, the causal switch, rows without
visible entries, errors naming arguments, gradients (gradcheck in fp64, every dtype against autograd of the fp64
model, the grad drop-in), opcheck, torch.compile fullgraph forward + backward without recompiling for new lengths,
and the NSA pipeline: the topk_indices of npu_nsa_compress_attention (with the §9 masks) fed directly to
npu_nsa_select_attention.
"""

import inspect
import math

import pytest
import torch

import nsa_ops
from nsa_ops import tolerance as tol

FLT_MAX = torch.finfo(torch.float32).max
E = inspect.Parameter.empty
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


# ------------------------------------------------------------------------------------------------ the fp64 model
def rha(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """P (>= 0) rounded to ``dtype`` half away from zero (§4 step 4), as float64: torch's nearest-even rounding, then
    the upper neighbour where the float32 value lies exactly halfway between two values of the dtype."""
    if dtype not in (torch.bfloat16, torch.float16):
        return p
    p32 = p.float()
    lo = p32.to(dtype)
    bits = torch.int16
    hi = (lo.view(bits) + 1).view(dtype)  # the next value up (p >= 0)
    tie_up = (p32.double() - lo.double()) * 2 == (hi.double() - lo.double())
    return torch.where(tie_up, hi, lo).double()


def gather_entries(q, k, v, idx, lp, causal, cu_q, cu_kv):
    """Per query row and head: the gathered keys/values of its K l' slot positions and their visibility (§3).
    Returns qh [T1, N1, D], kg [T1, N1, E, D], vg [T1, N1, E, Dv], vis [T1, N1, E] (E = K l'), float64."""
    T1, N1, D = q.shape
    N2, Dv, K = k.shape[1], v.shape[2], idx.shape[2]
    G = N1 // N2
    kg = torch.zeros(T1, N2, K * lp, D, dtype=torch.float64)
    vg = torch.zeros(T1, N2, K * lp, Dv, dtype=torch.float64)
    vis = torch.zeros(T1, N2, K * lp, dtype=torch.bool)
    kgs, vgs, viss = [], [], []
    for b in range(len(cu_q) - 1):
        t0, t1, k0, k1 = cu_q[b], cu_q[b + 1], cu_kv[b], cu_kv[b + 1]
        sq, skv = t1 - t0, k1 - k0
        if sq == 0:
            continue
        x = idx[t0:t1].long()                                              # [sq, N2, K]
        pos = (x[..., None] * lp + torch.arange(lp)).reshape(sq, N2, K * lp)
        s = torch.arange(sq).view(sq, 1, 1)
        vb = (x[..., None] >= 0).expand(sq, N2, K, lp).reshape(sq, N2, K * lp) & (pos < skv)
        if causal:
            vb = vb & (pos <= s)
        vis[t0:t1] = vb
        if skv == 0:
            continue
        pc = pos.clamp(0, skv - 1)
        heads = torch.arange(N2).view(1, N2, 1)
        kg[t0:t1] = k.double()[k0:k1][pc, heads]
        vg[t0:t1] = v.double()[k0:k1][pc, heads]
    rep = lambda t: t.repeat_interleave(G, dim=1)  # noqa: E731  KV head n2 -> query heads n2 G .. n2 G + G - 1
    return q.double(), rep(kg), rep(vg), rep(vis)


def model_forward(q, k, v, idx, scale, lp, causal, cu_q, cu_kv, dtype):
    """§4 in float64: returns out (P rounded half away to dtype, sum in fp64, not rounded: the bounds of
    nsa_ops.tolerance include the final rounding), m, l, and what the bounds need (exact P, gathered values,
    visibility, scores and their magnitudes)."""
    qh, kg, vg, vis = gather_entries(q, k, v, idx, lp, causal, cu_q, cu_kv)
    scale32 = float(torch.tensor(scale, dtype=torch.float32))
    S = torch.einsum("thd,thed->the", qh, kg) * scale32
    dot_abs = torch.einsum("thd,thed->the", qh.abs(), kg.abs()) * abs(scale32)
    Sm = torch.where(vis, S, torch.full_like(S, -math.inf))
    any_vis = vis.any(dim=-1)
    m = torch.where(any_vis, Sm.amax(dim=-1), torch.zeros_like(any_vis, dtype=torch.float64))
    e = torch.where(vis, torch.exp(Sm - m[..., None]), torch.zeros_like(S))
    lsum = e.sum(dim=-1)
    P = torch.where(vis, e / torch.where(any_vis, lsum, torch.ones_like(lsum))[..., None], torch.zeros_like(e))
    out = torch.einsum("the,thed->thd", rha(P, dtype), vg)
    m = torch.where(any_vis, m, torch.full_like(m, -FLT_MAX))
    lsum = torch.where(any_vis, lsum, torch.full_like(lsum, FLT_MAX))
    return dict(out=out, m=m, l=lsum, P=P, vg=vg, vis=vis, S=S, dot_abs=dot_abs, any_vis=any_vis)


def model_attention_diff(q, k, v, idx, scale, lp, causal, cu_q, cu_kv):
    """attention_out of §4 in float64, differentiable in q, k, v (P not rounded): the gradients' model (§8)."""
    T1, N1, D = q.shape
    N2, K = k.shape[1], idx.shape[2]
    G = N1 // N2
    scale32 = float(torch.tensor(scale, dtype=torch.float32))
    outs = []
    for b in range(len(cu_q) - 1):
        t0, t1, k0, k1 = cu_q[b], cu_q[b + 1], cu_kv[b], cu_kv[b + 1]
        sq, skv = t1 - t0, k1 - k0
        if sq == 0:
            continue
        x = idx[t0:t1].long()
        pos = (x[..., None] * lp + torch.arange(lp)).reshape(sq, N2, K * lp)
        vis = (x[..., None] >= 0).expand(sq, N2, K, lp).reshape(sq, N2, K * lp) & (pos < skv)
        if causal:
            vis = vis & (pos <= torch.arange(sq).view(sq, 1, 1))
        if skv == 0:
            outs.append(q.new_zeros(sq, N1, v.shape[2], dtype=torch.float64) + 0 * q[t0:t1].double().sum())
            continue
        pc = pos.clamp(0, skv - 1)
        heads = torch.arange(N2).view(1, N2, 1)
        kg = k.double()[k0:k1][pc, heads]                                 # [sq, N2, E, D]
        vg = v.double()[k0:k1][pc, heads]
        qh = q.double()[t0:t1].view(sq, N2, G, D)
        S = torch.einsum("sngd,sned->snge", qh, kg) * scale32
        visg = vis[:, :, None, :]
        any_vis = visg.any(dim=-1, keepdim=True)
        S = torch.where(visg, S, torch.full_like(S, -math.inf))
        S = torch.where(any_vis, S, torch.zeros_like(S))                  # rows without entries: no NaN
        P = torch.where(visg & any_vis, torch.softmax(S, dim=-1), torch.zeros_like(S))
        outs.append(torch.einsum("snge,sned->sngd", P, vg).reshape(sq, N1, -1))
    return torch.cat(outs, dim=0)


# ------------------------------------------------------------------------------------------------ cases
def make_case(dtype, *, sq=(37, 0, 22, 5), skv=(37, 3, 30, 5), N1=4, N2=2, D=24, Dv=16, lp=8, K=4, causal=True,
              p_empty=0.15, p_dup=0.15, seed=0, index_dtype=torch.int32, extra_kv=2):
    """Random inputs and valid indices: -1 slots, duplicates, unsorted, future and partial blocks."""
    g = torch.Generator().manual_seed(seed)
    T1, T2 = sum(sq), sum(skv) + extra_kv
    q = torch.randn(T1, N1, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(T2, N2, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(T2, N2, Dv, generator=g, dtype=torch.float64).to(dtype)
    idx = torch.full((T1, N2, K), -1, dtype=torch.int64)
    t = 0
    for s, kv in zip(sq, skv):
        nb = -(-kv // lp)
        for _ in range(s):
            for n in range(N2):
                for j in range(K):
                    u = torch.rand(1, generator=g).item()
                    if nb == 0 or u < p_empty:
                        continue
                    if j > 0 and torch.rand(1, generator=g).item() < p_dup:
                        idx[t, n, j] = idx[t, n, int(torch.randint(0, j, (1,), generator=g))]
                    else:
                        idx[t, n, j] = int(torch.randint(0, nb, (1,), generator=g))
            t += 1
    cu_q = [0] + torch.tensor(sq).cumsum(0).tolist()
    cu_kv = [0] + torch.tensor(skv).cumsum(0).tolist()
    return dict(q=q, k=k, v=v, idx=idx.to(index_dtype), scale=1.0 / math.sqrt(D), lp=lp, causal=causal, cu_q=cu_q,
                cu_kv=cu_kv)


def drop_in(c, **over):
    a = dict(c, **over)
    mask = torch.ones(1, 1, dtype=torch.bool) if a["causal"] else None
    return nsa_ops.npu_nsa_select_attention(a["q"], a["k"], a["v"], a["idx"], a["scale"], a["q"].shape[1], a["lp"],
                                            a["idx"].shape[2], atten_mask=mask, actual_seq_qlen=a["cu_q"][1:],
                                            actual_seq_kvlen=a["cu_kv"][1:])


def check_forward(c, got):
    out, smax, ssum = got
    q = c["q"]
    dtype = q.dtype
    md = model_forward(c["q"], c["k"], c["v"], c["idx"], c["scale"], c["lp"], c["causal"], c["cu_q"], c["cu_kv"], dtype)
    assert out.dtype == dtype and out.shape == md["out"].shape and out.is_contiguous()
    assert smax.dtype == torch.float32 and smax.shape == (q.shape[0], q.shape[1], 8)
    p_err = tol.p_rel_error(md["S"], md["dot_abs"], md["vis"], q.shape[2], dtype)
    bound = tol.attention_out_bound(md["out"], dtype, md["P"], md["vg"], p_err)
    err = (out.double() - md["out"]).abs()
    bad = ~(err <= bound)
    assert not bad.any(), (f"attention_out: {int(bad.sum())} elements out of bound, worst at "
                           f"{tuple(bad.nonzero()[0].tolist())}: got {out.double()[bad][0]}, model {md['out'][bad][0]}")
    for x in (smax, ssum):  # 8 equal copies per (row, head): the true TND layout (§5)
        assert torch.equal(x, x[..., :1].expand_as(x))
    nv = ~md["any_vis"]
    assert torch.all(out[nv] == 0) and torch.all(smax[..., 0][nv] == -FLT_MAX) and torch.all(ssum[..., 0][nv] == FLT_MAX)
    vis = md["any_vis"]
    assert not tol.stats_errors(smax[..., 0][vis], md["m"][vis], atol=tol.STATS_MAX_ATOL).any()
    assert not tol.stats_errors(ssum[..., 0][vis], md["l"][vis]).any()
    return md


# ------------------------------------------------------------------------------------------------ signatures
NPU_FWD = [("query", E), ("key", E), ("value", E), ("topk_indices", E), ("scale_value", E), ("head_num", E),
           ("select_block_size", E), ("select_block_count", E), ("atten_mask", None), ("actual_seq_qlen", None),
           ("actual_seq_kvlen", None)]
NPU_BWD = [("grad", E), ("query", E), ("key", E), ("value", E), ("attention_out", E), ("softmax_max", E),
           ("softmax_sum", E), ("topk_indices", E), ("scale_value", E), ("head_num", E), ("select_block_size", E),
           ("select_block_count", E), ("atten_mask", None), ("actual_seq_qlen", None), ("actual_seq_kvlen", None)]


@pytest.mark.parametrize("fn,params", [(nsa_ops.npu_nsa_select_attention, NPU_FWD),
                                       (nsa_ops.npu_nsa_select_attention_grad, NPU_BWD)])
def test_drop_in_signatures_equal_torch_npu(fn, params):
    sig = list(inspect.signature(fn).parameters.values())
    assert [(p.name, p.default) for p in sig] == params
    kinds = [p.kind for p in sig]
    n_kw = 3  # atten_mask, actual_seq_qlen, actual_seq_kvlen are keyword-only
    assert all(k == inspect.Parameter.POSITIONAL_OR_KEYWORD for k in kinds[:-n_kw])
    assert all(k == inspect.Parameter.KEYWORD_ONLY for k in kinds[-n_kw:])


@pytest.mark.parametrize("name,params,returns", [
    ("select_attention", NPU_FWD, ["attention_out", "softmax_max", "softmax_sum"]),
    ("select_attention_reference", NPU_FWD, ["attention_out", "softmax_max", "softmax_sum"]),
    ("select_attention_backward", NPU_BWD, ["query_grad", "key_grad", "value_grad"]),
])
def test_op_schemas(name, params, returns):
    for overload in ("default", "tensor_lengths") if "reference" not in name else ("default",):
        schema = getattr(getattr(torch.ops.nsa, name), overload)._schema
        args = [(a.name, a.default_value if a.has_default_value() else E) for a in schema.arguments]
        assert args == params
        assert [r.name for r in schema.returns] == returns


# ------------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("G", [1, 3])
def test_forward_matches_model(dtype, causal, G):
    c = make_case(dtype, N1=2 * G, causal=causal, seed=G + 10 * causal)
    check_forward(c, drop_in(c))
    check_forward(c, torch.ops.nsa.select_attention_reference(
        c["q"], c["k"], c["v"], c["idx"], c["scale"], 2 * G, c["lp"], c["idx"].shape[2],
        torch.ones(1, 1, dtype=torch.bool) if causal else None, c["cu_q"][1:], c["cu_kv"][1:]))


@pytest.mark.parametrize("lp,K,D,Dv", [(1, 9, 8, 8), (16, 2, 40, 24), (64, 3, 16, 16), (80, 2, 8, 5)])
def test_forward_block_sizes(lp, K, D, Dv):
    c = make_case(torch.bfloat16, sq=(70, 12), skv=(150, 12), lp=lp, K=K, D=D, Dv=Dv, seed=lp)
    check_forward(c, drop_in(c))


def test_int64_indices_and_strided_inputs_give_the_same_bits():
    c = make_case(torch.bfloat16, seed=3)
    base = drop_in(c)
    s = dict(c)
    s["q"] = c["q"].transpose(0, 1).contiguous().transpose(0, 1)
    s["k"] = torch.cat([c["k"], c["k"]], dim=2)[:, :, : c["k"].shape[2]]
    s["v"] = c["v"].transpose(1, 2).contiguous().transpose(1, 2)
    s["idx"] = c["idx"].long().transpose(0, 2).contiguous().transpose(0, 2)
    assert not s["k"].is_contiguous() and not s["idx"].is_contiguous()
    for x, y in zip(base, drop_in(s)):
        assert torch.equal(x, y)


def test_rows_without_visible_entry():
    """§6: all slots -1, all blocks in the future, a batch without keys: zeros, (-FLT_MAX, +FLT_MAX), zero grads."""
    c = make_case(torch.float32, sq=(6, 4), skv=(16, 0), N1=2, N2=1, lp=4, K=2, seed=5)
    idx = c["idx"]
    idx[0] = torch.tensor([[3, 2]])  # row s = 0: blocks 3, 2 are in the future
    idx[1] = -1
    c["idx"] = idx
    out, smax, ssum = drop_in(c)
    md = check_forward(c, (out, smax, ssum))
    empty = ~md["any_vis"]
    assert empty[0].all() and empty[1].all() and empty[6:].all()
    q, k, v = (c[n].clone().requires_grad_(True) for n in "qkv")
    o = nsa_ops.npu_nsa_select_attention(q, k, v, c["idx"], c["scale"], 2, 4, 2, atten_mask=torch.ones(1, 1, dtype=torch.bool),
                                         actual_seq_qlen=c["cu_q"][1:], actual_seq_kvlen=c["cu_kv"][1:])[0]
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    assert torch.all(dq[0] == 0) and torch.all(dq[1] == 0) and torch.all(dq[6:] == 0)


def test_lengths_as_lists_tuples_and_tensors_give_the_same_bits():
    c = make_case(torch.bfloat16, seed=4)
    base = drop_in(c)
    for conv in (tuple, lambda x: torch.tensor(x), lambda x: torch.tensor(x, dtype=torch.int32)):
        got = nsa_ops.npu_nsa_select_attention(
            c["q"], c["k"], c["v"], c["idx"], c["scale"], 4, c["lp"], 4, atten_mask=torch.ones(1, 1, dtype=torch.bool),
            actual_seq_qlen=conv(c["cu_q"][1:]), actual_seq_kvlen=conv(c["cu_kv"][1:]))
        for x, y in zip(base, got):
            assert torch.equal(x, y)


def test_causal_switch_is_the_presence_of_atten_mask():
    """§1: any 2-D bool/uint8 tensor turns causality on, its contents and size are not read; None turns it off."""
    c = make_case(torch.float32, seed=6)
    causal = drop_in(c)
    for mask in (torch.zeros(3, 7, dtype=torch.bool), torch.ones(100, 100, dtype=torch.uint8), torch.empty(0, 0, dtype=torch.bool)):
        got = nsa_ops.npu_nsa_select_attention(c["q"], c["k"], c["v"], c["idx"], c["scale"], 4, c["lp"], 4,
                                               atten_mask=mask, actual_seq_qlen=c["cu_q"][1:],
                                               actual_seq_kvlen=c["cu_kv"][1:])
        for x, y in zip(causal, got):
            assert torch.equal(x, y)
    plain = drop_in(c, causal=False)
    assert not torch.equal(causal[0], plain[0])
    check_forward(dict(c, causal=False), plain)
    for bad, pattern in ((torch.ones(4, dtype=torch.bool), "atten_mask must be a 2-D"),
                         (torch.ones(2, 2), "atten_mask must be a bool")):
        with pytest.raises(RuntimeError, match=pattern):
            nsa_ops.npu_nsa_select_attention(c["q"], c["k"], c["v"], c["idx"], c["scale"], 4, c["lp"], 4, atten_mask=bad,
                                             actual_seq_qlen=c["cu_q"][1:], actual_seq_kvlen=c["cu_kv"][1:])


# ------------------------------------------------------------------------------------------------ Pythonic API
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tensors", [False, True])
def test_pythonic_api_is_the_drop_in(causal, tensors):
    c = make_case(torch.bfloat16, causal=causal, seed=7)
    cu_q = torch.tensor(c["cu_q"]) if tensors else c["cu_q"]
    cu_kv = torch.tensor(c["cu_kv"], dtype=torch.int32) if tensors else tuple(c["cu_kv"])
    got = nsa_ops.select_attention(c["q"], c["k"], c["v"], c["idx"], cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv,
                                   select_block_size=c["lp"], causal=causal)
    assert isinstance(got, nsa_ops.SelectAttentionOutput)
    for x, y in zip(drop_in(c), got):  # default scale: 1 / sqrt(D), the case's scale
        assert torch.equal(x, y)
    got2 = nsa_ops.select_attention(c["q"], c["k"], c["v"], c["idx"], cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv,
                                    select_block_size=c["lp"], causal=causal, scale=0.5)
    for x, y in zip(drop_in(c, scale=0.5), got2):
        assert torch.equal(x, y)


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(cu_seqlens_q=[1, 64]), ValueError, "cu_seqlens_q must start with 0"),
    (dict(cu_seqlens_q=[0]), ValueError, "cu_seqlens_q must have B\\+1 >= 2"),
    (dict(cu_seqlens_kv=[0, 9, 5, 70, 75]), ValueError, "cu_seqlens_kv must be non-decreasing"),
    (dict(cu_seqlens_kv=[0, 75]), ValueError, "cu_seqlens_kv must have as many entries"),
    (dict(cu_seqlens_q="0,64"), TypeError, "cu_seqlens_q must be a list"),
    (dict(cu_seqlens_q=torch.tensor([[0, 64]])), ValueError, "cu_seqlens_q must be a 1-D"),
    (dict(scale=float("inf")), ValueError, "scale must be finite"),
    (dict(scale="0.1"), ValueError, "scale must be a float"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(select_block_size=2.0), ValueError, "select_block_size must be an int"),
    (dict(select_block_size=0), RuntimeError, "select_block_size must be >= 1"),
])
def test_pythonic_api_errors_name_arguments(kwargs, exc, pattern):
    c = make_case(torch.float32, seed=8)
    args = dict(cu_seqlens_q=c["cu_q"], cu_seqlens_kv=c["cu_kv"], select_block_size=c["lp"])
    args.update(kwargs)
    with pytest.raises(exc, match=pattern):
        nsa_ops.select_attention(c["q"], c["k"], c["v"], c["idx"], **args)


@pytest.mark.parametrize("change,pattern", [
    (dict(idx_value=(3, 1, 0, 99)), r"topk_indices\[3\]\[1\]\[0\] = 99 is out of range"),
    (dict(idx_value=(40, 0, 2, -2)), r"topk_indices\[40\]\[0\]\[2\] = -2 is out of range"),
    (dict(head_num=3), "head_num must equal"),
    (dict(K=3), "select_block_count"),
    (dict(qlen=[37, 37, 59, 63]), r"actual_seq_qlen\[-1\] must equal"),
    (dict(kvlen=[37, 36, 70, 75]), "actual_seq_kvlen must be non-decreasing"),
    (dict(kvlen=None), "actual_seq_kvlen must be given"),
    (dict(k_dtype=torch.float64), "key must have the dtype of query"),
    (dict(idx_dtype=torch.int16), "topk_indices must be an int32"),
    (dict(scale=float("nan")), "scale_value must be finite"),
    (dict(lp=0), "select_block_size must be >= 1"),
])
def test_drop_in_errors_name_arguments(change, pattern):
    c = make_case(torch.float32, seed=9)
    idx = c["idx"].clone()
    if "idx_value" in change:
        t, n, j, x = change["idx_value"]
        idx[t, n, j] = x
    if "idx_dtype" in change:
        idx = idx.to(change["idx_dtype"])
    k = c["k"].to(change.get("k_dtype", c["k"].dtype))
    with pytest.raises(RuntimeError, match=pattern):
        nsa_ops.npu_nsa_select_attention(
            c["q"], k, c["v"], idx, change.get("scale", c["scale"]), change.get("head_num", 4), change.get("lp", c["lp"]),
            change.get("K", 4), atten_mask=torch.ones(1, 1, dtype=torch.bool),
            actual_seq_qlen=change.get("qlen", c["cu_q"][1:]), actual_seq_kvlen=change.get("kvlen", c["cu_kv"][1:]))


def test_meta_kernels_give_shapes_without_data():
    q = torch.empty(300, 8, 40, dtype=torch.bfloat16, device="meta")
    k = torch.empty(500, 2, 40, dtype=torch.bfloat16, device="meta")
    v = torch.empty(500, 2, 24, dtype=torch.bfloat16, device="meta")
    idx = torch.empty(300, 2, 5, dtype=torch.int32, device="meta")
    out, smax, ssum = nsa_ops.npu_nsa_select_attention(q, k, v, idx, 0.1, 8, 64, 5, actual_seq_qlen=[300],
                                                       actual_seq_kvlen=[500])
    assert (out.shape, out.dtype, out.device.type) == ((300, 8, 24), torch.bfloat16, "meta")
    assert (smax.shape, smax.dtype) == ((300, 8, 8), torch.float32) and ssum.shape == (300, 8, 8)
    g = nsa_ops.npu_nsa_select_attention_grad(out, q, k, v, out, smax, ssum, idx, 0.1, 8, 64, 5, actual_seq_qlen=[300],
                                              actual_seq_kvlen=[500])
    assert [x.shape for x in g] == [q.shape, k.shape, v.shape]
    with pytest.raises(RuntimeError, match="select_block_count"):
        nsa_ops.npu_nsa_select_attention(q, k, v, idx, 0.1, 8, 64, 4, actual_seq_qlen=[300], actual_seq_kvlen=[500])


# ------------------------------------------------------------------------------------------------ gradients
def grads(fn, q, k, v, dout):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    return torch.autograd.grad(fn(q, k, v), (q, k, v), dout)


@pytest.mark.parametrize("entry", ["drop_in", "drop_in_tensor_lengths", "pythonic", "op"])
@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_fp64(entry, causal):
    c = make_case(torch.float64, sq=(9, 0, 6), skv=(9, 2, 11), N1=4, N2=2, D=5, Dv=3, lp=3, K=3, causal=causal, seed=11)
    mask = torch.ones(1, 1, dtype=torch.bool) if causal else None

    def f(q, k, v):
        if entry == "pythonic":
            return nsa_ops.select_attention(q, k, v, c["idx"], cu_seqlens_q=c["cu_q"], cu_seqlens_kv=c["cu_kv"],
                                            select_block_size=3, causal=causal).attention_out
        if entry == "op":
            return torch.ops.nsa.select_attention(q, k, v, c["idx"], c["scale"], 4, 3, 3, mask, c["cu_q"][1:],
                                                  c["cu_kv"][1:])[0]
        lengths = (c["cu_q"][1:], c["cu_kv"][1:])
        if entry == "drop_in_tensor_lengths":
            lengths = tuple(torch.tensor(x) for x in lengths)
        return nsa_ops.npu_nsa_select_attention(q, k, v, c["idx"], c["scale"], 4, 3, 3, atten_mask=mask,
                                                actual_seq_qlen=lengths[0], actual_seq_kvlen=lengths[1])[0]

    inputs = tuple(c[n].detach().clone().requires_grad_(True) for n in "qkv")
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 2, 8])
def test_grads_match_the_fp64_model(dtype, G):
    """FlashAttention's rule: max error <= 3 x that of the same composition in the dtype's precision + a floor
    relative to the gradient's magnitude (the bf16 dot-product path rounds P and dS to bf16, §8)."""
    c = make_case(dtype, sq=(40, 0, 33), skv=(40, 5, 60), N1=2 * G, N2=2, D=32, Dv=16, lp=8, K=4, seed=20 + G)
    a = (c["idx"], c["scale"], c["lp"], c["causal"], c["cu_q"], c["cu_kv"])
    out = drop_in(c)[0]
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    got = grads(lambda q, k, v: drop_in(dict(c, q=q, k=k, v=v))[0], c["q"], c["k"], c["v"], dout)
    ref = grads(lambda q, k, v: model_attention_diff(q, k, v, *a), c["q"].double(), c["k"].double(), c["v"].double(),
                dout.double())
    plain = grads(lambda q, k, v: model_attention_diff(q, k, v, *a).float().to(dtype), c["q"].float(), c["k"].float(),
                  c["v"].float(), dout.float())
    floor = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for name, g, r, p in zip("qkv", got, ref, plain):
        assert g.dtype == dtype and g.shape == r.shape and g.is_contiguous()
        err = (g.double() - r).abs().max().item()
        err_plain = (p.double().to(dtype).double() - r).abs().max().item()
        assert err <= 3 * err_plain + floor * max(r.abs().max().item(), 1.0), f"d{name}: {err} vs plain {err_plain}"


def test_grad_drop_in_equals_autograd_and_statistics_carry_no_gradient():
    c = make_case(torch.bfloat16, seed=12)
    q, k, v = (c[n].clone().requires_grad_(True) for n in "qkv")
    mask = torch.ones(1, 1, dtype=torch.bool)
    out, smax, ssum = nsa_ops.npu_nsa_select_attention(q, k, v, c["idx"], c["scale"], 4, c["lp"], 4, atten_mask=mask,
                                                       actual_seq_qlen=c["cu_q"][1:], actual_seq_kvlen=c["cu_kv"][1:])
    assert out.requires_grad and not smax.requires_grad and not ssum.requires_grad
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype)
    auto = torch.autograd.grad(out, (q, k, v), dout)
    direct = nsa_ops.npu_nsa_select_attention_grad(dout, c["q"], c["k"], c["v"], out.detach(), smax, ssum, c["idx"],
                                                   c["scale"], 4, c["lp"], 4, atten_mask=mask,
                                                   actual_seq_qlen=c["cu_q"][1:], actual_seq_kvlen=c["cu_kv"][1:])
    for x, y in zip(auto, direct):
        assert torch.equal(x, y)
    ref = torch.ops.nsa.select_attention_backward_reference(dout, c["q"], c["k"], c["v"], out.detach(), smax, ssum,
                                                            c["idx"], c["scale"], 4, c["lp"], 4, mask, c["cu_q"][1:],
                                                            c["cu_kv"][1:])
    for x, y in zip(direct, ref):
        assert (x.float() - y.float()).abs().max() <= 0.05 * y.float().abs().max()
    with pytest.raises(RuntimeError, match="double backward"):
        (dq,) = torch.autograd.grad(
            nsa_ops.npu_nsa_select_attention(q.double(), k.double(), v.double(), c["idx"], c["scale"], 4, c["lp"], 4,
                                             actual_seq_qlen=c["cu_q"][1:], actual_seq_kvlen=c["cu_kv"][1:])[0].sum(),
            (q,), create_graph=True)
        torch.autograd.grad(dq.sum(), (q,))


def test_backward_errors_name_arguments():
    c = make_case(torch.float32, seed=13)
    out, smax, ssum = drop_in(c)
    base = dict(grad=out, query=c["q"], key=c["k"], value=c["v"], attention_out=out, softmax_max=smax, softmax_sum=ssum,
                topk_indices=c["idx"], scale_value=c["scale"], head_num=4, select_block_size=c["lp"],
                select_block_count=4)
    kw = dict(atten_mask=torch.ones(1, 1, dtype=torch.bool), actual_seq_qlen=c["cu_q"][1:], actual_seq_kvlen=c["cu_kv"][1:])
    for name, bad, pattern in (("grad", out[:, :, :-1], "grad must have the shape"),
                               ("softmax_max", smax[:, :, :4], "softmax_max must be float32 of shape"),
                               ("softmax_sum", ssum.double(), "softmax_sum must be float32"),
                               ("attention_out", out.half(), "attention_out must have the dtype of query")):
        with pytest.raises(RuntimeError, match=pattern):
            nsa_ops.npu_nsa_select_attention_grad(**dict(base, **{name: bad}), **kw)


# ------------------------------------------------------------------------------------------------ PyTorch integration
@pytest.mark.parametrize("tensor_lengths", [False, True])
def test_opcheck(tensor_lengths):
    c = make_case(torch.float32, sq=(20, 9), skv=(20, 12), seed=14)
    q, k, v = (c[n].clone().requires_grad_(True) for n in "qkv")
    lengths = (c["cu_q"][1:], c["cu_kv"][1:])
    if tensor_lengths:
        lengths = tuple(torch.tensor(x) for x in lengths)
    op = torch.ops.nsa.select_attention.tensor_lengths if tensor_lengths else torch.ops.nsa.select_attention.default
    args = (q, k, v, c["idx"], c["scale"], 4, c["lp"], 4, torch.ones(1, 1, dtype=torch.bool), *lengths)
    torch.library.opcheck(op, args)
    out, smax, ssum = op(*args)
    bop = (torch.ops.nsa.select_attention_backward.tensor_lengths if tensor_lengths
           else torch.ops.nsa.select_attention_backward.default)
    torch.library.opcheck(bop, (out.detach(), c["q"], c["k"], c["v"], out.detach(), smax, ssum, c["idx"], c["scale"], 4,
                                c["lp"], 4, torch.ones(1, 1, dtype=torch.bool), *lengths))


@pytest.mark.parametrize("aot", [False, True])
def test_compiled_forward_backward_fullgraph_without_recompiling_for_new_lengths(aot):
    """torch.compile(fullgraph=True) of forward + backward through the Pythonic API with tensor lengths: new batch
    compositions with the same tensor shapes reuse the compiled graph (the lengths are tensor inputs)."""
    import torch._dynamo

    torch._dynamo.reset()
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        if aot:  # AOTAutograd traces the backward too (through the Meta kernel of the backward op)
            from torch._dynamo.backends.common import aot_autograd

            return aot_autograd(fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g)(gm, example_inputs)
        return gm

    def step(q, k, v, idx, cu_q, cu_kv):
        out = nsa_ops.select_attention(q, k, v, idx, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv, select_block_size=8)
        return out.attention_out.float().square().sum()

    compiled = torch.compile(step, backend=backend, fullgraph=True)
    for i, (sq, skv) in enumerate([((40, 24), (40, 24)), ((10, 54), (20, 44)), ((64, 0), (30, 34))]):
        c = make_case(torch.float32, sq=sq, skv=skv, seed=30 + i, extra_kv=0)
        assert c["q"].shape == (64, 4, 24) and c["k"].shape[0] == 64
        cu_q, cu_kv = torch.tensor(c["cu_q"]), torch.tensor(c["cu_kv"])
        qs, ks, vs = (c[n].clone().requires_grad_(True) for n in "qkv")
        loss = compiled(qs, ks, vs, c["idx"], cu_q, cu_kv)
        loss.backward()
        qe, ke, ve = (c[n].clone().requires_grad_(True) for n in "qkv")
        loss_e = step(qe, ke, ve, c["idx"], cu_q, cu_kv)
        loss_e.backward()
        assert torch.equal(loss, loss_e)
        for x, y in zip((qs, ks, vs), (qe, ke, ve)):
            assert torch.equal(x.grad, y.grad)
    assert len(compiles) == 1, f"expected one compilation, got {len(compiles)}"


# ------------------------------------------------------------------------------------------------ NSA pipeline
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_end_to_end_with_compressed_attention(dtype):
    """The topk_indices of npu_nsa_compress_attention (compressed keys/values by mean pooling, the causal masks of
    compress_attention.md §9) feed npu_nsa_select_attention directly, with the same atten_mask turning causality on;
    the result matches the model and gradients flow to query, key and value."""
    l, d, lp, K, N1, N2, D, Dv = 32, 16, 64, 4, 4, 2, 32, 16
    seqs = [256, 320]
    g = torch.Generator().manual_seed(40)
    T = sum(seqs)
    q = torch.randn(T, N1, D, generator=g).to(dtype)
    k = torch.randn(T, N2, D, generator=g).to(dtype)
    v = torch.randn(T, N2, Dv, generator=g).to(dtype)
    cmp = nsa_ops.compressed_lengths(seqs, l, d)
    kc, vc = [], []
    t0 = 0
    for s, c in zip(seqs, cmp):  # compressed token i: the mean of raw tokens [i d, i d + l)
        win = torch.arange(c).unsqueeze(1) * d + torch.arange(l)
        kc.append(k[t0:t0 + s].float()[win].mean(dim=1).to(dtype))
        vc.append(v[t0:t0 + s].float()[win].mean(dim=1).to(dtype))
        t0 += s
    kc, vc = torch.cat(kc), torch.cat(vc)
    sel = nsa_ops.selection_lengths(cmp, d, lp)
    am = nsa_ops.make_atten_mask(max(seqs), max(cmp), l, d)
    tm = nsa_ops.make_topk_mask(max(seqs), max(sel), lp)
    qlen, kvlen = nsa_ops.prefix_sums(seqs), nsa_ops.prefix_sums(cmp)
    scale = 1.0 / math.sqrt(D)
    _, topk, _, _ = nsa_ops.npu_nsa_compress_attention(q, kc, vc, scale, N1, l, d, lp, K, topk_mask=tm, atten_mask=am,
                                                       actual_seq_qlen=qlen, actual_cmp_seq_kvlen=kvlen)
    assert topk.dtype == torch.int32 and topk.shape == (T, N2, K)
    qr, kr, vr = (x.clone().requires_grad_(True) for x in (q, k, v))
    out = nsa_ops.npu_nsa_select_attention(qr, kr, vr, topk, scale, N1, lp, K, atten_mask=am, actual_seq_qlen=qlen,
                                           actual_seq_kvlen=qlen)
    c = dict(q=q, k=k, v=v, idx=topk, scale=scale, lp=lp, causal=True, cu_q=[0] + qlen, cu_kv=[0] + qlen)
    md = check_forward(c, out)
    assert md["any_vis"].all()  # the forced local block makes every row see at least itself
    dq, dk, dv = torch.autograd.grad(out[0], (qr, kr, vr), torch.ones_like(out[0]))
    assert all(torch.isfinite(x.float()).all() for x in (dq, dk, dv)) and dk.abs().sum() > 0
