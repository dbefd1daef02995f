"""Lengths and masks the way callers of the operator build them (docs/spec/compress_attention.md §2, §9).

Lengths: the operator takes *prefix sums* of per-batch lengths (``actual_seq_qlen``,
``actual_cmp_seq_kvlen``, ``actual_sel_seq_kvlen``, no leading zero). These helpers work on
per-batch lengths and convert.

Masks (docs/spec/compress_attention.md §9, the paper's convention; the operator does not enforce it): both are indexed by the
position ``t`` of a query inside its own sequence (top-left aligned, shared by all batches and
heads). They assume the queries of a batch are the tokens of the sequence itself, so that query row
``t`` of the batch is token ``t``.
"""

from __future__ import annotations

from typing import Any

import torch

from ._args import bounded_int, differences, int_arg, non_negative_lengths

__all__ = [
    "compressed_lengths",
    "selection_lengths",
    "prefix_sums",
    "lengths_from_prefix_sums",
    "make_atten_mask",
    "make_topk_mask",
]


def compressed_lengths(token_lengths: Any, compress_block_size: int, compress_stride: int) -> list[int]:
    """Compressed tokens per sequence: ``C_b = floor((L_b - l) / d) + 1`` when ``L_b >= l``, else 0.

    ``l = compress_block_size``, ``d = compress_stride``. Compressed token ``i`` summarises tokens
    ``[i*d, i*d + l)``; only complete windows exist, so a sequence shorter than ``l`` has none (and
    the operator rejects a batch with ``C_b = 0``, docs/spec/compress_attention.md §5). Example (docs/spec/compress_attention.md §8): 1024 tokens,
    l = 32, d = 16 -> 63.

    token_lengths: per-sequence token counts ``L_b`` (list, tuple or 1-D integer tensor).
    Returns a list of ints.
    """
    lengths = non_negative_lengths(token_lengths, "token_lengths")
    l, d = _window(compress_block_size, compress_stride)
    return [(L - l) // d + 1 if L >= l else 0 for L in lengths]


def _window(compress_block_size: Any, compress_stride: Any) -> tuple[int, int]:
    """(l, d) checked: ints, ``1 <= d <= l`` (a stride above the window would skip tokens: usually the two
    arguments swapped)."""
    l = bounded_int(compress_block_size, "compress_block_size", 1)
    d = bounded_int(compress_stride, "compress_stride", 1)
    if d > l:
        raise ValueError(f"compress_stride (d = {d}) must be <= compress_block_size (l = {l}): windows of l tokens "
                         f"every d tokens would skip tokens. Swapped? The order is compress_block_size (l, the "
                         f"window, e.g. 32), then compress_stride (d, e.g. 16)")
    return l, d


def selection_lengths(cmp_lengths: Any, compress_stride: int, select_block_size: int) -> list[int]:
    """Selection blocks per sequence: ``Sel_b = ceil(C_b / M)`` with ``M = select_block_size // compress_stride``.

    cmp_lengths: per-sequence compressed lengths ``C_b`` (e.g. from :func:`compressed_lengths`).
    Example (docs/spec/compress_attention.md §8): C = 63, d = 16, l' = 64 -> M = 4, Sel = 16.
    """
    lengths = non_negative_lengths(cmp_lengths, "cmp_lengths")
    d = bounded_int(compress_stride, "compress_stride", 1)
    lp = int_arg(select_block_size, "select_block_size")
    if lp <= 0 or lp % d != 0:
        raise ValueError(f"select_block_size must be a positive multiple of compress_stride ({d}), got {lp}"
                         + (" (swapped? the order is cmp_lengths, compress_stride, select_block_size)"
                            if lp > 0 and d % lp == 0 else ""))
    M = lp // d
    return [-(-c // M) for c in lengths]


def prefix_sums(lengths: Any, *, leading_zero: bool = False) -> list[int]:
    """Running totals of per-batch lengths: ``[L0, L0+L1, ...]`` (the operator's ``actual_*`` lists).

    With ``leading_zero=True`` the result starts with 0 (B+1 entries, FlashAttention's ``cu_seqlens``).
    """
    out, acc = ([0] if leading_zero else []), 0
    for x in non_negative_lengths(lengths, "lengths"):
        acc += x
        out.append(acc)
    return out


def lengths_from_prefix_sums(prefix: Any) -> list[int]:
    """Inverse of :func:`prefix_sums` (no leading zero): ``[p0, p1 - p0, ...]``; must be non-decreasing."""
    return differences(non_negative_lengths(prefix, "prefix"), "prefix")


def make_atten_mask(max_sq: int, max_c: int, compress_block_size: int, compress_stride: int, *,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Causal mask of the compressed tokens (docs/spec/compress_attention.md §9): bool ``[max_sq, max_c]``,
    **True = removed** (the opposite of scaled_dot_product_attention's boolean mask, where True keeps).

    ``atten_mask[t][i] = True`` (removed) when ``i*d + l - 1 > t``: compressed token ``i`` covers
    tokens ``[i*d, i*d + l)`` and query ``t`` may only see tokens ``<= t``. Rows
    ``t < l - 1`` are fully masked (docs/spec/compress_attention.md §5 defines their output). Example (docs/spec/compress_attention.md §8, l = 32, d = 16):
    t = 0..30 see nothing, t = 31..46 see {0}, t = 100 sees {0..4}.

    max_sq: rows (largest query count of a batch); max_c: columns (largest ``C_b``).
    """
    max_sq = bounded_int(max_sq, "max_sq", 0)
    max_c = bounded_int(max_c, "max_c", 0)
    l, d = _window(compress_block_size, compress_stride)
    t = torch.arange(max_sq, device=device).unsqueeze(1)
    i = torch.arange(max_c, device=device).unsqueeze(0)
    return i * d + (l - 1) > t


def make_topk_mask(max_sq: int, max_sel: int, select_block_size: int, *, num_init: int = 1, num_local: int = 2,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Forced selection blocks (docs/spec/compress_attention.md §9): bool ``[max_sq, max_sel]``, True = forced into the top-k.

    Selection block ``k`` (the operator's index) covers tokens ``[k*l', (k+1)*l')``, ``l' =
    select_block_size``. Row ``t`` forces

    * the ``num_init`` initial blocks ``k < num_init`` (the paper: 1), and
    * the ``num_local`` local blocks ending at the block that holds ``t``:
      ``t//l' - num_local < k <= t//l'`` (the paper: 2, i.e. ``{t//l' - 1, t//l'}``),

    clipped to ``[0, max_sel)``. Example: l' = 64, t = 100 forces {0, 1} (block 0 twice);
    t = 300 forces {0, 3, 4}.
    """
    max_sq = bounded_int(max_sq, "max_sq", 0)
    max_sel = bounded_int(max_sel, "max_sel", 0)
    lp = bounded_int(select_block_size, "select_block_size", 1)
    num_init = bounded_int(num_init, "num_init", 0)
    num_local = bounded_int(num_local, "num_local", 0)
    cur = (torch.arange(max_sq, device=device) // lp).unsqueeze(1)
    k = torch.arange(max_sel, device=device).unsqueeze(0)
    return (k < num_init) | ((k <= cur) & (k > cur - num_local))
