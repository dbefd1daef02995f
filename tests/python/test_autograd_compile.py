"""Gradients (docs/spec/compress_attention.md §7) through every entry point, and torch.compile / opcheck of the op with autograd.

The gradient oracle is an independent differentiable fp64 composition written here: per batch and KV
head, scores, the -FLT_MAX replacement of atten_mask, softmax, P.V; a fully masked row is the mean of
the batch's values (docs/spec/compress_attention.md §5), which does not depend on q or k: its exact derivative gives dV the uniform
share and nothing to dQ/dK (docs/spec/compress_attention.md §7). P is not rounded (fp64 inputs, or the rounding is treated as
noise in the lower-precision comparisons: §7 allows rounding P and dS).
"""

import math

import pytest
import torch

import nsa_ops

FLT_MAX = torch.finfo(torch.float32).max


def model_attention(q, k, v, scale, atten_mask, seq_q, seq_c):
    """attention_out of docs/spec/compress_attention.md §3-§5 in fp64, differentiable (the other outputs carry no gradient)."""
    T, N1, _ = q.shape
    N2 = k.shape[1]
    G = N1 // N2
    q64, k64, v64 = q.double(), k.double(), v.double()
    outs = []
    q0 = c0 = 0
    for qe, ce in zip(seq_q, seq_c):
        sq, c = qe - q0, ce - c0
        if sq > 0:
            qb = q64[q0:qe].reshape(sq, N2, G, -1)            # [s, n2, g, D]
            kb, vb = k64[c0:ce], v64[c0:ce]                   # [c, n2, D], [c, n2, D2]
            s = torch.einsum("sngd,cnd->sngc", qb, kb) * float(torch.tensor(scale, dtype=torch.float32))
            if atten_mask is not None:
                m = atten_mask[:sq, :c].bool()[:, None, None, :]
                s = s.masked_fill(m, -FLT_MAX)
                full = m.all(dim=-1, keepdim=True)             # [s, 1, 1, 1]
            else:
                full = torch.zeros(sq, 1, 1, 1, dtype=torch.bool)
            p = torch.softmax(s, dim=-1)
            o = torch.einsum("sngc,cne->snge", p, vb)
            mean_v = vb.mean(dim=0)[None, :, None, :]          # [1, n2, 1, D2]
            o = torch.where(full, mean_v.expand_as(o), o)
            outs.append(o.reshape(sq, N1, -1))
        q0, c0 = qe, ce
    return torch.cat(outs, dim=0)


