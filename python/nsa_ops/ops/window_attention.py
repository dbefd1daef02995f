"""Python entry points of sliding-window attention (torch.ops.nsa.window_attention*, sliding_window_attention*);
the contract is docs/spec/window_attention.md (sections cited as §).

* :func:`npu_fusion_attention` and :func:`npu_fusion_attention_grad`: drop-ins for torch_npu's operators of the
  same names, restricted to the subset NSA uses (§2): input_layout "TND", no dropout, sparse_mode 0-4. The same
  signatures, defaults and output tuples (7 and 5 entries); any other argument value raises an error naming it.
* :func:`sliding_window_attention`: NSA's sliding-window branch with FlashAttention-style ``cu_seqlens`` (§8),
  returning a :class:`WindowAttentionOutput`.
* :func:`compressed_atten_mask`: the ``[2048, 2048]`` mask that modes 2-4 require (§4).
"""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple, Optional

import torch

from .._args import attention_scale_and_inputs, cu_seqlens_list, int_list
from .._lib import load_library

load_library()

__all__ = [
    "WindowAttentionOutput",
    "npu_fusion_attention",
    "npu_fusion_attention_grad",
    "sliding_window_attention",
    "compressed_atten_mask",
]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
COMPRESSED_MASK_SIZE = 2048


class WindowAttentionOutput(NamedTuple):
    """Outputs of :func:`sliding_window_attention` (§8).

    attention_out: ``[T, N1, Dv]``, query's dtype, contiguous.
    softmax_max:   ``[T, N1, 8]`` float32, the row maxima of the scaled scores (8 equal copies), "TND" layout:
                   the value of (row t, head h) is ``softmax_max[t, h, 0]``.
    softmax_sum:   ``[T, N1, 8]`` float32, the softmax denominators, same layout.
    """

    attention_out: torch.Tensor
    softmax_max: torch.Tensor
    softmax_sum: torch.Tensor


def compressed_atten_mask(device: Any = None, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """The NPU's compressed mask of sparse_mode 2, 3 and 4 (§4): ``triu(ones(2048, 2048), diagonal=1)``, i.e.
    entry ``[a][c]`` is 1 exactly where ``c > a``. bool (default) or uint8."""
    if dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"dtype must be torch.bool or torch.uint8, got {dtype}")
    ones = torch.ones(COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE, dtype=torch.bool, device=device)
    return torch.triu(ones, diagonal=1).to(dtype)


