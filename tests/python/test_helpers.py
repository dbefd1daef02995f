"""Length, mask and statistics helpers against docs/spec/compress_attention.md §2/§4/§8/§9 worked by hand, and
the §8 example end to end."""

import pytest
import torch

import nsa_ops
import spec_model
from nsa_ops import tolerance

FLT_MAX = spec_model.FLT_MAX


def test_compressed_and_selection_lengths_spec8():
    assert nsa_ops.compressed_lengths([1024], 32, 16) == [63]           # floor((1024-32)/16) + 1
    assert nsa_ops.selection_lengths([63], 16, 64) == [16]             # ceil(63/4)
    assert nsa_ops.compressed_lengths([31, 32, 47, 48, 0], 32, 16) == [0, 1, 1, 2, 0]
    assert nsa_ops.compressed_lengths(torch.tensor([64, 100]), 64, 16) == [1, 3]
    assert nsa_ops.selection_lengths([1, 3, 4, 5, 0], 16, 64) == [1, 1, 1, 2, 0]
    assert nsa_ops.selection_lengths([5], 32, 64) == [3]               # M = 2


def test_prefix_sums():
    assert nsa_ops.prefix_sums([3, 0, 5]) == [3, 3, 8]
    assert nsa_ops.prefix_sums((3, 0, 5), leading_zero=True) == [0, 3, 3, 8]
    assert nsa_ops.prefix_sums(torch.tensor([2, 2])) == [2, 4]
    assert nsa_ops.lengths_from_prefix_sums([3, 3, 8]) == [3, 0, 5]
    with pytest.raises(ValueError, match=r"lengths\[1\] must be >= 0"):
        nsa_ops.prefix_sums([1, -1])
    with pytest.raises(ValueError, match="prefix must be non-decreasing"):
        nsa_ops.lengths_from_prefix_sums([3, 2])


def test_helper_argument_errors():
    with pytest.raises(ValueError, match=r"token_lengths\[0\] must be >= 0"):
        nsa_ops.compressed_lengths([-1], 32, 16)
    with pytest.raises(ValueError, match="compress_stride must be > 0"):
        nsa_ops.compressed_lengths([10], 32, 0)
    with pytest.raises(ValueError, match="select_block_size must be a positive multiple of compress_stride"):
        nsa_ops.selection_lengths([10], 16, 40)
    with pytest.raises(ValueError, match="max_sq must be >= 0"):
        nsa_ops.make_atten_mask(-1, 3, 32, 16)
    with pytest.raises(ValueError, match="select_block_size must be > 0"):
        nsa_ops.make_topk_mask(3, 3, 0)
    with pytest.raises(ValueError, match="num_local must be >= 0"):
        nsa_ops.make_topk_mask(3, 3, 64, num_local=-1)


def test_atten_mask_spec8():
    m = nsa_ops.make_atten_mask(1024, 63, 32, 16)
    assert m.shape == (1024, 63) and m.dtype == torch.bool
    assert m[:31].all()                                  # t = 0..30 see nothing (fully masked)
    for t in range(31, 47):                              # t = 31..46 see {0}
        assert (~m[t]).nonzero().flatten().tolist() == [0]
    assert (~m[100]).nonzero().flatten().tolist() == [0, 1, 2, 3, 4]   # 16i + 31 <= 100
    assert (~m[1023]).all()                              # the last token sees all 63
    # the rule itself: masked iff i*d + l - 1 > t
    t = torch.arange(1024).unsqueeze(1)
    i = torch.arange(63).unsqueeze(0)
    assert torch.equal(m, i * 16 + 31 > t)


def test_topk_mask_choice():
    m = nsa_ops.make_topk_mask(1024, 16, 64)
    assert m.shape == (1024, 16) and m.dtype == torch.bool
    rows = lambda t: m[t].nonzero().flatten().tolist()
    assert rows(0) == [0]             # block 0 is both the initial and the current block
    assert rows(63) == [0]
    assert rows(64) == [0, 1]         # current block 1, previous block 0
    assert rows(100) == [0, 1]
    assert rows(300) == [0, 3, 4]     # 300 // 64 = 4
    assert rows(1023) == [0, 14, 15]
    m2 = nsa_ops.make_topk_mask(10, 4, 16, num_init=2, num_local=3)
    assert m2[9].nonzero().flatten().tolist() == [0, 1]          # 9 // 16 = 0
    assert nsa_ops.make_topk_mask(200, 4, 16, num_init=0, num_local=1)[150].nonzero().flatten().tolist() == []
    assert nsa_ops.make_topk_mask(40, 4, 16, num_init=0, num_local=1)[37].nonzero().flatten().tolist() == [2]