def make_case(dtype, *, T_list=(40, 0, 57), N1=4, N2=2, D=24, D2=16, l=32, d=16, lp=32, K=1, causal=True,
              extra_kv_rows=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    C_list = [max(1, (t - l) // d + 1) for t in T_list]
    T, C = sum(T_list), sum(C_list)
    q = torch.randn(T, N1, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(C + extra_kv_rows, N2, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(C + extra_kv_rows, N2, D2, generator=g, dtype=torch.float64).to(dtype)
    seq_q = list(torch.tensor(T_list).cumsum(0).tolist())
    seq_c = list(torch.tensor(C_list).cumsum(0).tolist())
    am = nsa_ops.make_atten_mask(max(T_list), max(C_list), l, d) if causal else None
    args = dict(scale_value=1.0 / math.sqrt(D), head_num=N1, compress_block_size=l, compress_stride=d,
                select_block_size=lp, select_block_count=K, atten_mask=am, actual_seq_qlen=seq_q,
                actual_cmp_seq_kvlen=seq_c)
    return q, k, v, args


def grads_of(fn, q, k, v, dout):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v)
    return torch.autograd.grad(out, (q, k, v), dout)


@pytest.mark.parametrize("entry", ["dropin", "dropin_tensor_lengths", "keyword", "op"])
def test_gradcheck_fp64(entry):
    q, k, v, a = make_case(torch.float64, T_list=(36, 20), N1=4, N2=2, D=8, D2=6)
    seq_q, seq_c = a["actual_seq_qlen"], a["actual_cmp_seq_kvlen"]

    def f(q, k, v):
        if entry == "dropin":
            return nsa_ops.npu_nsa_compress_attention(q, k, v, **a)[0]
        if entry == "dropin_tensor_lengths":
            b = dict(a, actual_seq_qlen=torch.tensor(seq_q), actual_cmp_seq_kvlen=torch.tensor(seq_c))
            return nsa_ops.npu_nsa_compress_attention(q, k, v, **b)[0]
        if entry == "keyword":
            return nsa_ops.compress_attention(
                q, k, v, cu_seqlens_q=[0] + seq_q, cu_seqlens_cmp=[0] + seq_c,
                compress_block_size=a["compress_block_size"], compress_stride=a["compress_stride"],
                select_block_size=a["select_block_size"], select_block_count=a["select_block_count"],
                scale=a["scale_value"], atten_mask=a["atten_mask"]).attention_out
        return torch.ops.nsa.compress_attention(q, k, v, a["scale_value"], a["head_num"], a["compress_block_size"],
                                                a["compress_stride"], a["select_block_size"],
                                                a["select_block_count"], None, a["atten_mask"], seq_q, seq_c)[0]

    inputs = tuple(x.detach().clone().requires_grad_(True) for x in (q, k, v))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 2, 3, 8])
def test_grads_match_model(dtype, G):
    N2 = 2
    q, k, v, a = make_case(dtype, N1=N2 * G, N2=N2, D=40, D2=24, T_list=(70, 0, 45, 96), seed=G)
    seq_q, seq_c = a["actual_seq_qlen"], a["actual_cmp_seq_kvlen"]
    out = nsa_ops.npu_nsa_compress_attention(q, k, v, **a)[0]
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
    got = grads_of(lambda q, k, v: nsa_ops.npu_nsa_compress_attention(q, k, v, **a)[0], q, k, v, dout)
    ref = grads_of(lambda q, k, v: model_attention(q, k, v, a["scale_value"], a["atten_mask"], seq_q, seq_c),
                   q.double(), k.double(), v.double(), dout.double())
    # the same composition in the input dtype's precision (fp32 math on dtype-rounded values) as the
    # "plain same-dtype implementation" of FlashAttention's rule
    plain = grads_of(lambda q, k, v: model_attention(q, k, v, a["scale_value"], a["atten_mask"], seq_q, seq_c)
                     .to(dtype), q.float(), k.float(), v.float(), dout.float())
    # floor relative to the gradient's magnitude: for fp32 the recomputation of P from the saved float32
    # statistics (as the NPU does) and the cancellation in dP - Dlt cost about 1e-6 relative, more than a
    # plain fp32 autograd that keeps its own P.
    floor = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for name, g_got, g_ref, g_plain in zip("qkv", got, ref, plain):
        assert g_got.dtype == dtype and g_got.shape == g_ref.shape
        err = (g_got.double() - g_ref).abs().max().item()
        err_plain = (g_plain.double().to(dtype).double() - g_ref).abs().max().item()
        scale = g_ref.abs().max().item()
        assert err <= 3 * err_plain + floor * max(scale, 1.0), f"d{name}: error {err} vs plain {err_plain} ({dtype})"


def test_key_value_rows_past_last_prefix_sum_get_zero_gradient():
    q, k, v, a = make_case(torch.float32, extra_kv_rows=5)
    C = a["actual_cmp_seq_kvlen"][-1]
    dq, dk, dv = grads_of(lambda q, k, v: nsa_ops.npu_nsa_compress_attention(q, k, v, **a)[0], q, k, v,
                          torch.ones(q.shape[0], q.shape[1], v.shape[2]))
    assert torch.count_nonzero(dk[C:]) == 0 and torch.count_nonzero(dv[C:]) == 0
    assert torch.count_nonzero(dk[:C]) > 0 and torch.count_nonzero(dv[:C]) > 0


def test_fully_masked_rows_give_zero_dq_and_uniform_dv():
    q, k, v, a = make_case(torch.float64, T_list=(50,), extra_kv_rows=0)
    am = a["atten_mask"]
    full_rows = am.all(dim=1).nonzero().flatten()
    assert len(full_rows) > 0 and len(full_rows) < q.shape[0]
    dout = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float64)
    dout[full_rows] = 1.0  # gradient only through the fully masked rows
    dq, dk, dv = grads_of(lambda q, k, v: nsa_ops.npu_nsa_compress_attention(q, k, v, **a)[0], q, k, v, dout)
    assert torch.count_nonzero(dq) == 0 and torch.count_nonzero(dk) == 0
    C = a["actual_cmp_seq_kvlen"][-1]
    G = q.shape[1] // k.shape[1]
    expected = torch.full_like(dv, len(full_rows) * G / C)
    torch.testing.assert_close(dv, expected, rtol=1e-12, atol=1e-12)


def test_non_contiguous_inputs_and_grad_out():
    q, k, v, a = make_case(torch.float32)
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)    # same values, other strides
    kt = torch.cat([k, k], dim=2)[:, :, : k.shape[2]]
    vt = v.transpose(1, 2).contiguous().transpose(1, 2)
    dout = torch.randn(q.shape[0], q.shape[1], 2 * v.shape[2])[:, :, ::2]
    f = lambda q, k, v: nsa_ops.npu_nsa_compress_attention(q, k, v, **a)[0]  # noqa: E731
    got = grads_of(f, qt, kt, vt, dout)
    ref = grads_of(f, q, k, v, dout.contiguous())
    for x, y in zip(got, ref):
        assert torch.equal(x, y)


