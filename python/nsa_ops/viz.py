"""Pictures of the operator's block selection (needs matplotlib: ``pip install matplotlib``).

:func:`plot_selection` draws ``topk_indices`` as a heat map: query position down the y axis, selection block
index along the x axis, a cell coloured when the block is in that query's top-k. Blocks forced by
``topk_mask`` get their own colour, and so do slots that docs/spec/compress_attention.md §5 fills with blocks of score 0 (a query that sees
fewer than K blocks gets the remaining slots in ascending index order; consumers must mask those) and the picks of
rows that see no compressed token at all (uniform P). The legend names every colour shown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["MissingDependency", "require_matplotlib", "plot_selection", "zero_score_blocks", "fully_masked_rows"]

COLORS = {
    "none": (1.0, 1.0, 1.0),          # not selected
    "selected": (0.12, 0.31, 0.60),   # in the top-k by its score
    "forced": (0.95, 0.56, 0.17),     # forced by topk_mask (and so in the top-k)
    "forced_out": (0.99, 0.85, 0.71),  # forced but left out (more than K forced blocks, docs/spec/compress_attention.md §5)
    "filler": (0.72, 0.72, 0.72),     # in the top-k with score 0 (fewer than K scored blocks, docs/spec/compress_attention.md §5)
    "masked_row": (0.80, 0.33, 0.55),  # in the top-k of a row that sees no compressed token (fully masked, §5)
}
LABELS = {
    "none": "not selected",
    "selected": "selected (top-k by score)",
    "forced": "forced by topk_mask",
    "forced_out": "forced, not kept (more than K forced)",
    "filler": "filler: score 0, fills the remaining slots (§5)",
    "masked_row": "row sees no compressed token (atten_mask removes all): uniform P, so these picks "
                  "(future blocks included) carry no information (§5)",
}


class MissingDependency(ImportError):
    """An optional package that a feature needs is not installed (the message says how to install it)."""


def require_matplotlib():
    """Returns (Figure, FigureCanvasAgg, Patch) or raises MissingDependency with the install command."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise MissingDependency("this needs matplotlib, which is not installed: pip install matplotlib "
                                "(or pip install 'nsa-ops[plot]')") from None
    return Figure, FigureCanvasAgg, Patch


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"{name} must be a torch.Tensor or a NumPy array, got {type(x).__name__}")


