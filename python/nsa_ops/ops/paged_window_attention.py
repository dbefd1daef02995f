"""Python entry point of the paged decode sliding-window attention (torch.ops.nsa.paged_window_attention); the
contract is docs/spec/decode.md §9 (no NPU counterpart), with the roundings of docs/spec/window_attention.md §5.

The operator has no derivative: differentiating through it raises a RuntimeError that says so.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .._args import attention_scale_and_inputs, int_arg, int_list
from .._lib import load_library
from ._autograd_common import register_no_derivative

load_library()

__all__ = ["paged_window_attention"]

def _check_tensor(t: Any, name: str, rank: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must be a {rank}-D tensor {layout}, got shape {list(t.shape)}")


def _length_arg(value: Any, name: str, optional: bool):
    """A per-batch length list as the operator takes it: a 1-D tensor as it is (checked by the operator), anything
    else as a list of Python ints (errors name `name`)."""
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must be given: the per-batch lengths (a list of ints or a 1-D integer tensor)")
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be a 1-D int32/int64 tensor or a list of ints, got a {value.dim()}-D "
                             f"tensor of dtype {value.dtype}")
        return value
    return int_list(value, name)


def paged_window_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: Any, window: int, *, scale: Optional[float] = None,
                           query_lens: Any = None) -> torch.Tensor:
    """Sliding-window attention of one decode step over paged key/value caches (docs/spec/decode.md §9).

    Args:
        query: ``[T, N1, D]``, this step's query tokens of all batches packed (``T = sum(query_lens)``); bf16,
            fp16, fp32 (fp64: extension); any strides.
        key_cache: ``[num_pages, P, N2, D]``; value_cache: ``[num_pages, P, N2, Dv]``; query's dtype;
            ``N1 % N2 == 0`` (query head h reads KV head ``h // (N1 // N2)``).
        block_table: int32 ``[B, max_pages]``: raw position p of batch b is in page ``block_table[b, p // P]``,
            row ``p % P``; entries no query token reads may hold anything (-1 padding).
        seq_lens: per-batch raw lengths S_b, this step's tokens included (a list of ints or a 1-D int32/int64 CPU
            tensor: read inside the operator, so torch.compile does not recompile for new lengths).
        window: ``>= 1``: query token i of batch b (its position ``L_i - 1``, ``L_i = S_b - (q_b - 1 - i)``) sees
            the positions ``[max(0, L_i - window), L_i)``: the last ``window`` tokens, itself included (the window of
            :func:`nsa_ops.sliding_window_attention`).
        scale: multiplies q.k (used as float32); default ``1 / sqrt(D)``.
        query_lens: per-batch query counts q_b (default 1 each); a list or a 1-D tensor like seq_lens.

    Returns:
        attention_out ``[T, N1, Dv]`` in the query's dtype: exact softmax in fp32, P and the output rounded half
        away from zero (window_attention.md §5 step 4). Not differentiable (a backward raises).

    Raises:
        TypeError / ValueError for malformed Python arguments, RuntimeError naming the argument for the rules of §9
        (lengths, pages, shapes).
    """
    _check_tensor(query, "query", 3, "[T, N1, D]")
    _check_tensor(key_cache, "key_cache", 4, "[num_pages, P, N2, D]")
    _check_tensor(value_cache, "value_cache", 4, "[num_pages, P, N2, Dv]")
    _check_tensor(block_table, "block_table", 2, "[B, max_pages]")
    window = int_arg(window, "window")
    if window < 1:
        raise ValueError(f"window must be >= 1 (the positions a query token sees, itself included), got {window}")
    query, key_cache, value_cache, scale = attention_scale_and_inputs(query, key_cache, value_cache, scale)
    s = _length_arg(seq_lens, "seq_lens", optional=False)
    q = _length_arg(query_lens, "query_lens", optional=True)
    if isinstance(s, torch.Tensor) or isinstance(q, torch.Tensor):
        if not isinstance(s, torch.Tensor):
            s = torch.tensor(s, dtype=torch.int64)
        if q is not None and not isinstance(q, torch.Tensor):
            q = torch.tensor(q, dtype=torch.int64)
        op = torch.ops.nsa.paged_window_attention.tensor_lengths
    else:
        op = torch.ops.nsa.paged_window_attention.default
    return op(query, key_cache, value_cache, block_table, s, window, scale, q)


register_no_derivative("paged_window_attention", "§9")
