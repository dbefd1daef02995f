"""Python entry points of the selected-attention operator (torch.ops.nsa.select_attention); the contract is
docs/spec/select_attention.md.

* :func:`npu_nsa_select_attention` and :func:`npu_nsa_select_attention_grad`: drop-ins for
  ``torch_npu.npu_nsa_select_attention`` and ``torch_npu.npu_nsa_select_attention_grad``: the same signatures,
  argument order (the grad takes the three forward outputs before ``topk_indices``), keyword-only marker, defaults
  and outputs. Causality is torch_npu's switch: on when ``atten_mask`` is given (any 2-D bool/uint8 tensor; its
  contents are not read, §1).
* :func:`select_attention`: a keyword API with FlashAttention-style ``cu_seqlens``, a default scale and an
  explicit ``causal`` flag, returning a :class:`SelectAttentionOutput` named tuple.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from .._args import attention_scale_and_inputs, check_cu_seqlens, int_arg, int_list, seq_lengths_for_op
from .._lib import load_library

load_library()

__all__ = ["SelectAttentionOutput", "npu_nsa_select_attention", "npu_nsa_select_attention_grad", "select_attention"]


class SelectAttentionOutput(NamedTuple):
    """Outputs of the operator (docs/spec/select_attention.md §5), in torch_npu's order.

    attention_out: ``[T1, N1, Dv]``, query's dtype, contiguous.
    softmax_max:   ``[T1, N1, 8]`` float32: the row maximum m of the visible scores of (row t, head h), stored 8
                   times at ``[t, h, :]`` (true TND layout); ``-FLT_MAX`` for a row without visible entry (§6).
    softmax_sum:   ``[T1, N1, 8]`` float32: the softmax denominator l_sum, same layout; ``+FLT_MAX`` for a row
                   without visible entry.
    """

    attention_out: torch.Tensor
    softmax_max: torch.Tensor
    softmax_sum: torch.Tensor



def npu_nsa_select_attention(query, key, value, topk_indices, scale_value, head_num, select_block_size,
                             select_block_count, *, atten_mask=None, actual_seq_qlen=None, actual_seq_kvlen=None):
    """Drop-in replacement for ``torch_npu.npu_nsa_select_attention`` (docs/spec/select_attention.md §1-§7).

    Args:
        query: ``[T1, N1, D]``, bfloat16 / float16 (float32, float64: extensions), any strides. Query head ``h``
            reads key/value head ``h // G``, ``G = N1 / N2``.
        key: ``[T2, N2, D]`` raw keys, query's dtype, any strides.
        value: ``[T2, N2, Dv]`` raw values, ``Dv <= D``, query's dtype, any strides.
        topk_indices: ``[T1, N2, K]`` int32 (int64 accepted): per query row and KV head, K batch-local block
            indices in ``[0, ceil(Skv_b / select_block_size))`` or -1 (an empty slot); block x covers the batch's
            key positions ``[x l', (x+1) l')``. Duplicates count twice; the order does not matter.
        scale_value: multiplies the fp32 product q.k (used as float32); must be finite.
        head_num: must equal N1.
        select_block_size: ``l' >= 1``; select_block_count: ``K >= 1``, equal to ``topk_indices.shape[2]``.
        atten_mask: ``None`` (not causal) or any 2-D bool/uint8 tensor (causal: key position p is visible to local
            query position s only if p <= s). Its contents and size are not read (torch_npu's rule, §1).
        actual_seq_qlen: the B prefix sums of the query lengths (no leading zero), the last equal to T1;
        actual_seq_kvlen: the B prefix sums of the key lengths, the last <= T2. Lists/tuples of ints, or 1-D
            int64/int32 CPU tensors (the ``.tensor_lengths`` overload: no recompilation under ``torch.compile`` for
            new lengths).

    Returns:
        ``(attention_out [T1, N1, Dv], softmax_max [T1, N1, 8], softmax_sum [T1, N1, 8])``, see
        :class:`SelectAttentionOutput`. Differentiable with respect to query, key and value (§8); the statistics
        carry no gradient.

    Raises:
        RuntimeError naming the argument for every violation of §7 (every index is checked).
    """
    tensor_lengths, qlen, kvlen = seq_lengths_for_op(actual_seq_qlen, actual_seq_kvlen)
    op = torch.ops.nsa.select_attention.tensor_lengths if tensor_lengths else torch.ops.nsa.select_attention.default
    return op(query, key, value, topk_indices, scale_value, head_num, select_block_size, select_block_count,
              atten_mask=atten_mask, actual_seq_qlen=qlen, actual_seq_kvlen=kvlen)


def npu_nsa_select_attention_grad(grad, query, key, value, attention_out, softmax_max, softmax_sum, topk_indices,
                                  scale_value, head_num, select_block_size, select_block_count, *, atten_mask=None,
                                  actual_seq_qlen=None, actual_seq_kvlen=None):
    """Drop-in replacement for ``torch_npu.npu_nsa_select_attention_grad`` (docs/spec/select_attention.md §8).

    ``grad`` is dO ``[T1, N1, Dv]`` (query's dtype); ``attention_out``, ``softmax_max`` and ``softmax_sum`` are the
    forward's outputs as returned (only element 0 of the statistics' last dimension is read); every other argument
    is the forward's, with the same causal switch (``atten_mask`` present: causal; unlike the NPU backward, which is
    always causal, §11 item 3). Returns ``(query_grad, key_grad, value_grad)`` with the shapes and dtype of query,
    key and value, contiguous, rounded half away from zero; deterministic whatever the thread count.
    """
    tensor_lengths, qlen, kvlen = seq_lengths_for_op(actual_seq_qlen, actual_seq_kvlen)
    op = (torch.ops.nsa.select_attention_backward.tensor_lengths if tensor_lengths
          else torch.ops.nsa.select_attention_backward.default)
    return op(grad, query, key, value, attention_out, softmax_max, softmax_sum, topk_indices, scale_value, head_num,
              select_block_size, select_block_count, atten_mask=atten_mask, actual_seq_qlen=qlen,
              actual_seq_kvlen=kvlen)


def _check_tensor(t: Any, name: str, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name} must be a 3-D tensor {layout}, got shape {list(t.shape)}")


def _cu_for_op(cu: Any, name: str):
    """``cu[1:]``: a list for a list/tuple, a tensor for a tensor (checked by nsa_ops._args.check_cu_seqlens; the
    operator checks a tensor's values in its kernel)."""
    check_cu_seqlens(cu, name)
    return cu[1:] if isinstance(cu, torch.Tensor) else int_list(cu, name)[1:]


def select_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, topk_indices: torch.Tensor, *,
                     cu_seqlens_q: Any, cu_seqlens_kv: Any, select_block_size: int, scale: Optional[float] = None,
                     causal: bool = True) -> SelectAttentionOutput:
    """Selected attention of Native Sparse Attention with FlashAttention-style lengths (docs/spec/select_attention.md).

    Exactly ``npu_nsa_select_attention(query, key, value, topk_indices, scale, N1, select_block_size, K,
    atten_mask=<causal>, actual_seq_qlen=cu_seqlens_q[1:], actual_seq_kvlen=cu_seqlens_kv[1:])`` with
    ``K = topk_indices.shape[2]``; differentiable in the same way.

    Args:
        query: ``[T1, N1, D]``; key: ``[T2, N2, D]``; value: ``[T2, N2, Dv]``, ``Dv <= D``: bfloat16 / float16
            (float32, float64: extensions), one dtype, any strides.
        topk_indices: ``[T1, N2, K]`` int32/int64, batch-local block indices or -1 (e.g. the ``topk_indices`` of
            :func:`nsa_ops.compress_attention` on the compressed keys of the same sequences).
        cu_seqlens_q, cu_seqlens_kv: ``B+1`` offsets ``0 = cu[0] <= cu[1] <= ...`` (lists/tuples, or 1-D
            int32/int64 CPU tensors: then nothing is recompiled under torch.compile for new lengths);
            ``cu_seqlens_q[-1] = T1``, ``cu_seqlens_kv[-1] <= T2``.
        select_block_size: ``l' >= 1``: block x of a batch covers its key positions ``[x l', (x+1) l')``.
        scale: multiplies q.k (used as float32); default ``1 / sqrt(D)``; must be finite.
        causal: key position p is visible to local query position s only if p <= s (top-left aligned).

    Returns:
        :class:`SelectAttentionOutput` ``(attention_out, softmax_max, softmax_sum)``.

    Raises:
        TypeError / ValueError: malformed Python arguments (the message names the argument).
        RuntimeError: other violations of §7, from the operator (the message names the argument).
    """
    _check_tensor(query, "query", "[T1, N1, D]")
    _check_tensor(key, "key", "[T2, N2, D]")
    _check_tensor(value, "value", "[T2, N2, Dv]")
    _check_tensor(topk_indices, "topk_indices", "[T1, N2, K]")
    lp = int_arg(select_block_size, "select_block_size")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    query, key, value, scale = attention_scale_and_inputs(query, key, value, scale)
    qlen = _cu_for_op(cu_seqlens_q, "cu_seqlens_q")
    kvlen = _cu_for_op(cu_seqlens_kv, "cu_seqlens_kv")
    if isinstance(qlen, list) and isinstance(kvlen, list) and len(qlen) != len(kvlen):
        raise ValueError(f"cu_seqlens_kv must have as many entries as cu_seqlens_q ({len(qlen) + 1}), got "
                         f"{len(kvlen) + 1}")
    # torch_npu's switch: any 2-D bool tensor turns causal masking on; its contents are never read
    mask = torch.empty((0, 0), dtype=torch.bool, device=query.device) if causal else None
    out = npu_nsa_select_attention(query, key, value, topk_indices, scale, query.shape[1], lp,
                                   topk_indices.shape[2], atten_mask=mask, actual_seq_qlen=qlen,
                                   actual_seq_kvlen=kvlen)
    return SelectAttentionOutput(*out)
