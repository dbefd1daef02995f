"""Pieces shared by the operators' autograd formulas (torch.library.register_autograd)."""

from __future__ import annotations

import torch


def save_with_lengths(ctx, saved: list, seq_q, seq_kv) -> None:
    """Saves `saved` plus the two length lists: as tensors when they are tensors (the .tensor_lengths overloads;
    no recompilation under torch.compile), else as Python values on ctx.lengths. Sets ctx.tensor_lengths."""
    ctx.tensor_lengths = isinstance(seq_q, torch.Tensor)
    if ctx.tensor_lengths:
        saved = saved + [seq_q, seq_kv]
    else:
        ctx.lengths = (seq_q, seq_kv)
    ctx.save_for_backward(*saved)