# ------------------------------------------------------------------------------------------------ argument checks
def _int(value: Any, name: str) -> int:
    """A Python int in int64 range (ints, NumPy ints, 0-d integer tensors; not bools or floats)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got a bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if not _INT64_MIN <= v <= _INT64_MAX:
        raise ValueError(f"{name} must fit in int64, got {v}")
    return v


def _float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype.is_floating_point:
            return float(value)
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    return float(value)


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _check_layout(input_layout: Any) -> None:
    if not isinstance(input_layout, str):
        raise TypeError(f"input_layout must be a str, got {type(input_layout).__name__}")
    if input_layout.upper() != "TND":
        raise ValueError(f"input_layout must be \"TND\" (packed varlen): nsa_ops supports only that layout of "
                         f"npu_fusion_attention, got {input_layout!r}")


def _check_softmax_layout(softmax_layout: Any) -> str:
    if not isinstance(softmax_layout, str):
        raise TypeError(f"softmax_layout must be a str, got {type(softmax_layout).__name__}")
    if softmax_layout not in ("", "TND"):
        raise ValueError(f"softmax_layout must be \"\" (per batch) or \"TND\", got {softmax_layout!r}")
    return softmax_layout


def _check_none(**kwargs: Any) -> None:
    for name, value in kwargs.items():
        if value is not None:
            raise ValueError(f"{name} is not supported by nsa_ops' npu_fusion_attention (only None is accepted), got "
                             f"{type(value).__name__}")


def _check_keep_prob(keep_prob: Any) -> None:
    if _float(keep_prob, "keep_prob") != 1.0:
        raise ValueError(f"keep_prob must be 1.0 (nsa_ops has no dropout), got {keep_prob!r}")


def _check_tensor(t: Any, name: str, rank: Optional[int] = None, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name} must be a {rank}-D tensor, got shape {list(t.shape)}")


def _lengths(q: Any, kv: Any) -> tuple[Any, Any, bool]:
    """The two prefix-sum lists: (list, list, False), or (tensor, tensor, True) when either is a tensor (the
    .tensor_lengths overload; a list beside a tensor becomes an int64 tensor)."""
    for v, name in ((q, "actual_seq_qlen"), (kv, "actual_seq_kvlen")):
        if v is None:
            raise ValueError(f"{name} must be given: the prefix sums of the per-batch lengths (input_layout \"TND\")")
    if isinstance(q, torch.Tensor) or isinstance(kv, torch.Tensor):
        def as_tensor(v: Any, name: str) -> torch.Tensor:
            if isinstance(v, torch.Tensor):
                return v
            return torch.tensor(int_list(v, name), dtype=torch.int64)
        return as_tensor(q, "actual_seq_qlen"), as_tensor(kv, "actual_seq_kvlen"), True
    return int_list(q, "actual_seq_qlen"), int_list(kv, "actual_seq_kvlen"), False


def _numels(head_num: int, q: Any, kv: Any, tensors: bool) -> Any:
    """numels of §5: N1 * (q[0] kv[0] + sum_{b>=1} (q[b] - q[b-1]) (kv[b] - kv[b-1])) on the lists as given; a 0-d
    int64 tensor when the lengths are tensors (no data-dependent value under torch.compile)."""
    if tensors:
        qt, kt = q.to(torch.int64), kv.to(torch.int64)
        n = min(qt.shape[0], kt.shape[0])
        dq = torch.diff(qt[:n], prepend=qt.new_zeros(1))
        dk = torch.diff(kt[:n], prepend=kt.new_zeros(1))
        return (dq * dk).sum() * head_num
    total = 0
    for b in range(min(len(q), len(kv))):
        dq = q[b] - (q[b - 1] if b else 0)
        dk = kv[b] - (kv[b - 1] if b else 0)
        total += dq * dk
    return head_num * total


# ------------------------------------------------------------------------------------------------ drop-ins
def _drop_in_options(head_num, scale, scale_name, pre_tockens, next_tockens, inner_precise, sparse_mode,
                     gen_mask_parallel, sync, softmax_layout):
    """The scalar options of npu_fusion_attention and its grad, checked and converted (errors name the argument):
    (head_num, scale, pre_tockens, next_tockens, inner_precise, sparse_mode, softmax_layout)."""
    head_num = _int(head_num, "head_num")
    scale = _float(scale, scale_name)
    pre, nxt = _int(pre_tockens, "pre_tockens"), _int(next_tockens, "next_tockens")
    inner_precise, sparse_mode = _int(inner_precise, "inner_precise"), _int(sparse_mode, "sparse_mode")
    _bool(gen_mask_parallel, "gen_mask_parallel")
    _bool(sync, "sync")
    return head_num, scale, pre, nxt, inner_precise, sparse_mode, _check_softmax_layout(softmax_layout)


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                         scale=1., keep_prob=1., pre_tockens=2147483647, next_tockens=2147483647, inner_precise=0,
                         prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False, softmax_layout="", sink=None, dropout_mask=None, seed=0,
                         offset=0):
    """Drop-in replacement for ``torch_npu.npu_fusion_attention``, TND subset (docs/spec/window_attention.md).

    ``query [T1, N1, D]``, ``key [T2, N2, D]``, ``value [T2, N2, Dv]`` (bf16, fp16, fp32; fp64 as an extension;
    any strides), ``head_num = N1``, ``input_layout = "TND"``. Visibility (§4): without ``atten_mask`` every key of
    the batch is visible **whatever sparse_mode, pre_tockens and next_tockens say** (as on the NPU: a band or
    causal call without its mask is silently full attention); mode 0/1 take a ``[maxSq, maxSkv]`` bool/uint8 mask
    (True = masked; mode 0 also the band ``i - pre <= j <= i + next``), modes 2/3/4 the compressed
    ``[2048, 2048]`` mask (:func:`compressed_atten_mask`, checked) and mean causal, bottom-right causal and the
    bottom-right band ``i + o - pre <= j <= i + o + next`` (o = Skv_b - Sq_b). ``actual_seq_qlen`` and
    ``actual_seq_kvlen`` (required) are prefix sums without a leading 0 (lists, or 1-D int64/int32 CPU tensors,
    read inside the kernel so that torch.compile does not recompile for new lengths). ``inner_precise`` 2 gives
    rows without a visible key zeros (0/1: the mean of the batch's values, §6). ``softmax_layout`` "" (per batch)
    or "TND" (§5).

    Returns ``(attention_out [T1, N1, Dv], softmax_max [T1, N1, 8] f32, softmax_sum [T1, N1, 8] f32,
    softmax_out (empty [0]), seed, offset, numels)``; numels is a 0-d int64 tensor when the lengths are tensors.
    Differentiable with respect to query, key and value (the gradients reaching the statistics are dropped, §1).

    Raises TypeError/ValueError for unsupported or malformed Python arguments (pse, padding_mask, prefix, sink,
    dropout_mask other than None, keep_prob != 1, another input_layout or softmax_layout), RuntimeError naming
    the argument for the other rules of §2-§4 and §9.
    """
    _check_tensor(query, "query")
    _check_tensor(key, "key")
    _check_tensor(value, "value")
    _check_tensor(atten_mask, "atten_mask", optional=True)
    _check_layout(input_layout)
    _check_none(pse=pse, padding_mask=padding_mask, prefix=prefix, sink=sink, dropout_mask=dropout_mask)
    _check_keep_prob(keep_prob)
    head_num, scale, pre, nxt, inner_precise, sparse_mode, softmax_layout = _drop_in_options(
        head_num, scale, "scale", pre_tockens, next_tockens, inner_precise, sparse_mode, gen_mask_parallel, sync,
        softmax_layout)
    seed, offset = _int(seed, "seed"), _int(offset, "offset")
    seq_q, seq_kv, tensors = _lengths(actual_seq_qlen, actual_seq_kvlen)
    op = torch.ops.nsa.window_attention.tensor_lengths if tensors else torch.ops.nsa.window_attention.default
    out, smax, ssum = op(query, key, value, head_num, scale, atten_mask, sparse_mode, pre, nxt, inner_precise, seq_q,
                         seq_kv, softmax_layout)
    softmax_out = torch.empty(0, dtype=query.dtype, device=query.device)
    return out, smax, ssum, softmax_out, seed, offset, _numels(head_num, seq_q, seq_kv, tensors)


def npu_fusion_attention_grad(query, key, value, dy, head_num, input_layout, *, pse=None, padding_mask=None,
                              atten_mask=None, softmax_max=None, softmax_sum=None, softmax_in=None, attention_in=None,
                              scale_value=1., keep_prob=1., pre_tockens=2147483647, next_tockens=2147483647,
                              inner_precise=0, seed=0, offset=0, numels=0, prefix=None, actual_seq_qlen=None,
                              actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False,
                              softmax_layout="", sink=None):
    """Drop-in replacement for ``torch_npu.npu_fusion_attention_grad``, TND subset (§7).

    The forward's arguments (with ``scale_value`` for the scale) plus ``dy [T1, N1, Dv]`` (the gradient of
    attention_out) and the forward's outputs ``attention_in`` (attention_out), ``softmax_max`` and ``softmax_sum``
    (required; element 0 of each statistics row is read, in ``softmax_layout``). ``softmax_in``, ``seed``,
    ``offset``, ``numels``, ``gen_mask_parallel`` and ``sync`` have no effect. The mask, mode, band,
    inner_precise and lengths must be the forward's for the result to be its derivative.

    Returns ``(dq, dk, dv, dpse, dsink)``: the gradients in the shapes and dtypes of query, key and value (rounded
    once, ties away from zero), an empty ``[0]`` dpse of the query's dtype and an empty ``[0]`` float32 dsink.
    Deterministic: the result does not depend on the thread count.
    """
    _check_tensor(query, "query")
    _check_tensor(key, "key")
    _check_tensor(value, "value")
    _check_tensor(dy, "dy")
    _check_tensor(atten_mask, "atten_mask", optional=True)
    for t, name in ((softmax_max, "softmax_max"), (softmax_sum, "softmax_sum"), (attention_in, "attention_in")):
        if t is None:
            raise ValueError(f"{name} must be given: npu_fusion_attention_grad needs the forward's softmax_max, "
                             "softmax_sum and attention_out (as attention_in)")
        _check_tensor(t, name)
    _check_tensor(softmax_in, "softmax_in", optional=True)
    _check_layout(input_layout)
    _check_none(pse=pse, padding_mask=padding_mask, prefix=prefix, sink=sink)
    _check_keep_prob(keep_prob)
    head_num, scale, pre, nxt, inner_precise, sparse_mode, softmax_layout = _drop_in_options(
        head_num, scale_value, "scale_value", pre_tockens, next_tockens, inner_precise, sparse_mode, gen_mask_parallel,
        sync, softmax_layout)
    _int(seed, "seed")
    _int(offset, "offset")
    if not (isinstance(numels, torch.Tensor) and numels.dim() == 0 and not numels.dtype.is_floating_point):
        _int(numels, "numels")
    seq_q, seq_kv, tensors = _lengths(actual_seq_qlen, actual_seq_kvlen)
    op = (torch.ops.nsa.window_attention_backward.tensor_lengths if tensors
          else torch.ops.nsa.window_attention_backward.default)
    dq, dk, dv = op(dy, query, key, value, attention_in, softmax_max, softmax_sum, head_num, scale, atten_mask,
                    sparse_mode, pre, nxt, inner_precise, seq_q, seq_kv, softmax_layout)
    dpse = torch.empty(0, dtype=query.dtype, device=query.device)
    dsink = torch.empty(0, dtype=torch.float32, device=query.device)
    return dq, dk, dv, dpse, dsink


# ------------------------------------------------------------------------------------------------ Pythonic
def sliding_window_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: Any,
                             window: int, *, scale: Optional[float] = None) -> WindowAttentionOutput:
    """Causal sliding-window attention of Native Sparse Attention's window branch (§8), on packed sequences.

    Args:
        query: ``[T, N1, D]``; key ``[T, N2, D]``; value ``[T, N2, Dv]`` with ``Dv <= D``, ``N1 % N2 == 0`` (query
            head h reads key/value head ``h // (N1 // N2)``); bf16, fp16, fp32 (fp64: extension); any strides.
        cu_seqlens: ``B+1`` ints, a leading 0, non-decreasing, the last equal to T (list, tuple, or a 1-D int64/int32
            CPU tensor: read inside the operator, so torch.compile does not recompile when only the lengths
            change). Queries and keys share it (self-attention); empty sequences are allowed.
        window: ``>= 1``: the query at position i of its sequence sees the keys ``max(0, i - window + 1) .. i``, the
            last ``window`` keys itself included (flash-attn's ``window_size=(window - 1, 0)``; ``window >= Sq`` is
            plain causal attention).
        scale: multiplies ``q . k`` (used as float32); default ``1 / sqrt(D)``.

    Returns:
        :class:`WindowAttentionOutput` ``(attention_out [T, N1, Dv], softmax_max [T, N1, 8], softmax_sum
        [T, N1, 8])``, statistics in the "TND" layout. Exactly ``npu_fusion_attention(query, key, value, N1, "TND",
        atten_mask=compressed_atten_mask(), scale=scale, pre_tockens=window - 1, next_tockens=0,
        actual_seq_qlen=cu_seqlens[1:], actual_seq_kvlen=cu_seqlens[1:], sparse_mode=4, softmax_layout="TND")[:3]``;
        differentiable with respect to query, key and value.
    """
    _check_tensor(query, "query", 3)
    _check_tensor(key, "key", 3)
    _check_tensor(value, "value", 3)
    window = _int(window, "window")
    if window < 1:
        raise ValueError(f"window must be >= 1 (the keys a query sees, itself included), got {window}")
    query, key, value, scale = attention_scale_and_inputs(query, key, value, scale)
    if isinstance(cu_seqlens, torch.Tensor):
        cu = cu_seqlens  # checked inside the operator (errors name cu_seqlens)
    else:
        values = cu_seqlens_list(cu_seqlens, "cu_seqlens")
        if values[-1] != query.shape[0]:
            raise ValueError(f"cu_seqlens[-1] must equal the number of query rows T = {query.shape[0]}, got "
                             f"{values[-1]}")
        cu = torch.tensor(values, dtype=torch.int64)
    return WindowAttentionOutput(*torch.ops.nsa.sliding_window_attention(query, key, value, cu, window, scale))
