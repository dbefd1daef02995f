"""The Python API on the paths training code takes (issue 14): torch.compile with varying batches, torch.export,
torch.jit.trace, the statistics and the scale under autograd, scale kinds, autocast, torch.func and vmap, the
guidance of the errors (inverted masks, raw keys/values, swapped helper arguments, short sequences), the runnable
examples of docs/API.md, the select-map picture and the end-to-end example.

The last part applies the same rules (compile with tensor lengths, scale kinds, autocast) to the family's other
Pythonic entry points: nsa_ops.compress, nsa_ops.sliding_window_attention, select_attention and NSAAttention.
"""

from __future__ import annotations

import math
import re
import runpy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

import nsa_ops
from cases import base_args

REPO = Path(__file__).resolve().parents[2]

# One geometry for the compile tests: T = 256 query rows = T2 key rows, l = 32, d = 16, l' = 32 (M = 2), K = 1.
# Every composition has a sequence of 128 tokens and none longer, so maxSq = 128, maxC = 7, maxSel = 4: the
# masks keep their shapes and only the lengths change.
L, D_STRIDE, LP, K = 32, 16, 32, 1
T = 256
COMPOSITIONS_VARYING_B = (
    [[128, 128], [32, 32, 32, 32, 128], [48, 128, 80]]
    + [[128, a, 128 - a] for a in range(32, 97, 8)]                        # 9
    + [[a, 128, 128 - a] for a in (40, 56, 72, 88)]
    + [[128, 32, 32, 64], [64, 128, 32, 32], [32, 64, 32, 128], [32, 32, 64, 128]])
COMPOSITIONS_FIXED_B = [[128, a, 128 - a] for a in range(32, 97, 4)] + [[a, 128, 128 - a] for a in (40, 56, 72)]


def _cu(lengths):
    cmp = nsa_ops.compressed_lengths(lengths, L, D_STRIDE)
    return nsa_ops.prefix_sums(lengths, leading_zero=True), nsa_ops.prefix_sums(cmp, leading_zero=True)


def _qkv(dtype=torch.float32, T_=T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T_, 4, 32, generator=g).to(dtype), torch.randn(T_, 2, 32, generator=g).to(dtype),
            torch.randn(T_, 2, 32, generator=g).to(dtype))


ATTEN = nsa_ops.make_atten_mask(128, 7, L, D_STRIDE)
TOPK = nsa_ops.make_topk_mask(128, 4, LP)


def _step(q, k, v, cu, cc, scale=None):
    out = nsa_ops.compress_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_cmp=cc, compress_block_size=L,
                                     compress_stride=D_STRIDE, select_block_size=LP, select_block_count=K,
                                     scale=scale, atten_mask=ATTEN, topk_mask=TOPK)
    return out.attention_out.square().sum() + out.topk_indices.sum() + out.softmax_sum.sum()


def test_compositions_are_twenty_distinct_with_fixed_mask_shapes():
    for comps in (COMPOSITIONS_VARYING_B, COMPOSITIONS_FIXED_B):
        assert len(comps) == 20 and len({tuple(c) for c in comps}) == 20
        for c in comps:
            assert sum(c) == T and max(c) == 128 and min(c) >= L
    assert len({len(c) for c in COMPOSITIONS_VARYING_B}) == 4


# ------------------------------------------------------------------------------------------------ item 1: compile
@pytest.mark.parametrize("dynamic", [None, True, False])
def test_compile_fullgraph_tensor_cu_seqlens_twenty_compositions_at_most_two_compilations(dynamic):
    """Tensor cu_seqlens: 20 batch compositions under fullgraph=True compile at most twice (dynamic=None/True: the
    batch count changes too; dynamic=False, whose shapes are static by definition: a fixed batch count, one
    compilation), and each result equals eager bitwise."""
    torch._dynamo.reset()
    cnt = CompileCounter()
    compiled = torch.compile(_step, backend=cnt, fullgraph=True, dynamic=dynamic)
    q, k, v = _qkv()
    comps = COMPOSITIONS_FIXED_B if dynamic is False else COMPOSITIONS_VARYING_B
    for lengths in comps:
        cu, cc = (torch.tensor(x) for x in _cu(lengths))
        assert torch.equal(compiled(q, k, v, cu, cc), _step(q, k, v, cu, cc)), lengths
    assert cnt.frame_count <= (1 if dynamic is False else 2), cnt.frame_count


def test_compile_fullgraph_list_cu_seqlens_dynamic_true_does_not_recompile_per_composition():
    """Lists become tensors inside the graph: with dynamic=True their ints are symbolic, so 20 compositions of the
    same batch count compile once (docs/API.md: with dynamic=None each element recompiles once first)."""
    torch._dynamo.reset()
    cnt = CompileCounter()
    compiled = torch.compile(_step, backend=cnt, fullgraph=True, dynamic=True)
    q, k, v = _qkv()
    for lengths in COMPOSITIONS_FIXED_B:
        cu, cc = _cu(lengths)
        assert torch.equal(compiled(q, k, v, cu, cc), _step(q, k, v, cu, cc)), lengths
    assert cnt.frame_count == 1


def test_compile_drop_in_with_list_lengths_traces_them_as_tensors():
    torch._dynamo.reset()
    cnt = CompileCounter()
    q, k, v = _qkv()

    def f(q, k, v, sq, sc):
        return nsa_ops.npu_nsa_compress_attention(q, k, v, 0.25, 4, L, D_STRIDE, LP, K, TOPK, ATTEN, sq, sc)[0]

    compiled = torch.compile(f, backend=cnt, fullgraph=True, dynamic=True)
    for lengths in COMPOSITIONS_FIXED_B[:8]:
        cu, cc = _cu(lengths)
        assert torch.equal(compiled(q, k, v, cu[1:], cc[1:]), f(q, k, v, cu[1:], cc[1:]))
    assert cnt.frame_count == 1


