"""Autograd of torch.ops.nsa.compress_attention (docs/spec/compress_attention.md §7), registered with torch.library.

Gradients flow to query, key and value; none to the masks, the lengths, topk_indices or the softmax
statistics (their incoming gradients are ignored). The backward recomputes P from the saved
statistics (softmax_max/softmax_sum in docs/spec/compress_attention.md §4's per-batch layout) and attention_out, as the NPU's
FlashAttention backward does, in torch.ops.nsa.compress_attention_backward. Double backward is not
supported and raises.
"""

from __future__ import annotations

import torch

_DOUBLE_BACKWARD_ERROR = ("nsa::compress_attention does not support double backward (gradients of its gradients); "
                          "call torch.autograd.grad without create_graph=True")


def _setup_context(ctx, inputs, output):
    (query, key, value, scale_value, head_num, compress_block_size, compress_stride, select_block_size,
     select_block_count, _topk_mask, atten_mask, actual_seq_qlen, actual_cmp_seq_kvlen, _sel) = inputs
    attention_out, _topk, softmax_max, softmax_sum = output
    tensor_lengths = isinstance(actual_seq_qlen, torch.Tensor)
    saved = [query, key, value, attention_out, softmax_max, softmax_sum, atten_mask]
    if tensor_lengths:
        saved += [actual_seq_qlen, actual_cmp_seq_kvlen]
    else:
        ctx.lengths = (actual_seq_qlen, actual_cmp_seq_kvlen)
    ctx.save_for_backward(*saved)
    ctx.tensor_lengths = tensor_lengths
    ctx.scalars = (scale_value, head_num, compress_block_size, compress_stride, select_block_size, select_block_count)


def _backward(ctx, grad_out, _grad_topk, _grad_max, _grad_sum):
    saved = ctx.saved_tensors
    query, key, value, attention_out, softmax_max, softmax_sum, atten_mask = saved[:7]
    if grad_out is None:
        return (None,) * 14
    if ctx.tensor_lengths:
        seq_q, seq_c = saved[7], saved[8]
        op = torch.ops.nsa.compress_attention_backward.tensor_lengths
    else:
        seq_q, seq_c = ctx.lengths
        op = torch.ops.nsa.compress_attention_backward.default
    dq, dk, dv = op(grad_out, query, key, value, attention_out, softmax_max, softmax_sum, *ctx.scalars, atten_mask,
                    seq_q, seq_c)
    return (dq if ctx.needs_input_grad[0] else None, dk if ctx.needs_input_grad[1] else None,
            dv if ctx.needs_input_grad[2] else None) + (None,) * 11


def _no_double_backward_setup(ctx, inputs, output):
    pass


def _no_double_backward(ctx, *grads):
    raise RuntimeError(_DOUBLE_BACKWARD_ERROR)


def register() -> None:
    for name in ("nsa::compress_attention", "nsa::compress_attention.tensor_lengths"):
        torch.library.register_autograd(name, _backward, setup_context=_setup_context)
    for name in ("nsa::compress_attention_backward", "nsa::compress_attention_backward.tensor_lengths"):
        torch.library.register_autograd(name, _no_double_backward, setup_context=_no_double_backward_setup)
