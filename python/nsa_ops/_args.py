"""Conversion of Python arguments (lists, tuples, 1-D integer tensors) with errors naming the argument."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Sequence

import numpy as np
import torch


def int_list(value: Any, name: str) -> list[int]:
    """A list of Python ints from a sequence of ints or a 1-D integer tensor (ValueError/TypeError naming `name`)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(f"{name} must be a 1-D tensor or a list of ints, got a {value.dim()}-D tensor")
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"{name} must hold integers, got a tensor of dtype {value.dtype}")
        return [int(x) for x in value.tolist()]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) and not hasattr(value, "tolist"):
        raise TypeError(f"{name} must be a list/tuple of ints or a 1-D integer tensor, got {type(value).__name__}")
    if hasattr(value, "tolist") and not isinstance(value, Sequence):  # e.g. a NumPy array
        value = value.tolist()
    out = []
    for i, x in enumerate(value):
        if isinstance(x, bool):
            raise ValueError(f"{name}[{i}] must be an int, got a bool")
        try:
            out.append(operator.index(x))
        except TypeError:
            raise ValueError(f"{name}[{i}] must be an int, got {x!r}") from None
    return out


def optional_int_list(value: Any, name: str) -> list[int] | None:
    return None if value is None else int_list(value, name)


def seq_lengths_for_op(actual_seq_qlen: Any, actual_seq_kvlen: Any) -> tuple[bool, Any, Any]:
    """``(tensor_lengths, qlen, kvlen)`` of a drop-in's ``actual_seq_qlen`` / ``actual_seq_kvlen`` (either may be
    None): when either is a tensor, both go to the op's ``.tensor_lengths`` overload as 1-D int64 CPU tensors (read
    in the kernel: no recompilation under torch.compile for new values); otherwise both as lists of ints."""
    names = ("actual_seq_qlen", "actual_seq_kvlen")
    if isinstance(actual_seq_qlen, torch.Tensor) or isinstance(actual_seq_kvlen, torch.Tensor):
        out = []
        for value, name in zip((actual_seq_qlen, actual_seq_kvlen), names):
            if value is None or isinstance(value, torch.Tensor):
                out.append(value)
            else:
                out.append(torch.tensor(int_list(value, name), dtype=torch.int64))
        return True, out[0], out[1]
    return False, optional_int_list(actual_seq_qlen, names[0]), optional_int_list(actual_seq_kvlen, names[1])


def int_arg(value: Any, name: str) -> int:
    """A Python int (ints, 0-d integer tensors, NumPy ints; not bools or floats)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r}") from None


def bounded_int(value: Any, name: str, minimum: int) -> int:
    """:func:`int_arg`, and ``>= minimum`` (ValueError naming `name`)."""
    x = int_arg(value, name)
    if x < minimum:
        raise ValueError(f"{name} must be {'> 0' if minimum == 1 else f'>= {minimum}'}, got {x}")
    return x


def non_negative_lengths(value: Any, name: str) -> list[int]:
    out = int_list(value, name)
    for i, x in enumerate(out):
        if x < 0:
            raise ValueError(f"{name}[{i}] must be >= 0, got {x}")
    return out


def differences(prefix: list[int], name: str) -> list[int]:
    """Per-batch lengths from running totals without the leading 0: ``[p0, p1 - p0, ...]``; ValueError naming
    `name` where the totals decrease."""
    out, prev = [], 0
    for i, x in enumerate(prefix):
        if x < prev:
            raise ValueError(f"{name} must be non-decreasing, but {name}[{i}] = {x} < {prev}")
        out.append(x - prev)
        prev = x
    return out


def cu_seqlens_list(value: Any, name: str) -> list[int]:
    """FlashAttention-style offsets as Python ints: B+1 >= 2 entries, a leading 0, non-decreasing (errors name
    `name`)."""
    cu = int_list(value, name)
    if len(cu) < 2:
        raise ValueError(f"{name} must have B+1 >= 2 entries (a leading 0, then the running totals), got {cu}")
    if cu[0] != 0:
        raise ValueError(f"{name} must start with 0 (FlashAttention's cu_seqlens convention), got {cu[0]}")
    differences(cu, name)
    return cu


def check_cu_seqlens(value: Any, name: str) -> None:
    """FlashAttention-style offsets given as a list/tuple or a 1-D int32/int64 tensor: for a tensor its rank, dtype
    and length always, its values only outside torch.compile (reading them would break the graph; the operators
    check them in their kernels); for a list everything (:func:`cu_seqlens_list`). Errors name `name`."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be a 1-D int32/int64 tensor or a list of ints, got a {value.dim()}-D "
                             f"tensor of dtype {value.dtype}")
        if value.shape[0] < 2:
            raise ValueError(f"{name} must have B+1 >= 2 entries (a leading 0, then the running totals), got "
                             f"{value.shape[0]}")
        if torch.compiler.is_compiling():
            return
    cu_seqlens_list(value, name)


