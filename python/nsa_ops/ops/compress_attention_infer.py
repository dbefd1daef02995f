"""Python entry point of decode-time compressed attention (torch.ops.nsa.compress_attention_infer); the contract is
docs/spec/decode.md §3.

* :func:`npu_nsa_compress_attention_infer`: drop-in for ``torch_npu.npu_nsa_compress_attention_infer``: the same
  signature, argument order, keyword-only arguments and defaults (``layout='TND'``), returning
  ``(attention_out, topk_indices)``.

The operator has no derivative (§3). Its autograd formula, registered here, raises when a backward reaches it, so
that the forward still runs on tensors that require grad (a decode step of a model in training mode) but no
gradient silently stops at it.
"""

from __future__ import annotations

import torch

from .._args import optional_int_list
from .._lib import load_library
from ._autograd_common import register_no_derivative

load_library()

__all__ = ["npu_nsa_compress_attention_infer"]

_LENGTHS = ("actual_seq_qlen", "actual_cmp_seq_kvlen", "actual_sel_seq_kvlen")


def npu_nsa_compress_attention_infer(query, key, value, scale_value, head_num, key_value_head_num,
                                     select_block_size, select_block_count, page_block_size, compress_block_size,
                                     compress_stride, *, layout="TND", atten_mask=None, block_table=None,
                                     topk_mask=None, actual_seq_qlen=None, actual_cmp_seq_kvlen=None,
                                     actual_sel_seq_kvlen=None):
    """Drop-in replacement for ``torch_npu.npu_nsa_compress_attention_infer`` (docs/spec/decode.md §3).

    Args:
        query: TND ``[T, N1, D]`` (T = sum of the per-batch query counts) or BSND ``[B, Sq, N1, D]``; bfloat16 /
            float16 (float32, float64: extensions); any strides.
        key: ``[num_pages, page_block_size, N2 * D]`` the paged compressed keys (heads flattened).
        value: ``[num_pages, page_block_size, N2 * Dv]``, ``Dv <= D``.
        scale_value: the factor applied to ``q . k`` (used as a float32).
        head_num, key_value_head_num: N1 and N2 (N1 a multiple of N2).
        select_block_size, select_block_count: l' and K (any K >= 1: slots past the batch's Sel' hold -1).
        page_block_size: P, equal to ``key.shape[1]``.
        compress_block_size, compress_stride: l and d (``d <= l <= l'``, ``l' % d == 0``).
        layout: "TND" (default) or "BSND".
        atten_mask: any tensor or None: its presence turns on MTP causality (contents not read).
        block_table: ``[B, max_pages]`` int32 pages of the compressed cache (required).
        topk_mask: ignored (as on the NPU).
        actual_seq_qlen: per-batch query counts q_b (None: 1 each). Per batch, not prefix sums.
        actual_cmp_seq_kvlen: per-batch compressed lengths C_b >= 1 (required).
        actual_sel_seq_kvlen: per-batch raw lengths S_b, read when atten_mask is given and some q_b > 1.
        The three length lists are lists/tuples of ints, or 1-D integer CPU tensors (all then go to the
        ``.tensor_lengths`` overload: under ``torch.compile`` new lengths cause no recompilation).

    Returns:
        ``(attention_out, topk_indices)``: TND ``[T, N1, Dv]`` / ``[T, N2, K]`` int32, BSND ``[B, Sq, N1, Dv]`` /
        ``[B, Sq, N2, K]`` (BSND rows past q_b: zeros and -1).

    Raises:
        RuntimeError naming the argument for every rule of §3; nothing is written then.
    """
    lengths = {"actual_seq_qlen": actual_seq_qlen, "actual_cmp_seq_kvlen": actual_cmp_seq_kvlen,
               "actual_sel_seq_kvlen": actual_sel_seq_kvlen}
    scale = float(scale_value)
    if any(isinstance(v, torch.Tensor) for v in lengths.values()):
        tensors = {k: v if v is None or isinstance(v, torch.Tensor)
                   else torch.tensor(optional_int_list(v, k), dtype=torch.int64) for k, v in lengths.items()}
        return torch.ops.nsa.compress_attention_infer.tensor_lengths(
            query, key, value, scale, head_num, key_value_head_num, select_block_size, select_block_count,
            page_block_size, compress_block_size, compress_stride, layout=layout, atten_mask=atten_mask,
            block_table=block_table, topk_mask=topk_mask, **tensors)
    lists = {k: optional_int_list(v, k) for k, v in lengths.items()}
    return torch.ops.nsa.compress_attention_infer(
        query, key, value, scale, head_num, key_value_head_num, select_block_size, select_block_count,
        page_block_size, compress_block_size, compress_stride, layout=layout, atten_mask=atten_mask,
        block_table=block_table, topk_mask=topk_mask, **lists)


register_no_derivative("compress_attention_infer", "§3")
