"""Python entry points of the operator (torch.ops.nsa.compress_attention); the contract is docs/spec/compress_attention.md.

* :func:`npu_nsa_compress_attention`: a drop-in for ``torch_npu.npu_nsa_compress_attention``: the same
  signature, argument order, defaults and output order.
* :func:`compress_attention`: a keyword API with FlashAttention-style ``cu_seqlens`` and a default scale,
  returning a :class:`CompressAttentionOutput` named tuple.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch

from .._args import cu_seqlens_list, int_arg, int_list, optional_int_list
from .._lib import load_library

load_library()

__all__ = ["CompressAttentionOutput", "npu_nsa_compress_attention", "compress_attention", "cpu_isa"]


def cpu_isa() -> tuple[str, str]:
    """The CPU backend's instruction-set paths ``(detected, active)``: what cpuid + XCR0 allow, and what runs
    after the ``NSA_CPU_ISA=scalar|avx2|avx512|avx512bf16`` cap (read once per process)."""
    detected, active = torch.ops.nsa.cpu_isa()
    return detected, active


class CompressAttentionOutput(NamedTuple):
    """Outputs of the operator (docs/spec/compress_attention.md §4), in torch_npu's order.

    attention_out: ``[T, N1, D2]``, query's dtype, contiguous.
    topk_indices:  ``[T, N2, K]`` int32, selection-block indices local to the batch, in ``[0, Sel_b)``,
                   by descending importance (ties: smaller index first).
    softmax_max:   ``[T, N1, 8]`` float32, the row maxima of the scores, per-batch memory layout
                   (see :mod:`nsa_ops.stats`).
    softmax_sum:   ``[T, N1, 8]`` float32, the softmax denominators, same layout.
    """

    attention_out: torch.Tensor
    topk_indices: torch.Tensor
    softmax_max: torch.Tensor
    softmax_sum: torch.Tensor


def npu_nsa_compress_attention(query, key, value, scale_value, head_num, compress_block_size, compress_stride,
                               select_block_size, select_block_count, topk_mask=None, atten_mask=None,
                               actual_seq_qlen=None, actual_cmp_seq_kvlen=None, actual_sel_seq_kvlen=None):
    """Drop-in replacement for ``torch_npu.npu_nsa_compress_attention`` (docs/spec/compress_attention.md §1-§6).

    Arguments as in torch_npu: ``query [T, N1, D]``, ``key [T2, N2, D]``, ``value [T2, N2, D2]`` (bf16,
    fp16; fp32 and fp64 as extensions; any strides), ``scale_value`` (float), ``head_num`` (= N1), the
    block sizes ``compress_block_size`` (l), ``compress_stride`` (d), ``select_block_size`` (l'),
    ``select_block_count`` (K), optional bool/uint8 masks ``topk_mask [maxSq, maxSel]`` and
    ``atten_mask [maxSq, maxC]``, and the per-batch prefix sums ``actual_seq_qlen``,
    ``actual_cmp_seq_kvlen`` and (optional, checked) ``actual_sel_seq_kvlen``: lists/tuples of ints
    or 1-D int64/int32 CPU tensors. Tensors select the operator's ``.tensor_lengths`` overload, which
    reads them inside the kernel: under ``torch.compile`` new lengths then cause no recompilation.

    Returns the tuple ``(attention_out, topk_indices, softmax_max, softmax_sum)``; see
    :class:`CompressAttentionOutput`. Violations of docs/spec/compress_attention.md §6 raise RuntimeError naming the argument.
    """
    lengths = (actual_seq_qlen, actual_cmp_seq_kvlen, actual_sel_seq_kvlen)
    if any(isinstance(x, torch.Tensor) for x in lengths):
        # Lengths as tensors: the .tensor_lengths overload reads them in the kernel, so under
        # torch.compile new lengths are new inputs, not new constants (no recompilation).
        return torch.ops.nsa.compress_attention.tensor_lengths(
            query, key, value, scale_value, head_num, compress_block_size, compress_stride, select_block_size,
            select_block_count, topk_mask, atten_mask,
            *(_lengths_tensor(x, name) for x, name in zip(lengths, _LENGTH_NAMES)))
    return torch.ops.nsa.compress_attention(
        query, key, value, scale_value, head_num, compress_block_size, compress_stride, select_block_size,
        select_block_count, topk_mask, atten_mask,
        optional_int_list(actual_seq_qlen, "actual_seq_qlen"),
        optional_int_list(actual_cmp_seq_kvlen, "actual_cmp_seq_kvlen"),
        optional_int_list(actual_sel_seq_kvlen, "actual_sel_seq_kvlen"))


_LENGTH_NAMES = ("actual_seq_qlen", "actual_cmp_seq_kvlen", "actual_sel_seq_kvlen")


def _lengths_tensor(value: Any, name: str) -> Optional[torch.Tensor]:
    """A prefix-sum list as a 1-D int64 CPU tensor for the .tensor_lengths overload (tensors pass unchanged;
    their rank, dtype and device are checked by the operator)."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    return torch.tensor(int_list(value, name), dtype=torch.int64)


def _check_tensor(t: Any, name: str, rank: int, layout: str, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must be a {rank}-D tensor {layout}, got shape {list(t.shape)}")


def compress_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                       cu_seqlens_q: Any, cu_seqlens_cmp: Any, compress_block_size: int, compress_stride: int,
                       select_block_size: int, select_block_count: int, scale: Optional[float] = None,
                       atten_mask: Optional[torch.Tensor] = None, topk_mask: Optional[torch.Tensor] = None
                       ) -> CompressAttentionOutput:
    """Compressed attention of Native Sparse Attention with top-k block selection (docs/spec/compress_attention.md).

    Batches are packed along the first dimension ("TND", as in FlashAttention's varlen API);
    batch ``b`` owns query rows ``[cu_seqlens_q[b], cu_seqlens_q[b+1])`` and compressed key/value rows
    ``[cu_seqlens_cmp[b], cu_seqlens_cmp[b+1])``. Names: ``l = compress_block_size``, ``d =
    compress_stride``, ``l' = select_block_size``, ``K = select_block_count``, ``M = l'/d``,
    ``G = N1/N2``; ``Sq_b`` and ``C_b`` are the batch's query and compressed-token counts,
    ``Sel_b = ceil(C_b/M)`` its selection blocks; ``maxSq``, ``maxC``, ``maxSel`` their maxima.

    Args:
        query: ``[T, N1, D]``, bfloat16 / float16 (float32, float64: extensions), any strides.
            Query head ``h`` reads key/value head ``h // G``.
        key: ``[T2, N2, D]`` compressed keys, query's dtype, any strides. Rows past
            ``cu_seqlens_cmp[-1]`` are ignored.
        value: ``[T2, N2, D2]`` compressed values, ``D2 <= D``, query's dtype, any strides.
        cu_seqlens_q: ``B+1`` ints (list, tuple or 1-D integer tensor), ``0 = cu[0] <= cu[1] <= ...``,
            ``cu[-1] = T``. Empty batches (``Sq_b = 0``) are allowed.
        cu_seqlens_cmp: ``B+1`` ints, same convention, ``cu[-1] <= T2``; every ``C_b >= 1``
            (see :func:`nsa_ops.compressed_lengths`).
        compress_block_size, compress_stride, select_block_size: multiples of 16 with
            ``16 <= d <= l <= l' <= 128``, ``d <= 64``, ``l' % d == 0``.
        select_block_count: ``K`` in ``[1, 32]``, ``K <= min_b Sel_b``.
        scale: multiplies ``q . k`` (used as float32); default ``1 / sqrt(D)``; must be finite.
        atten_mask: optional ``[maxSq, maxC]`` bool/uint8, any strides; True removes compressed token
            ``c`` from the softmax of query row ``s`` (position inside its batch, shared by batches and
            heads). See :func:`nsa_ops.make_atten_mask`. A fully masked row gives the mean of the
            batch's values (docs/spec/compress_attention.md §5).
        topk_mask: optional ``[maxSq, maxSel]`` bool/uint8; True forces block ``k`` into the top-k of
            row ``s``. See :func:`nsa_ops.make_topk_mask`.

    Returns:
        :class:`CompressAttentionOutput` ``(attention_out [T, N1, D2] query dtype, topk_indices
        [T, N2, K] int32, softmax_max [T, N1, 8] float32, softmax_sum [T, N1, 8] float32)``. The
        statistics use the per-batch memory layout of docs/spec/compress_attention.md §4: read them with
        :func:`nsa_ops.softmax_stats_view` / :func:`nsa_ops.softmax_stats_dense` (``cu_seqlens_q=``).

    Raises:
        TypeError / ValueError: malformed Python arguments (the message names the argument).
        RuntimeError: other violations of docs/spec/compress_attention.md §6, from the operator (the message names the argument).
    """
    _check_tensor(query, "query", 3, "[T, N1, D]")
    _check_tensor(key, "key", 3, "[T2, N2, D]")
    _check_tensor(value, "value", 3, "[T2, N2, D2]")
    _check_tensor(atten_mask, "atten_mask", 2, "[maxSq, maxC]", optional=True)
    _check_tensor(topk_mask, "topk_mask", 2, "[maxSq, maxSel]", optional=True)
    cu_q = cu_seqlens_list(cu_seqlens_q, "cu_seqlens_q")
    cu_c = cu_seqlens_list(cu_seqlens_cmp, "cu_seqlens_cmp")
    if len(cu_c) != len(cu_q):
        raise ValueError(f"cu_seqlens_cmp must have as many entries as cu_seqlens_q ({len(cu_q)}), got {len(cu_c)}")
    if cu_q[-1] != query.shape[0]:
        raise ValueError(f"cu_seqlens_q[-1] must equal the number of query rows T = {query.shape[0]}, got {cu_q[-1]}")
    if cu_c[-1] > key.shape[0]:
        raise ValueError(f"cu_seqlens_cmp[-1] must be <= the number of key rows T2 = {key.shape[0]}, got {cu_c[-1]}")
    for b in range(len(cu_c) - 1):
        if cu_c[b + 1] == cu_c[b]:
            raise ValueError(f"cu_seqlens_cmp must give every batch at least one compressed token; batch {b} has none")
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[2]) if query.shape[2] > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a float, got {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    out = torch.ops.nsa.compress_attention(
        query, key, value, scale, query.shape[1],
        int_arg(compress_block_size, "compress_block_size"), int_arg(compress_stride, "compress_stride"),
        int_arg(select_block_size, "select_block_size"), int_arg(select_block_count, "select_block_count"),
        topk_mask, atten_mask, cu_q[1:], cu_c[1:], None)
    return CompressAttentionOutput(*out)
