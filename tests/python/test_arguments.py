"""Every bad argument raises, and the message names the argument (docs/spec/compress_attention.md §6).

Operator rules (torch.ops.nsa.compress_attention, through the torch_npu drop-in) raise RuntimeError;
malformed Python arguments of the Python API raise ValueError (TypeError for a wrong type)."""

import math

import pytest
import torch

import nsa_ops
from cases import args_with as _with
from cases import base_args


def test_base_call_is_valid():
    out = nsa_ops.npu_nsa_compress_attention(**base_args())
    assert out[0].shape == (20, 4, 16)


BAD = [
    # (id, args maker, regex the message must match)
    ("query-rank", _with(query=lambda a: a["query"][0]), r"query must be a 3-D"),
    ("key-rank", _with(key=lambda a: a["key"].unsqueeze(0)), r"key must be a 3-D"),
    ("value-rank", _with(value=lambda a: a["value"][..., 0]), r"value must be a 3-D"),
    ("query-dtype", _with(query=lambda a: a["query"].to(torch.int32)), r"query must be bfloat16, float16"),
    ("key-dtype-mismatch", _with(key=lambda a: a["key"].half()), r"key must have the dtype of query"),
    ("value-dtype-mismatch", _with(value=lambda a: a["value"].float()), r"value must have the dtype of query"),
    ("key-head-dim", _with(key=lambda a: a["key"][..., :16].contiguous()), r"key must have the head dim D"),
    ("value-rows", _with(value=lambda a: a["value"][:10]), r"value must have the first two dims of key"),
    ("value-D2-above-D", _with(value=lambda a: torch.zeros(12, 2, 48, dtype=torch.bfloat16)), r"value head dim D2"),
    ("query-empty", _with(query=lambda a: a["query"][:0]), r"query must not be empty"),
    ("key-empty", _with(key=lambda a: a["key"][:0], value=lambda a: a["value"][:0]), r"key must not be empty"),
    ("value-empty", _with(value=lambda a: a["value"][..., :0]), r"value must not be empty"),
    ("scale-inf", _with(scale_value=math.inf), r"scale_value must be finite"),
    ("scale-nan", _with(scale_value=math.nan), r"scale_value must be finite"),
    ("scale-float32-overflow", _with(scale_value=1e39), r"scale_value must be finite"),
    ("head-num", _with(head_num=3), r"head_num must equal"),
    ("heads-not-multiple", _with(key=lambda a: torch.zeros(12, 3, 32, dtype=torch.bfloat16),
                                 value=lambda a: torch.zeros(12, 3, 16, dtype=torch.bfloat16)),
     r"multiple of the number of key/value heads"),
    ("compress-block-size-not-16", _with(compress_block_size=24), r"compress_block_size must be a multiple of 16"),
    ("compress-block-size-too-big", _with(compress_block_size=144), r"compress_block_size must be"),
    ("compress-stride-not-16", _with(compress_stride=8), r"compress_stride must be a multiple of 16"),
    ("compress-stride-above-block", _with(compress_stride=48, select_block_size=96), r"compress_stride \(48\)"),
    ("select-block-size-too-big", _with(select_block_size=256), r"select_block_size must be"),
    ("select-block-size-below-block", _with(compress_block_size=64, select_block_size=32),
     r"compress_block_size \(64\) must be <= select_block_size"),
    ("select-block-size-not-multiple-of-stride", _with(compress_block_size=32, compress_stride=32,
                                                       select_block_size=48),
     r"select_block_size \(48\) must be a multiple of compress_stride"),
    ("select-block-count-0", _with(select_block_count=0), r"select_block_count must be in \[1, 32\]"),
    ("select-block-count-33", _with(select_block_count=33), r"select_block_count must be in \[1, 32\]"),
    ("select-block-count-above-min-sel", _with(select_block_count=3), r"select_block_count \(3\) must be <="),
    ("seq-qlen-missing", _with(actual_seq_qlen=None), r"actual_seq_qlen must be given"),
    ("seq-qlen-empty", _with(actual_seq_qlen=[]), r"actual_seq_qlen must have at least one element"),
    ("seq-qlen-decreasing", _with(actual_seq_qlen=[12, 8]), r"actual_seq_qlen must be non-decreasing"),
    ("seq-qlen-negative", _with(actual_seq_qlen=[-1, 20]), r"actual_seq_qlen must start"),
    ("seq-qlen-last-not-T", _with(actual_seq_qlen=[8, 19]), r"actual_seq_qlen\[-1\] must equal"),
    ("cmp-len-missing", _with(actual_cmp_seq_kvlen=None), r"actual_cmp_seq_kvlen must be given"),
    ("cmp-len-count", _with(actual_cmp_seq_kvlen=[12]), r"actual_cmp_seq_kvlen must have as many elements"),
    ("cmp-len-decreasing", _with(actual_cmp_seq_kvlen=[7, 5]), r"actual_cmp_seq_kvlen must be non-decreasing"),
    ("cmp-len-past-T2", _with(actual_cmp_seq_kvlen=[5, 13]), r"actual_cmp_seq_kvlen\[-1\] must be <="),
    ("cmp-len-empty-batch", _with(actual_cmp_seq_kvlen=[5, 5], select_block_count=1),
     r"actual_cmp_seq_kvlen must give every batch at least one"),
    ("sel-len-values", _with(actual_sel_seq_kvlen=[2, 3]), r"actual_sel_seq_kvlen\[1\] must be the prefix sum"),
    ("sel-len-count", _with(actual_sel_seq_kvlen=[4]), r"actual_sel_seq_kvlen must have as many elements"),
    ("sel-len-empty", _with(actual_sel_seq_kvlen=[]), r"actual_sel_seq_kvlen must have as many elements"),
    ("atten-mask-shape", _with(atten_mask=torch.zeros(12, 8, dtype=torch.bool)), r"atten_mask must have shape \[12, 7\]"),
    ("atten-mask-transposed-shape", _with(atten_mask=torch.zeros(7, 12, dtype=torch.bool)),
     r"atten_mask must have shape"),
    ("atten-mask-dtype", _with(atten_mask=torch.zeros(12, 7)), r"atten_mask must be a bool"),
    ("atten-mask-rank", _with(atten_mask=torch.zeros(1, 12, 7, dtype=torch.bool)), r"atten_mask must be a 2-D"),
    ("topk-mask-shape", _with(topk_mask=torch.zeros(12, 3, dtype=torch.bool)), r"topk_mask must have shape \[12, 2\]"),
    ("topk-mask-dtype", _with(topk_mask=torch.zeros(12, 2, dtype=torch.int32)), r"topk_mask must be a bool"),
    ("topk-mask-rank", _with(topk_mask=torch.zeros(12, dtype=torch.bool)), r"topk_mask must be a 2-D"),
]


