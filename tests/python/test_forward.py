"""The shape matrix: the CPU op and the C++ reference op against this suite's fp64 model of
docs/spec/compress_attention.md §3/§4, with the comparison rules of nsa_ops.tolerance."""

import pytest
import torch

import nsa_ops
import spec_model
from nsa_ops import tolerance
from cases import MATRIX, Case, make_args

OPS = {
    "cpu": lambda: torch.ops.nsa.compress_attention,
    "reference": lambda: torch.ops.nsa.compress_attention_reference,
}


def check_against_model(case: Case, op, args=None):
    args = args if args is not None else make_args(case)
    out, topk, smax, ssum = op(**args)
    T, N1 = args["query"].shape[:2]
    assert out.shape == (T, N1, case.d2) and out.dtype == case.dtype and out.is_contiguous()
    assert topk.shape == (T, case.n2, case.k) and topk.dtype == torch.int32
    assert smax.shape == ssum.shape == (T, N1, 8) and smax.dtype == torch.float32
    res = spec_model.model_forward(**args)
    plain = spec_model.plain_same_dtype(args["query"], args["key"], args["value"], args["scale_value"],
                                        args["atten_mask"], args["actual_seq_qlen"], args["actual_cmp_seq_kvlen"])
    spec_model.check_attention_out(out, res, plain, what=case.name)
    spec_model.check_stats(smax, ssum, res, what=case.name)
    spec_model.check_topk(topk, res, args["actual_seq_qlen"], case.k, what=case.name)
    return out, topk, smax, ssum


@pytest.mark.parametrize("backend", sorted(OPS))
@pytest.mark.parametrize("case", MATRIX, ids=[c.name for c in MATRIX])
def test_matrix(case, backend):
    check_against_model(case, OPS[backend]())


