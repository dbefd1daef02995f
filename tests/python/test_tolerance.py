"""The comparison rules of nsa_ops.tolerance, and that the checks built on them fail where they must: planted
errors (a missing §3.4 cast of P, truncation instead of rounding to nearest, one element one ulp further off,
a separated top-k slot swapped, an exact tie out of order, statistics 2e-5 off) are caught element by element;
the operator's own outputs pass (test_forward.py)."""

import pytest
import torch

import nsa_ops  # noqa: F401  (loads torch.ops.nsa)
import spec_model
from cases import MATRIX, make_args
from nsa_ops import tolerance

BF, F16, F32 = torch.bfloat16, torch.float16, torch.float32


def _case(name):
    case = next(c for c in MATRIX if c.name == name)
    args = make_args(case)
    return case, args, spec_model.model_forward(**args)


def _plain(args):
    return spec_model.plain_same_dtype(args["query"], args["key"], args["value"], args["scale_value"],
                                       args["atten_mask"], args["actual_seq_qlen"], args["actual_cmp_seq_kvlen"])


# ------------------------------------------------------------------------------------------------ units
def test_ulp_and_ulp_distance():
    x = torch.tensor([1.0, 1.5, 0.0, 2.0 ** -130, -3.0], dtype=torch.float64)
    assert tolerance.ulp(x, BF).tolist() == [2.0 ** -7, 2.0 ** -7, 2.0 ** -133, 2.0 ** -133, 2.0 ** -6]
    assert tolerance.ulp(x, F16).tolist()[:3] == [2.0 ** -10, 2.0 ** -10, 2.0 ** -24]
    assert tolerance.ulp(x, F32).tolist()[:2] == [2.0 ** -23, 2.0 ** -23]
    a = torch.tensor([1.0, -0.0, 1.0, float("nan"), float("nan")], dtype=BF)
    b = torch.tensor([1.0 + 2 ** -6, 0.0, -1.0, float("nan"), 1.0], dtype=BF)
    d = tolerance.ulp_distance(a, b).tolist()
    assert d[:4] == [2, 0, 2 * 0x3F80, 0] and d[4] == 1 << 40


def test_flip_mask_marks_p_near_a_rounding_midpoint():
    # bf16 spacing in [0.5, 1) is 2^-8: 0.5 + 2^-9 is a midpoint, 0.5 + 2^-8 a bf16 value.
    p = torch.tensor([0.5 + 2 ** -9, 0.5 + 2 ** -9 + 2 ** -20, 0.5 + 2 ** -8, 0.25], dtype=torch.float64)
    rel = torch.full((4,), 1e-5, dtype=torch.float64)
    assert tolerance.flip_mask(p, BF, rel).tolist() == [True, True, False, False]
    assert tolerance.flip_mask(p, BF, torch.zeros(4, dtype=torch.float64)).tolist() == [True, False, False, False]
    assert not tolerance.flip_mask(p, F32, rel).any()


def test_p_error_bound_grows_with_the_dot_products_and_ignores_masked_entries():
    S = torch.tensor([[1.0, -2.0, -3.4e38]], dtype=torch.float64)
    visible = torch.tensor([[True, True, False]])
    small = tolerance.p_rel_error(S, torch.tensor([[1.0, 1.0, 1e30]], dtype=torch.float64), visible, 64, BF)
    large = tolerance.p_rel_error(S, torch.tensor([[100.0, 1.0, 1e30]], dtype=torch.float64), visible, 64, BF)
    assert small.shape == (1, 1) and 0 < small.item() < 1e-4 < large.item()
    masked = tolerance.p_rel_error(torch.full((1, 3), -3.4e38, dtype=torch.float64), torch.ones(1, 3), 
                                   torch.zeros(1, 3, dtype=torch.bool), 64, BF)
    assert masked.item() < 1e-5  # a fully masked row: every P is exactly 1/C
    f64 = tolerance.p_rel_error(S, torch.tensor([[1.0, 1.0, 1e30]], dtype=torch.float64), visible, 64,
                                torch.float64)
    assert f64.item() < small.item() * 1e-8


# ------------------------------------------------------------------------------------------------ attention_out
@pytest.mark.parametrize("name", ["causal-512tok-bf16", "varlen-empty-G3-fp16", "strided-bf16"])
def test_attention_out_check_catches_a_missing_cast_of_p(name):
    """The same computation without §3.4's rounding of P (the fp64 model on fp64 copies, rounded once at the
    end) is far from the model for thousands of elements."""
    case, args, res = _case(name)
    wide = dict(args, query=args["query"].double(), key=args["key"].double(), value=args["value"].double())
    no_cast = spec_model.model_forward(**wide).attention_out.to(case.dtype)
    bad = (no_cast.double() - res.attention_out).abs() > res.out_bound
    assert bad.double().mean() > 0.1
    with pytest.raises(AssertionError, match="beyond their bound"):
        spec_model.check_attention_out(no_cast, res, _plain(args), what=name)