@pytest.mark.parametrize("make,pattern", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_argument_raises_naming_it(make, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        nsa_ops.npu_nsa_compress_attention(**make())


@pytest.mark.parametrize("make,pattern", [b[1:] for b in BAD[:6]], ids=[b[0] for b in BAD[:6]])
def test_bad_argument_raises_in_the_reference_op_too(make, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.nsa.compress_attention_reference(**make())


# ------------------------------------------------------------------------ Python-level arguments

@pytest.mark.parametrize("value,exc,pattern", [
    ([8.0, 20.0], ValueError, r"actual_seq_qlen\[0\] must be an int"),
    ([True, 20], ValueError, r"actual_seq_qlen\[0\] must be an int"),
    # tensors go to the operator's .tensor_lengths overload, which checks them (RuntimeError, as torch_npu)
    (torch.tensor([[8, 20]]), RuntimeError, r"actual_seq_qlen must be a 1-D"),
    (torch.tensor([8.0, 20.0]), RuntimeError, r"actual_seq_qlen must be an int64 or int32 tensor"),
    ("8,20", TypeError, r"actual_seq_qlen must be a list"),
    (7, TypeError, r"actual_seq_qlen must be a list"),
])
def test_drop_in_length_conversion_errors(value, exc, pattern):
    with pytest.raises(exc, match=pattern):
        nsa_ops.npu_nsa_compress_attention(**dict(base_args(), actual_seq_qlen=value))


def test_drop_in_accepts_tuples_and_int_tensors():
    a = base_args()
    want = nsa_ops.npu_nsa_compress_attention(**a)
    for conv in (tuple, lambda x: torch.tensor(x, dtype=torch.int32), lambda x: torch.tensor(x)):
        b = dict(a, actual_seq_qlen=conv(a["actual_seq_qlen"]), actual_cmp_seq_kvlen=conv(a["actual_cmp_seq_kvlen"]),
                 actual_sel_seq_kvlen=conv(a["actual_sel_seq_kvlen"]))
        for x, y in zip(nsa_ops.npu_nsa_compress_attention(**b), want):
            assert torch.equal(x, y)


def kw_args():
    a = base_args()
    return dict(query=a["query"], key=a["key"], value=a["value"], cu_seqlens_q=[0, 8, 20], cu_seqlens_cmp=[0, 5, 12],
                compress_block_size=32, compress_stride=16, select_block_size=64, select_block_count=2,
                atten_mask=a["atten_mask"], topk_mask=a["topk_mask"])


@pytest.mark.parametrize("changes,exc,pattern", [
    (dict(cu_seqlens_q=[8, 20]), ValueError, r"cu_seqlens_q must start with 0"),
    (dict(cu_seqlens_q=[0]), ValueError, r"cu_seqlens_q must have B\+1 >= 2 entries"),
    (dict(cu_seqlens_q=[0, 12, 8]), ValueError, r"cu_seqlens_q must be non-decreasing"),
    (dict(cu_seqlens_q=[0, 8, 19]), ValueError, r"cu_seqlens_q\[-1\] must equal"),
    (dict(cu_seqlens_q=[0, 0.5, 20]), ValueError, r"cu_seqlens_q\[1\] must be an int"),
    (dict(cu_seqlens_cmp=[0, 12]), ValueError, r"cu_seqlens_cmp must have as many entries as cu_seqlens_q"),
    (dict(cu_seqlens_cmp=[1, 5, 12]), ValueError, r"cu_seqlens_cmp must start with 0"),
    (dict(cu_seqlens_cmp=[0, 5, 13]), ValueError, r"cu_seqlens_cmp\[-1\] must be <="),
    (dict(cu_seqlens_cmp=[0, 5, 5]), ValueError, r"cu_seqlens_cmp must give every batch"),
    (dict(scale=math.nan), ValueError, r"scale must be finite"),
    (dict(scale=math.inf), ValueError, r"scale must be finite"),
    (dict(scale="0.1"), ValueError, r"scale must be a float"),
    (dict(compress_block_size=32.0), ValueError, r"compress_block_size must be an int"),
    (dict(select_block_count=None), ValueError, r"select_block_count must be an int"),
    (dict(query=[[0.0]]), TypeError, r"query must be a torch.Tensor"),
    (dict(key=lambda a: a["key"][0]), ValueError, r"key must be a 3-D tensor"),
    (dict(atten_mask=torch.zeros(1, 12, 7, dtype=torch.bool)), ValueError, r"atten_mask must be a 2-D"),
    (dict(topk_mask="yes"), TypeError, r"topk_mask must be a torch.Tensor"),
    # operator rules come through as RuntimeError, naming the operator's argument
    (dict(select_block_count=0), RuntimeError, r"select_block_count must be in"),
    (dict(compress_stride=8), RuntimeError, r"compress_stride must be a multiple of 16"),
    (dict(atten_mask=torch.zeros(12, 6, dtype=torch.bool)), RuntimeError, r"atten_mask must have at least"),
])
def test_keyword_api_errors(changes, exc, pattern):
    a = kw_args()
    for k, v in changes.items():
        a[k] = v(a) if callable(v) else v
    with pytest.raises(exc, match=pattern):
        nsa_ops.compress_attention(**a)


def test_keyword_api_equals_drop_in():
    a = kw_args()
    got = nsa_ops.compress_attention(**a, scale=0.2)
    want = nsa_ops.npu_nsa_compress_attention(**base_args())
    assert isinstance(got, nsa_ops.CompressAttentionOutput)
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    assert torch.equal(got.topk_indices, want[1])
    # default scale = 1/sqrt(D), cu_seqlens as int tensors
    d = nsa_ops.compress_attention(**dict(a, cu_seqlens_q=torch.tensor([0, 8, 20], dtype=torch.int32),
                                          cu_seqlens_cmp=torch.tensor([0, 5, 12])))
    e = nsa_ops.npu_nsa_compress_attention(**dict(base_args(), scale_value=1 / math.sqrt(32)))
    for x, y in zip(d, e):
        assert torch.equal(x, y)
