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


def non_negative_lengths(value: Any, name: str) -> list[int]:
    out = int_list(value, name)
    for i, x in enumerate(out):
        if x < 0:
            raise ValueError(f"{name}[{i}] must be >= 0, got {x}")
    return out
