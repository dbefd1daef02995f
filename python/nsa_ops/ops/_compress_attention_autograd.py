"""Autograd, autocast and functorch rules of torch.ops.nsa.compress_attention (docs/spec/compress_attention.md §7).

Two routes to the same backward (torch.ops.nsa.compress_attention_backward, which recomputes P from the saved
statistics, softmax_max/softmax_sum in §4's per-batch layout, and attention_out, as the NPU's FlashAttention
backward does):

* :func:`register` puts a formula on the operator itself (torch.library.register_autograd), for callers of
  ``torch.ops.nsa.compress_attention`` directly;
* :class:`CompressAttentionFunction` is the torch.autograd.Function behind the Python entry points
  (``nsa_ops.compress_attention`` and ``nsa_ops.npu_nsa_compress_attention``). Unlike the generated function of
  register_autograd it has a separate ``setup_context``, so ``torch.func.grad`` / ``vjp`` / ``jacrev`` work, a
  ``vmap`` rule (the mapped dimension becomes more packed sequences: one operator call), and it differentiates
  a 0-d tensor scale that requires grad.

Gradients flow to query, key, value and (Python entry points) a tensor scale; none to the masks, the lengths,
topk_indices or the softmax statistics: those three outputs are marked non-differentiable (requires_grad is
False on them). Double backward is not supported and raises.

Autocast (:func:`register`): under ``torch.autocast("cpu", dtype=...)`` the forward operators cast floating
query/key/value tensors other than float64 to the autocast dtype first, as CPU autocast does for torch's
scaled_dot_product_attention (its "lower precision" list); the result is in that dtype.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .._args import autocast_kernel as _autocast_kernel
from ._autograd_common import save_with_lengths

_DOUBLE_BACKWARD_ERROR = ("nsa::compress_attention does not support double backward (gradients of its gradients); "
                          "call torch.autograd.grad without create_graph=True")


def forward_op(tensor_lengths: bool, ext: bool):
    """The forward overload: lengths as tensors or int lists; ``ext``: the §10 overloads (one more argument,
    ``causal``)."""
    f = torch.ops.nsa.compress_attention
    if ext:
        return f.ext_tensor_lengths if tensor_lengths else f.ext
    return f.tensor_lengths if tensor_lengths else f.default


def backward_op(tensor_lengths: bool, ext: bool):
    f = torch.ops.nsa.compress_attention_backward
    if ext:
        return f.ext_tensor_lengths if tensor_lengths else f.ext
    return f.tensor_lengths if tensor_lengths else f.default


def _setup_context(ctx, inputs, output):
    (query, key, value, scale_value, head_num, compress_block_size, compress_stride, select_block_size,
     select_block_count, _topk_mask, atten_mask, actual_seq_qlen, actual_cmp_seq_kvlen, _sel) = inputs[:14]
    ctx.ext = len(inputs) > 14               # the .ext overloads (§10): one more input, causal
    ctx.causal = bool(inputs[14]) if ctx.ext else False
    attention_out, topk, softmax_max, softmax_sum = output
    ctx.mark_non_differentiable(topk, softmax_max, softmax_sum)
    save_with_lengths(ctx, [query, key, value, attention_out, softmax_max, softmax_sum, atten_mask],
                      actual_seq_qlen, actual_cmp_seq_kvlen)
    ctx.scalars = (scale_value, head_num, compress_block_size, compress_stride, select_block_size, select_block_count)


def _run_backward(ctx, grad_out, query, key, value, attention_out, softmax_max, softmax_sum, atten_mask, seq_q,
                  seq_c):
    op = backward_op(isinstance(seq_q, torch.Tensor), ctx.ext)
    extra = (ctx.causal,) if ctx.ext else ()
    return op(grad_out, query, key, value, attention_out, softmax_max, softmax_sum, *ctx.scalars, atten_mask,
              seq_q, seq_c, *extra)


def _backward(ctx, grad_out, _grad_topk, _grad_max, _grad_sum):
    saved = ctx.saved_tensors
    query, key, value, attention_out, softmax_max, softmax_sum, atten_mask = saved[:7]
    n_rest = 12 if ctx.ext else 11
    if grad_out is None:
        return (None,) * (3 + n_rest)
    seq_q, seq_c = (saved[7], saved[8]) if ctx.tensor_lengths else ctx.lengths
    dq, dk, dv = _run_backward(ctx, grad_out, query, key, value, attention_out, softmax_max, softmax_sum,
                               atten_mask, seq_q, seq_c)
    return (dq if ctx.needs_input_grad[0] else None, dk if ctx.needs_input_grad[1] else None,
            dv if ctx.needs_input_grad[2] else None) + (None,) * n_rest


def _no_double_backward_setup(ctx, inputs, output):
    pass


def _no_double_backward(ctx, *grads):
    raise RuntimeError(_DOUBLE_BACKWARD_ERROR)


# ------------------------------------------------------------------------------------------------ autocast
_FORWARD_OPS = ("compress_attention", "compress_attention.tensor_lengths", "compress_attention.ext",
                "compress_attention.ext_tensor_lengths", "compress_attention_reference")
_LIB: Optional[torch.library.Library] = None


def register() -> None:
    global _LIB
    for name in ("nsa::compress_attention", "nsa::compress_attention.tensor_lengths", "nsa::compress_attention.ext",
                 "nsa::compress_attention.ext_tensor_lengths"):
        torch.library.register_autograd(name, _backward, setup_context=_setup_context)
    for name in ("nsa::compress_attention_backward", "nsa::compress_attention_backward.tensor_lengths",
                 "nsa::compress_attention_backward.ext", "nsa::compress_attention_backward.ext_tensor_lengths"):
        torch.library.register_autograd(name, _no_double_backward, setup_context=_no_double_backward_setup)
    if _LIB is None:
        _LIB = torch.library.Library("nsa", "IMPL")
        for name in _FORWARD_OPS:
            base, _, overload = name.partition(".")
            op = getattr(getattr(torch.ops.nsa, base), overload or "default")
            _LIB.impl(name, _autocast_kernel(op), "AutocastCPU", with_keyset=True)


# ------------------------------------------------------------------------------------------------ Python entry points
class _BackwardFunction(torch.autograd.Function):
    """torch.ops.nsa.compress_attention_backward as a function whose own backward raises (no double backward).
    Needed because torch.func.grad runs backward formulas with grad tracking on, and the generated function of
    register_autograd (no separate setup_context) is refused by functorch."""

    @staticmethod
    def forward(grad_out, query, key, value, attention_out, softmax_max, softmax_sum, scalars, atten_mask, seq_q,
                seq_c, ext, causal):
        op = backward_op(isinstance(seq_q, torch.Tensor), ext)
        return op(grad_out, query, key, value, attention_out, softmax_max, softmax_sum, *scalars, atten_mask, seq_q,
                  seq_c, *((causal,) if ext else ()))

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_DOUBLE_BACKWARD_ERROR)


class CompressAttentionFunction(torch.autograd.Function):
    """The operator for the Python entry points: ``apply(query, key, value, scale_tensor, scale_value, head_num,
    compress_block_size, compress_stride, select_block_size, select_block_count, topk_mask, atten_mask,
    actual_seq_qlen, actual_cmp_seq_kvlen, actual_sel_seq_kvlen, ext, causal)`` with the operator's arguments
    (lengths as prefix sums: lists of ints, or 1-D integer tensors for the .tensor_lengths overloads; ``ext``: the
    §10 overloads, with ``causal``).

    ``scale_tensor``: None, or the 0-d tensor whose value ``scale_value`` is; when it requires grad its gradient
    is ``dL/dscale = Σ_{t,h} q[t,h]·dQ[t,h] / scale`` (§7: ``dQ = scale · Σ_c dS·k`` and ``dL/dscale = Σ_c dS·(q·k)``),
    accumulated in float64 from the dQ of the backward operator (rounded to the input dtype)."""

    @staticmethod
    def forward(query, key, value, scale_tensor, scale_value, head_num, compress_block_size, compress_stride,
                select_block_size, select_block_count, topk_mask, atten_mask, seq_q, seq_c, seq_sel, ext, causal):
        op = forward_op(isinstance(seq_q, torch.Tensor), ext)
        return op(query, key, value, scale_value, head_num, compress_block_size, compress_stride, select_block_size,
                  select_block_count, topk_mask, atten_mask, seq_q, seq_c, seq_sel, *((causal,) if ext else ()))

    @staticmethod
    def setup_context(ctx, inputs, output):
        (query, key, value, scale_tensor, scale_value, head_num, l, d, lp, K, _topk_mask, atten_mask, seq_q, seq_c,
         _seq_sel, ext, causal) = inputs
        attention_out, topk, softmax_max, softmax_sum = output
        ctx.mark_non_differentiable(topk, softmax_max, softmax_sum)
        tensor_lengths = isinstance(seq_q, torch.Tensor)
        saved = [query, key, value, attention_out, softmax_max, softmax_sum, atten_mask]
        saved += [seq_q, seq_c] if tensor_lengths else [None, None]
        ctx.save_for_backward(*saved)
        ctx.lengths = None if tensor_lengths else (seq_q, seq_c)
        ctx.scalars = (scale_value, head_num, l, d, lp, K)
        ctx.scale_dtype = scale_tensor.dtype if isinstance(scale_tensor, torch.Tensor) else None
        ctx.ext, ctx.causal = ext, causal

    @staticmethod
    def backward(ctx, grad_out, _grad_topk, _grad_max, _grad_sum):
        query, key, value, attention_out, softmax_max, softmax_sum, atten_mask, sq, sc = ctx.saved_tensors
        if grad_out is None or not any(ctx.needs_input_grad[:4]):
            return (None,) * 17
        seq_q, seq_c = ctx.lengths if ctx.lengths is not None else (sq, sc)
        dq, dk, dv = _BackwardFunction.apply(grad_out, query, key, value, attention_out, softmax_max, softmax_sum,
                                             ctx.scalars, atten_mask, seq_q, seq_c, ctx.ext, ctx.causal)
        dscale = None
        if ctx.needs_input_grad[3]:
            scale = ctx.scalars[0]
            if scale == 0:
                raise RuntimeError("scale = 0: the gradient with respect to scale is computed as "
                                   "sum(query * grad_query) / scale and is not available at 0")
            dscale = ((query.to(torch.float32) * dq.to(torch.float32)).sum(dtype=torch.float64) / scale
                      ).to(ctx.scale_dtype)
        return (dq if ctx.needs_input_grad[0] else None, dk if ctx.needs_input_grad[1] else None,
                dv if ctx.needs_input_grad[2] else None, dscale) + (None,) * 13

    @staticmethod
    def vmap(info, in_dims, query, key, value, scale_tensor, scale_value, head_num, l, d, lp, K, topk_mask,
             atten_mask, seq_q, seq_c, seq_sel, ext, causal):
        """vmap over query/key/value: the V mapped copies become V times the packed sequences of one call (copy
        v's sequences follow copy v-1's), so the operator runs once; the outputs are split back into [V, ...].
        The statistics of copy v are the floats [v·T·N1·8, (v+1)·T·N1·8), already in §4's per-batch layout.
        Masks, lengths and the scale are shared (mapping them is an error)."""
        names = ("scale", "topk_mask", "atten_mask", "the lengths", "the lengths", "the lengths")
        for dim, name in zip((in_dims[3],) + tuple(in_dims[10:15]), names):
            if any(x is not None for x in torch.utils._pytree.tree_leaves(dim)):
                raise ValueError(f"vmap of nsa_ops compress_attention maps query, key and value only; {name} "
                                 "must be the same for every mapped copy (in_dims None)")
        V = info.batch_size

        def lead(x, dim):
            return x.unsqueeze(0).expand(V, *x.shape) if dim is None else x.movedim(dim, 0)

        q, k, v = lead(query, in_dims[0]), lead(key, in_dims[1]), lead(value, in_dims[2])
        T, N1, D = q.shape[1:]

        def values(x):
            return None if x is None else (x.tolist() if isinstance(x, torch.Tensor) else list(x))

        pq, pc, ps = values(seq_q), values(seq_c), values(seq_sel)
        Tc = pc[-1] if pc else 0                     # key/value rows past it are ignored: leave them out
        k, v = k[:, :Tc], v[:, :Tc]

        def repeat(prefix, total):
            return None if prefix is None else [c * total + x for c in range(V) for x in prefix]

        Ts = ps[-1] if ps else 0
        rq, rc, rs = repeat(pq, T), repeat(pc, Tc), repeat(ps, Ts)
        if isinstance(seq_q, torch.Tensor):
            rq, rc = torch.tensor(rq, dtype=torch.int64), torch.tensor(rc, dtype=torch.int64)
            rs = None if rs is None else torch.tensor(rs, dtype=torch.int64)
        out = CompressAttentionFunction.apply(
            q.reshape(V * T, N1, D), k.reshape(V * Tc, *k.shape[2:]), v.reshape(V * Tc, *v.shape[2:]), scale_tensor,
            scale_value, head_num, l, d, lp, K, topk_mask, atten_mask, rq, rc, rs, ext, causal)
        return tuple(o.view(V, T, *o.shape[1:]) for o in out), (0, 0, 0, 0)