def test_compile_dynamic_true_default_scale_no_graph_break_for_new_sizes():
    """dynamic=True with scale=None: the default 1/sqrt(D) specialises D (a guard), not a graph break; new T and
    compositions reuse the graph."""
    torch._dynamo.reset()
    cnt = CompileCounter()
    compiled = torch.compile(_step, backend=cnt, fullgraph=True, dynamic=True)
    for lengths in ([128, 64, 64], [128, 128, 64], [128, 128, 128]):
        T_ = sum(lengths)
        q, k, v = _qkv(T_=T_, seed=T_)
        cu, cc = (torch.tensor(x) for x in _cu(lengths))
        assert torch.equal(compiled(q, k, v, cu, cc), _step(q, k, v, cu, cc))
    assert cnt.frame_count == 1


def test_compile_forward_backward_and_autocast_aot():
    """AOTAutograd (forward + backward graphs) with tensor lengths: gradients equal eager bitwise for three
    compositions, one compilation; the same graph under CPU autocast runs in bf16."""
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_step, backend=cnt, fullgraph=True)
    q, k, v = _qkv()
    for lengths in ([128, 64, 64], [64, 128, 64], [96, 32, 128]):
        cu, cc = (torch.tensor(x) for x in _cu(lengths))
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        ys = [x.clone().requires_grad_() for x in (q, k, v)]
        compiled(*xs, cu, cc).backward()
        _step(*ys, cu, cc).backward()
        for a, b in zip(xs, ys):
            assert torch.equal(a.grad, b.grad)
    assert cnt.frame_count == 1
    cu, cc = (torch.tensor(x) for x in _cu([128, 128]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = compiled(q, k, v, cu, cc)
        ref = _step(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu, cc)
    assert torch.equal(got, ref)


def test_torch_export_with_dynamic_dims():
    class Attn(torch.nn.Module):
        def forward(self, q, k, v, cu, cc):
            return nsa_ops.compress_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_cmp=cc, compress_block_size=L,
                                              compress_stride=D_STRIDE, select_block_size=LP,
                                              select_block_count=K).attention_out

    Dim = torch.export.Dim
    q, k, v = _qkv()
    cu, cc = (torch.tensor(x) for x in _cu([128, 64, 64]))
    B1 = Dim("B1", min=3, max=128)
    ep = torch.export.export(Attn(), (q, k, v, cu, cc), dynamic_shapes={
        "q": {0: Dim("T", min=2, max=1 << 20)}, "k": {0: Dim("T2", min=2, max=1 << 20)},
        "v": {0: Dim("T2", min=2, max=1 << 20)}, "cu": {0: B1}, "cc": {0: B1}})
    for T_, lengths in ((256, [32, 200, 24 + 0]), (200, [100, 100]), (300, [64, 64, 100, 72])):
        lengths = [x if x >= L else L for x in lengths]
        T_ = sum(lengths)
        q2, k2, v2 = _qkv(T_=T_, seed=T_)
        cu2, cc2 = (torch.tensor(x) for x in _cu(lengths))
        assert torch.equal(ep.module()(q2, k2, v2, cu2, cc2), Attn()(q2, k2, v2, cu2, cc2))


def test_jit_trace_generalises_over_tensor_lengths_and_checks_them_when_run():
    """torch.jit.trace records the length check and the operator, not the values: a new split of the same T gives
    the eager result (the issue's trace baked the lengths and returned a wrong result), and bad values raise."""
    q, k, v = _qkv()

    def f(q, k, v, cu, cc):
        return nsa_ops.compress_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_cmp=cc, compress_block_size=L,
                                          compress_stride=D_STRIDE, select_block_size=LP,
                                          select_block_count=K).attention_out

    cu, cc = (torch.tensor(x) for x in _cu([128, 128]))
    traced = torch.jit.trace(f, (q, k, v, cu, cc))
    for lengths in ([64, 192], [200, 56], [32, 32, 192 - 0]):
        if sum(lengths) != T:
            continue
        cu2, cc2 = (torch.tensor(x) for x in _cu(lengths))
        if cu2.shape != cu.shape:
            continue
        assert torch.equal(traced(q, k, v, cu2, cc2), f(q, k, v, cu2, cc2))
    with pytest.raises(Exception, match=r"cu_seqlens_q must start with 0"):
        traced(q, k, v, torch.tensor([1, 128, 256]), cc)