def test_no_gradient_for_masks_topk_and_statistics():
    q, k, v, a = make_case(torch.float32)
    q.requires_grad_(True)
    out, topk, smax, ssum = nsa_ops.npu_nsa_compress_attention(q, k, v, **a)
    assert out.requires_grad and not topk.requires_grad
    (g,) = torch.autograd.grad(smax.sum() + ssum.sum() + out.sum() * 0, (q,), allow_unused=True)
    assert g is None or torch.count_nonzero(g) == 0


def test_double_backward_raises_clearly():
    q, k, v, a = make_case(torch.float64)
    q.requires_grad_(True)
    out = nsa_ops.npu_nsa_compress_attention(q, k, v, **a)[0]
    (dq,) = torch.autograd.grad(out.sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(dq.sum(), (q,))


def test_backward_bad_arguments_name_them():
    q, k, v, a = make_case(torch.float32)
    out, _, smax, ssum = nsa_ops.npu_nsa_compress_attention(q, k, v, **a)
    base = [out, q, k, v, out, smax, ssum, a["scale_value"], a["head_num"], a["compress_block_size"],
            a["compress_stride"], a["select_block_size"], a["select_block_count"], a["atten_mask"],
            a["actual_seq_qlen"], a["actual_cmp_seq_kvlen"]]
    bad_grad = list(base)
    bad_grad[0] = out[:, :, :-1]
    with pytest.raises(RuntimeError, match="grad_out"):
        torch.ops.nsa.compress_attention_backward(*bad_grad)
    bad_stat = list(base)
    bad_stat[5] = smax.double()
    with pytest.raises(RuntimeError, match="softmax_max"):
        torch.ops.nsa.compress_attention_backward(*bad_stat)
    bad_len = list(base)
    bad_len[14] = [1]
    with pytest.raises(RuntimeError, match="actual_seq_qlen"):
        torch.ops.nsa.compress_attention_backward(*bad_len)


def _op_args(q, k, v, a, tensor_lengths):
    seq_q, seq_c = a["actual_seq_qlen"], a["actual_cmp_seq_kvlen"]
    if tensor_lengths:
        seq_q, seq_c = torch.tensor(seq_q), torch.tensor(seq_c)
    return (q, k, v, a["scale_value"], a["head_num"], a["compress_block_size"], a["compress_stride"],
            a["select_block_size"], a["select_block_count"], None, a["atten_mask"], seq_q, seq_c, None)


@pytest.mark.parametrize("tensor_lengths", [False, True])
def test_opcheck_with_gradients(tensor_lengths):
    q, k, v, a = make_case(torch.float32)
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    op = torch.ops.nsa.compress_attention.tensor_lengths if tensor_lengths else torch.ops.nsa.compress_attention.default
    torch.library.opcheck(op, _op_args(q, k, v, a, tensor_lengths))


@pytest.mark.parametrize("aot", [False, True])
def test_compiled_forward_backward_fullgraph_without_recompiling_for_new_lengths(aot):
    """torch.compile(fullgraph=True) of forward + backward through the drop-in with tensor lengths: new batch
    compositions with the same tensor shapes reuse the compiled graph (lengths are tensor inputs)."""
    import torch._dynamo

    torch._dynamo.reset()
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        if aot:  # AOTAutograd traces the backward too (through the Meta kernel of the backward op)
            from torch._dynamo.backends.common import aot_autograd

            return aot_autograd(fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g)(gm, example_inputs)
        return gm

    def step(q, k, v, seq_q, seq_c, am):
        out = nsa_ops.npu_nsa_compress_attention(q, k, v, 0.25, 4, 32, 16, 32, 1, None, am, seq_q, seq_c)[0]
        return out.float().square().sum()

    compiled = torch.compile(step, backend=counting_backend, fullgraph=True)
    # T = 100, T2 = 4, maxSq = 60 and maxC = 2 in every composition: only the lengths' values change
    for T_list in [(60, 20, 20), (20, 60, 20), (30, 10, 60)]:
        q, k, v, a = make_case(torch.float32, T_list=T_list, extra_kv_rows=0, K=1)
        seq_q = torch.tensor(a["actual_seq_qlen"])
        seq_c = torch.tensor(a["actual_cmp_seq_kvlen"])
        am = a["atten_mask"]
        assert q.shape == (100, 4, 24) and k.shape[0] == 4 and am.shape == (60, 2)
        qs, ks, vs = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
        loss = compiled(qs, ks, vs, seq_q, seq_c, am)
        loss.backward()
        qe, ke, ve = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
        loss_e = step(qe, ke, ve, seq_q, seq_c, am)
        loss_e.backward()
        assert torch.equal(loss, loss_e)
        for x, y in zip((qs, ks, vs), (qe, ke, ve)):
            assert torch.equal(x.grad, y.grad)
    assert len(compiles) == 1, f"expected one compilation, got {len(compiles)}"
