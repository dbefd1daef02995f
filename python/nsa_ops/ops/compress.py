"""Python entry points of the KV compression operator (torch.ops.nsa.compress); the contract is
docs/spec/compress.md.

* :func:`npu_nsa_compress` and :func:`npu_nsa_compress_grad`: drop-ins for ``torch_npu.npu_nsa_compress`` and
  ``torch_npu.npu_nsa_compress_grad``: the same signatures (``actual_seq_len`` keyword-only), argument order,
  defaults and outputs.
* :func:`compress`: a keyword API with FlashAttention-style ``cu_seqlens`` that also returns the compressed
  offsets ``cu_seqlens_cmp`` (a :class:`CompressOutput` named tuple), ready for
  :func:`nsa_ops.compress_attention`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Union

import torch

from .._args import check_cu_seqlens, int_arg, int_list, optional_int_list
from .._lib import load_library

load_library()

__all__ = ["CompressOutput", "npu_nsa_compress", "npu_nsa_compress_grad", "compress", "compressed_offsets"]


class CompressOutput(NamedTuple):
    """Result of :func:`compress` (docs/spec/compress.md §1, §3).

    output:         ``[R, N, D]``, input's dtype, contiguous: compressed row ``c`` of batch ``b`` is row
                    ``cu_seqlens_cmp[b] + c``.
    cu_seqlens_cmp: the ``B+1`` compressed-row offsets ``[0, C_0, C_0+C_1, ..., R]``; a list of ints when
                    ``cu_seqlens`` was a list/tuple, a 1-D tensor of its dtype when it was a tensor.
    """

    output: torch.Tensor
    cu_seqlens_cmp: Union[list, torch.Tensor]


def _lengths_for_op(actual_seq_len: Any):
    """(overload, lengths): tensors select the .tensor_lengths overload (read in the kernel: no recompilation under
    torch.compile for new values); lists/tuples/None the int[] overload."""
    if isinstance(actual_seq_len, torch.Tensor):
        return True, actual_seq_len
    return False, optional_int_list(actual_seq_len, "actual_seq_len")


def npu_nsa_compress(input, weight, compress_block_size, compress_stride, *, actual_seq_len=None):
    """Drop-in replacement for ``torch_npu.npu_nsa_compress`` (docs/spec/compress.md §1-§7).

    Args:
        input: ``[T, N, D]`` raw keys or values of all batches packed along T ("TND"); bfloat16 / float16
            (float32, float64: extensions); any strides.
        weight: ``[compress_block_size, N]``, input's dtype: ``weight[w, n]`` multiplies token ``w`` of each
            window for head ``n``.
        compress_block_size: the window length ``l >= 1``.
        compress_stride: the distance ``d`` between window starts, ``1 <= d <= l``.
        actual_seq_len: the ``B`` prefix sums of the batches' lengths (no leading zero; a leading 0 is an empty
            first batch), the last equal to T: a list/tuple of ints or a 1-D int64/int32 CPU tensor (the
            ``.tensor_lengths`` overload: under ``torch.compile`` new lengths cause no recompilation, and the
            output's first dimension is then a data-dependent size).

    Returns:
        ``output [R, N, D]``: row ``R_b + c`` = ``sum_w weight[w, n] * input[start_b + c*d + w, n, :]`` accumulated
        in fp32 and rounded half away from zero (§4); a batch with fewer than ``l`` tokens has no rows (§5).
        Differentiable with respect to ``input`` and ``weight`` (§6).

    Raises:
        RuntimeError naming the argument for every violation of §7 (including ``actual_seq_len=None``).
    """
    tensor_lengths, lengths = _lengths_for_op(actual_seq_len)
    if tensor_lengths:
        return torch.ops.nsa.compress.tensor_lengths(input, weight, compress_block_size, compress_stride, lengths)
    return torch.ops.nsa.compress(input, weight, compress_block_size, compress_stride, lengths)


def npu_nsa_compress_grad(grad, input, weight, compress_block_size, compress_stride, *, actual_seq_len=None):
    """Drop-in replacement for ``torch_npu.npu_nsa_compress_grad`` (docs/spec/compress.md §6).

    ``grad`` is the gradient of :func:`npu_nsa_compress`'s output, ``[R, N, D]`` of input's dtype (any strides); the
    other arguments are the forward's. Returns ``(input_grad [T, N, D], weight_grad [l, N])``, input's dtype,
    contiguous, rounded to nearest even; input rows no window covers get zeros.
    """
    tensor_lengths, lengths = _lengths_for_op(actual_seq_len)
    if tensor_lengths:
        return torch.ops.nsa.compress_backward.tensor_lengths(grad, input, weight, compress_block_size,
                                                              compress_stride, lengths)
    return torch.ops.nsa.compress_backward(grad, input, weight, compress_block_size, compress_stride, lengths)


def compressed_offsets(cu_seqlens: Any, compress_block_size: int, compress_stride: int):
    """``cu_seqlens_cmp`` of §3 from FlashAttention-style ``cu_seqlens`` (``B+1`` offsets starting at 0):
    ``C_b = (S_b - l) // d + 1`` for ``S_b >= l`` else 0, and the running totals with a leading 0. A list for a
    list/tuple, a tensor (same dtype and device) for a tensor: computed with tensor operations, so it traces under
    torch.compile without a graph break."""
    l = int_arg(compress_block_size, "compress_block_size")
    d = int_arg(compress_stride, "compress_stride")
    if l < 1 or d < 1 or d > l:
        raise ValueError(f"compress_block_size and compress_stride must satisfy 1 <= compress_stride <= "
                         f"compress_block_size, got {l} and {d}")
    if isinstance(cu_seqlens, torch.Tensor):
        s = cu_seqlens[1:] - cu_seqlens[:-1]
        c = torch.where(s >= l, torch.div(s - l, d, rounding_mode="floor") + 1, torch.zeros_like(s))
        return torch.cat([cu_seqlens[:1] * 0, torch.cumsum(c, 0).to(cu_seqlens.dtype)])
    cu = int_list(cu_seqlens, "cu_seqlens")
    out = [0]
    for b in range(len(cu) - 1):
        s = cu[b + 1] - cu[b]
        out.append(out[-1] + ((s - l) // d + 1 if s >= l else 0))
    return out


def compress(input: torch.Tensor, weight: torch.Tensor, *, cu_seqlens: Any, compress_block_size: int,
             compress_stride: int) -> CompressOutput:
    """KV compression of Native Sparse Attention with FlashAttention-style lengths (docs/spec/compress.md §1).

    Exactly ``npu_nsa_compress(input, weight, l, d, actual_seq_len=cu_seqlens[1:])`` plus the compressed offsets.

    Args:
        input: ``[T, N, D]`` keys or values of all batches packed along T; batch ``b`` owns rows
            ``[cu_seqlens[b], cu_seqlens[b+1])``. bfloat16 / float16 (float32, float64: extensions), any strides.
        weight: ``[compress_block_size, N]``, input's dtype.
        cu_seqlens: ``B+1`` ints, ``0 = cu[0] <= cu[1] <= ... <= cu[B] = T`` (a list/tuple, or a 1-D int32/int64
            CPU tensor: then the operator's ``.tensor_lengths`` overload runs and nothing is recompiled under
            torch.compile for new lengths).
        compress_block_size: ``l >= 1``; compress_stride: ``d``, ``1 <= d <= l``.

    Returns:
        :class:`CompressOutput` ``(output [R, N, D], cu_seqlens_cmp)``; pass ``cu_seqlens_cmp`` as
        :func:`nsa_ops.compress_attention`'s ``cu_seqlens_cmp`` (every batch needs ``S_b >= l`` there).
        Differentiable with respect to ``input`` and ``weight``.

    Raises:
        TypeError / ValueError: malformed Python arguments (the message names the argument).
        RuntimeError: other violations of §7, from the operator (the message names the argument).
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor [T, N, D], got {type(input).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor [compress_block_size, N], got {type(weight).__name__}")
    l = int_arg(compress_block_size, "compress_block_size")
    d = int_arg(compress_stride, "compress_stride")
    check_cu_seqlens(cu_seqlens, "cu_seqlens")
    if isinstance(cu_seqlens, torch.Tensor):
        # the whole list: its leading 0 is an empty first batch (§2), so this equals actual_seq_len=cu[1:]
        output = torch.ops.nsa.compress.tensor_lengths(input, weight, l, d, cu_seqlens)
    else:
        output = torch.ops.nsa.compress(input, weight, l, d, int_list(cu_seqlens, "cu_seqlens")[1:])
    return CompressOutput(output, compressed_offsets(cu_seqlens, l, d))
