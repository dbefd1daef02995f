"""Autograd of torch.ops.nsa.window_attention and sliding_window_attention (docs/spec/window_attention.md §1, §7),
registered with torch.library.

Gradients flow to query, key and value; none to the mask, the lengths or the statistics: as torch_npu's formula
reads only the gradient of attention_out, the gradients reaching softmax_max / softmax_sum are dropped. The
backward recomputes P from the saved statistics and attention_out (torch.ops.nsa.window_attention_backward, the
operator behind npu_fusion_attention_grad, with the forward's arguments). Double backward is not supported and
raises.
"""

from __future__ import annotations

import torch

from ._autograd_common import save_with_lengths

_DOUBLE_BACKWARD_ERROR = ("nsa::window_attention does not support double backward (gradients of its gradients); "
                          "call torch.autograd.grad without create_graph=True")


def _setup_context(ctx, inputs, output):
    (query, key, value, head_num, scale, atten_mask, sparse_mode, pre, nxt, inner_precise, seq_q, seq_kv,
     softmax_layout) = inputs
    attention_out, softmax_max, softmax_sum = output
    save_with_lengths(ctx, [query, key, value, attention_out, softmax_max, softmax_sum, atten_mask], seq_q, seq_kv)
    ctx.args = (head_num, scale)
    ctx.visibility = (sparse_mode, pre, nxt, inner_precise)
    ctx.softmax_layout = softmax_layout


def _backward(ctx, grad_out, _grad_max, _grad_sum):
    saved = ctx.saved_tensors
    query, key, value, attention_out, softmax_max, softmax_sum, atten_mask = saved[:7]
    if grad_out is None:
        return (None,) * 13
    if ctx.tensor_lengths:
        seq_q, seq_kv = saved[7], saved[8]
        op = torch.ops.nsa.window_attention_backward.tensor_lengths
    else:
        seq_q, seq_kv = ctx.lengths
        op = torch.ops.nsa.window_attention_backward.default
    dq, dk, dv = op(grad_out, query, key, value, attention_out, softmax_max, softmax_sum, *ctx.args, atten_mask,
                    *ctx.visibility, seq_q, seq_kv, ctx.softmax_layout)
    return (dq if ctx.needs_input_grad[0] else None, dk if ctx.needs_input_grad[1] else None,
            dv if ctx.needs_input_grad[2] else None) + (None,) * 10


def _sliding_setup_context(ctx, inputs, output):
    query, key, value, cu_seqlens, window, scale = inputs
    attention_out, softmax_max, softmax_sum = output
    ctx.save_for_backward(query, key, value, attention_out, softmax_max, softmax_sum, cu_seqlens)
    ctx.window = window
    ctx.scale = scale


def _sliding_backward(ctx, grad_out, _grad_max, _grad_sum):
    query, key, value, attention_out, softmax_max, softmax_sum, cu_seqlens = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 6
    dq, dk, dv = torch.ops.nsa.sliding_window_attention_backward(grad_out, query, key, value, attention_out,
                                                                 softmax_max, softmax_sum, cu_seqlens, ctx.window,
                                                                 ctx.scale)
    return (dq if ctx.needs_input_grad[0] else None, dk if ctx.needs_input_grad[1] else None,
            dv if ctx.needs_input_grad[2] else None, None, None, None)


def _no_double_backward_setup(ctx, inputs, output):
    pass


def _no_double_backward(ctx, *grads):
    raise RuntimeError(_DOUBLE_BACKWARD_ERROR)


def register() -> None:
    for name in ("nsa::window_attention", "nsa::window_attention.tensor_lengths"):
        torch.library.register_autograd(name, _backward, setup_context=_setup_context)
    torch.library.register_autograd("nsa::sliding_window_attention", _sliding_backward,
                                    setup_context=_sliding_setup_context)
    for name in ("nsa::window_attention_backward", "nsa::window_attention_backward.tensor_lengths",
                 "nsa::sliding_window_attention_backward"):
        torch.library.register_autograd(name, _no_double_backward, setup_context=_no_double_backward_setup)
