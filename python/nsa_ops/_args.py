"""Conversion of Python arguments (lists, tuples, 1-D integer tensors) with errors naming the argument."""

from __future__ import annotations

import operator
from typing import Any, Sequence

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