# ---------------------------------------------------------------------------------------------------------------
# Pieces for entry points that must trace under torch.compile / torch.export / torch.jit.trace: nothing here reads
# the values of a tensor in Python while tracing.

def is_tracing() -> bool:
    """True inside torch.compile / torch.export (dynamo) and torch.jit.trace: Python must then not read the
    values of tensors (they are symbolic or would be baked into the trace)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


@torch.library.custom_op("nsa::cu_seqlens_prefix_sums", mutates_args=())
def _cu_seqlens_prefix_sums(cu: torch.Tensor, name: str, total: int, total_exact: bool, min_length: int
                            ) -> torch.Tensor:
    """FlashAttention-style offsets ``cu`` (``B+1`` entries, 1-D int32/int64 CPU) -> the operators' prefix sums
    ``cu[1:]`` as a new int64 tensor, after checking the values (errors name ``name``): ``cu[0] == 0``,
    non-decreasing, every ``cu[b+1] - cu[b] >= min_length``, and ``cu[-1] == total`` (``total_exact``) or
    ``cu[-1] <= total``.

    An operator of its own (torch.ops.nsa.cu_seqlens_prefix_sums) so that the values are read when the graph
    runs, not while it is traced: under torch.compile a new batch composition is a new input, not a new
    constant, and torch.jit.trace records the check instead of the values."""
    check_cu_seqlens_values(cu.tolist(), name, total, total_exact, min_length)
    return cu[1:].to(torch.int64, copy=True)


def check_cu_seqlens_values(v: list[int], name: str, total: int, total_exact: bool, min_length: int) -> None:
    """The value checks of torch.ops.nsa.cu_seqlens_prefix_sums on a list of ints (ValueError naming `name`)."""
    if v[0] != 0:
        raise ValueError(f"{name} must start with 0 (FlashAttention's cu_seqlens convention), got {v[0]}")
    for b in range(len(v) - 1):
        if v[b + 1] < v[b]:
            raise ValueError(f"{name} must be non-decreasing, but {name}[{b + 1}] = {v[b + 1]} < {v[b]}")
        if v[b + 1] - v[b] < min_length:
            raise ValueError(f"{name} must give every batch at least {min_length} "
                             f"{'row' if min_length == 1 else 'rows'}; batch {b} has {v[b + 1] - v[b]}")
    if total_exact and v[-1] != total:
        raise ValueError(f"{name}[-1] must equal the number of rows {total}, got {v[-1]}")
    if not total_exact and v[-1] > total:
        raise ValueError(f"{name}[-1] must be <= the number of rows {total}, got {v[-1]}")


@_cu_seqlens_prefix_sums.register_fake
def _(cu, name, total, total_exact, min_length):
    return cu.new_empty((cu.shape[0] - 1,), dtype=torch.int64)


def cu_seqlens_prefix_tensor(value: Any, name: str, total: Any, *, total_exact: bool = True,
                             min_length: int = 0) -> torch.Tensor:
    """``cu_seqlens`` (a list/tuple of ints, a NumPy array or a 1-D integer CPU tensor) as the operators'
    prefix sums ``cu[1:]``, an int64 tensor, checked without reading values while tracing.

    The metadata (rank, dtype, at least 2 entries) is checked here; the values here in eager mode, and while
    tracing by the operator torch.ops.nsa.cu_seqlens_prefix_sums when the graph runs (see there). Errors name
    `name`. ``total`` may be a symbolic size."""
    if is_tracing() and isinstance(value, (list, tuple)):
        # No look at the elements: that would guard on their values (a recompilation per composition).
        value = torch.tensor(list(value), dtype=torch.int64)
    if not isinstance(value, torch.Tensor):
        if isinstance(value, (str, bytes)) or not (isinstance(value, Sequence) or hasattr(value, "tolist")):
            raise TypeError(f"{name} must be a list/tuple of ints or a 1-D integer tensor, got "
                            f"{type(value).__name__}")
        if hasattr(value, "tolist") and not isinstance(value, Sequence):  # a NumPy array
            value = value.tolist()
        for i, x in enumerate(value):
            if isinstance(x, bool) or not isinstance(x, (int, torch.SymInt)) and not hasattr(x, "__index__"):
                raise ValueError(f"{name}[{i}] must be an int, got {x!r}")
        value = torch.tensor([x if isinstance(x, (int, torch.SymInt)) else operator.index(x) for x in value],
                             dtype=torch.int64)
    if value.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor or a list of ints, got a {value.dim()}-D tensor")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got a tensor of dtype {value.dtype}")
    if value.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor (the lengths are read on the host), got {value.device}")
    if value.shape[0] < 2:
        raise ValueError(f"{name} must have B+1 >= 2 entries (a leading 0, then the running totals), got "
                         f"{value.shape[0]}")
    if not is_tracing():  # eager: the same checks without the operator (whose first call imports torch._dynamo)
        check_cu_seqlens_values(value.tolist(), name, int(total), total_exact, min_length)
        return value[1:].to(torch.int64)
    return torch.ops.nsa.cu_seqlens_prefix_sums(value, name, total, total_exact, min_length)


def scale_arg(value: Any, name: str, head_dim: Any) -> Any:
    """A softmax scale as the operators take it: ``None`` -> ``1/sqrt(head_dim)`` (a Python float: a symbolic
    head_dim is specialised, no graph break); a Python/NumPy int or float, or a 0-d NumPy array -> Python
    float; a 0-d real tensor -> returned as it is (the caller reads it, or differentiates through it). bools,
    complex numbers, strings and tensors of other shapes raise TypeError/ValueError naming `name`. Finiteness
    is checked by the operators (and by :func:`check_finite_scale` outside tracing)."""
    if value is None:
        d = int(head_dim)
        return 1.0 / math.sqrt(d) if d > 0 else 1.0
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a float (or a 0-d tensor), got a tensor of shape {list(value.shape)}")
        if value.dtype == torch.bool or value.dtype.is_complex:
            raise ValueError(f"{name} must be a float (a real number), got a tensor of dtype {value.dtype}")
        return value
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a float (a real number), got a bool")
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf":
        return float(value)
    if isinstance(value, (int, float, torch.SymInt, torch.SymFloat)) or \
            isinstance(value, numbers.Real):  # NumPy scalars register as numbers.Real
        return value if isinstance(value, (torch.SymInt, torch.SymFloat)) else float(value)
    raise ValueError(f"{name} must be a float (a Python or NumPy real number, or a 0-d tensor), got {value!r}")


def attention_scale_and_inputs(query, key, value, scale: Any) -> tuple:
    """The common prologue of the Pythonic attention entry points: `scale` resolved (None -> 1/sqrt(D); Python /
    NumPy numbers and 0-d tensors alike; finite outside tracing; a scale that requires grad is refused, naming
    `scale`), and under CPU autocast float32 query/key/value cast to the autocast dtype as torch's own attention
    casts them. Returns (query, key, value, scale)."""
    scale = scale_arg(scale, "scale", query.shape[2])
    if isinstance(scale, torch.Tensor):
        if scale.requires_grad:
            raise ValueError("scale must not require grad here (this operator has no gradient with respect to the "
                             "scale); pass a float or a detached tensor")
        scale = float(scale)
    if not is_tracing():
        check_finite_scale(scale, "scale")
    if torch.is_autocast_enabled("cpu") and query.device.type == "cpu":
        dtype = torch.get_autocast_dtype("cpu")
        query, key, value = (autocast_cast(x, dtype) for x in (query, key, value))
    return query, key, value, scale


def autocast_cast(x: Any, dtype: torch.dtype) -> Any:
    """x cast to the autocast dtype when CPU autocast would cast it for torch's attention: a floating CPU tensor
    that is not float64 (and not already of that dtype); anything else unchanged."""
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.device.type == "cpu" \
            and x.dtype != torch.float64 and x.dtype != dtype:
        return x.to(dtype)
    return x


def autocast_kernel(op):
    """An AutocastCPU kernel for `op`: floating arguments cast as :func:`autocast_cast` says, then `op` called
    below the autocast key (register it with torch.library.Library(...).impl(name, kernel, "AutocastCPU",
    with_keyset=True))."""
    key_set = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype("cpu")
        with torch._C._ExcludeDispatchKeyGuard(key_set):
            return op(*(autocast_cast(a, dtype) for a in args))

    return kernel


def check_finite_scale(value: float, name: str) -> None:
    """ValueError naming `name` unless the float is finite, also as a float32 (the operators use float32)."""
    with np.errstate(over="ignore"):
        as_f32 = float(np.float32(value))
    if not math.isfinite(value) or not math.isfinite(as_f32):
        raise ValueError(f"{name} must be finite (as a float32 too), got {value}")
