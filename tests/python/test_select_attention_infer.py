"""nsa_ops.npu_nsa_select_attention_infer (docs/spec/decode.md §4): the drop-in against the independent fp64 model of
paged_model.py (every dtype, every layout, B several, G = 1 and G > 1, D != Dv, P = 1 and P not dividing the
lengths, shuffled pages, -1 table padding, -1 slots, duplicates, MTP); the §5 worked example; the layouts agree
bit for bit; batch-major rows past q_b are zero; list and tensor lengths agree; §6 decode consistency with the
training select_attention; every argument rule raises naming the argument; no derivative; opcheck.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import nsa_ops
from paged_model import DTYPES, assert_close, make_case, model, random_topk, rha, ulp

SHAPES = [
    # q, s, N1, N2, D, Dv, P, l', K
    ([1, 1, 1], [37, 5, 64], 2, 2, 16, 16, 16, 8, 4),
    ([1, 1], [100, 33], 8, 2, 24, 16, 32, 16, 3),
    ([1, 1], [9, 4], 2, 1, 8, 5, 1, 4, 3),
    ([3, 1, 2], [70, 3, 45], 4, 2, 16, 8, 24, 16, 4),
]


def tnd(c, scale, **kw):
    """The drop-in with layout TND on a case (caches flattened to [num_pages, P, N2*D])."""
    return nsa_ops.npu_nsa_select_attention_infer(
        c.query, c.key.flatten(2), c.value.flatten(2), c.topk, scale, c.N1, c.N2, c.lp, c.K, c.P, layout="TND",
        block_table=c.table, actual_seq_qlen=c.q, actual_seq_kvlen=c.s, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=["G1", "G4-D!=Dv", "P1", "MTP"])
def test_against_fp64_model(dtype, shape):
    q, s, N1, N2, D, Dv, P, lp, K = shape
    c = make_case(dtype, q, s, N1, N2, D, Dv, P, seed=len(s) * 7 + D)
    random_topk(c, lp, K, seed=D)
    c.topk[0, 0, 0] = -1
    if K > 2:
        c.topk[0, 0, 1] = c.topk[0, 0, 2] = 0  # a duplicated block counts twice
    out, tol, zero = model(c, 0.37, select=True)
    assert_close(tnd(c, 0.37), out, tol, zero)
    ref = torch.ops.nsa.select_attention_infer_reference(
        c.query, c.key.flatten(2), c.value.flatten(2), c.topk, 0.37, N1, N2, lp, K, P, "TND", None, c.table, c.q, c.s)
    assert_close(ref, out, tol, zero)


def test_section5_worked_example():
    """S_0 = 80, l' = 64, P = 64, pages [5, 2], topk [1, 0, -1]; zero queries (P = 1 everywhere), v[p] = p."""
    key = torch.full((6, 64, 1, 1), float("nan"), dtype=torch.bfloat16)
    value = key.clone()
    table = torch.tensor([[5, 2]], dtype=torch.int32)
    for p in range(80):
        key[table[0, p // 64], p % 64] = 0.0
        value[table[0, p // 64], p % 64] = float(p)
    q1 = torch.zeros(1, 1, 1, 1, dtype=torch.bfloat16)
    out = nsa_ops.npu_nsa_select_attention_infer(q1, key, value, torch.tensor([[[1, 0, -1]]], dtype=torch.int32),
                                                 1.0, 1, 1, 64, 3, 64, block_table=table, actual_seq_kvlen=[80])
    assert out.shape == (1, 1, 1, 1) and out.item() == 39.5  # positions 64..79 then 0..63: mean of 0..79
    # q_0 = 2 (BSND Sq = 2): token 0 (position 78) sees 64..78 and 0..63 (mean 39), token 1 all 80
    q2 = torch.zeros(1, 2, 1, 1, dtype=torch.bfloat16)
    topk = torch.tensor([[[[1, 0, -1]], [[-1, 0, 1]]]], dtype=torch.int32)
    out = nsa_ops.npu_nsa_select_attention_infer(q2, key, value, topk, 1.0, 1, 1, 64, 3, 64, block_table=table,
                                                 actual_seq_kvlen=[80])
    assert out.flatten().tolist() == [39.0, 39.5]
    empty = torch.tensor([[[-1, -1, -1]]], dtype=torch.int32)
    out = nsa_ops.npu_nsa_select_attention_infer(q1, key, value, empty, 1.0, 1, 1, 64, 3, 64, block_table=table,
                                                 actual_seq_kvlen=[80])
    assert out.item() == 0.0


def _batch_major(c, Sq):
    """BSND / BSH tensors of a case whose q_b are all Sq."""
    B = c.B
    return c.query.reshape(B, Sq, c.N1, c.D), c.topk.reshape(B, Sq, c.N2, c.K)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layouts_agree_bitwise(dtype):
    c = make_case(dtype, [2, 2, 2], [40, 9, 2], 4, 2, 8, 6, 8, seed=3)
    random_topk(c, 4, 5, seed=3)
    t = tnd(c, 0.5)
    q4, k4 = _batch_major(c, 2)
    bsnd = nsa_ops.npu_nsa_select_attention_infer(q4, c.key, c.value, k4, 0.5, 4, 2, 4, 5, 8, block_table=c.table,
                                                  actual_seq_kvlen=c.s)
    bsh = nsa_ops.npu_nsa_select_attention_infer(q4.flatten(2), c.key.flatten(2), c.value.flatten(2), k4, 0.5, 4, 2,
                                                 4, 5, 8, layout="BSH", block_table=c.table, actual_seq_qlen=c.q,
                                                 actual_seq_kvlen=c.s)
    assert bsnd.shape == (3, 2, 4, 6) and bsh.shape == (3, 2, 24) and t.shape == (6, 4, 6)
    assert torch.equal(bsnd.flatten(), t.flatten()) and torch.equal(bsh.flatten(), t.flatten())
    # Sq = 1: topk_indices [B, N2, K] is accepted for BSND
    c1 = make_case(dtype, [1, 1], [20, 7], 2, 1, 8, 8, 4, seed=4)
    random_topk(c1, 4, 3, seed=4)
    a = nsa_ops.npu_nsa_select_attention_infer(c1.query[:, None], c1.key, c1.value, c1.topk, 0.5, 2, 1, 4, 3, 4,
                                               block_table=c1.table, actual_seq_kvlen=c1.s)
    b = nsa_ops.npu_nsa_select_attention_infer(c1.query[:, None], c1.key, c1.value, c1.topk[:, None], 0.5, 2, 1, 4, 3,
                                               4, block_table=c1.table, actual_seq_kvlen=c1.s)
    assert torch.equal(a, b)


def test_batch_major_rows_past_q_are_zero():
    """BSND with actual_seq_qlen < Sq: rows i >= q_b are zero (§4, §7 item 7); the rows below q_b are those of TND."""
    c = make_case(torch.float32, [1, 3], [30, 12], 2, 2, 8, 8, 8, seed=5)
    random_topk(c, 4, 3, seed=5, p_empty=0.0)
    t = tnd(c, 0.3)
    q4 = torch.zeros(2, 3, 2, 8)
    topk4 = torch.full((2, 3, 2, 3), 999, dtype=torch.int32)  # rows past q_b are never read
    q4[0, 0], q4[1] = c.query[0], c.query[1:]
    topk4[0, 0], topk4[1] = c.topk[0], c.topk[1:]
    out = nsa_ops.npu_nsa_select_attention_infer(q4, c.key, c.value, topk4, 0.3, 2, 2, 4, 3, 8, block_table=c.table,
                                                 actual_seq_qlen=[1, 3], actual_seq_kvlen=c.s)
    assert torch.equal(out[0, 1:], torch.zeros(2, 2, 8))
    assert torch.equal(out[0, 0], t[0]) and torch.equal(out[1], t[1:])


def test_tensor_lengths_equal_lists():
    c = make_case(torch.bfloat16, [2, 1], [50, 6], 4, 2, 8, 8, 16, seed=6)
    random_topk(c, 8, 3, seed=6)
    a = tnd(c, 0.25)
    b = nsa_ops.npu_nsa_select_attention_infer(
        c.query, c.key.flatten(2), c.value.flatten(2), c.topk, 0.25, 4, 2, 8, 3, 16, layout="TND",
        block_table=c.table, actual_seq_qlen=torch.tensor(c.q, dtype=torch.int32), actual_seq_kvlen=torch.tensor(c.s))
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_consistency_with_training(dtype):
    """§6: q_b = 1, one sequence: the paged decode equals the causal training select_attention's last row within
    the tolerance (the training op rounds normalised P, the decode op unnormalised P: not bit-identical)."""
    S, N1, N2, D, lp, K, P = 45, 4, 2, 16, 8, 4, 16
    c = make_case(dtype, [1], [S], N1, N2, D, D, P, seed=11)
    random_topk(c, lp, K, seed=11, p_empty=0.0)
    dec = tnd(c, 0.25)
    keys = torch.stack([c.key[c.page_row(0, p)] for p in range(S)])  # [S, N2, D], contiguous raw keys
    vals = torch.stack([c.value[c.page_row(0, p)] for p in range(S)])
    query = torch.zeros(S, N1, D, dtype=dtype)
    query[-1] = c.query[0]
    topk = torch.full((S, N2, K), -1, dtype=torch.int32)
    topk[-1] = c.topk[0]
    train = nsa_ops.select_attention(query, keys, vals, topk, cu_seqlens_q=[0, S], cu_seqlens_kv=[0, S],
                                      select_block_size=lp, scale=0.25, causal=True).attention_out[-1]
    # each within its rounding budget of the exact attention (P unrounded), plus one output ulp each
    dec_x, train_x = {}, {}
    model(c, 0.25, select=True, extra=dec_x)
    model(c, 0.25, select=True, normalised=True, extra=train_x)
    a, b = dec[0].double().numpy(), train.double().numpy()
    bound = dec_x["budget"][0] + train_x["budget"][0] + ulp(a, dtype) + ulp(b, dtype)
    assert np.all(np.abs(a - b) <= bound), (np.abs(a - b) / bound).max()


def _base():
    c = make_case(torch.float32, [1, 2], [30, 3], 2, 2, 4, 4, 16, seed=12, spare=1)
    c.table = torch.tensor([[3, 1], [2, -1]], dtype=torch.int32)
    c.lp, c.K = 8, 2
    c.topk = torch.tensor([[[0, 3], [1, -1]], [[0, -1], [-1, 0]], [[0, 0], [0, -1]]], dtype=torch.int32)
    key = torch.randn(4, 16, 2, 4)
    value = torch.randn(4, 16, 2, 4)
    args = dict(query=c.query, key=key.flatten(2), value=value.flatten(2), topk_indices=c.topk, scale_value=0.5,
                head_num=2, key_value_head_num=2, select_block_size=8, select_block_count=2, page_block_size=16,
                layout="TND", block_table=c.table, actual_seq_qlen=[1, 2], actual_seq_kvlen=[30, 3])
    return args


def _call(**kw):
    a = _base()
    a.update(kw)
    pos = [a.pop(n) for n in ("query", "key", "value", "topk_indices", "scale_value", "head_num",
                              "key_value_head_num", "select_block_size", "select_block_count", "page_block_size")]
    return nsa_ops.npu_nsa_select_attention_infer(*pos, **a)


@pytest.mark.parametrize("kw, message", [
    (dict(layout="NTD"), "layout must be"),
    (dict(block_table=None), "block_table must be given"),
    (dict(block_table=torch.tensor([[3, 1], [2, -1]])), "block_table must be an int32"),
    (dict(block_table=torch.tensor([[3, 9], [2, -1]], dtype=torch.int32)), r"block_table\[0\]\[1\] = 9 is not a valid page"),
    (dict(block_table=torch.tensor([[3, 1], [-1, -1]], dtype=torch.int32)), r"block_table\[1\]\[0\] = -1"),
    (dict(block_table=torch.tensor([[3], [2]], dtype=torch.int32)), "block_table must have a page for every position"),
    (dict(actual_seq_kvlen=None), "actual_seq_kvlen must be given"),
    (dict(actual_seq_qlen=None), "actual_seq_qlen must be given for layout TND"),
    (dict(actual_seq_qlen=[1, 1]), "actual_seq_qlen must sum to the query rows"),
    (dict(actual_seq_qlen=[0, 3]), r"actual_seq_qlen\[0\] must be >= 1"),
    (dict(actual_seq_kvlen=[30, 1]), r"actual_seq_kvlen\[1\] = 1 must be >= q_b = 2"),
    (dict(actual_seq_kvlen=[30, 3, 4]), "block_table must have one row per batch"),
    (dict(head_num=4), "head_num"),
    (dict(key_value_head_num=1), "key_value_head_num"),
    (dict(key_value_head_num=3), "must be a multiple of key_value_head_num"),
    (dict(page_block_size=8), "page_block_size must equal"),
    (dict(select_block_count=3), "topk_indices must have select_block_count = 3"),
    (dict(topk_indices=torch.tensor([[[0, 4], [1, -1]], [[0, -1], [-1, 0]], [[0, 0], [0, -1]]], dtype=torch.int32)),
     r"topk_indices\[0\]\[0\]\[1\] = 4 is out of range"),
    (dict(topk_indices=torch.tensor([[[0, 3], [1, -1]], [[0, -1], [-1, 0]], [[0, -3], [0, -1]]], dtype=torch.int32)),
     r"topk_indices\[2\]\[0\]\[1\] = -3 is out of range"),
    (dict(topk_indices=torch.zeros(3, 2, 2)), "topk_indices must be an int32"),
    (dict(value=torch.zeros(4, 16, 8, dtype=torch.float16)), "value must have the dtype of query"),
    (dict(scale_value=float("inf")), "scale_value must be finite"),
])
def test_argument_rules(kw, message):
    with pytest.raises(RuntimeError, match=message):
        _call(**kw)


def test_no_derivative():
    a = _base()
    q = a["query"].clone().requires_grad_()
    a["query"] = q
    out = _call(query=q)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="has no derivative"):
        out.sum().backward()


@pytest.mark.parametrize("tensor_lengths", [False, True])
def test_opcheck(tensor_lengths):
    a = _base()
    ql, kl = a["actual_seq_qlen"], a["actual_seq_kvlen"]
    if tensor_lengths:
        ql, kl = torch.tensor(ql), torch.tensor(kl)
    op = torch.ops.nsa.select_attention_infer.tensor_lengths if tensor_lengths else torch.ops.nsa.select_attention_infer.default
    torch.library.opcheck(op, (a["query"], a["key"], a["value"], a["topk_indices"], 0.5, 2, 2, 8, 2, 16, "TND", None,
                               a["block_table"], ql, kl))


def test_strided_caches():
    """Caches that are views (a slice of a combined K/V buffer; a last-dim step of 2, also flattened for TND) are
    read in place: bitwise the result of contiguous copies."""
    c = make_case(torch.bfloat16, [1, 1], [40, 21], 4, 2, 8, 8, 8, seed=32)
    random_topk(c, 4, 4, seed=32)
    a = tnd(c, 0.5)
    kv = torch.cat([c.key, c.value], dim=2)
    wide = torch.zeros(*c.key.shape[:3], 16, dtype=c.key.dtype)
    wide[..., ::2] = c.key
    b = nsa_ops.npu_nsa_select_attention_infer(c.query[:, None], wide[..., ::2], kv[:, :, 2:], c.topk[:, None], 0.5,
                                               4, 2, 4, 4, 8, block_table=c.table, actual_seq_kvlen=c.s)
    assert torch.equal(a, b[:, 0])
    wide3 = torch.zeros(*c.key.shape[:2], 32, dtype=c.key.dtype)
    wide3[..., ::2] = c.key.flatten(2)
    wide_v = torch.zeros(*c.value.shape[:2], 32, dtype=c.value.dtype)
    wide_v[..., 1::2] = c.value.flatten(2)
    d = nsa_ops.npu_nsa_select_attention_infer(c.query, wide3[..., ::2], wide_v[..., 1::2], c.topk, 0.5, 4, 2, 4, 4, 8,
                                               layout="TND", block_table=c.table, actual_seq_qlen=c.q,
                                               actual_seq_kvlen=c.s)
    assert torch.equal(a, d)


def test_drop_in_signature_equals_torch_npu():
    """§4's signature: ten positional-or-keyword arguments, then keyword-only layout='BSND' and four None."""
    import inspect

    params = list(inspect.signature(nsa_ops.npu_nsa_select_attention_infer).parameters.values())
    positional = ["query", "key", "value", "topk_indices", "scale_value", "head_num", "key_value_head_num",
                  "select_block_size", "select_block_count", "page_block_size"]
    assert [p.name for p in params[:10]] == positional
    assert all(p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is inspect.Parameter.empty
               for p in params[:10])
    assert [(p.name, p.default, p.kind) for p in params[10:]] == [
        (n, d, inspect.Parameter.KEYWORD_ONLY) for n, d in [("layout", "BSND"), ("atten_mask", None),
                                                            ("block_table", None), ("actual_seq_qlen", None),
                                                            ("actual_seq_kvlen", None)]]


@pytest.mark.parametrize("layout, q, k, v, topk, expected", [
    ("BSND", (3, 2, 8, 16), (5, 4, 2, 16), (5, 4, 2, 12), (3, 2, 2, 4), (3, 2, 8, 12)),
    ("BSND", (3, 1, 8, 16), (5, 4, 2, 16), (5, 4, 2, 12), (3, 2, 4), (3, 1, 8, 12)),
    ("BSH", (3, 2, 128), (5, 4, 32), (5, 4, 24), (3, 2, 2, 4), (3, 2, 96)),
    ("TND", (7, 8, 16), (5, 4, 32), (5, 4, 24), (7, 2, 4), (7, 8, 12)),
])
def test_meta_kernel_shapes(layout, q, k, v, topk, expected):
    meta = dict(device="meta")
    out = torch.ops.nsa.select_attention_infer(
        torch.empty(q, dtype=torch.bfloat16, **meta), torch.empty(k, dtype=torch.bfloat16, **meta),
        torch.empty(v, dtype=torch.bfloat16, **meta), torch.empty(topk, dtype=torch.int32, **meta), 0.5, 8, 2, 4, 4, 4,
        layout, None, torch.empty(3, 2, dtype=torch.int32, **meta), None, [5, 5, 5])
    assert out.shape == expected and out.dtype == torch.bfloat16 and out.device.type == "meta"


def test_compile_tensor_lengths_no_recompilation():
    """torch.compile(fullgraph=True) with tensor lengths: new lengths are new inputs, not new constants."""
    import torch._dynamo

    c = make_case(torch.bfloat16, [1, 1], [20, 9], 2, 1, 8, 8, 4, seed=42)
    random_topk(c, 4, 2, seed=42, p_empty=0.0)
    c.topk.clamp_(max=1)  # blocks 0 and 1 exist for every length below
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    def call(q, s):
        return nsa_ops.npu_nsa_select_attention_infer(q, c.key.flatten(2), c.value.flatten(2), c.topk, 0.5, 2, 1, 4,
                                                      2, 4, layout="TND", block_table=c.table,
                                                      actual_seq_qlen=torch.tensor([1, 1]), actual_seq_kvlen=s)

    fn = torch.compile(call, backend=backend, fullgraph=True)
    for s in ([20, 9], [17, 5], [19, 9]):
        assert torch.equal(fn(c.query, torch.tensor(s)), call(c.query, torch.tensor(s)))
    assert len(frames) == 1
    torch._dynamo.reset()