@pytest.mark.parametrize("name", ["causal-2seq-fp16", "G4-bf16"])
def test_attention_out_check_catches_truncation_and_one_more_ulp(name):
    case, args, res = _case(name)
    ref, dt = res.attention_out, case.dtype
    nearest = ref.to(dt)
    spec_model.check_attention_out(nearest, res, _plain(args), what=name)  # the exact result, rounded: passes
    bits = nearest.view(torch.int16)
    away = (nearest.double().abs() > ref.abs()) & (nearest != 0)
    truncated = torch.where(away, bits - 1, bits).view(dt)  # toward zero (same sign: magnitude bits - 1)
    with pytest.raises(AssertionError, match="beyond their bound"):
        spec_model.check_attention_out(truncated, res, _plain(args), what=name)
    # One element one ulp further from the model, where the bound is tightest.
    i = int((res.out_bound / tolerance.ulp(ref, dt)).view(-1).argmin())
    one = nearest.clone()
    step = 1 if (one.view(-1)[i].double() >= ref.view(-1)[i]) == (one.view(-1)[i] >= 0) else -1
    one.view(-1).view(torch.int16)[i] += step
    with pytest.raises(AssertionError, match="beyond their bound"):
        spec_model.check_attention_out(one, res, _plain(args), what=name)


def test_attention_out_bound_is_a_few_ulps_plus_the_accumulation_term():
    """For bf16 the bound is, on average over the elements, about one ulp (half an ulp of rounding plus the
    fp32 accumulation and the rare rounding flips of P); it never drops below the rounding itself."""
    case, args, res = _case("causal-512tok-bf16")
    ratio = res.out_bound / tolerance.ulp(res.attention_out, case.dtype)
    assert (ratio >= 0.5).all() and ratio.mean() < 3


# ------------------------------------------------------------------------------------------------ top-k
def test_topk_check_catches_swaps_duplicates_and_out_of_order_exact_ties():
    case, args, res = _case("G4-bf16")
    topk = torch.ops.nsa.compress_attention(**args)[1]
    spec_model.check_topk(topk, res, args["actual_seq_qlen"], case.k, what=case.name)
    # Swap the first two slots of a row whose scores are well separated.
    sc = res.scores[0]                                              # [N2, sq, Sel]
    srt = sc.sort(dim=-1, descending=True).values
    gap = (srt[..., 0] - srt[..., 1]) / srt[..., 0]
    n2, s = divmod(int(gap.argmax()), gap.shape[1])
    assert gap[n2, s] > 1e-2
    swapped = topk.clone()
    swapped[s, n2, [0, 1]] = swapped[s, n2, [1, 0]]
    with pytest.raises(AssertionError, match="index differs"):
        spec_model.check_topk(swapped, res, args["actual_seq_qlen"], case.k, what="swapped")
    dup = topk.clone()
    dup[s, n2, 1] = dup[s, n2, 0]
    with pytest.raises(AssertionError, match="duplicate"):
        spec_model.check_topk(dup, res, args["actual_seq_qlen"], case.k, what="dup")
    out_of_range = topk.clone()
    out_of_range[s, n2, 0] = sc.shape[-1]
    with pytest.raises(AssertionError, match="outside"):
        spec_model.check_topk(out_of_range, res, args["actual_seq_qlen"], case.k, what="range")


def test_topk_exact_ties_must_follow_the_index_order():
    """Zero keys: every row's P is uniform, equal scores are equal in fp32 too, so §3.8's order is required;
    blocks of score 0 must come in ascending order (§5) even where P is not uniform."""
    case, args, res = _case("ties-zero-keys-bf16")
    topk = torch.ops.nsa.compress_attention(**args)[1]
    spec_model.check_topk(topk, res, args["actual_seq_qlen"], case.k, what=case.name)
    sc = res.scores[0]
    n2, s = 0, 10
    row = topk[s, n2].long()
    vals = sc[n2, s][row]
    i = next(i for i in range(case.k - 1) if vals[i] == vals[i + 1])  # a tied pair of slots
    swapped = topk.clone()
    swapped[s, n2, [i, i + 1]] = swapped[s, n2, [i + 1, i]]
    with pytest.raises(AssertionError, match="exact tie"):
        spec_model.check_topk(swapped, res, args["actual_seq_qlen"], case.k, what="tie swapped")
    # The same swap in a row the caller does not declare exact is a tie the rule accepts.
    g = swapped[:, :, :].permute(1, 0, 2)[:, :sc.shape[1]]
    bad, _ = tolerance.topk_slot_errors(g, sc, res.score_rel[0], res.score_weight)
    assert not bad.any()
    zero = torch.tensor([[0.5, 0.0, 0.0, 0.0]], dtype=torch.float64)
    bad, reason = tolerance.topk_slot_errors(torch.tensor([[0, 3, 1]]), zero, torch.full((1, 1), 1e-6), 1)
    assert bad.tolist() == [[False, False, True]] and "ascending" in reason


# ------------------------------------------------------------------------------------------------ statistics
def test_stats_check_catches_a_relative_error_of_2e_5():
    case, args, res = _case("G4-bf16")
    _, _, smax, ssum = torch.ops.nsa.compress_attention(**args)
    spec_model.check_stats(smax, ssum, res, what=case.name)
    off = ssum.clone()
    off.view(-1)[17] *= 1 + 2e-5
    with pytest.raises(AssertionError, match="softmax_sum"):
        spec_model.check_stats(smax, off, res, what=case.name)
