"""nsa_ops.paged_window_attention (docs/spec/decode.md §9): against the independent fp64 model of paged_model.py
(every dtype, B several, G = 1 and G > 1, D != Dv, P = 1 and P not dividing the lengths, shuffled pages, -1 table
padding, MTP q_b > 1, windows shorter and longer than the sequences); a hand-worked window; decode consistency
with nsa_ops.sliding_window_attention's last row (window_attention.md §8); lists, tuples and tensors for the
lengths; the default scale; every argument rule raises naming the argument; no derivative; opcheck.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import nsa_ops
from paged_model import DTYPES, assert_close, make_case, model, ulp

SHAPES = [
    # q, s, N1, N2, D, Dv, P, window
    ([1, 1, 1], [37, 5, 64], 2, 2, 16, 16, 16, 16),
    ([1, 1], [100, 33], 8, 2, 24, 16, 32, 40),
    ([1, 1], [9, 4], 2, 1, 8, 5, 1, 6),
    ([3, 1, 2], [70, 3, 45], 4, 2, 16, 8, 24, 20),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=["G1", "G4-D!=Dv", "P1", "MTP"])
def test_against_fp64_model(dtype, shape):
    q, s, N1, N2, D, Dv, P, window = shape
    c = make_case(dtype, q, s, N1, N2, D, Dv, P, seed=len(s) * 5 + D)
    out, tol, zero = model(c, 0.41, select=False, window=window)
    got = nsa_ops.paged_window_attention(c.query, c.key, c.value, c.table, c.s, window, scale=0.41, query_lens=c.q)
    assert got.shape == (sum(q), N1, Dv) and got.dtype == dtype
    assert_close(got, out, tol, zero)
    ref = torch.ops.nsa.paged_window_attention_reference(c.query, c.key, c.value, c.table, c.s, window, 0.41, c.q)
    assert_close(ref, out, tol, zero)


def test_hand_window():
    """S = 6 in pages of 4 (shuffled), zero queries and keys (P = 1/n), v[p] = 2p: window 4 at the last token sees
    {2..5} (mean 7); with q_b = 2 token 0 (position 4) sees {1..4} (mean 5); window 100 sees {0..5} (mean 5)."""
    c = make_case(torch.bfloat16, [2], [6], 1, 1, 1, 1, 4, seed=1)
    key = torch.zeros_like(c.key)
    value = torch.full_like(c.value, float("nan"))
    for p in range(6):
        value[c.page_row(0, p)] = 2.0 * p
    q = torch.zeros(2, 1, 1, dtype=torch.bfloat16)
    out = nsa_ops.paged_window_attention(q[:1], key, value, c.table, [6], 4)
    assert out.item() == 7.0
    out = nsa_ops.paged_window_attention(q, key, value, c.table, [6], 4, query_lens=[2])
    assert out.flatten().tolist() == [5.0, 7.0]
    assert nsa_ops.paged_window_attention(q[:1], key, value, c.table, [6], 100).item() == 5.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_decode_consistency_with_sliding_window(dtype):
    """window_attention.md §8 via decode.md §9: the paged decode of the last token of each sequence equals
    sliding_window_attention's last row of that sequence within the tolerance."""
    s, N1, N2, D, P, window = [29, 40], 4, 2, 16, 8, 12
    c = make_case(dtype, [1, 1], s, N1, N2, D, D, P, seed=21)
    keys = torch.cat([torch.stack([c.key[c.page_row(b, p)] for p in range(s[b])]) for b in range(2)])
    vals = torch.cat([torch.stack([c.value[c.page_row(b, p)] for p in range(s[b])]) for b in range(2)])
    query = torch.zeros(sum(s), N1, D, dtype=dtype)
    query[s[0] - 1] = c.query[0]
    query[-1] = c.query[1]
    train = nsa_ops.sliding_window_attention(query, keys, vals, [0, s[0], sum(s)], window, scale=0.3).attention_out
    train = torch.stack([train[s[0] - 1], train[-1]])
    dec = nsa_ops.paged_window_attention(c.query, c.key, c.value, c.table, s, window, scale=0.3)
    x = {}
    model(c, 0.3, select=False, window=window, extra=x)
    a, b = dec.double().numpy(), train.double().numpy()
    bound = 2 * x["budget"] + ulp(a, dtype) + ulp(b, dtype)
    assert np.all(np.abs(a - b) <= bound), (np.abs(a - b) / bound).max()


