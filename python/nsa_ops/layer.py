"""``nsa_ops.NSAAttention``: a complete Native Sparse Attention layer over packed sequences (docs/spec/nsa_layer.md).

The forward is docs/spec/nsa_layer.md §4, step by step:

1. q/k/v/gate projections (torch), sigmoid gates in fp32;
2. key/value compression (``nsa_ops.compress``);
3. compressed attention with top-k block selection (``nsa_ops.compress_attention``), grouped by
   ``K_b = min(K, Sel_b)``; rows ``s < l - 1`` zeroed; indices sorted ascending and padded with -1; batches with
   ``C_b = 0`` get ``o_cmp = 0`` and ``[0, -1, ...]``;
4. selected attention (``nsa_ops.select_attention``, causal);
5. sliding-window attention (``nsa_ops.sliding_window_attention``);
6. ``o = rne_T(g_cmp·o_cmp + g_slc·o_slc + g_swa·o_swa)`` in fp32, then ``o_proj``.

Gradients are autograd's through the operators' specified backwards (§6).

``torch.compile``: when ``cu_seqlens`` is a tensor, steps 2-3 run inside one opaque operator
(``torch.ops.nsa.layer_compressed_branch``, whose per-batch grouping depends on the lengths' values) and steps 4-5
take the lengths as tensors, so new lengths with the same T reuse the compiled graph (§12 item 8). Its backward
(``torch.ops.nsa.layer_compressed_branch_backward``) recomputes the compression and the compressed-attention
forward (for the softmax statistics) and calls the operators' backwards explicitly, exactly as autograd calls
them outside compilation, so both paths give the same bits.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import nn

from ._args import cu_seqlens_list, int_list

__all__ = ["NSAAttention", "NSAAux"]


class NSAAux(NamedTuple):
    """Intermediate results of one forward (docs/spec/nsa_layer.md §1).

    topk_indices: ``[T, N2, K]`` int32, the selection blocks the selected branch used: batch-local indices in
                  ascending order, then -1 for empty slots (``[0, -1, ...]`` for sequences shorter than l).
    gates:        ``[T, N1, 3]`` float32 (float64 for fp64 modules), sigmoid gates (compressed, selected, window).
    o_cmp, o_slc, o_swa: ``[T, N1, Dv]`` in the parameters' dtype, the branch outputs as combined in §4 step 6.
    """

    topk_indices: torch.Tensor
    gates: torch.Tensor
    o_cmp: torch.Tensor
    o_slc: torch.Tensor
    o_swa: torch.Tensor


def _size_arg(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _check_config(H: int, N1: int, N2: int, Dqk: int, Dv: int, l: int, d: int, lp: int, K: int, w: int) -> None:
    """docs/spec/nsa_layer.md §1 (the block sizes: docs/spec/compress_attention.md §6)."""
    if N1 % N2 != 0:
        raise ValueError(f"num_heads ({N1}) must be a multiple of num_kv_heads ({N2})")
    if Dv > Dqk:
        raise ValueError(f"head_dim_v ({Dv}) must be <= head_dim_qk ({Dqk}) (compressed attention reads values "
                         f"of at most the query/key head dimension)")
    for value, name in ((l, "compress_block_size"), (d, "compress_stride"), (lp, "select_block_size")):
        if value % 16 != 0:
            raise ValueError(f"{name} must be a multiple of 16, got {value}")
    if d > 64:
        raise ValueError(f"compress_stride must be in [16, 64], got {d}")
    if l < d:
        raise ValueError(f"compress_block_size ({l}) must be >= compress_stride ({d})")
    if lp < l:
        raise ValueError(f"select_block_size ({lp}) must be >= compress_block_size ({l})")
    if lp > 128:
        raise ValueError(f"select_block_size must be <= 128, got {lp}")
    if lp % d != 0:
        raise ValueError(f"select_block_size ({lp}) must be a multiple of compress_stride ({d})")
    if K > 32:
        raise ValueError(f"select_block_count must be in [1, 32], got {K}")


def _cu_seqlens_list(cu_seqlens: Any, T: int) -> list[int]:
    """B+1 offsets as Python ints: leading 0, non-decreasing, last = T (errors name ``cu_seqlens``)."""
    cu = cu_seqlens_list(cu_seqlens, "cu_seqlens")
    if cu[-1] != T:
        raise ValueError(f"cu_seqlens[-1] must equal the number of rows of hidden_states T = {T}, got {cu[-1]}")
    return cu


_SIGMOID_CHUNK = 16384     # elements per torch.sigmoid call: below ATen's parallel grain (32768), a multiple of 64


def _sigmoid_position_independent(z: torch.Tensor) -> torch.Tensor:
    """torch.sigmoid with every element's result independent of its position in the tensor and of the thread count.

    ATen's elementwise kernels evaluate the bulk of a contiguous range with vector code and the last few elements
    of each thread's range with scalar code, whose exp can differ in the last bit; the ranges depend on the tensor's
    size and the thread count. Evaluated here in chunks of ``_SIGMOID_CHUNK`` elements (one thread each), the last
    chunk zero-padded to a multiple of 64, every element takes the vector path, so a token's gates are the same
    whatever the batch around it (docs/spec/nsa_layer.md §9). The backward (``g·y·(1 - y)``) is exact arithmetic."""
    flat = z.reshape(-1)
    n = flat.numel()
    pieces = []
    for start in range(0, n, _SIGMOID_CHUNK):
        piece = flat[start:start + _SIGMOID_CHUNK]
        size = piece.numel()
        pad = -size % 64
        if pad:
            piece = torch.nn.functional.pad(piece, (0, pad))
        pieces.append(torch.sigmoid(piece)[:size])
    if not pieces:
        return torch.sigmoid(z)
    return (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).view(z.shape)


def _local_positions(cu: list[int], device: torch.device) -> torch.Tensor:
    """[T] int64: the position of every packed row inside its own sequence."""
    lengths = torch.tensor([b - a for a, b in zip(cu, cu[1:])], dtype=torch.int64)
    starts = torch.tensor(cu[:-1], dtype=torch.int64)
    T = cu[-1]
    return (torch.arange(T, dtype=torch.int64) - torch.repeat_interleave(starts, lengths, output_size=T)).to(device)


class _Group(NamedTuple):
    """One compressed-attention call of §4 step 3: the batches with the same K_b = min(K, Sel_b)."""

    K_b: int
    rows: Optional[torch.Tensor]       # packed query rows of the group's batches (None: all T rows, in order)
    crows: Optional[torch.Tensor]      # their compressed rows (None: all of them)
    cu_q: list[int]                    # B_g + 1 offsets of the group's queries
    cu_c: list[int]                    # B_g + 1 offsets of the group's compressed tokens
    atten_mask: torch.Tensor           # §5, sized to the call
    topk_mask: torch.Tensor
    seen: torch.Tensor                 # [rows, 1, 1] bool: local position s >= l - 1 (rows with a visible token)


def _plan(cu: list[int], cu_cmp: list[int], K: int, l: int, d: int, lp: int, device: torch.device
          ) -> tuple[list[_Group], bool]:
    """The calls of §4 step 3, and whether some non-empty sequence has C_b = 0 (its rows keep o_cmp = 0 and the
    indices [0, -1, ...]). Empty sequences and those with C_b = 0 take part in no call (the operator requires
    C_b >= 1)."""
    from .masks import make_atten_mask, make_topk_mask

    M = lp // d
    by_k: dict[int, list[int]] = {}
    short_rows = False
    for b in range(len(cu) - 1):
        S, C = cu[b + 1] - cu[b], cu_cmp[b + 1] - cu_cmp[b]
        if S == 0:
            continue
        if C == 0:
            short_rows = True
            continue
        by_k.setdefault(min(K, -(-C // M)), []).append(b)
    local = _local_positions(cu, device)
    groups = []
    for K_b, batches in sorted(by_k.items()):
        lengths = [cu[b + 1] - cu[b] for b in batches]
        cmp_lengths = [cu_cmp[b + 1] - cu_cmp[b] for b in batches]
        cu_q, cu_c = [0], [0]
        for S, C in zip(lengths, cmp_lengths):
            cu_q.append(cu_q[-1] + S)
            cu_c.append(cu_c[-1] + C)
        if len(by_k) == 1 and not short_rows:          # the group holds every row, in order: no gather
            rows = crows = None
            local_g = local
        else:
            rows = torch.cat([torch.arange(cu[b], cu[b + 1]) for b in batches]).to(device)
            crows = torch.cat([torch.arange(cu_cmp[b], cu_cmp[b + 1]) for b in batches]).to(device)
            local_g = local.index_select(0, rows)
        max_sq, max_c = max(lengths), max(cmp_lengths)
        groups.append(_Group(K_b, rows, crows, cu_q, cu_c, make_atten_mask(max_sq, max_c, l, d, device=device),
                             make_topk_mask(max_sq, -(-max_c // M), lp, num_init=1, num_local=2, device=device),
                             (local_g >= l - 1).view(-1, 1, 1)))
    return groups, short_rows


def _group_inputs(g: _Group, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor):
    if g.rows is None:
        return q, kc, vc
    return q.index_select(0, g.rows), kc.index_select(0, g.crows), vc.index_select(0, g.crows)


def _attend(g: _Group, q_g: torch.Tensor, kc_g: torch.Tensor, vc_g: torch.Tensor, l: int, d: int, lp: int,
            scale: float):
    from .ops.compress_attention import compress_attention

    return compress_attention(q_g, kc_g, vc_g, cu_seqlens_q=g.cu_q, cu_seqlens_cmp=g.cu_c, compress_block_size=l,
                              compress_stride=d, select_block_size=lp, select_block_count=g.K_b, scale=scale,
                              atten_mask=g.atten_mask, topk_mask=g.topk_mask)


def _compressed_branch(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, cu: list[int], cu_cmp: list[int],
                       Dv: int, l: int, d: int, lp: int, K: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/spec/nsa_layer.md §4 step 3 for all batches: (o_cmp [T, N1, Dv], topk_indices [T, N2, K] int32).

    q: [T, N1, Dqk]; kc [R, N2, Dqk] and vc [R, N2, Dv] as compressed with the offsets ``cu_cmp``. One
    compressed-attention call per group of batches with the same K_b (the grouping changes no result, §4 step 3);
    differentiable through the operator's autograd (compress_attention.md §7)."""
    T, N1, _ = q.shape
    N2 = kc.shape[1]
    groups, short_rows = _plan(cu, cu_cmp, K, l, d, lp, q.device)
    topk = torch.full((T, N2, K), -1, dtype=torch.int32, device=q.device)
    if short_rows:
        topk[:, :, 0] = 0          # rows of sequences with C_b = 0 keep [0, -1, ...]; the others are overwritten
    o_cmp: Optional[torch.Tensor] = None
    for g in groups:
        res = _attend(g, *_group_inputs(g, q, kc, vc), l, d, lp, scale)
        o_g = torch.where(g.seen, res.attention_out, torch.zeros_like(res.attention_out))   # s < l - 1: 0
        idx = torch.sort(res.topk_indices, dim=-1).values          # ascending (§11 item 4)
        if g.rows is None:
            o_cmp = o_g
            topk[:, :, :g.K_b] = idx
            topk[:, :, g.K_b:] = -1
        else:
            if o_cmp is None:
                o_cmp = q.new_zeros(T, N1, Dv)
            o_cmp = o_cmp.index_copy(0, g.rows, o_g)
            topk[g.rows] = torch.cat([idx, idx.new_full((idx.shape[0], N2, K - g.K_b), -1)], dim=-1)
    if o_cmp is None:
        o_cmp = q.new_zeros(T, N1, Dv)
    return o_cmp, topk


