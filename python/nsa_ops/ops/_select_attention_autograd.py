"""Autograd of torch.ops.nsa.select_attention (docs/spec/select_attention.md §1, §8), registered with
torch.library.register_autograd.

Gradients flow to query, key and value through ``nsa::select_attention_backward`` (the same overload kind: int[]
or tensor lengths) called as torch_npu's autograd calls ``npu_nsa_select_attention_grad``: the incoming gradient of
attention_out, the inputs, the three forward outputs, topk_indices, the same scalars, atten_mask and lengths.
softmax_max and softmax_sum are marked non-differentiable (they do not require grad; a gradient arriving at them is
dropped, as on torch_npu); topk_indices, atten_mask and the lengths receive none. Double backward is not supported
and raises.
"""

from __future__ import annotations

import torch

_DOUBLE_BACKWARD_ERROR = ("nsa::select_attention does not support double backward (gradients of its gradients); "
                          "call torch.autograd.grad without create_graph=True")


def available() -> bool:
    """Whether the loaded library has the operator (it may be built without it: -DNSA_OPERATORS)."""
    return hasattr(torch.ops.nsa, "select_attention") and hasattr(torch.ops.nsa, "select_attention_backward")


def _setup_context(ctx, inputs, output):
    (query, key, value, topk_indices, scale_value, head_num, select_block_size, select_block_count, atten_mask, qlen,
     kvlen) = inputs
    attention_out, softmax_max, softmax_sum = output
    ctx.mark_non_differentiable(softmax_max, softmax_sum)
    ctx.tensor_lengths = isinstance(qlen, torch.Tensor) or isinstance(kvlen, torch.Tensor)
    ctx.has_mask = atten_mask is not None
    saved = [query, key, value, attention_out, softmax_max, softmax_sum, topk_indices]
    if ctx.has_mask:
        saved.append(atten_mask)
    if ctx.tensor_lengths:
        ctx.qlen_index = len(saved) if qlen is not None else None
        if qlen is not None:
            saved.append(qlen)
        ctx.kvlen_index = len(saved) if kvlen is not None else None
        if kvlen is not None:
            saved.append(kvlen)
    else:
        ctx.lengths = (qlen, kvlen)
    ctx.save_for_backward(*saved)
    ctx.scalars = (scale_value, head_num, select_block_size, select_block_count)


def _backward(ctx, grad_out, _grad_max, _grad_sum):
    if grad_out is None or not any(ctx.needs_input_grad[:3]):
        return (None,) * 11
    saved = ctx.saved_tensors
    query, key, value, attention_out, softmax_max, softmax_sum, topk_indices = saved[:7]
    atten_mask = saved[7] if ctx.has_mask else None
    if ctx.tensor_lengths:
        qlen = saved[ctx.qlen_index] if ctx.qlen_index is not None else None
        kvlen = saved[ctx.kvlen_index] if ctx.kvlen_index is not None else None
        op = torch.ops.nsa.select_attention_backward.tensor_lengths
    else:
        qlen, kvlen = ctx.lengths
        op = torch.ops.nsa.select_attention_backward.default
    dq, dk, dv = op(grad_out, query, key, value, attention_out, softmax_max, softmax_sum, topk_indices, *ctx.scalars,
                    atten_mask=atten_mask, actual_seq_qlen=qlen, actual_seq_kvlen=kvlen)
    return (dq if ctx.needs_input_grad[0] else None, dk if ctx.needs_input_grad[1] else None,
            dv if ctx.needs_input_grad[2] else None) + (None,) * 8


def _no_double_backward_setup(ctx, inputs, output):
    pass


def _no_double_backward(ctx, *grads):
    raise RuntimeError(_DOUBLE_BACKWARD_ERROR)


def register() -> None:
    if not available():
        return
    for name in ("nsa::select_attention", "nsa::select_attention.tensor_lengths"):
        torch.library.register_autograd(name, _backward, setup_context=_setup_context)
    for name in ("nsa::select_attention_backward", "nsa::select_attention_backward.tensor_lengths"):
        torch.library.register_autograd(name, _no_double_backward, setup_context=_no_double_backward_setup)