def test_lengths_as_lists_tuples_tensors_and_defaults():
    c = make_case(torch.bfloat16, [1, 1, 1], [17, 3, 40], 4, 2, 8, 8, 8, seed=3)
    a = nsa_ops.paged_window_attention(c.query, c.key, c.value, c.table, c.s, 5, scale=1 / math.sqrt(8))
    for seq_lens, query_lens in [(tuple(c.s), None), (torch.tensor(c.s), None), (torch.tensor(c.s, dtype=torch.int32),
                                                                                   torch.tensor([1, 1, 1])),
                                 (c.s, torch.tensor([1, 1, 1])), (np.array(c.s), [1, 1, 1])]:
        b = nsa_ops.paged_window_attention(c.query, c.key, c.value, c.table, seq_lens, 5, query_lens=query_lens)
        assert torch.equal(a, b)  # the default scale is 1/sqrt(D)


def _args():
    c = make_case(torch.float32, [1, 2], [30, 3], 2, 2, 4, 4, 16, seed=12, spare=1)
    c.table = torch.tensor([[3, 1], [2, -1]], dtype=torch.int32)
    key, value = torch.randn(4, 16, 2, 4), torch.randn(4, 16, 2, 4)
    return dict(query=c.query, key_cache=key, value_cache=value, block_table=c.table, seq_lens=[30, 3], window=20,
                query_lens=[1, 2])


def _call(**kw):
    a = _args()
    a.update(kw)
    pos = [a.pop(n) for n in ("query", "key_cache", "value_cache", "block_table", "seq_lens", "window")]
    return nsa_ops.paged_window_attention(*pos, **a)


@pytest.mark.parametrize("kw, error, message", [
    (dict(window=0), ValueError, "window must be >= 1"),
    (dict(window=2.5), ValueError, "window must be an int"),
    (dict(seq_lens=None), ValueError, "seq_lens must be given"),
    (dict(seq_lens=[30.0, 3]), ValueError, r"seq_lens\[0\] must be an int"),
    (dict(seq_lens=torch.tensor([[30, 3]])), ValueError, "seq_lens must be a 1-D int32/int64 tensor"),
    (dict(scale=float("inf")), ValueError, "scale must be finite"),
    (dict(query=torch.zeros(3, 2)), ValueError, "query must be a 3-D tensor"),
    (dict(key_cache=torch.zeros(4, 16, 8)), ValueError, "key_cache must be a 4-D tensor"),
    (dict(block_table=[[3, 1], [2, -1]]), TypeError, "block_table must be a torch.Tensor"),
    (dict(block_table=torch.tensor([[3, 1], [2, -1]])), RuntimeError, "block_table must be an int32"),
    (dict(block_table=torch.tensor([[3, 7], [2, -1]], dtype=torch.int32)), RuntimeError,
     r"block_table\[0\]\[1\] = 7 is not a valid page"),
    (dict(block_table=torch.tensor([[3, 1], [-1, 2]], dtype=torch.int32)), RuntimeError,
     r"block_table\[1\]\[0\] = -1 is not a valid page"),
    (dict(block_table=torch.tensor([[3], [2]], dtype=torch.int32)), RuntimeError,
     "block_table must have a page for every position"),
    (dict(seq_lens=[30, 1]), RuntimeError, r"seq_lens\[1\] = 1 must be >= q_b = 2"),
    (dict(seq_lens=[30, 3, 3]), RuntimeError, "block_table must have one row per batch"),
    (dict(query_lens=[1, 1]), RuntimeError, r"query must have sum\(query_lens\) = 2 rows"),
    (dict(query_lens=[0, 3]), RuntimeError, r"query_lens\[0\] must be >= 1"),
    (dict(query_lens=[1, 2, 0]), RuntimeError, "query_lens must have one entry per batch"),
    (dict(value_cache=torch.zeros(4, 16, 2, 4, dtype=torch.float64)), RuntimeError, "value_cache must have the dtype"),
    (dict(key_cache=torch.zeros(4, 8, 2, 4)), RuntimeError, "value_cache must have the pages"),
    (dict(key_cache=torch.zeros(4, 16, 3, 4), value_cache=torch.zeros(4, 16, 3, 4)), RuntimeError,
     "must be a multiple of the number of key/value heads"),
])
def test_argument_rules(kw, error, message):
    with pytest.raises(error, match=message):
        _call(**kw)