# ------------------------------------------------------------------------------------------------ item 2: autograd
def _small(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(40, 4, 16, generator=g).to(dtype)
    k = torch.randn(6, 2, 16, generator=g).to(dtype)
    v = torch.randn(6, 2, 16, generator=g).to(dtype)
    kw = dict(cu_seqlens_q=[0, 24, 40], cu_seqlens_cmp=[0, 4, 6], compress_block_size=16, compress_stride=16,
              select_block_size=16, select_block_count=2,
              atten_mask=nsa_ops.make_atten_mask(24, 4, 16, 16) & (torch.arange(24) > 5).unsqueeze(1))
    return q, k, v, kw


def _drop_in(q, k, v, scale, kw):
    return nsa_ops.npu_nsa_compress_attention(
        q, k, v, scale, q.shape[1], kw["compress_block_size"], kw["compress_stride"], kw["select_block_size"],
        kw["select_block_count"], None, kw["atten_mask"], kw["cu_seqlens_q"][1:], kw["cu_seqlens_cmp"][1:])


def test_statistics_come_back_non_differentiable():
    q, k, v, kw = _small(torch.float32)
    q.requires_grad_()
    for out in (nsa_ops.compress_attention(q, k, v, **kw), _drop_in(q, k, v, 0.25, kw),
                torch.ops.nsa.compress_attention(q, k, v, 0.25, 4, 16, 16, 16, 2, None, kw["atten_mask"], [24, 40],
                                                 [4, 6])):
        assert out[0].requires_grad
        assert [t.requires_grad for t in out[1:]] == [False, False, False]


@pytest.mark.parametrize("api", ["pythonic", "drop_in"])
def test_scale_that_requires_grad_gets_its_gradient_gradcheck(api):
    """dL/dscale = Σ q·dQ / scale (§7). gradcheck in fp64 with scale and eps powers of two (the operator uses the
    scale as float32, so scale ± eps must be float32 numbers for the finite differences to see them); the
    tolerances of test_autograd_compile's gradcheck (the backward recomputes P from the float32 statistics)."""
    q, k, v, kw = _small()
    scale = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)

    def f(q, s):
        if api == "pythonic":
            return nsa_ops.compress_attention(q, k, v, scale=s, **kw).attention_out
        return _drop_in(q, k, v, s, kw)[0]

    # the scale only (the query's gradient is test_autograd_compile's), in fast mode (random projections of the
    # Jacobian, one backward instead of one per output element)
    assert torch.autograd.gradcheck(f, (q, scale), eps=2.0 ** -20, atol=1e-6, rtol=1e-5,
                                    fast_mode=True)


def test_learnable_scale_parameter_is_trained_and_zero_scale_is_refused():
    q, k, v, kw = _small(torch.float32)
    p = torch.nn.Parameter(torch.tensor(0.3))
    nsa_ops.compress_attention(q, k, v, scale=p, **kw).attention_out.square().sum().backward()
    assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.item() != 0.0
    # the same value as a float: the forward is identical
    a = nsa_ops.compress_attention(q, k, v, scale=p, **kw).attention_out
    assert torch.equal(a, nsa_ops.compress_attention(q, k, v, scale=0.3, **kw).attention_out)
    z = torch.nn.Parameter(torch.tensor(0.0))
    out = nsa_ops.compress_attention(q, k, v, scale=z, **kw).attention_out
    with pytest.raises(RuntimeError, match=r"scale = 0"):
        out.sum().backward()


SCALES = [0.25, 1, np.float32(0.25), np.float64(0.25), np.float16(0.25), np.int64(1), np.array(0.25),
          torch.tensor(0.25), torch.tensor(0.25, dtype=torch.float64), torch.tensor(1)]


@pytest.mark.parametrize("scale", SCALES, ids=lambda s: f"{type(s).__name__}-{getattr(s, 'dtype', '')}")
def test_numeric_scales_of_every_kind_are_accepted_alike(scale):
    q, k, v, kw = _small(torch.bfloat16)
    ref = nsa_ops.compress_attention(q, k, v, scale=float(scale), **kw)
    got = nsa_ops.compress_attention(q, k, v, scale=scale, **kw)
    drop = _drop_in(q, k, v, scale, kw)
    for a, b, c in zip(ref, got, drop):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("scale,pattern", [
    ("0.1", r"scale must be a float"), (True, r"scale must be a float"), (np.bool_(True), r"scale must be a float"),
    (torch.tensor([0.25]), r"scale must be a float \(or a 0-d tensor\)"), (1 + 2j, r"scale must be a float"),
    (torch.tensor(True), r"scale must be a float"), (math.inf, r"scale must be finite"),
    (np.float64(1e39), r"scale must be finite"), (torch.tensor(math.nan), r"scale must be finite"),
])
def test_bad_scales_name_the_argument(scale, pattern):
    q, k, v, kw = _small(torch.bfloat16)
    with pytest.raises(ValueError, match=pattern):
        nsa_ops.compress_attention(q, k, v, scale=scale, **kw)
    if not isinstance(scale, (float, np.floating)) and not (isinstance(scale, torch.Tensor) and scale.dim() == 0
                                                            and scale.dtype.is_floating_point):
        with pytest.raises(ValueError, match=pattern.replace("scale", "scale_value")):
            _drop_in(q, k, v, scale, kw)


# ------------------------------------------------------------------------------------------------ item 3: autocast, functorch
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_casts_inputs_as_torch_attention_does(dtype):
    """Under CPU autocast fp32 query/key/value run in the autocast dtype, as scaled_dot_product_attention does;
    the result equals the call on inputs cast by hand; gradients reach the fp32 leaves; fp64 is not cast."""
    q, k, v, kw = _small(torch.float32)
    with torch.autocast("cpu", dtype=dtype):
        sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.repeat_interleave(2, 1)
                                                                .transpose(0, 1), v.repeat_interleave(2, 1)
                                                                .transpose(0, 1))
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        got = nsa_ops.compress_attention(*leaves, **kw)
        drop = _drop_in(*leaves, 0.25, kw)
        op = torch.ops.nsa.compress_attention(q, k, v, 0.25, 4, 16, 16, 16, 2, None, kw["atten_mask"], [24, 40],
                                              [4, 6])
        f64 = nsa_ops.compress_attention(q.double(), k.double(), v.double(), **kw)
    assert sdpa.dtype == dtype
    assert got.attention_out.dtype == dtype and drop[0].dtype == dtype and op[0].dtype == dtype
    assert f64.attention_out.dtype == torch.float64
    ref = nsa_ops.compress_attention(q.to(dtype), k.to(dtype), v.to(dtype), **kw)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    assert torch.equal(drop[0], _drop_in(q.to(dtype), k.to(dtype), v.to(dtype), 0.25, kw)[0])
    got.attention_out.float().sum().backward()
    assert all(x.grad is not None and x.grad.dtype == torch.float32 for x in leaves)