def zero_score_blocks(atten_mask: Optional[torch.Tensor], num_rows: int, cmp_len: int, compress_block_size: int,
                      compress_stride: int, select_block_size: int) -> torch.Tensor:
    """Bool ``[num_rows, Sel]``: True where selection block k of row s necessarily scores 0 (docs/spec/compress_attention.md §3.5).

    Block k sums P over the compressed tokens ``c = M(k+1) - i``, ``0 <= i <= M+N-2`` (``c < cmp_len``); it
    scores 0 when atten_mask removes all of them from row s (and the row is not fully masked: a fully masked
    row has the uniform P of docs/spec/compress_attention.md §5, so every block with a token scores). One batch: rows are positions
    inside it, ``cmp_len`` its compressed length.
    """
    M = select_block_size // compress_stride
    N = compress_block_size // compress_stride
    sel = -(-cmp_len // M)
    c = torch.arange(cmp_len).unsqueeze(1)
    k = torch.arange(sel).unsqueeze(0)
    i = M * (k + 1) - c
    touches = ((i >= 0) & (i <= M + N - 2)).float()  # [C, Sel]
    if atten_mask is None:
        visible = torch.ones(num_rows, cmp_len)
    else:
        am = _as_tensor(atten_mask, "atten_mask")[:num_rows, :cmp_len].bool()
        visible = (~am).float()
        visible[am.all(dim=1)] = 1.0  # fully masked rows: uniform P
    return (visible @ touches) == 0


def fully_masked_rows(atten_mask: Any, num_rows: int, cmp_len: int) -> torch.Tensor:
    """Bool ``[num_rows]``: True where atten_mask removes every one of the batch's ``cmp_len`` compressed tokens
    from the row (docs/spec/compress_attention.md §5: uniform P; with the causal mask of §9 the rows
    ``t < l - 1``). One batch: rows are positions inside it."""
    am = _as_tensor(atten_mask, "atten_mask")[:num_rows, :cmp_len].bool()
    return am.all(dim=1)


def plot_selection(topk_indices: Any, topk_mask: Any = None, kv_head: int = 0, path: str | Path = "selection.png",
                   *, actual_seq_qlen: Optional[list] = None, num_blocks: Optional[int] = None,
                   zero_score: Any = None, masked_rows: Any = None, title: Optional[str] = None,
                   dpi: int = 150) -> Path:
    """Writes a PNG heat map of the top-k selection of one KV head and returns its path.

    topk_indices: ``[T, N2, K]`` int (the operator's output; torch tensor or NumPy array).
    topk_mask: optional ``[maxSq, maxSel]`` bool, the operator's input: forced blocks get their own colour.
        Rows are positions inside a batch (see actual_seq_qlen).
    kv_head: which KV head ``n2`` to draw.
    path: where to write the PNG (parent directories are created).
    actual_seq_qlen: prefix sums of the query lengths when T packs several batches (rows of topk_mask are
        then looked up by the position inside the batch; batch boundaries are drawn). Default: one batch.
    num_blocks: width of the x axis (default: the largest index + 1, or topk_mask's width).
    zero_score: optional bool ``[T, Sel]`` (rows as in topk_indices), True where a block scores 0 for that
        query (e.g. from :func:`zero_score_blocks`): selected such blocks are drawn as docs/spec/compress_attention.md §5 fillers.
    masked_rows: optional bool ``[T]``, True for rows that see no compressed token (e.g. from
        :func:`fully_masked_rows`): their selected, not forced blocks get a colour of their own (their P is
        uniform, so the top-k holds the first blocks by the §3.5 weights, future ones included).
    Every colour in the picture has a legend entry (white: not selected).
    Raises MissingDependency when matplotlib is not installed.
    """
    Figure, FigureCanvasAgg, Patch = require_matplotlib()
    topk = _as_tensor(topk_indices, "topk_indices").to(torch.int64)
    if topk.dim() != 3:
        raise ValueError(f"topk_indices must be [T, N2, K], got shape {list(topk.shape)}")
    T, N2, K = topk.shape
    if not 0 <= kv_head < N2:
        raise ValueError(f"kv_head must be in [0, {N2}), got {kv_head}")
    forced_mask = None if topk_mask is None else _as_tensor(topk_mask, "topk_mask").bool()
    width = num_blocks
    if width is None:
        width = int(topk.max()) + 1 if topk.numel() else 1
        if forced_mask is not None:
            width = max(width, forced_mask.shape[1])
    seq = list(actual_seq_qlen) if actual_seq_qlen is not None else [T]
    if seq[-1] != T:
        raise ValueError(f"actual_seq_qlen[-1] must equal T = {T}, got {seq[-1]}")
    pos = torch.empty(T, dtype=torch.int64)  # position of each row inside its batch
    prev = 0
    for end in seq:
        pos[prev:end] = torch.arange(end - prev)
        prev = end

    sel = torch.zeros(T, width, dtype=torch.bool)
    idx = topk[:, kv_head, :]
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= width):
        raise ValueError(f"topk_indices hold blocks outside [0, {width}) (num_blocks)")
    sel.scatter_(1, idx, True)
    forced = torch.zeros(T, width, dtype=torch.bool)
    if forced_mask is not None:
        w = min(width, forced_mask.shape[1])
        if T and int(pos.max()) >= forced_mask.shape[0]:
            raise ValueError(f"topk_mask has {forced_mask.shape[0]} rows; a batch has {int(pos.max()) + 1}")
        forced[:, :w] = forced_mask[pos, :w]
    zs = torch.zeros(T, width, dtype=torch.bool)
    if zero_score is not None:
        z = _as_tensor(zero_score, "zero_score").bool()
        w = min(width, z.shape[1])
        zs[:, :w] = z[:, :w]

    mr = torch.zeros(T, 1, dtype=torch.bool)
    if masked_rows is not None:
        m = _as_tensor(masked_rows, "masked_rows").bool().reshape(-1)
        if m.shape[0] != T:
            raise ValueError(f"masked_rows must have T = {T} entries, got {m.shape[0]}")
        mr = m.unsqueeze(1)

    # 0 none, 1 selected, 2 forced, 3 forced_out, 4 filler, 5 selected in a fully masked row
    cat = np.zeros((T, width), dtype=np.int8)
    cat[(sel & ~forced).numpy()] = 1
    cat[(sel & ~forced & zs).numpy()] = 4
    cat[(sel & ~forced & mr).numpy()] = 5
    cat[(sel & forced).numpy()] = 2
    cat[(~sel & forced).numpy()] = 3
    keys = ["none", "selected", "forced", "forced_out", "filler", "masked_row"]
    palette = np.array([COLORS[k] for k in keys], dtype=np.float32)
    img = palette[cat]

    height = min(12.0, max(4.0, 3.0 + T / 300))
    fig = Figure(figsize=(min(14.0, max(6.0, 3.0 + width * 0.18)), height), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(img, aspect="auto", interpolation="nearest", extent=(-0.5, width - 0.5, T - 0.5, -0.5))
    ax.set_xlabel("selection block index k (the operator's topk_indices value)")
    ax.set_ylabel("query position t")
    step = max(1, width // 16)
    ax.set_xticks(range(0, width, step))
    for end in seq[:-1]:
        ax.axhline(end - 0.5, color="black", linewidth=0.8)
    ax.set_title(title or f"top-{K} selection blocks of KV head {kv_head} ({T} queries, {width} blocks)",
                 fontsize=10)
    present = sorted({int(v) for v in np.unique(cat)})
    handles = [Patch(facecolor=COLORS[keys[v]], edgecolor="0.4", label=LABELS[keys[v]]) for v in present]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=1, fontsize=8,
              frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