def test_no_derivative():
    a = _args()
    q = a["query"].clone().requires_grad_()
    out = _call(query=q)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="has no derivative"):
        out.sum().backward()


@pytest.mark.parametrize("tensor_lengths", [False, True])
def test_opcheck(tensor_lengths):
    a = _args()
    s, q = a["seq_lens"], a["query_lens"]
    if tensor_lengths:
        s, q = torch.tensor(s), torch.tensor(q)
    op = torch.ops.nsa.paged_window_attention.tensor_lengths if tensor_lengths else torch.ops.nsa.paged_window_attention.default
    torch.library.opcheck(op, (a["query"], a["key_cache"], a["value_cache"], a["block_table"], s, 20, 0.5, q))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_strided_caches_and_query(dtype):
    """Caches that are views (K and V halves of one buffer, a last-dim step of 2) and a strided query read in
    place: bitwise the result of contiguous copies."""
    c = make_case(dtype, [1, 2], [33, 12], 4, 2, 8, 8, 8, seed=31)
    a = nsa_ops.paged_window_attention(c.query, c.key, c.value, c.table, c.s, 9, query_lens=c.q)
    kv = torch.cat([c.key, c.value], dim=2)  # [num_pages, P, 2 N2, D]: keys heads 0..N2-1, values N2..2N2-1
    wide = torch.zeros(*c.key.shape[:3], 16, dtype=c.key.dtype)
    wide[..., ::2] = c.key
    q_wide = torch.zeros(c.query.shape[0], c.query.shape[1], 16, dtype=c.query.dtype)
    q_wide[..., 1::2] = c.query
    b = nsa_ops.paged_window_attention(q_wide[..., 1::2], wide[..., ::2], kv[:, :, 2:], c.table, c.s, 9,
                                       query_lens=c.q)
    assert torch.equal(a, b)
    wide_v = torch.zeros(*c.value.shape[:3], 16, dtype=c.value.dtype)
    wide_v[..., 1::2] = c.value
    assert torch.equal(a, nsa_ops.paged_window_attention(c.query, c.key, wide_v[..., 1::2], c.table, c.s, 9,
                                                         query_lens=c.q))


def test_compile_tensor_lengths_no_recompilation():
    """torch.compile(fullgraph=True) with tensor lengths: new lengths are new inputs, not new constants."""
    import torch._dynamo

    c = make_case(torch.bfloat16, [1, 1], [20, 9], 2, 1, 8, 8, 4, seed=41)
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    fn = torch.compile(lambda q, s: nsa_ops.paged_window_attention(q, c.key, c.value, c.table, s, 6),
                       backend=backend, fullgraph=True)
    for s in ([20, 9], [17, 2], [19, 9]):
        eager = nsa_ops.paged_window_attention(c.query, c.key, c.value, c.table, s, 6)
        assert torch.equal(fn(c.query, torch.tensor(s)), eager)
    assert len(frames) == 1
    torch._dynamo.reset()


def test_signature_and_meta_kernel():
    import inspect

    params = list(inspect.signature(nsa_ops.paged_window_attention).parameters.values())
    assert [p.name for p in params] == ["query", "key_cache", "value_cache", "block_table", "seq_lens", "window",
                                        "scale", "query_lens"]
    assert [p.kind for p in params[6:]] == [inspect.Parameter.KEYWORD_ONLY] * 2
    assert params[6].default is None and params[7].default is None
    meta = dict(device="meta", dtype=torch.float16)
    out = torch.ops.nsa.paged_window_attention(torch.empty(5, 8, 16, **meta), torch.empty(3, 4, 2, 16, **meta),
                                               torch.empty(3, 4, 2, 12, **meta),
                                               torch.empty(2, 2, dtype=torch.int32, device="meta"), [4, 6], 3, 0.5,
                                               [2, 3])
    assert out.shape == (5, 8, 12) and out.dtype == torch.float16 and out.device.type == "meta"