def test_torch_func_grad_equals_autograd():
    q, k, v, kw = _small()

    def loss(q, k, v):
        return nsa_ops.compress_attention(q, k, v, **kw).attention_out.square().sum()

    g = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, v)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    loss(*leaves).backward()
    for a, b in zip(g, leaves):
        assert torch.equal(a, b.grad)
    # the drop-in, and the gradient with respect to a tensor scale
    gs = torch.func.grad(lambda s: _drop_in(q, k, v, s, kw)[0].square().sum())(torch.tensor(0.25,
                                                                                            dtype=torch.float64))
    s = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    _drop_in(q, k, v, s, kw)[0].square().sum().backward()
    assert torch.equal(gs, s.grad)


def test_vmap_packs_the_mapped_copies_into_one_call():
    q, k, v, kw = _small()
    qs = torch.stack([q, 2 * q, -q])
    ks = torch.stack([k, k.flip(0), 0.5 * k])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "performance drop" fallback warning
        out = torch.vmap(lambda q, k: tuple(nsa_ops.compress_attention(q, k, v, **kw)))(qs, ks)
    for i in range(3):
        ref = nsa_ops.compress_attention(qs[i], ks[i], v, **kw)
        for a, b in zip(out, ref):
            assert torch.equal(a[i], b)
    # grad of vmap: per-copy gradients
    g = torch.func.grad(lambda qs: torch.vmap(lambda q: nsa_ops.compress_attention(q, k, v, **kw).attention_out)(qs)
                        .sum())(qs)
    for i in range(3):
        qi = qs[i].clone().requires_grad_()
        nsa_ops.compress_attention(qi, k, v, **kw).attention_out.sum().backward()
        assert torch.equal(g[i], qi.grad)
    masks = torch.stack([kw["atten_mask"]] * 3)
    kw2 = {x: y for x, y in kw.items() if x != "atten_mask"}
    with pytest.raises(ValueError, match=r"vmap of nsa_ops compress_attention maps query, key and value only; "
                                         r"atten_mask"):
        torch.vmap(lambda q, m: nsa_ops.compress_attention(q, k, v, atten_mask=m, **kw2).attention_out)(qs, masks)


# ------------------------------------------------------------------------------------------------ item 4: guidance
def test_docs_say_plainly_that_the_operator_does_not_compress():
    api = (REPO / "docs" / "API.md").read_text()
    assert "**The operator does not compress.**" in api and "nsa_ops.compress" in api
    assert "does not compress" in nsa_ops.compress_attention.__doc__
    for text in (api, nsa_ops.compress_attention.__doc__, nsa_ops.make_atten_mask.__doc__):
        assert re.search(r"True = remove|True removes", text, re.I) and "scaled_dot_product_attention" in text
    assert hasattr(nsa_ops, "compress")  # the compressor the docs point to exists


