"""Python entry point of the decode selected attention (torch.ops.nsa.select_attention_infer); the contract is
docs/spec/decode.md §4.

:func:`npu_nsa_select_attention_infer` is a drop-in for ``torch_npu.npu_nsa_select_attention_infer``: the same
signature, argument order, keyword-only marker and defaults (note ``layout='BSND'`` here), the same output. The
operator has no derivative: differentiating through it raises a RuntimeError that says so (an autograd formula that
raises is registered, so that forward calls on tensors requiring grad still work).
"""

from __future__ import annotations

import torch

from .._args import seq_lengths_for_op
from .._lib import load_library
from ._autograd_common import register_no_derivative

load_library()

__all__ = ["npu_nsa_select_attention_infer"]

def npu_nsa_select_attention_infer(query, key, value, topk_indices, scale_value, head_num, key_value_head_num,
                                   select_block_size, select_block_count, page_block_size, *, layout='BSND',
                                   atten_mask=None, block_table=None, actual_seq_qlen=None, actual_seq_kvlen=None):
    """Drop-in replacement for ``torch_npu.npu_nsa_select_attention_infer`` (docs/spec/decode.md §4).

    Args:
        query: this step's query tokens: ``layout='BSND'`` ``[B, Sq, N1, D]``; ``'BSH'`` ``[B, Sq, N1*D]``;
            ``'TND'`` ``[T, N1, D]`` with ``T = sum(actual_seq_qlen)``. bfloat16 / float16 (float32, float64:
            extensions), any strides.
        key, value: the paged raw caches ``[num_pages, P, N2, D]`` / ``[num_pages, P, N2, Dv]`` (BSND) or
            ``[num_pages, P, N2*D]`` / ``[num_pages, P, N2*Dv]`` (BSH, TND), query's dtype.
        topk_indices: int32 (int64 accepted) ``[B, Sq, N2, K]`` (BSND also ``[B, N2, K]`` when Sq = 1, BSH) or
            ``[T, N2, K]`` (TND): block indices, -1 (an empty slot, anywhere) or in ``[0, ceil(S_b / l'))``.
            Duplicates count twice.
        scale_value: multiplies the fp32 product q.k (used as float32).
        head_num, key_value_head_num: N1 and N2 (``N1 % N2 == 0``).
        select_block_size: ``l'``; select_block_count: K (``topk_indices.shape[-1]``); page_block_size: P
            (``key.shape[1]``).
        layout: 'BSND' (default), 'BSH' or 'TND'.
        atten_mask: accepted and ignored (the NPU never reads it; MTP causality is always on, §4).
        block_table: int32 ``[B, max_pages]``, required: raw position p of batch b is in page
            ``block_table[b, p // P]``, row ``p % P``. Entries no row reads may hold anything (-1 padding).
        actual_seq_qlen: per-batch query counts q_b (**not** prefix sums); required for TND, defaults to Sq for
            BSND/BSH (rows ``i >= q_b`` of a batch are then zeros).
        actual_seq_kvlen: per-batch raw lengths S_b including this step's tokens (required). Lists of ints or 1-D
            int32/int64 CPU tensors.

    Token i < q_b of batch b (raw position ``S_b - q_b + i``) sees, through each slot x, the positions
    ``[x l', min((x+1) l', S_b - q_b + i + 1))``. Returns attention_out: ``[B, Sq, N1, Dv]`` (BSND),
    ``[B, Sq, N1*Dv]`` (BSH) or ``[T, N1, Dv]`` (TND), query's dtype; a row without any entry is zero.

    Raises:
        RuntimeError naming the argument for every rule of §4 (every index, every page a row reads, lengths).
    """
    tensor_lengths, qlen, kvlen = seq_lengths_for_op(actual_seq_qlen, actual_seq_kvlen)
    op = (torch.ops.nsa.select_attention_infer.tensor_lengths if tensor_lengths
          else torch.ops.nsa.select_attention_infer.default)
    return op(query, key, value, topk_indices, scale_value, head_num, key_value_head_num, select_block_size,
              select_block_count, page_block_size, layout, atten_mask, block_table, qlen, kvlen)


register_no_derivative("select_attention_infer", "§4")