def test_matrix_covers_the_required_shapes():
    groups = {c.n1 // c.n2 for c in MATRIX}
    assert {1, 2, 3, 4, 8} <= groups
    assert any(0 in c.sq for c in MATRIX)
    assert any(c.d != c.d2 for c in MATRIX) and any(c.d % 16 for c in MATRIX)
    cs = {(cc, c.M) for c in MATRIX for cc in c.c}
    for want in (lambda C, M: C == 1, lambda C, M: C == M - 1, lambda C, M: C == M, lambda C, M: C == M + 1,
                 lambda C, M: C >= 100):
        assert any(want(C, M) for C, M in cs)
    assert {"none", "causal", "random"} <= {c.atten for c in MATRIX}
    assert {"none", "local", "random", "dense"} <= {c.topk for c in MATRIX}
    assert {torch.bfloat16, torch.float16, torch.float32} <= {c.dtype for c in MATRIX}
    assert any(c.layout == "strided" for c in MATRIX) and any(c.keys == "zero" for c in MATRIX)


def test_cpu_matches_reference_topk_and_stats():
    """The CPU backend and the C++ reference on every case of the matrix: both top-k lists by the tie rule
    against the model (so they are identical wherever a slot's score is separated from its neighbours, forced,
    or an exact tie, and elsewhere hold blocks of equal score within the tolerance, without duplicates), and
    the two statistics within tolerance.STATS_RTOL of each other."""
    n_slots = n_differ = 0
    for case in MATRIX:
        args = make_args(case)
        a = torch.ops.nsa.compress_attention(**args)
        b = torch.ops.nsa.compress_attention_reference(**args)
        res = spec_model.model_forward(**args)
        spec_model.check_topk(a[1], res, args["actual_seq_qlen"], case.k, what=f"{case.name} cpu")
        spec_model.check_topk(b[1], res, args["actual_seq_qlen"], case.k, what=f"{case.name} reference")
        n_slots += a[1].numel()
        n_differ += int((a[1] != b[1]).sum())
        assert not tolerance.stats_errors(a[2], b[2], atol=tolerance.STATS_MAX_ATOL).any(), case.name
        assert not tolerance.stats_errors(a[3], b[3]).any(), case.name
    # Near ties are rare in random data: the two backends pick the same block in almost every slot.
    assert n_differ <= n_slots // 100, f"{n_differ} of {n_slots} top-k slots differ between cpu and reference"


def test_strided_equals_contiguous():
    """Non-contiguous inputs (read in place) give bitwise the results of their contiguous copies."""
    case = next(c for c in MATRIX if c.name == "strided-bf16")
    args = make_args(case)
    got = torch.ops.nsa.compress_attention(**args)
    cont = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    want = torch.ops.nsa.compress_attention(**cont)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_uint8_masks_equal_bool_masks():
    case = next(c for c in MATRIX if c.name == "varlen-empty-G3-fp16")
    args = make_args(case)
    u8 = dict(args, atten_mask=args["atten_mask"].to(torch.uint8) * 7, topk_mask=args["topk_mask"].to(torch.uint8))
    for g, w in zip(torch.ops.nsa.compress_attention(**args), torch.ops.nsa.compress_attention(**u8)):
        assert torch.equal(g, w)


def test_expanded_mask_rows():
    """A zero-stride (expanded) mask is read in place."""
    case = Case("expanded", sq=(40,), c=(20,), n1=2, n2=1, k=2)
    args = make_args(case)
    row = torch.rand(20, generator=torch.Generator().manual_seed(3)) < 0.5
    args["atten_mask"] = row.expand(40, 20)
    args["topk_mask"] = torch.tensor([False, True, False, False, True]).expand(40, 5)
    check_against_model(case, torch.ops.nsa.compress_attention, args)
    want = torch.ops.nsa.compress_attention(**dict(args, atten_mask=args["atten_mask"].contiguous(),
                                                   topk_mask=args["topk_mask"].contiguous()))
    for g, w in zip(torch.ops.nsa.compress_attention(**args), want):
        assert torch.equal(g, w)


def test_key_rows_past_the_last_prefix_sum_are_ignored():
    case = next(c for c in MATRIX if c.name == "fp64-extension")
    args = make_args(case)
    a = torch.ops.nsa.compress_attention(**args)
    key, value = args["key"].clone(), args["value"].clone()
    key[sum(case.c):] = 1e30
    value[sum(case.c):] = float("nan")
    b = torch.ops.nsa.compress_attention(**dict(args, key=key, value=value))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------------- determinism

def _bitwise_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_deterministic_over_repeats_and_thread_counts():
    case = next(c for c in MATRIX if c.name == "varlen-empty-G3-fp16")
    args = make_args(case)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        base = torch.ops.nsa.compress_attention(**args)
        for n in (1, 2, 3, 7):
            torch.set_num_threads(n)
            assert _bitwise_equal(base, torch.ops.nsa.compress_attention(**args)), f"num_threads={n}"
    finally:
        torch.set_num_threads(before)


def test_sequence_alone_equals_sequence_in_batch():
    case = next(c for c in MATRIX if c.name == "varlen-empty-G3-fp16")
    args = make_args(case)
    out, topk, smax, ssum = torch.ops.nsa.compress_attention(**args)
    q0 = c0 = 0
    for b, (sq, C) in enumerate(zip(case.sq, case.c)):
        sel = case.sel[b]
        if sq:
            alone = dict(args, query=args["query"][q0:q0 + sq], key=args["key"][c0:c0 + C],
                         value=args["value"][c0:c0 + C], atten_mask=args["atten_mask"][:sq, :C],
                         topk_mask=args["topk_mask"][:sq, :sel], actual_seq_qlen=[sq], actual_cmp_seq_kvlen=[C],
                         actual_sel_seq_kvlen=[sel], select_block_count=min(case.k, sel))
            o, t, m, s = torch.ops.nsa.compress_attention(**alone)
            assert torch.equal(o, out[q0:q0 + sq]), f"batch {b}"
            assert torch.equal(t, topk[q0:q0 + sq]), f"batch {b}"
            views_m = nsa_ops.softmax_stats_view(smax, args["actual_seq_qlen"])
            views_s = nsa_ops.softmax_stats_view(ssum, args["actual_seq_qlen"])
            assert torch.equal(nsa_ops.softmax_stats_view(m, [sq])[0], views_m[b])
            assert torch.equal(nsa_ops.softmax_stats_view(s, [sq])[0], views_s[b])
        q0 += sq
        c0 += C