def test_raw_keys_values_warn():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(64, 2, 16, generator=g), torch.randn(64, 1, 16, generator=g)
    with pytest.warns(UserWarning, match=r"look uncompressed"):
        nsa_ops.compress_attention(q, k, k, cu_seqlens_q=[0, 40, 64], cu_seqlens_cmp=[0, 40, 64],
                                   compress_block_size=16, compress_stride=16, select_block_size=16,
                                   select_block_count=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nsa_ops.compress_attention(q, k, k, cu_seqlens_q=[0, 40, 64], cu_seqlens_cmp=[0, 3, 5],
                                   compress_block_size=16, compress_stride=16, select_block_size=16,
                                   select_block_count=2)


def test_inverted_masks_are_detected_and_correct_ones_pass():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(200, 2, 16, generator=g).bfloat16()
    k = torch.randn(11, 1, 16, generator=g).bfloat16()
    kw = dict(cu_seqlens_q=[0, 200], cu_seqlens_cmp=[0, 11], compress_block_size=32, compress_stride=16,
              select_block_size=64, select_block_count=2)
    am = nsa_ops.make_atten_mask(200, 11, 32, 16)
    tm = nsa_ops.make_topk_mask(200, 3, 64)
    nsa_ops.compress_attention(q, k, k, atten_mask=am, topk_mask=tm, **kw)               # correct
    nsa_ops.compress_attention(q, k, k, atten_mask=torch.zeros_like(am), **kw)          # no masking
    nsa_ops.compress_attention(q, k, k, atten_mask=torch.ones_like(am).to(torch.uint8), **kw)
    with pytest.raises(ValueError, match=r"atten_mask looks inverted.*True = REMOVE.*scaled_dot_product_attention"):
        nsa_ops.compress_attention(q, k, k, atten_mask=~am, **kw)
    with pytest.raises(ValueError, match=r"atten_mask looks inverted"):
        nsa_ops.compress_attention(q, k, k, atten_mask=(~am).to(torch.uint8), **kw)
    with pytest.raises(ValueError, match=r"topk_mask looks inverted.*True = FORCE"):
        nsa_ops.compress_attention(q, k, k, atten_mask=am, topk_mask=~tm, **kw)
    # the drop-in keeps the NPU's behaviour: no such check
    nsa_ops.npu_nsa_compress_attention(q, k, k, 0.25, 2, 32, 16, 64, 2, None, ~am, [200], [11])


@pytest.mark.parametrize("call,pattern", [
    (lambda: nsa_ops.compressed_lengths([1024], 16, 32), r"compress_stride \(d = 32\) must be <= compress_block_size "
                                                         r"\(l = 16\).*Swapped"),
    (lambda: nsa_ops.make_atten_mask(64, 3, 16, 32), r"compress_stride \(d = 32\) must be <= compress_block_size"),
    (lambda: nsa_ops.compressed_lengths([1024], 0, 16), r"compress_block_size must be > 0"),
    (lambda: nsa_ops.compressed_lengths([1024], 32, 0), r"compress_stride must be > 0"),
    (lambda: nsa_ops.compressed_lengths([-1], 32, 16), r"token_lengths\[0\] must be >= 0"),
    (lambda: nsa_ops.selection_lengths([63], 64, 16), r"select_block_size must be a positive multiple of "
                                                      r"compress_stride \(64\), got 16 \(swapped"),
])
def test_helpers_validate_their_arguments(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_helpers_accept_the_documented_keywords():
    assert nsa_ops.compressed_lengths([1024, 31], compress_block_size=32, compress_stride=16) == [63, 0]
    m = nsa_ops.make_atten_mask(64, 3, compress_block_size=32, compress_stride=16)
    assert m.shape == (64, 3) and bool(m[30].all()) and not bool(m[31, 0])
    t = nsa_ops.make_topk_mask(300, 5, 64, num_init=1, num_local=2)
    assert t[300 - 1].nonzero().flatten().tolist() == [0, 3, 4]


def test_drop_in_length_errors_name_the_batch_and_hint_at_a_leading_zero():
    a = base_args()
    a.update(actual_seq_qlen=[0, 20], actual_cmp_seq_kvlen=[0, 12], actual_sel_seq_kvlen=None, atten_mask=None,
             topk_mask=None, select_block_count=1)
    with pytest.raises(RuntimeError, match=r"batch 0 has C_b = 0.*starts with 0.*without\* a leading 0"):
        nsa_ops.npu_nsa_compress_attention(**a)
    a.update(actual_seq_qlen=[8, 20], actual_cmp_seq_kvlen=[5, 5])
    with pytest.raises(RuntimeError, match=r"batch 1 has C_b = 0.*actual_cmp_seq_kvlen\[1\] = 5 equals the previous"):
        nsa_ops.npu_nsa_compress_attention(**a)
    a.update(actual_cmp_seq_kvlen=[5, 6], select_block_count=2)   # Sel = [2, 1] with M = 4
    with pytest.raises(RuntimeError, match=r"must be <= the smallest.*batch 1 has C_b = 1 compressed tokens, i.e. 1 "
                                           r"selection blocks.*sequences of >= 96 tokens"):
        nsa_ops.npu_nsa_compress_attention(**a)
    a.update(actual_cmp_seq_kvlen=torch.tensor([0, 12]), actual_seq_qlen=torch.tensor([0, 20]), select_block_count=1)
    with pytest.raises(RuntimeError, match=r"batch 0 has C_b = 0.*leading 0"):
        nsa_ops.npu_nsa_compress_attention(**a)


def test_tensor_cu_seqlens_errors_name_the_pythonic_argument():
    q, k, v, kw = _small(torch.float32)
    for name, value, pattern in (
            ("cu_seqlens_q", torch.tensor([1, 24, 40]), r"cu_seqlens_q must start with 0"),
            ("cu_seqlens_q", torch.tensor([0, 24, 39]), r"cu_seqlens_q\[-1\] must equal the number of rows 40"),
            ("cu_seqlens_cmp", torch.tensor([0, 4, 4]), r"cu_seqlens_cmp must give every batch at least 1 row; "
                                                        r"batch 1 has 0"),
            ("cu_seqlens_cmp", torch.tensor([0, 4, 7]), r"cu_seqlens_cmp\[-1\] must be <= the number of rows 6"),
            ("cu_seqlens_cmp", torch.tensor([0, 6]), r"cu_seqlens_cmp must have as many entries as cu_seqlens_q"),
            ("cu_seqlens_q", torch.tensor([[0, 40]]), r"cu_seqlens_q must be a 1-D tensor"),
            ("cu_seqlens_q", torch.tensor([0.0, 40.0]), r"cu_seqlens_q must hold integers")):
        with pytest.raises(ValueError, match=pattern):
            nsa_ops.compress_attention(q, k, v, **{**kw, name: value})


# ------------------------------------------------------------------------------------------------ item 5: docs, pictures, example
def test_api_md_python_examples_run():
    """Every ```python block of docs/API.md, in order, in one namespace (small sizes, CPU)."""
    text = (REPO / "docs" / "API.md").read_text()
    blocks = [(m.start(), m.group(1)) for m in re.finditer(r"```python\n(.*?)```", text, re.S)]
    assert len(blocks) >= 4
    ns: dict = {}
    failures = []
    for i, (pos, block) in enumerate(blocks):
        headings = re.findall(r"^#+ .*$", text[:pos], re.M)
        where = f"docs/API.md python block {i} (line {text[:pos].count(chr(10)) + 1}, under {headings[-1]!r})"
        try:
            exec(compile(block, where, "exec"), ns)
        except Exception as e:  # every block is reported, not only the first that fails
            failures.append(f"{where}: {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures)


def test_readme_does_not_claim_a_cuda_pytorch_operator():
    """The torch binding registers CPU and Meta kernels only (torch.ops.nsa.compress_attention has no CUDA
    kernel): the README's first paragraph must not promise CUDA in PyTorch."""
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("nsa::compress_attention", "CUDA")
    intro = (REPO / "README.md").read_text().split("\n## ")[0]
    assert not re.search(r"CPU \(and CUDA\) with a PyTorch binding", intro)


def test_select_map_default_is_meaningful_and_every_colour_has_a_legend_entry(tmp_path):
    from nsa_ops import cli, viz

    args = cli.build_parser().parse_args(["select-map"])
    C = nsa_ops.compressed_lengths([args.tokens], args.compress_block_size, args.compress_stride)[0]
    Sel = nsa_ops.selection_lengths([C], args.compress_stride, args.select_block_size)[0]
    assert args.topk * 2 <= Sel, (args.topk, Sel)              # K well below the number of blocks
    assert set(viz.LABELS) == set(viz.COLORS)
    am = nsa_ops.make_atten_mask(100, 5, 32, 16)
    rows = viz.fully_masked_rows(am, 100, 5)
    assert rows[:31].all() and not rows[31:].any()
    pytest.importorskip("matplotlib")
    topk = torch.arange(2).view(1, 1, 2).expand(100, 1, 2).to(torch.int32)
    path = viz.plot_selection(topk, None, 0, tmp_path / "m.png", num_blocks=4, masked_rows=rows)
    assert path.stat().st_size > 0


def test_end_to_end_example_runs(capsys):
    mod = runpy.run_path(str(REPO / "examples" / "compress_attention_end_to_end.py"))
    assert mod["main"](["--tokens", "992,200"]) == 0
    out = capsys.readouterr().out
    assert "compressed by nsa_ops.compress" in out and "gradient norms" in out and "empty slots" in out
    assert mod["main"](["--tokens", "992,1040", "--explicit-masks"]) == 0


# ------------------------------------------------------------------------------------------------ the family's other entry points
# The same rules on the other Pythonic entry points. A failure here names the rule and the entry point.
_OPS_DIR = Path(nsa_ops.__file__).parent / "ops"


def _window_call(q, k, v, cu, scale=None):
    return nsa_ops.sliding_window_attention(q, k, v, cu, 48, scale=scale).attention_out


@pytest.mark.parametrize("dynamic", [None, True])
def test_family_compress_compile_tensor_cu_seqlens(dynamic):
    torch._dynamo.reset()
    cnt = CompileCounter()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, 2, 32, generator=g)
    w = torch.randn(L, 2, generator=g)

    def f(x, w, cu):
        return nsa_ops.compress(x, w, cu_seqlens=cu, compress_block_size=L, compress_stride=D_STRIDE).output.sum()

    compiled = torch.compile(f, backend=cnt, fullgraph=True, dynamic=dynamic)
    for lengths in COMPOSITIONS_VARYING_B:
        cu = torch.tensor(nsa_ops.prefix_sums(lengths, leading_zero=True))
        assert torch.equal(compiled(x, w, cu), f(x, w, cu)), lengths
    assert cnt.frame_count <= 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_family_compress_autocast(dtype):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(96, 2, 32, generator=g), torch.randn(L, 2, generator=g)
    with torch.autocast("cpu", dtype=dtype):
        out = nsa_ops.compress(x, w, cu_seqlens=[0, 40, 96], compress_block_size=L, compress_stride=D_STRIDE)
    ref = nsa_ops.compress(x.to(dtype), w.to(dtype), cu_seqlens=[0, 40, 96], compress_block_size=L,
                           compress_stride=D_STRIDE)
    assert out.output.dtype == dtype and torch.equal(out.output, ref.output)


@pytest.mark.parametrize("dynamic", [None, True])
def test_family_sliding_window_attention_compile_tensor_cu_seqlens_default_scale(dynamic):
    torch._dynamo.reset()
    cnt = CompileCounter()
    q, k, v = _qkv()

    def f(q, k, v, cu):
        return _window_call(q, k, v, cu).sum()

    compiled = torch.compile(f, backend=cnt, fullgraph=True, dynamic=dynamic)
    for lengths in COMPOSITIONS_VARYING_B:
        cu = torch.tensor(nsa_ops.prefix_sums(lengths, leading_zero=True))
        assert torch.equal(compiled(q, k, v, cu), f(q, k, v, cu)), lengths
    assert cnt.frame_count <= 2


@pytest.mark.parametrize("scale", SCALES, ids=lambda s: f"{type(s).__name__}-{getattr(s, 'dtype', '')}")
def test_family_sliding_window_attention_scale_kinds(scale):
    q, k, v = _qkv(torch.bfloat16, T_=96)
    cu = [0, 40, 96]
    assert torch.equal(_window_call(q, k, v, cu, scale), _window_call(q, k, v, cu, float(scale)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_family_sliding_window_attention_autocast(dtype):
    q, k, v = _qkv(torch.float32, T_=96)
    with torch.autocast("cpu", dtype=dtype):
        out = _window_call(q, k, v, [0, 40, 96])
    assert out.dtype == dtype and torch.equal(out, _window_call(q.to(dtype), k.to(dtype), v.to(dtype), [0, 40, 96]))


def _need_select_attention():
    if not (_OPS_DIR / "select_attention.py").is_file():
        pytest.skip("python/nsa_ops/ops/select_attention.py does not exist yet")


def _select_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(T, n, 32, generator=g).to(dtype) for n in (4, 2, 2))
    topk = torch.zeros(T, 2, 2, dtype=torch.int32)
    topk[:, :, 1] = -1
    return q, k, v, topk


def _select_call(q, k, v, topk, cu, scale=None):
    from nsa_ops.ops.select_attention import select_attention

    return select_attention(q, k, v, topk, cu_seqlens_q=cu, cu_seqlens_kv=cu, select_block_size=LP, scale=scale,
                            causal=True).attention_out


@pytest.mark.parametrize("dynamic", [None, True])
def test_family_select_attention_compile_tensor_cu_seqlens(dynamic):
    _need_select_attention()
    torch._dynamo.reset()
    cnt = CompileCounter()
    q, k, v, topk = _select_inputs()

    def f(q, k, v, topk, cu):
        return _select_call(q, k, v, topk, cu).sum()

    compiled = torch.compile(f, backend=cnt, fullgraph=True, dynamic=dynamic)
    for lengths in COMPOSITIONS_VARYING_B:
        cu = torch.tensor(nsa_ops.prefix_sums(lengths, leading_zero=True))
        assert torch.equal(compiled(q, k, v, topk, cu), f(q, k, v, topk, cu)), lengths
    assert cnt.frame_count <= 2


@pytest.mark.parametrize("scale", SCALES, ids=lambda s: f"{type(s).__name__}-{getattr(s, 'dtype', '')}")
def test_family_select_attention_scale_kinds(scale):
    _need_select_attention()
    q, k, v, topk = _select_inputs(torch.bfloat16)
    cu = [0, 128, T]
    assert torch.equal(_select_call(q, k, v, topk, cu, scale), _select_call(q, k, v, topk, cu, float(scale)))


def test_family_select_attention_autocast():
    _need_select_attention()
    q, k, v, topk = _select_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _select_call(q, k, v, topk, [0, 128, T])
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, _select_call(q.bfloat16(), k.bfloat16(), v.bfloat16(), topk, [0, 128, T]))


def _layer():
    _need_select_attention()
    torch.manual_seed(3)
    return nsa_ops.NSAAttention(64, 4, 2, 32, 32, L, D_STRIDE, LP, 2, 64)


@pytest.mark.parametrize("dynamic", [None, True])
def test_family_nsa_attention_compile_tensor_cu_seqlens(dynamic):
    layer = _layer()
    torch._dynamo.reset()
    cnt = CompileCounter()
    x = torch.randn(T, 64, generator=torch.Generator().manual_seed(4))
    compiled = torch.compile(layer, backend=cnt, fullgraph=True, dynamic=dynamic)
    for lengths in COMPOSITIONS_VARYING_B:
        cu = torch.tensor(nsa_ops.prefix_sums(lengths, leading_zero=True))
        assert torch.equal(compiled(x, cu), layer(x, cu)), lengths
    assert cnt.frame_count <= 2


def test_family_nsa_attention_autocast():
    layer = _layer()
    x = torch.randn(T, 64, generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, [0, 128, T])
    assert out.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ §10 extensions
def _causal_inputs(lengths, dtype=torch.bfloat16, seed=0, l=32, d=16):
    g = torch.Generator().manual_seed(seed)
    cmp = nsa_ops.compressed_lengths(lengths, l, d)
    cu, cc = nsa_ops.prefix_sums(lengths, leading_zero=True), nsa_ops.prefix_sums(cmp, leading_zero=True)
    q = torch.randn(cu[-1], 4, 32, generator=g).to(dtype)
    k = torch.randn(cc[-1] + 3, 2, 32, generator=g).to(dtype)
    v = torch.randn(cc[-1] + 3, 2, 24, generator=g).to(dtype)
    return q, k, v, cu, cc, cmp


def _ext_kw(cu, cc, K=4):
    return dict(cu_seqlens_q=cu, cu_seqlens_cmp=cc, compress_block_size=32, compress_stride=16, select_block_size=64,
                select_block_count=K)


@pytest.mark.parametrize("tensor_lengths", [False, True])
def test_causal_true_equals_the_helper_masks_bitwise_forward_and_backward(tensor_lengths):
    lengths = [300, 33, 150, 70]                      # C = [17, 1, 8, 3], Sel = [5, 1, 2, 1]: K = 4 > Sel_b
    q, k, v, cu, cc, cmp = _causal_inputs(lengths)
    ms, mc = max(lengths), max(cmp)
    am = nsa_ops.make_atten_mask(ms, mc, 32, 16)
    tm = nsa_ops.make_topk_mask(ms, nsa_ops.selection_lengths([mc], 16, 64)[0], 64)
    cu_c, cc_c = (torch.tensor(cu), torch.tensor(cc)) if tensor_lengths else (cu, cc)
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    ys = [x.clone().requires_grad_() for x in (q, k, v)]
    a = nsa_ops.compress_attention(*xs, causal=True, **_ext_kw(cu_c, cc_c))
    b = nsa_ops.compress_attention(*ys, atten_mask=am, topk_mask=tm, **_ext_kw(cu_c, cc_c))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    dout = torch.randn(a.attention_out.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    a.attention_out.backward(dout)
    b.attention_out.backward(dout)
    for x, y in zip(xs, ys):
        assert torch.equal(x.grad, y.grad)
    with pytest.raises(ValueError, match=r"causal=True applies the masks .* pass atten_mask=None"):
        nsa_ops.compress_attention(q, k, v, causal=True, atten_mask=am, **_ext_kw(cu, cc))


def test_short_sequences_pad_missing_slots_with_minus_one_and_the_drop_in_keeps_the_rule():
    lengths = [300, 150, 70, 40]                      # C = [17, 8, 3, 1], Sel = [5, 2, 1, 1] with K = 4
    q, k, v, cu, cc, cmp = _causal_inputs(lengths)
    out = nsa_ops.compress_attention(q, k, v, causal=True, **_ext_kw(cu, cc))
    sel = nsa_ops.selection_lengths(cmp, 16, 64)
    for b, (lo, hi) in enumerate(zip(cu[:-1], cu[1:])):
        rows = out.topk_indices[lo:hi]
        kb = min(4, sel[b])
        assert (rows[..., kb:] == -1).all() and (rows[..., :kb] >= 0).all() and (rows[..., :kb] < sel[b]).all()
        # the batch alone with K = Sel_b gives the first slots
        alone = nsa_ops.compress_attention(q[lo:hi], k[cc[b]:cc[b + 1]], v[cc[b]:cc[b + 1]], causal=True,
                                           **_ext_kw([0, hi - lo], [0, cmp[b]], K=kb))
        assert torch.equal(rows[..., :kb], alone.topk_indices)
        assert torch.equal(out.attention_out[lo:hi], alone.attention_out)
    with pytest.raises(RuntimeError, match=r"select_block_count \(4\) must be <= .*batch 1 has C_b = 8 compressed "
                                           r"tokens, i.e. 2 selection blocks \(3 batches below K = 4\)"):
        nsa_ops.npu_nsa_compress_attention(q, k, v, 0.25, 4, 32, 16, 64, 4, None, None, cu[1:], cc[1:])


def test_masks_larger_than_needed_use_their_top_left_part():
    lengths = [150, 70]
    q, k, v, cu, cc, cmp = _causal_inputs(lengths)
    big_am = nsa_ops.make_atten_mask(4096, 255, 32, 16)      # built once for the longest sequence expected
    big_tm = nsa_ops.make_topk_mask(4096, 64, 64)
    a = nsa_ops.compress_attention(q, k, v, atten_mask=big_am, topk_mask=big_tm, **_ext_kw(cu, cc, K=2))
    b = nsa_ops.compress_attention(q, k, v, atten_mask=big_am[:150, :8], topk_mask=big_tm[:150, :2],
                                   **_ext_kw(cu, cc, K=2))
    c = nsa_ops.compress_attention(q, k, v, causal=True, **_ext_kw(cu, cc, K=2))
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)
    with pytest.raises(RuntimeError, match=r"atten_mask must have at least \[150, 8\]"):
        nsa_ops.compress_attention(q, k, v, atten_mask=big_am[:149], **_ext_kw(cu, cc, K=2))
    with pytest.raises(RuntimeError, match=r"atten_mask must have shape \[150, 8\]"):          # the drop-in: exact
        nsa_ops.npu_nsa_compress_attention(q, k, v, 0.25, 4, 32, 16, 64, 1, None, big_am, cu[1:], cc[1:])


@pytest.mark.parametrize("dynamic", [None, True])
def test_compile_causal_any_composition_at_most_two_compilations(dynamic):
    """causal=True needs no mask tensor, so any composition (new T, new longest sequence, new B, short sequences)
    reuses the graph: 20 compositions, at most 2 compilations, forward + backward equal eager. (With the default
    dynamic=None every size that changes gets one recompilation, when it first changes: the second composition
    changes T, T2 and B together. B = 1 is a graph of its own: torch specialises the 1-element prefix sums.)"""
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")

    def f(q, k, v, cu, cc):
        return nsa_ops.compress_attention(q, k, v, causal=True, **_ext_kw(cu, cc)).attention_out.float().square().sum()

    compiled = torch.compile(f, backend=cnt, fullgraph=True, dynamic=dynamic)
    rng = np.random.default_rng(0)
    seen = {(300, 100)}
    q, k, v, cu, cc, _ = _causal_inputs([300, 100], torch.float32)
    compiled(*(x.requires_grad_() for x in (q, k, v)), torch.tensor(cu), torch.tensor(cc)).backward()
    while len(seen) < 20:
        lengths = tuple(int(x) for x in rng.integers(32, 400, size=3 if len(seen) == 1 else int(rng.integers(2, 6))))
        if lengths in seen:
            continue
        seen.add(lengths)
        q, k, v, cu, cc, _ = _causal_inputs(list(lengths), torch.float32, seed=len(seen))
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        ys = [x.clone().requires_grad_() for x in (q, k, v)]
        got = compiled(*xs, torch.tensor(cu), torch.tensor(cc))
        ref = f(*ys, torch.tensor(cu), torch.tensor(cc))
        got.backward()
        ref.backward()
        assert torch.equal(got, ref), lengths
        for x, y in zip(xs, ys):
            assert torch.equal(x.grad, y.grad), lengths
    assert cnt.frame_count <= 2, cnt.frame_count


@pytest.mark.parametrize("tensor_lengths", [False, True])
def test_opcheck_ext_overloads(tensor_lengths):
    q, k, v, cu, cc, _ = _causal_inputs([150, 70], torch.float32)
    seq_q, seq_c = cu[1:], cc[1:]
    if tensor_lengths:
        seq_q, seq_c = torch.tensor(seq_q), torch.tensor(seq_c)
    op = torch.ops.nsa.compress_attention.ext_tensor_lengths if tensor_lengths else torch.ops.nsa.compress_attention.ext
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(op, (q, k, v, 0.25, 4, 32, 16, 64, 4, None, None, seq_q, seq_c, None, True))
