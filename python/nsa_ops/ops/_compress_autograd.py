"""Autograd and fake (torch.compile) registrations of torch.ops.nsa.compress (docs/spec/compress.md §6).

* ``nsa::compress`` and ``nsa::compress.tensor_lengths``: gradients to ``input`` and ``weight`` through
  ``nsa::compress_backward`` with the same l, d and lengths; none to the lengths. An undefined incoming gradient
  gives no gradients (the same as zeros, §6).
* ``nsa::compress_backward`` (both overloads) is differentiable too: the forward is bilinear, so the backward is
  linear in (grad, weight) and in (grad, input), and its derivatives are the two operators again. With ``gi`` and
  ``gw`` the incoming gradients of ``input_grad`` and ``weight_grad``:
      d grad   = compress(gi, weight) + compress(input, gw)
      d input  = compress_backward(grad, input, gw).input_grad
      d weight = compress_backward(grad, gi, weight).weight_grad
  (so double backward and gradgradcheck work, in every order).
* Autocast: under ``torch.autocast("cpu", dtype=...)`` the forward operators (``compress``, its
  ``.tensor_lengths`` overload, ``compress_reference``) cast floating CPU tensors other than float64 (input, weight)
  to the autocast dtype first, so the result is in that dtype (the casts are differentiable: gradients reach the
  float32 tensors).
* ``nsa::compress.tensor_lengths``'s fake kernel: the output has R = sum_b C_b rows, a function of the lengths'
  values, hence an unbacked size (``ctx.new_dynamic_size()``, 0 <= R <= T). Outside torch.compile, a call on
  ``meta`` tensors with tensor lengths cannot know R and raises; the int[] overload's Meta kernel (C++) computes it.
"""

from __future__ import annotations

import torch

from .._args import autocast_kernel as _autocast_kernel

_OPS = ("compress", "compress.tensor_lengths", "compress_backward", "compress_backward.tensor_lengths")


def available() -> bool:
    """Whether the loaded library has the operator (it may be built without it: -DNSA_OPERATORS)."""
    return hasattr(torch.ops.nsa, "compress") and hasattr(torch.ops.nsa, "compress_backward")


def _op(name: str, tensor_lengths: bool):
    packet = getattr(torch.ops.nsa, name)
    return packet.tensor_lengths if tensor_lengths else packet.default


# ------------------------------------------------------------------ forward's autograd
def _setup_context(ctx, inputs, output):
    input, weight, l, d, lengths = inputs
    ctx.tensor_lengths = isinstance(lengths, torch.Tensor)
    if ctx.tensor_lengths:
        ctx.save_for_backward(input, weight, lengths)
    else:
        ctx.save_for_backward(input, weight)
        ctx.lengths = lengths
    ctx.block = (l, d)


def _backward(ctx, grad):
    if grad is None or not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return None, None, None, None, None
    saved = ctx.saved_tensors
    input, weight = saved[0], saved[1]
    lengths = saved[2] if ctx.tensor_lengths else ctx.lengths
    input_grad, weight_grad = _op("compress_backward", ctx.tensor_lengths)(grad, input, weight, *ctx.block, lengths)
    return (input_grad if ctx.needs_input_grad[0] else None, weight_grad if ctx.needs_input_grad[1] else None,
            None, None, None)


# ------------------------------------------------------------------ backward's autograd (double backward)
def _setup_context_grad(ctx, inputs, output):
    grad, input, weight, l, d, lengths = inputs
    ctx.tensor_lengths = isinstance(lengths, torch.Tensor)
    if ctx.tensor_lengths:
        ctx.save_for_backward(grad, input, weight, lengths)
    else:
        ctx.save_for_backward(grad, input, weight)
        ctx.lengths = lengths
    ctx.block = (l, d)


def _add(a, b):
    if a is None:
        return b
    return a if b is None else a + b


def _backward_grad(ctx, g_input_grad, g_weight_grad):
    saved = ctx.saved_tensors
    grad, input, weight = saved[0], saved[1], saved[2]
    lengths = saved[3] if ctx.tensor_lengths else ctx.lengths
    fwd = _op("compress", ctx.tensor_lengths)
    bwd = _op("compress_backward", ctx.tensor_lengths)
    need_grad, need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    d_grad = d_input = d_weight = None
    if g_input_grad is not None:
        if need_grad:
            d_grad = fwd(g_input_grad, weight, *ctx.block, lengths)
        if need_weight:
            d_weight = bwd(grad, g_input_grad, weight, *ctx.block, lengths)[1]
    if g_weight_grad is not None:
        if need_grad:
            d_grad = _add(d_grad, fwd(input, g_weight_grad, *ctx.block, lengths))
        if need_input:
            d_input = bwd(grad, input, g_weight_grad, *ctx.block, lengths)[0]
    return d_grad, d_input, d_weight, None, None, None


# ------------------------------------------------------------------ fake kernel of the tensor-lengths overload
def _fake_compress_tensor_lengths(input, weight, compress_block_size, compress_stride, actual_seq_len=None):
    torch._check(input.dim() == 3, lambda: f"input must be a 3-D tensor [T, N, D], got {input.dim()}-D")
    torch._check(weight.dim() == 2, lambda: f"weight must be a 2-D tensor [compress_block_size, N], got {weight.dim()}-D")
    torch._check(weight.dtype == input.dtype,
                 lambda: f"weight must have the dtype of input ({input.dtype}), got {weight.dtype}")
    torch._check(input.dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64),
                 lambda: f"input must be bfloat16, float16, float32 or float64, got {input.dtype}")
    torch._check(actual_seq_len is not None, lambda: "actual_seq_len must be given (prefix sums of the batches' lengths)")
    torch._check(actual_seq_len.dim() == 1 and actual_seq_len.dtype in (torch.int32, torch.int64),
                 lambda: "actual_seq_len must be a 1-D int64 or int32 tensor")
    torch._check(1 <= compress_stride <= compress_block_size,
                 lambda: "compress_stride must be in [1, compress_block_size]")
    ctx = torch.library.get_ctx()
    T = input.shape[0]
    rows = ctx.new_dynamic_size(max=T) if isinstance(T, int) else ctx.new_dynamic_size()
    return input.new_empty((rows, input.shape[1], input.shape[2]))


# ------------------------------------------------------------------ autocast
_FORWARD_OPS = ("compress", "compress.tensor_lengths", "compress_reference")
_LIB = None


_registered = False


def register() -> None:
    """Registers the autograd formulas and the fake kernel (once; nothing when the library lacks the operator)."""
    global _registered
    if _registered or not available():
        return
    torch.library.register_fake("nsa::compress.tensor_lengths", _fake_compress_tensor_lengths)
    for name in ("nsa::compress", "nsa::compress.tensor_lengths"):
        torch.library.register_autograd(name, _backward, setup_context=_setup_context)
    for name in ("nsa::compress_backward", "nsa::compress_backward.tensor_lengths"):
        torch.library.register_autograd(name, _backward_grad, setup_context=_setup_context_grad)
    global _LIB
    _LIB = torch.library.Library("nsa", "IMPL")
    for name in _FORWARD_OPS:
        base, _, overload = name.partition(".")
        _LIB.impl(name, _autocast_kernel(getattr(getattr(torch.ops.nsa, base), overload or "default")), "AutocastCPU",
                  with_keyset=True)
    _registered = True