def test_stats_helpers_layout():
    # B = 2, Sq = [3, 2], N1 = 4 (the docs/spec/compress_attention.md §4 example): batch 1, s = 0, head 2 is at float 96 + (2*2 + 0)*8.
    T, N1 = 5, 4
    dense = torch.arange(T * N1, dtype=torch.float32).view(T, N1)   # value = 4*t + h
    packed = nsa_ops.softmax_stats_pack(dense, [3, 5])
    flat = packed.view(-1)
    assert packed.shape == (5, 4, 8)
    assert torch.equal(flat[96 + (2 * 2 + 0) * 8: 96 + (2 * 2 + 0) * 8 + 8], torch.full((8,), 4.0 * 3 + 2))
    assert torch.equal(flat[(1 * 3 + 2) * 8], torch.tensor(4.0 * 2 + 1))   # batch 0, head 1, s = 2
    views = nsa_ops.softmax_stats_view(packed, [3, 5])
    assert [tuple(v.shape) for v in views] == [(4, 3), (4, 2)]
    assert views[1][2, 0].item() == 4.0 * 3 + 2
    assert torch.equal(nsa_ops.softmax_stats_dense(packed, [3, 5]), dense)
    assert torch.equal(nsa_ops.softmax_stats_dense(packed, cu_seqlens_q=[0, 3, 5]), dense)
    views[0][0, 0] = -1.0                                  # views share storage
    assert packed.view(-1)[0].item() == -1.0
    with pytest.raises(ValueError, match="exactly one of actual_seq_qlen"):
        nsa_ops.softmax_stats_view(packed)
    with pytest.raises(ValueError, match="exactly one of actual_seq_qlen"):
        nsa_ops.softmax_stats_view(packed, [3, 5], cu_seqlens_q=[0, 3, 5])
    with pytest.raises(ValueError, match="sum to 4"):
        nsa_ops.softmax_stats_view(packed, [4])
    with pytest.raises(ValueError, match=r"stats must have shape \[T, N1, 8\]"):
        nsa_ops.softmax_stats_view(packed[..., :4], [5])
    with pytest.raises(ValueError, match="cu_seqlens_q must have B\\+1"):
        nsa_ops.softmax_stats_view(packed, cu_seqlens_q=[5])


def test_stats_helpers_on_operator_output():
    from cases import MATRIX, make_args
    case = next(c for c in MATRIX if c.name == "varlen-empty-G3-fp16")
    a = make_args(case)
    _, _, smax, ssum = torch.ops.nsa.compress_attention(**a)
    res = spec_model.model_forward(**a)
    dense_max = nsa_ops.softmax_stats_dense(smax, a["actual_seq_qlen"])
    dense_sum = nsa_ops.softmax_stats_dense(ssum, a["actual_seq_qlen"])
    assert dense_max.shape == dense_sum.shape == res.softmax_max.shape
    assert not tolerance.stats_errors(dense_max, res.softmax_max, atol=tolerance.STATS_MAX_ATOL).any()
    assert not tolerance.stats_errors(dense_sum, res.softmax_sum).any()
    assert torch.equal(nsa_ops.softmax_stats_pack(nsa_ops.softmax_stats_dense(smax, a["actual_seq_qlen"]),
                                                  a["actual_seq_qlen"]), smax)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spec8_end_to_end(dtype):
    """One sequence of 1024 tokens, l = 32, d = 16, l' = 64, K = 16, causal mask, no topk_mask."""
    g = torch.Generator().manual_seed(8)
    C = nsa_ops.compressed_lengths([1024], 32, 16)[0]
    Sel = nsa_ops.selection_lengths([C], 16, 64)[0]
    q = torch.randn(1024, 1, 16, generator=g).to(dtype)
    k = torch.randn(C, 1, 16, generator=g).to(dtype)
    v = torch.randn(C, 1, 16, generator=g).to(dtype)
    am = nsa_ops.make_atten_mask(1024, C, 32, 16)
    out, topk, smax, ssum = nsa_ops.npu_nsa_compress_attention(
        q, k, v, 0.25, 1, 32, 16, 64, 16, atten_mask=am, actual_seq_qlen=[1024], actual_cmp_seq_kvlen=[C],
        actual_sel_seq_kvlen=[Sel])
    # t = 100 sees {0..4}: scores [P0+2P1+2P2+2P3+P4, P4, 0, ...] -> [0, 1, 2, ..., 15] (or 1 first if P4 wins)
    row = topk[100, 0].tolist()
    assert row[2:] == list(range(2, 16)) and sorted(row[:2]) == [0, 1]
    # t = 0..30 fully masked (docs/spec/compress_attention.md §5): max = -FLT_MAX, sum = C, output = mean of the values, uniform scores
    assert (smax[:31] == -FLT_MAX).all() and (ssum[:31] == C).all()
    mean = v.double().mean(dim=0)
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7
    assert ((out[:31].double() - mean).abs() <= tol * (1 + mean.abs())).all()
    assert not torch.isnan(out).any()
    # uniform P: blocks 0..14 tie at 8/C (the smaller index first), block 15 has 5/C (P60..62 only)
    assert topk[0, 0].tolist() == list(range(16))
