"""Python entry point of the decode-time compressed-cache update (torch.ops.nsa.compress_infer); the contract is
docs/spec/decode.md §2.

* :func:`npu_nsa_compress_infer`: drop-in for ``torch_npu.npu_nsa_compress_infer`` (its ``.cache`` overload): the
  same signature, argument order, keyword-only arguments and defaults; ``cache`` is updated in place and returned.

The operator has no derivative (§2): calling it with an input, weight or cache that requires gradients while
gradient mode is on raises a RuntimeError (call it under ``torch.no_grad()`` / ``torch.inference_mode()`` or pass
detached tensors), so that no backward can silently pass through it.
"""

from __future__ import annotations

import torch

from .._args import optional_int_list
from .._lib import load_library

load_library()

__all__ = ["npu_nsa_compress_infer"]


def check_no_grad(op: str, section: str, **tensors) -> None:
    """RuntimeError naming the first tensor that requires gradients while grad mode is on (decode operators have
    no derivative, docs/spec/decode.md ``section``)."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise RuntimeError(
                f"{op} has no derivative (docs/spec/decode.md {section}), but {name} requires grad: call it under "
                f"torch.no_grad() or torch.inference_mode(), or pass {name}.detach()")


def npu_nsa_compress_infer(input, weight, slot_mapping, compress_block_size, compress_stride, page_block_size, *,
                           block_table=None, actual_seq_len=None, cache):
    """Drop-in replacement for ``torch_npu.npu_nsa_compress_infer`` (``.cache`` overload; docs/spec/decode.md §2).

    Args:
        input: ``[num_pages, page_block_size, N, D]`` the paged raw key (or value) cache; bfloat16 / float16
            (float32, float64: extensions); any strides.
        weight: ``[compress_block_size, N]``, input's dtype.
        slot_mapping: ``[B]`` int32: the row of ``cache`` that batch ``b`` writes when it compresses this step.
        compress_block_size: the window length ``l >= 1``.
        compress_stride: ``d``, ``1 <= d <= l``.
        page_block_size: ``P``, equal to ``input.shape[1]``.
        block_table: ``[B, max_pages]`` int32 page numbers (required, although torch_npu's default is None).
        actual_seq_len: the ``B`` per-batch raw lengths ``S_b`` (NOT prefix sums), counting this step's token:
            a list/tuple of ints or a 1-D int64/int32 CPU tensor (the ``.tensor_lengths`` overload: under
            ``torch.compile`` new lengths cause no recompilation). Required.
        cache: ``[num_slots, N, D]``, input's dtype: the compressed cache, updated in place.

    Returns:
        ``cache`` itself. For every batch with ``S_b >= l`` and ``(S_b - l) % d == 0``,
        ``cache[slot_mapping[b]] = rne(sum_w weight[w] * token[S_b - l + w])`` (fp32 accumulation, rounded to
        nearest even); every other row is unchanged.

    Raises:
        RuntimeError naming the argument for every rule of §2 (pages and slots of the batches that write, distinct
        slots, lengths); nothing is written then. RuntimeError if a tensor requires grad in grad mode.
    """
    check_no_grad("npu_nsa_compress_infer", "§2", input=input, weight=weight, cache=cache)
    if isinstance(actual_seq_len, torch.Tensor):
        torch.ops.nsa.compress_infer.tensor_lengths(input, weight, slot_mapping, compress_block_size, compress_stride,
                                                    page_block_size, block_table=block_table,
                                                    actual_seq_len=actual_seq_len, cache=cache)
    else:
        torch.ops.nsa.compress_infer(input, weight, slot_mapping, compress_block_size, compress_stride,
                                     page_block_size, block_table=block_table,
                                     actual_seq_len=optional_int_list(actual_seq_len, "actual_seq_len"), cache=cache)
    return cache