def _compress_and_attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, weight_k: torch.Tensor,
                         weight_v: torch.Tensor, cu: list[int], Dv: int, l: int, d: int, lp: int, K: int,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-3 of docs/spec/nsa_layer.md §4 (differentiable through the operators' autograd)."""
    from .ops.compress import compress

    kc, cu_cmp = compress(key, weight_k, cu_seqlens=cu, compress_block_size=l, compress_stride=d)
    vc, _ = compress(value, weight_v, cu_seqlens=cu, compress_block_size=l, compress_stride=d)
    return _compressed_branch(query, kc, vc, cu, int_list(cu_cmp, "cu_seqlens_cmp"), Dv, l, d, lp, K, scale)


def _compress_and_attend_backward(grad_o: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                  weight_k: torch.Tensor, weight_v: torch.Tensor, cu: list[int], l: int, d: int,
                                  lp: int, K: int, scale: float) -> tuple[torch.Tensor, ...]:
    """Gradients of o_cmp (steps 2-3) with respect to (query, key, value, weight_k, weight_v), by the operators'
    backward calls in the order autograd makes them in :func:`_compress_and_attend` (same values, bit for bit):
    the zeroed rows pass zero gradient; compress_attention.md §7 per call; compress.md §6 for both compressions.
    The forward of each call is recomputed for its softmax statistics."""
    from .ops.compress import compress, npu_nsa_compress_grad

    kc, cu_cmp = compress(key, weight_k, cu_seqlens=cu, compress_block_size=l, compress_stride=d)
    vc, _ = compress(value, weight_v, cu_seqlens=cu, compress_block_size=l, compress_stride=d)
    groups, _ = _plan(cu, int_list(cu_cmp, "cu_seqlens_cmp"), K, l, d, lp, query.device)
    dq = torch.zeros_like(query)
    if not groups:
        return dq, torch.zeros_like(key), torch.zeros_like(value), torch.zeros_like(weight_k), \
            torch.zeros_like(weight_v)
    dkc, dvc = torch.zeros_like(kc), torch.zeros_like(vc)
    for g in groups:
        q_g, kc_g, vc_g = _group_inputs(g, query, kc, vc)
        res = _attend(g, q_g, kc_g, vc_g, l, d, lp, scale)
        grad_g = grad_o if g.rows is None else grad_o.index_select(0, g.rows)
        grad_g = torch.where(g.seen, grad_g, torch.zeros_like(grad_g))
        dq_g, dkc_g, dvc_g = torch.ops.nsa.compress_attention_backward(
            grad_g.contiguous(), q_g, kc_g, vc_g, res.attention_out, res.softmax_max, res.softmax_sum, scale,
            query.shape[1], l, d, lp, g.K_b, g.atten_mask, g.cu_q[1:], g.cu_c[1:])
        if g.rows is None:
            dq, dkc, dvc = dq_g, dkc_g, dvc_g
        else:
            dq.index_copy_(0, g.rows, dq_g)
            dkc.index_add_(0, g.crows, dkc_g)
            dvc.index_add_(0, g.crows, dvc_g)
    dk, dwk = npu_nsa_compress_grad(dkc, key, weight_k, l, d, actual_seq_len=cu[1:])
    dv, dwv = npu_nsa_compress_grad(dvc, value, weight_v, l, d, actual_seq_len=cu[1:])
    return dq, dk, dv, dwk, dwv


# ---- the opaque operator used under torch.compile with tensor lengths (docs/spec/nsa_layer.md §12 item 8) ----

@torch.library.custom_op("nsa::layer_compressed_branch", mutates_args=())
def _layer_compressed_branch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, weight_k: torch.Tensor,
                             weight_v: torch.Tensor, cu_seqlens: torch.Tensor, compress_block_size: int,
                             compress_stride: int, select_block_size: int, select_block_count: int,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-3 of docs/spec/nsa_layer.md §4 as one operator: (o_cmp [T, N1, Dv], topk_indices [T, N2, K] int32)
    from q [T, N1, Dqk], k [T, N2, Dqk], v [T, N2, Dv], the compression weights [l, N2] and the B+1 offsets."""
    cu = _cu_seqlens_list(cu_seqlens, query.shape[0])
    with torch.no_grad():
        o_cmp, topk = _compress_and_attend(query, key, value, weight_k, weight_v, cu, value.shape[2],
                                           compress_block_size, compress_stride, select_block_size,
                                           select_block_count, scale)
    return o_cmp.contiguous(), topk


@_layer_compressed_branch.register_fake
def _(query, key, value, weight_k, weight_v, cu_seqlens, compress_block_size, compress_stride, select_block_size,
      select_block_count, scale):
    T, N1, _ = query.shape
    return (query.new_empty(T, N1, value.shape[2]),
            query.new_empty((T, key.shape[1], select_block_count), dtype=torch.int32))


@torch.library.custom_op("nsa::layer_compressed_branch_backward", mutates_args=())
def _layer_compressed_branch_backward(grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                                      value: torch.Tensor, weight_k: torch.Tensor, weight_v: torch.Tensor,
                                      cu_seqlens: torch.Tensor, compress_block_size: int, compress_stride: int,
                                      select_block_size: int, select_block_count: int, scale: float
                                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor]:
    """Gradients of o_cmp with respect to (query, key, value, weight_k, weight_v): the operators' backwards
    (compress.md §6, compress_attention.md §7) called explicitly, as autograd would call them."""
    cu = _cu_seqlens_list(cu_seqlens, query.shape[0])
    grads = _compress_and_attend_backward(grad, query, key, value, weight_k, weight_v, cu, compress_block_size,
                                          compress_stride, select_block_size, select_block_count, scale)
    return tuple(g.contiguous() for g in grads)


@_layer_compressed_branch_backward.register_fake
def _(grad, query, key, value, weight_k, weight_v, cu_seqlens, *args):
    return tuple(torch.empty_like(t) for t in (query, key, value, weight_k, weight_v))


def _branch_setup_context(ctx, inputs, output):
    query, key, value, weight_k, weight_v, cu_seqlens, *scalars = inputs
    ctx.save_for_backward(query, key, value, weight_k, weight_v, cu_seqlens)
    ctx.scalars = scalars


def _branch_backward(ctx, grad_o, _grad_topk):
    query, key, value, weight_k, weight_v, cu_seqlens = ctx.saved_tensors
    grads = torch.ops.nsa.layer_compressed_branch_backward(grad_o.contiguous(), query, key, value, weight_k,
                                                           weight_v, cu_seqlens, *ctx.scalars)
    return tuple(grads) + (None,) * 6


_layer_compressed_branch.register_autograd(_branch_backward, setup_context=_branch_setup_context)


# ---- the module ----

class NSAAttention(nn.Module):
    """Native Sparse Attention over packed variable-length sequences (docs/spec/nsa_layer.md).

    Args (docs/spec/nsa_layer.md §1; every violation raises an error naming the argument):
        hidden_size: H, the width of ``hidden_states`` and of the output.
        num_heads, num_kv_heads: N1 query heads and N2 key/value heads, ``N1 % N2 == 0``.
        head_dim_qk, head_dim_v: Dqk (queries and keys) and Dv (values), ``Dv <= Dqk``.
        compress_block_size, compress_stride: l and d of the key/value compression (windows of l tokens every d).
        select_block_size: l', the size of a selection block; l, d, l' are multiples of 16 with
            ``16 <= d <= 64``, ``d <= l <= l' <= 128`` and ``l' % d == 0``.
        select_block_count: K in [1, 32], the blocks each query attends in the selected branch.
        window_size: w >= 1, the keys (itself included) each query sees in the window branch. Tokens at the end of
            a sequence that cannot select their own block (fewer than l of them) see it through the window
            when ``w >= l`` (§5, §12 item 4).
        device, dtype: of the parameters (bf16, fp16, fp32; fp64 for gradcheck).

    Parameters (docs/spec/nsa_layer.md §2; created, and drawn from the global generator, in this order):
    ``q_proj.weight [N1·Dqk, H]``, ``k_proj.weight [N2·Dqk, H]``, ``v_proj.weight [N2·Dv, H]``,
    ``g_proj.weight [3·N1, H]``, ``o_proj.weight [H, N1·Dv]`` (``nn.Linear`` defaults, no bias), then
    ``compress_weight_k`` and ``compress_weight_v`` ``[l, N2]`` filled with 1/l. (``named_parameters()`` and
    ``state_dict()`` list a module's own parameters before those of its submodules, so they name the two
    compression weights first.)
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim_qk: int, head_dim_v: int,
                 compress_block_size: int, compress_stride: int, select_block_size: int, select_block_count: int,
                 window_size: int, *, device: Union[torch.device, str, None] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        names = ("hidden_size", "num_heads", "num_kv_heads", "head_dim_qk", "head_dim_v", "compress_block_size",
                 "compress_stride", "select_block_size", "select_block_count", "window_size")
        values = (hidden_size, num_heads, num_kv_heads, head_dim_qk, head_dim_v, compress_block_size,
                  compress_stride, select_block_size, select_block_count, window_size)
        sizes = [_size_arg(v, n) for v, n in zip(values, names)]
        _check_config(*sizes)
        (self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim_qk, self.head_dim_v,
         self.compress_block_size, self.compress_stride, self.select_block_size, self.select_block_count,
         self.window_size) = sizes
        H, N1, N2, Dqk, Dv, l = sizes[:6]
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(H, N1 * Dqk, bias=False, **factory)
        self.k_proj = nn.Linear(H, N2 * Dqk, bias=False, **factory)
        self.v_proj = nn.Linear(H, N2 * Dv, bias=False, **factory)
        self.g_proj = nn.Linear(H, 3 * N1, bias=False, **factory)
        self.o_proj = nn.Linear(N1 * Dv, H, bias=False, **factory)
        self.compress_weight_k = nn.Parameter(torch.full((l, N2), 1.0 / l, **factory))
        self.compress_weight_v = nn.Parameter(torch.full((l, N2), 1.0 / l, **factory))

    @property
    def config(self) -> dict[str, int]:
        """The ten constructor sizes by name (what :func:`nsa_ops.reference.nsa_layer_reference` takes)."""
        return {n: getattr(self, n) for n in ("hidden_size", "num_heads", "num_kv_heads", "head_dim_qk",
                                              "head_dim_v", "compress_block_size", "compress_stride",
                                              "select_block_size", "select_block_count", "window_size")}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: Any, *, return_aux: bool = False
                ) -> Union[torch.Tensor, tuple[torch.Tensor, NSAAux]]:
        """docs/spec/nsa_layer.md §4.

        hidden_states: ``[T, H]`` in the parameters' dtype, the sequences packed along T.
        cu_seqlens: B+1 offsets (list, tuple or 1-D integer tensor): ``cu[0] = 0``, non-decreasing, ``cu[-1] = T``;
            any lengths, 0 and lengths below l included. Under ``torch.compile`` pass a tensor: new lengths then
            reuse the compiled graph.
        return_aux: also return :class:`NSAAux`.

        Returns ``[T, H]`` in the parameters' dtype (and the :class:`NSAAux`)."""
        x = hidden_states
        self._check_hidden(x)
        N1, N2, Dqk, Dv = self.num_heads, self.num_kv_heads, self.head_dim_qk, self.head_dim_v
        l, d, lp, K, win = (self.compress_block_size, self.compress_stride, self.select_block_size,
                            self.select_block_count, self.window_size)
        T = x.shape[0]
        scale = 1.0 / math.sqrt(Dqk)
        compiled_lengths = isinstance(cu_seqlens, torch.Tensor) and torch.compiler.is_compiling()
        if compiled_lengths:
            if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
                raise ValueError(f"cu_seqlens must be a 1-D integer tensor, got {cu_seqlens.dtype} "
                                 f"{list(cu_seqlens.shape)}")
            cu: Any = cu_seqlens
        else:
            cu = _cu_seqlens_list(cu_seqlens, T)

        # Step 1: projections and fp32 gates (fp64 for fp64 modules, §12 item 7).
        q, k, v, gates = self._project(x)

        if T == 0:
            o_cmp = o_slc = o_swa = x.new_zeros(0, N1, Dv)
            topk = torch.full((0, N2, K), -1, dtype=torch.int32, device=x.device)
        else:
            from .ops.select_attention import select_attention
            from .ops.window_attention import sliding_window_attention

            # Steps 2-3.
            if compiled_lengths:
                o_cmp, topk = torch.ops.nsa.layer_compressed_branch(
                    q, k, v, self.compress_weight_k, self.compress_weight_v, cu, l, d, lp, K, scale)
            else:
                o_cmp, topk = _compress_and_attend(q, k, v, self.compress_weight_k, self.compress_weight_v, cu,
                                                   Dv, l, d, lp, K, scale)
            # Step 4: causal selected attention over the sorted blocks.
            o_slc = select_attention(q, k, v, topk, cu_seqlens_q=cu, cu_seqlens_kv=cu, select_block_size=lp,
                                     scale=scale, causal=True).attention_out
            # Step 5: the last w keys, itself included.
            o_swa = sliding_window_attention(q, k, v, cu, win, scale=scale).attention_out

        # Step 6: one fp32 expression, in this order, rounded once to the parameters' dtype.
        acc = gates.dtype
        o = (gates[..., 0:1] * o_cmp.to(acc) + gates[..., 1:2] * o_slc.to(acc)
             + gates[..., 2:3] * o_swa.to(acc)).to(x.dtype)
        out = self.o_proj(o.reshape(T, N1 * Dv))
        if return_aux:
            return out, NSAAux(topk, gates, o_cmp, o_slc, o_swa)
        return out

    # ---- generation: prefill and decode over paged caches (docs/spec/nsa_layer.md "Generation") ----

    def new_cache(self, batch_size: int, *, page_size: int = 64, compressed_page_size: Optional[int] = None,
                  max_len: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> "NSACache":
        """An empty :class:`nsa_ops.NSACache` for ``batch_size`` sequences, on the parameters' device.

        page_size: P, raw tokens per page; compressed_page_size: compressed tokens per page (default P).
        max_len: an optional hint to size the first allocation (pages are otherwise added on demand, the storage
        doubling when the free list runs out). dtype: the caches' dtype, which must be the parameters' (default)."""
        from .cache import NSACache

        w = self.q_proj.weight
        if dtype is not None and dtype != w.dtype:
            raise ValueError(f"dtype must be the parameters' dtype {w.dtype} (the decode operators take equal dtypes), "
                             f"got {dtype}")
        return NSACache(batch_size, self.num_kv_heads, self.head_dim_qk, self.head_dim_v, self.compress_block_size,
                        self.compress_stride, page_size=page_size, compressed_page_size=compressed_page_size,
                        max_len=max_len, dtype=w.dtype, device=w.device)

    def _check_cache(self, cache: Any) -> None:
        from .cache import NSACache

        if not isinstance(cache, NSACache):
            raise TypeError(f"cache must be an NSACache (from NSAAttention.new_cache), got {type(cache).__name__}")
        w = self.q_proj.weight
        shape = (self.num_kv_heads, self.head_dim_qk, self.head_dim_v, self.compress_block_size,
                 self.compress_stride)
        if (cache.num_kv_heads, cache.head_dim_qk, cache.head_dim_v, cache.compress_block_size,
                cache.compress_stride) != shape or cache.dtype != w.dtype or cache.device != w.device:
            raise ValueError("cache was not made for this layer (num_kv_heads, head dims, l, d, dtype or device "
                             "differ): create it with this layer's new_cache()")

    def _project(self, x: torch.Tensor):
        """§4 step 1: q ``[T, N1, Dqk]``, k ``[T, N2, Dqk]``, v ``[T, N2, Dv]`` in the parameters' dtype and the gates
        ``[T, N1, 3]`` in fp32 (fp64 for fp64 modules, §12 item 7)."""
        T = x.shape[0]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        q = self.q_proj(x).view(T, self.num_heads, self.head_dim_qk)
        k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim_qk)
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim_v)
        gates = _sigmoid_position_independent(self.g_proj(x).view(T, self.num_heads, 3).to(acc))
        return q, k, v, gates

    def _check_hidden(self, x: Any) -> None:
        w = self.q_proj.weight
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"hidden_states must be a torch.Tensor [T, H], got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"hidden_states must be [T, hidden_size = {self.hidden_size}], got {list(x.shape)}")
        if x.dtype != w.dtype:
            raise ValueError(f"hidden_states must have the parameters' dtype {w.dtype}, got {x.dtype}")
        if x.device != w.device:
            raise ValueError(f"hidden_states must be on the parameters' device {w.device}, got {x.device}")

    def prefill(self, hidden_states: torch.Tensor, cu_seqlens: Any, cache: "NSACache") -> torch.Tensor:
        """The training forward (§4) on the packed prompts, which also fills ``cache``.

        hidden_states ``[T, H]`` and cu_seqlens (B+1 offsets, ``B = cache.batch_size``; prompts of any length, 0
        included) as for :meth:`forward`, whose output this returns unchanged (with its autograd graph when grad
        mode is on). The cache, which must be empty (new or :meth:`NSACache.reset`), receives every prompt token's
        key and value in its raw pages and, for every complete window, the compressed key and value that the
        training compression (``nsa_ops.compress``, compress.md §4 rounding) gives, at the slot of decode.md §1."""
        from .ops.compress import compress

        self._check_cache(cache)
        self._check_hidden(hidden_states)
        cu = _cu_seqlens_list(cu_seqlens, hidden_states.shape[0])
        B = len(cu) - 1
        if B != cache.batch_size:
            raise ValueError(f"cu_seqlens describes {B} sequences but the cache holds batch_size = "
                             f"{cache.batch_size}")
        if cache.prefilled or any(cache.seq_lens):
            raise RuntimeError("prefill needs an empty cache: this one already holds tokens (call cache.reset() "
                               "or make a new one with new_cache())")
        out = self.forward(hidden_states, cu)
        with torch.no_grad():
            x = hidden_states.detach()
            T, N2, Dqk, Dv = x.shape[0], self.num_kv_heads, self.head_dim_qk, self.head_dim_v
            # The same projections and compression as the forward (deterministic: the same bits).
            k = self.k_proj(x).view(T, N2, Dqk)
            v = self.v_proj(x).view(T, N2, Dv)
            slots: list[int] = []
            for b in range(B):
                cache._reserve(b, cu[b + 1] - cu[b])
                slots += cache._raw_slots(b, 0, cu[b + 1] - cu[b])
                cache._lengths[b] = cu[b + 1] - cu[b]
            if T:
                cache._write_raw(slots, k, v)
                l, d = self.compress_block_size, self.compress_stride
                kc, cu_cmp = compress(k, self.compress_weight_k.detach(), cu_seqlens=cu, compress_block_size=l,
                                      compress_stride=d)
                vc, _ = compress(v, self.compress_weight_v.detach(), cu_seqlens=cu, compress_block_size=l,
                                 compress_stride=d)
                cu_c = int_list(cu_cmp, "cu_seqlens_cmp")
                cslots = [cache.compressed_slot(b, c) for b in range(B) for c in range(cu_c[b + 1] - cu_c[b])]
                if cslots:
                    idx = torch.tensor(cslots, dtype=torch.int64, device=x.device)
                    cache.compressed_key_slots().index_copy_(0, idx, kc)
                    cache.compressed_value_slots().index_copy_(0, idx, vc)
        cache.prefilled = True
        return out

    def decode_step(self, hidden_states: torch.Tensor, cache: "NSACache", *, query_lens: Any = None,
                    selection: str = "training") -> torch.Tensor:
        """One generation step: the new tokens of every sequence attend to their cached prefix and to each other.

        hidden_states: ``[T_new, H]``, the new tokens packed by sequence (sequence 0's first); query_lens: the new
        tokens per sequence q_b >= 0 (a list of B ints, or one int for all; default 1 each), ``sum = T_new``.
        Returns ``[T_new, H]``: row i of sequence b is the layer's output for raw position ``S_b + i`` (S_b the
        length before the step), computed by the decode composition of docs/spec/decode.md §1 (steps in the body).
        selection: "training" (default): each token's forced blocks are training's (0, cur - 1, cur; nsa_layer.md
        §5), so the step's outputs equal the training forward's (§13); "operator": the blocks that
        npu_nsa_compress_attention_infer forces (0, Sel' - 2, Sel' - 1; decode.md §3 step 7), as an NPU decode
        would, which differ for the first positions of each selection block and cost no extra query rows.
        Runs without autograd (the decode operators have no derivative). Requires a prefilled cache."""
        from .ops.compress_attention_infer import npu_nsa_compress_attention_infer
        from .ops.compress_infer import npu_nsa_compress_infer
        from .ops.paged_window_attention import paged_window_attention
        from .ops.select_attention_infer import npu_nsa_select_attention_infer

        self._check_cache(cache)
        self._check_hidden(hidden_states)
        if not cache.prefilled:
            raise RuntimeError("decode_step before prefill: call prefill(hidden_states, cu_seqlens, cache) first "
                               "(with zero-length prompts if there are none)")
        if selection not in ("training", "operator"):
            raise ValueError(f"selection must be 'training' or 'operator', got {selection!r}")
        B = cache.batch_size
        if query_lens is None:
            qlens = [1] * B
        elif isinstance(query_lens, int) and not isinstance(query_lens, bool):
            qlens = [query_lens] * B
        else:
            qlens = int_list(query_lens, "query_lens")
            if len(qlens) != B:
                raise ValueError(f"query_lens must have batch_size = {B} entries, got {len(qlens)}")
        if any(q < 0 for q in qlens):
            raise ValueError(f"query_lens must be >= 0, got {qlens}")
        T = hidden_states.shape[0]
        if sum(qlens) != T:
            raise ValueError(f"hidden_states has {T} rows but the new tokens per sequence (query_lens = {qlens}) sum "
                             f"to {sum(qlens)} (batch_size = {B}; one new token per sequence by default)")
        N1, N2, Dqk, Dv = self.num_heads, self.num_kv_heads, self.head_dim_qk, self.head_dim_v
        l, d, lp, K, win = (self.compress_block_size, self.compress_stride, self.select_block_size,
                            self.select_block_count, self.window_size)
        scale = 1.0 / math.sqrt(Dqk)
        x = hidden_states
        with torch.no_grad():
            # Step 1 (§4 step 1): projections and fp32 gates, as in the forward.
            q, k, v, gates = self._project(x)
            if T == 0:
                return self.o_proj(x.new_zeros(0, N1 * Dv))
            start = cache.seq_lens
            active = [b for b in range(B) if qlens[b] > 0]
            # Decode step 1 (decode.md §1): the new keys and values into the raw pages.
            slots: list[int] = []
            for b in active:
                cache._reserve(b, start[b] + qlens[b])
                slots += cache._raw_slots(b, start[b], start[b] + qlens[b])
            cache._write_raw(slots, k, v)
            for b in active:
                cache._lengths[b] = start[b] + qlens[b]
            # Decode step 2 (§2): one compress_infer call per new-token index j for the sequences whose length
            # start + j + 1 completes a window (compressed token c = (S - l)/d at its §1 slot).
            wk, wv = self.compress_weight_k.detach(), self.compress_weight_v.detach()
            for j in range(max(qlens)):
                writers = [b for b in active if qlens[b] > j and start[b] + j + 1 >= l
                           and (start[b] + j + 1 - l) % d == 0]
                if not writers:
                    continue
                lengths = [start[b] + j + 1 for b in writers]
                slot_map = torch.tensor([cache.compressed_slot(b, (S - l) // d) for b, S in zip(writers, lengths)],
                                        dtype=torch.int32, device=x.device)
                table = cache.block_table(writers)
                npu_nsa_compress_infer(cache.key_pages, wk, slot_map, l, d, cache.page_size, block_table=table,
                                       actual_seq_len=lengths, cache=cache.compressed_key_slots())
                npu_nsa_compress_infer(cache.value_pages, wv, slot_map, l, d, cache.page_size, block_table=table,
                                       actual_seq_len=lengths, cache=cache.compressed_value_slots())
            # Decode step 3 (§3): compressed attention and selection. Every new token is its own batch of the call
            # (its own length and compressed count), so a multi-token step equals token-by-token steps; tokens at
            # positions < l - 1 see no compressed token: o_cmp = 0 and the blocks [0, -1, ...] (nsa_layer.md §4
            # step 3).
            #
            # Forced blocks. Training forces, for the token at position s, the blocks 0, cur - 1 and cur with
            # cur = s // l' (nsa_layer.md §5); the decode operator forces 0, Sel' - 2 and Sel' - 1 with
            # Sel' = ceil(((C - 1)·d + l) / l') (decode.md §3 step 7). They agree when Sel' = cur + 1; when the
            # compressed tokens end at or before cur·l' (the first positions of a block: s % l' < d - 1 when d
            # divides l) Sel' = cur and the operator would force cur - 2 instead of cur. With
            # selection="training" such a token is given to the operator as the first query of an MTP batch whose
            # compressed count C' is raised until Sel'(C') = cur + 1 (S' = (C' - 1)·d + l raw tokens, q' = S' - s
            # queries, atten_mask on): the added compressed tokens end after s, so they are masked for it
            # (§3 step 3) and its P, scores and output are those of its C tokens, while the forced blocks become
            # training's. The extra query rows (copies of the token's query, q' <= d in all) are discarded.
            row_batch = [b for b in active for _ in range(qlens[b])]
            row_len = [start[b] + i + 1 for b in active for i in range(qlens[b])]
            o_cmp = q.new_zeros(T, N1, Dv)
            topk = torch.full((T, N2, K), -1, dtype=torch.int32, device=x.device)
            topk[:, :, 0] = 0
            rows = [r for r in range(T) if row_len[r] >= l]
            if rows:
                call_q, call_c, call_s, first = [], [], [], []
                for r in rows:
                    S = row_len[r]
                    s, C = S - 1, (S - l) // d + 1
                    Cx = C
                    if selection == "training":
                        while -(-((Cx - 1) * d + l) // lp) <= s // lp:
                            Cx += 1
                    Sx = (Cx - 1) * d + l if Cx > C else S
                    first.append(sum(call_q))
                    call_q.append(Sx - s)
                    call_c.append(Cx)
                    call_s.append(Sx)
                    if Cx > C:
                        cache._reserve_compressed(row_batch[r], Cx)
                rows_t = torch.tensor(rows, dtype=torch.int64, device=x.device)
                q_call = q.index_select(0, torch.tensor([r for r, n in zip(rows, call_q) for _ in range(n)],
                                                        dtype=torch.int64, device=x.device))
                mtp = any(n > 1 for n in call_q)
                o_r, idx = npu_nsa_compress_attention_infer(
                    q_call, cache.compressed_key_pages, cache.compressed_value_pages, scale, N1, N2, lp, K,
                    cache.compressed_page_size, l, d, layout="TND",
                    atten_mask=torch.ones(1, dtype=torch.bool) if mtp else None,
                    block_table=cache.block_table([row_batch[r] for r in rows], compressed=True),
                    actual_seq_qlen=call_q, actual_cmp_seq_kvlen=call_c,
                    actual_sel_seq_kvlen=call_s if mtp else None)
                if mtp:
                    first_t = torch.tensor(first, dtype=torch.int64, device=x.device)
                    o_r, idx = o_r.index_select(0, first_t), idx.index_select(0, first_t)
                # Ascending block order, -1 last (the training order, nsa_layer.md §11 item 4).
                big = torch.iinfo(torch.int32).max
                idx = torch.sort(torch.where(idx < 0, big, idx), dim=-1).values
                idx = torch.where(idx == big, -1, idx)
                o_cmp.index_copy_(0, rows_t, o_r)
                topk.index_copy_(0, rows_t, idx)
            # Decode step 4 (§4): selected attention over the raw pages, MTP causality by position.
            table = cache.block_table(active)
            seq_lens = [cache.seq_lens[b] for b in active]
            q_lens = [qlens[b] for b in active]
            o_slc = npu_nsa_select_attention_infer(
                q, cache.key_pages.view(cache.num_pages, cache.page_size, N2 * Dqk),
                cache.value_pages.view(cache.num_pages, cache.page_size, N2 * Dv), topk, scale, N1, N2, lp, K,
                cache.page_size, layout="TND", block_table=table, actual_seq_qlen=q_lens, actual_seq_kvlen=seq_lens)
            # Decode step 5 (§9): the last w tokens of every new token.
            o_swa = paged_window_attention(q, cache.key_pages, cache.value_pages, table, seq_lens, win, scale=scale,
                                           query_lens=q_lens)
            # Step 6 (nsa_layer.md §4 step 6): the same fp32 gate expression, one rounding, o_proj.
            acc = gates.dtype
            o = (gates[..., 0:1] * o_cmp.to(acc) + gates[..., 1:2] * o_slc.to(acc)
                 + gates[..., 2:3] * o_swa.to(acc)).to(x.dtype)
            return self.o_proj(o.reshape(T, N1 * Dv))
