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


def register_no_derivative(op: str, section: str) -> None:
    """Registers on ``nsa::<op>``, its ``.tensor_lengths`` overload and ``nsa::<op>_reference`` an autograd formula
    that raises: the decode operators have no backward (docs/spec/decode.md). Their forward runs on tensors that
    require grad; a backward that reaches them fails with a message naming the operator. Nothing is registered
    when the loaded library lacks the operator."""
    if not hasattr(torch.ops.nsa, op):
        return
    message = (f"nsa::{op} has no derivative: the decode operators have no backward (docs/spec/decode.md "
               f"{section}); call it under torch.no_grad() / torch.inference_mode(), or on detached tensors")

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(message)

    for name in (f"nsa::{op}", f"nsa::{op}.tensor_lengths", f"nsa::{op}_reference"):
        torch.library.register_autograd(name, backward, setup_context=setup_context)
