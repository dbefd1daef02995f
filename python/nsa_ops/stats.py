"""Reading and writing the softmax statistics in the operator's layout (docs/spec/compress_attention.md §4).

``softmax_max`` and ``softmax_sum`` are declared ``[T, N1, 8]`` float32 but their memory is laid out
per batch: batch ``b`` occupies the contiguous float range starting at ``8 * N1 * q_b`` (``q_b`` =
query rows of the batches before ``b``), ordered ``[N1][Sq_b][8]``, every value repeated 8 times.
So ``stats[t, h, :]`` is NOT the statistic of query row ``t`` and head ``h`` unless N1 = 1 (or every batch has a single row): even for B = 1 the memory is [N1][T][8].
These helpers translate.

The query lengths are given in exactly one of two conventions, by keyword:
``actual_seq_qlen`` (the operator's prefix sums, B entries, no leading 0) or ``cu_seqlens_q``
(FlashAttention's, B+1 entries starting at 0).
"""

from __future__ import annotations

from typing import Any

import torch

from ._args import cu_seqlens_list, differences, int_list

__all__ = ["query_lengths", "softmax_stats_view", "softmax_stats_dense", "softmax_stats_pack"]


def query_lengths(actual_seq_qlen: Any = None, *, cu_seqlens_q: Any = None) -> list[int]:
    """Per-batch query counts ``Sq_b`` from either convention (exactly one must be given)."""
    if (actual_seq_qlen is None) == (cu_seqlens_q is None):
        raise ValueError("give exactly one of actual_seq_qlen (prefix sums) and cu_seqlens_q (leading 0)")
    if cu_seqlens_q is not None:
        return differences(cu_seqlens_list(cu_seqlens_q, "cu_seqlens_q"), "cu_seqlens_q")[1:]
    prefix = int_list(actual_seq_qlen, "actual_seq_qlen")
    if len(prefix) < 1:
        raise ValueError("actual_seq_qlen must have at least one element")
    return differences(prefix, "actual_seq_qlen")


def _check_stats(stats: torch.Tensor, lengths: list[int], name: str = "stats") -> tuple[int, int]:
    if not isinstance(stats, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(stats).__name__}")
    if stats.dim() != 3 or stats.shape[2] != 8:
        raise ValueError(f"{name} must have shape [T, N1, 8], got {list(stats.shape)}")
    T, N1 = stats.shape[0], stats.shape[1]
    if sum(lengths) != T:
        raise ValueError(f"the query lengths sum to {sum(lengths)} but {name} has T = {T} rows")
    return T, N1


def softmax_stats_view(stats: torch.Tensor, actual_seq_qlen: Any = None, *, cu_seqlens_q: Any = None
                       ) -> list[torch.Tensor]:
    """Per-batch views ``[N1, Sq_b]`` of a statistic (the first of its 8 copies), without copying.

    stats: ``softmax_max`` or ``softmax_sum`` as returned, ``[T, N1, 8]`` float32, contiguous.
    Returns B tensors; entry ``b`` is ``[N1, Sq_b]`` with element ``[h, s]`` the statistic of query
    row ``s`` of batch ``b`` and head ``h`` (views: writing to them writes ``stats``).
    """
    lengths = query_lengths(actual_seq_qlen, cu_seqlens_q=cu_seqlens_q)
    _, N1 = _check_stats(stats, lengths)
    if not stats.is_contiguous():
        raise ValueError("stats must be contiguous (the layout of docs/spec/compress_attention.md §4 is a memory layout)")
    flat = stats.view(-1)
    out, begin = [], 0
    for sq in lengths:
        n = 8 * N1 * sq
        out.append(flat[begin:begin + n].view(N1, sq, 8)[:, :, 0])
        begin += n
    return out


def softmax_stats_dense(stats: torch.Tensor, actual_seq_qlen: Any = None, *, cu_seqlens_q: Any = None
                        ) -> torch.Tensor:
    """The statistic in the natural layout: a new ``[T, N1]`` tensor, ``[t, h]`` for query row ``t``, head ``h``."""
    views = softmax_stats_view(stats, actual_seq_qlen, cu_seqlens_q=cu_seqlens_q)
    if not views:
        return stats.new_empty((0, stats.shape[1]))
    return torch.cat([v.t() for v in views], dim=0)


def softmax_stats_pack(dense: torch.Tensor, actual_seq_qlen: Any = None, *, cu_seqlens_q: Any = None
                       ) -> torch.Tensor:
    """Inverse of :func:`softmax_stats_dense`: ``[T, N1]`` -> ``[T, N1, 8]`` float32 in the layout of docs/spec/compress_attention.md §4.

    Use it to hand statistics computed elsewhere to code that expects the operator's layout (the backward).
    """
    if not isinstance(dense, torch.Tensor) or dense.dim() != 2:
        raise ValueError("dense must be a 2-D tensor [T, N1]")
    lengths = query_lengths(actual_seq_qlen, cu_seqlens_q=cu_seqlens_q)
    T, N1 = dense.shape
    if sum(lengths) != T:
        raise ValueError(f"the query lengths sum to {sum(lengths)} but dense has T = {T} rows")
    parts, begin = [], 0
    for sq in lengths:
        blk = dense[begin:begin + sq].t().to(torch.float32)  # [N1, Sq_b]
        parts.append(blk.unsqueeze(-1).expand(N1, sq, 8).reshape(-1))
        begin += sq
    flat = torch.cat(parts) if parts else dense.new_empty((0,), dtype=torch.float32)
    return flat.view(T, N1, 8)
