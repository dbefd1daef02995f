"""Python entry points of the operator (torch.ops.nsa.compress_attention); the contract is docs/spec/compress_attention.md.

* :func:`npu_nsa_compress_attention`: a drop-in for ``torch_npu.npu_nsa_compress_attention``: the same
  signature, argument order, defaults and output order.
* :func:`compress_attention`: a keyword API with FlashAttention-style ``cu_seqlens`` and a default scale,
  returning a :class:`CompressAttentionOutput` named tuple.

The operator does **not** compress: ``key`` and ``value`` are the compressed tokens (one row per window of
``l = compress_block_size`` tokens, stride ``d = compress_stride``), e.g. from :func:`nsa_ops.compress`.

Both entry points cast query/key/value under CPU autocast, then call the operator, whose autograd formula marks
the statistics non-differentiable, or, for a tensor scale that requires grad and inside torch.func transforms,
:class:`~nsa_ops.ops._compress_attention_autograd.CompressAttentionFunction` (the scale's gradient, functorch's
setup_context, a vmap rule). Under torch.compile / torch.export / torch.jit.trace they read no
tensor values in Python: lengths travel as tensors to operators that check them when the graph runs.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple, Optional

import torch

from .._args import (check_finite_scale, cu_seqlens_list, cu_seqlens_prefix_tensor, int_arg, int_list, is_tracing,
                     optional_int_list, scale_arg)
from .._lib import load_library
from .._args import autocast_cast
from ._compress_attention_autograd import CompressAttentionFunction, forward_op

load_library()

__all__ = ["CompressAttentionOutput", "npu_nsa_compress_attention", "compress_attention", "cpu_isa"]


def cpu_isa() -> tuple[str, str]:
    """The CPU backend's instruction-set paths ``(detected, active)``: the best that cpuid + XCR0 allow, and what
    runs: the fastest path on this CPU, or the one ``NSA_CPU_ISA=scalar|avx2|avx512|avx512bf16`` names (decided
    once per process; ``nsa_ops.cpu_isa_report()`` says why)."""
    detected, active = torch.ops.nsa.cpu_isa()
    return detected, active


class CompressAttentionOutput(NamedTuple):
    """Outputs of the operator (docs/spec/compress_attention.md §4), in torch_npu's order.

    attention_out: ``[T, N1, D2]``, query's dtype, contiguous.
    topk_indices:  ``[T, N2, K]`` int32, selection-block indices local to the batch, in ``[0, Sel_b)``,
                   by descending importance (ties: smaller index first).
    softmax_max:   ``[T, N1, 8]`` float32, the row maxima of the scores, per-batch memory layout
                   (see :mod:`nsa_ops.stats`); not differentiable.
    softmax_sum:   ``[T, N1, 8]`` float32, the softmax denominators, same layout; not differentiable.
    """

    attention_out: torch.Tensor
    topk_indices: torch.Tensor
    softmax_max: torch.Tensor
    softmax_sum: torch.Tensor


def _run(query, key, value, scale, head_num, l, d, lp, K, topk_mask, atten_mask, seq_q, seq_c, seq_sel, ext=False,
         causal=False):
    """Autocast, then the operator (plain autograd) or CompressAttentionFunction (a tensor scale that requires
    grad, or inside a torch.func transform). ``scale``: a Python float or a 0-d tensor (read with .item(): a
    graph break under torch.compile; differentiated when it requires grad)."""
    if torch.is_autocast_enabled("cpu") and query.device.type == "cpu":
        dtype = torch.get_autocast_dtype("cpu")
        query, key, value = (autocast_cast(x, dtype) for x in (query, key, value))
    scale_tensor = None
    if isinstance(scale, torch.Tensor):
        if scale.requires_grad and torch.is_grad_enabled():
            scale_tensor = scale
        scale = float(scale.detach())
    if scale_tensor is None and not torch._C._are_functorch_transforms_active():
        # The operator directly: its own autograd formula (torch.library.register_autograd, the same backward and
        # non-differentiable statistics) serves plain autograd; autograd.Function.apply would bind its arguments
        # with inspect.signature on every call (~0.2 ms).
        op = forward_op(isinstance(seq_q, torch.Tensor), ext)
        return op(query, key, value, scale, head_num, l, d, lp, K, topk_mask, atten_mask, seq_q, seq_c, seq_sel,
                  *((causal,) if ext else ()))
    return CompressAttentionFunction.apply(query, key, value, scale_tensor, scale, head_num, l, d, lp, K, topk_mask,
                                           atten_mask, seq_q, seq_c, seq_sel, ext, causal)


def npu_nsa_compress_attention(query, key, value, scale_value, head_num, compress_block_size, compress_stride,
                               select_block_size, select_block_count, topk_mask=None, atten_mask=None,
                               actual_seq_qlen=None, actual_cmp_seq_kvlen=None, actual_sel_seq_kvlen=None):
    """Drop-in replacement for ``torch_npu.npu_nsa_compress_attention`` (docs/spec/compress_attention.md §1-§6).

    Arguments as in torch_npu: ``query [T, N1, D]``, ``key [T2, N2, D]``, ``value [T2, N2, D2]`` (bf16,
    fp16; fp32 and fp64 as extensions; any strides; key/value are the *compressed* tokens), ``scale_value``
    (a Python or NumPy number, or a 0-d tensor; one that requires grad gets a gradient), ``head_num`` (= N1),
    the block sizes ``compress_block_size`` (l), ``compress_stride`` (d), ``select_block_size`` (l'),
    ``select_block_count`` (K), optional bool/uint8 masks ``topk_mask [maxSq, maxSel]`` (True = force the block)
    and ``atten_mask [maxSq, maxC]`` (True = **remove** the token, the opposite of scaled_dot_product_attention),
    and the per-batch prefix sums ``actual_seq_qlen``, ``actual_cmp_seq_kvlen`` and (optional, checked)
    ``actual_sel_seq_kvlen``, **without a leading 0**: lists/tuples of ints or 1-D int64/int32 CPU tensors.
    Tensors select the operator's ``.tensor_lengths`` overload, which reads them inside the kernel: under
    ``torch.compile`` new lengths then cause no recompilation (lists are turned into such tensors while
    tracing).

    Returns the tuple ``(attention_out, topk_indices, softmax_max, softmax_sum)``; see
    :class:`CompressAttentionOutput`. Violations of docs/spec/compress_attention.md §6 raise RuntimeError naming
    the argument (for lengths given in Python, the message also names the batch at fault).
    """
    lengths = (actual_seq_qlen, actual_cmp_seq_kvlen, actual_sel_seq_kvlen)
    if isinstance(scale_value, torch.Tensor):
        scale_value = scale_arg(scale_value, "scale_value", None)
    elif scale_value is None:  # no default in torch_npu's signature
        raise TypeError("scale_value must be a float (torch_npu's drop-in has no default scale), got None")
    elif type(scale_value) not in (float, int, torch.SymInt, torch.SymFloat):
        scale_value = scale_arg(scale_value, "scale_value", None)   # NumPy numbers, 0-d arrays -> float; no bools
    tracing = is_tracing()
    if tracing or any(isinstance(x, torch.Tensor) for x in lengths):
        # Lengths as tensors: the .tensor_lengths overload reads them in the kernel, so under
        # torch.compile new lengths are new inputs, not new constants (no recompilation).
        seqs = tuple(_lengths_tensor(x, name) for x, name in zip(lengths, _LENGTH_NAMES))
    else:
        seqs = tuple(optional_int_list(x, name) for x, name in zip(lengths, _LENGTH_NAMES))
    args = (query, key, value, scale_value, head_num, compress_block_size, compress_stride, select_block_size,
            select_block_count, topk_mask, atten_mask, *seqs)
    if tracing:
        return _run(*args)
    try:
        return _run(*args)
    except RuntimeError as e:
        hint = _lengths_hint(str(e), seqs[1], compress_block_size, compress_stride, select_block_size,
                             select_block_count)
        if not hint:
            raise
        raise RuntimeError(f"{e}{hint}") from None


_LENGTH_NAMES = ("actual_seq_qlen", "actual_cmp_seq_kvlen", "actual_sel_seq_kvlen")


def _lengths_tensor(value: Any, name: str) -> Optional[torch.Tensor]:
    """A prefix-sum list as a 1-D int64 CPU tensor for the .tensor_lengths overload (tensors pass unchanged;
    their rank, dtype and device are checked by the operator). Elements may be symbolic while tracing."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    if is_tracing() and isinstance(value, (list, tuple)):   # elements untouched: no guards on their values
        return torch.tensor(list(value), dtype=torch.int64)
    return torch.tensor(int_list(value, name), dtype=torch.int64)


def _lengths_hint(message: str, seq_c: Any, l: Any, d: Any, lp: Any, K: Any) -> str:
    """More words for the operator's length errors of the drop-in (eager only): which batch, how long, and the
    likely cause. Empty when there is nothing to add."""
    try:
        prefix = int_list(seq_c, "actual_cmp_seq_kvlen")
        l, d, lp, K = (int_arg(x, "") for x in (l, d, lp, K))
    except (TypeError, ValueError):
        return ""
    cmp_len = [x - p for x, p in zip(prefix, [0] + prefix[:-1])]
    if "at least one compressed token" in message:
        bad = [b for b, c in enumerate(cmp_len) if c < 1]
        if not bad:
            return ""
        b = bad[0]
        if b == 0 and prefix and prefix[0] == 0:
            return (". Hint: actual_cmp_seq_kvlen starts with 0, but it holds prefix sums *without* a leading 0 "
                    "(unlike FlashAttention's cu_seqlens), so the 0 makes batch 0 empty: pass cu_seqlens[1:], or "
                    "call nsa_ops.compress_attention(cu_seqlens_cmp=cu_seqlens)")
        hint = (f". Hint: actual_cmp_seq_kvlen[{b}] = {prefix[b]} equals the previous prefix sum; a sequence needs "
                f"at least l = {l} tokens for one compressed token (nsa_ops.compressed_lengths)")
        return hint
    if "smallest number of selection blocks" in message and d > 0 and lp % d == 0 and lp >= d:
        M = lp // d
        bad = [b for b, c in enumerate(cmp_len) if c >= 1 and -(-c // M) < K]
        if not bad:
            return ""
        b = bad[0]
        return (f"; batch {b} has C_b = {cmp_len[b]} compressed tokens, i.e. {-(-cmp_len[b] // M)} selection "
                f"blocks ({len(bad)} batch{'es' if len(bad) > 1 else ''} below K = {K}); K blocks need "
                f"C_b >= {(K - 1) * M + 1}, i.e. sequences of >= {l + (K - 1) * lp} tokens")
    return ""


def _check_tensor(t: Any, name: str, rank: int, layout: str, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must be a {rank}-D tensor {layout}, got shape {list(t.shape)}")


def _is_plain(t: Optional[torch.Tensor]) -> bool:
    """False for a tensor wrapped by a functorch transform (vmap, grad), whose values Python must not read."""
    if t is None:
        return True
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return wrapped is None or not wrapped(t)


def _probe_rows(rows: int) -> list[int]:
    return sorted({0, rows // 2, rows - 1})


def _check_mask_convention(atten_mask: Optional[torch.Tensor], topk_mask: Optional[torch.Tensor], l: int, d: int,
                           lp: int) -> None:
    """ValueError when a mask is exactly the complement of the §9 mask on three probe rows (first, middle, last):
    the mask of scaled_dot_product_attention's convention (True = keep / visible) passed where nsa_ops wants
    True = remove (atten_mask) or True = force (topk_mask). O(columns) work; skipped while tracing."""
    if atten_mask is not None and atten_mask.shape[0] >= l and atten_mask.shape[1] > 0:
        rows = _probe_rows(atten_mask.shape[0])
        t = torch.tensor(rows).unsqueeze(1)
        visible = torch.arange(atten_mask.shape[1]).unsqueeze(0) * d + (l - 1) <= t   # §9: True = visible
        got = atten_mask[rows].to(device="cpu", dtype=torch.bool)
        if torch.equal(got, visible):
            raise ValueError(
                f"atten_mask looks inverted: on rows {rows} it is True exactly where the causal rule of "
                "docs/spec/compress_attention.md §9 lets query t see compressed token i. nsa_ops masks use "
                "True = REMOVE (the opposite of torch's scaled_dot_product_attention, where True = keep): pass "
                f"~atten_mask, or nsa_ops.make_atten_mask(max_sq, max_c, {l}, {d})")
    if topk_mask is not None and topk_mask.shape[1] >= 2 and topk_mask.shape[0] > 0:
        rows = _probe_rows(topk_mask.shape[0])
        cur = torch.tensor(rows).unsqueeze(1) // lp
        k = torch.arange(topk_mask.shape[1]).unsqueeze(0)
        not_forced = ~((k < 1) | ((k <= cur) & (k > cur - 2)))     # complement of make_topk_mask's defaults
        got = topk_mask[rows].to(device="cpu", dtype=torch.bool)
        if torch.equal(got, not_forced) and bool(got.any(dim=1).all()):
            raise ValueError(
                f"topk_mask looks inverted: on rows {rows} it is True everywhere except the initial and local "
                "blocks of docs/spec/compress_attention.md §9. topk_mask uses True = FORCE the block into the "
                f"top-k: pass ~topk_mask, or nsa_ops.make_topk_mask(max_sq, max_sel, {lp})")


def _warn_raw_kv(cu_q: Any, cu_c: Any, l: int) -> None:
    """UserWarning when cu_seqlens_cmp equals cu_seqlens_q and a batch has >= l rows: key/value then hold as many
    rows per sequence as the queries, which compression (C_b = (S_b - l)//d + 1 < S_b) never gives."""
    if isinstance(cu_q, torch.Tensor) or isinstance(cu_c, torch.Tensor):
        if not (isinstance(cu_q, torch.Tensor) and isinstance(cu_c, torch.Tensor)) or cu_q.shape != cu_c.shape:
            return
        same = torch.equal(cu_q.to(torch.int64), cu_c.to(torch.int64))
        longest = int((cu_q[1:] - cu_q[:-1]).max()) if same else 0
    else:
        same = list(cu_q) == list(cu_c)
        longest = max(b - a for a, b in zip(cu_q[:-1], cu_q[1:])) if same else 0
    if same and longest >= l:
        warnings.warn("compress_attention: cu_seqlens_cmp equals cu_seqlens_q, so key/value have one row per query "
                      "token: they look uncompressed. The operator does not compress; pass the compressed keys "
                      "and values (nsa_ops.compress, or any pooling over windows of compress_block_size tokens "
                      "with stride compress_stride) and their offsets (nsa_ops.compressed_lengths).",
                      UserWarning, stacklevel=3)


def compress_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                       cu_seqlens_q: Any, cu_seqlens_cmp: Any, compress_block_size: int, compress_stride: int,
                       select_block_size: int, select_block_count: int, scale: Any = None,
                       atten_mask: Optional[torch.Tensor] = None, topk_mask: Optional[torch.Tensor] = None,
                       causal: bool = False) -> CompressAttentionOutput:
    """Compressed attention of Native Sparse Attention with top-k block selection (docs/spec/compress_attention.md).

    **The operator does not compress.** ``key`` and ``value`` are the *compressed* tokens: row ``i`` of a
    sequence summarises its tokens ``[i*d, i*d + l)`` (``C_b = (S_b - l)//d + 1`` rows for ``S_b >= l`` tokens,
    :func:`nsa_ops.compressed_lengths`). Produce them with :func:`nsa_ops.compress` (or your own pooling); raw
    keys/values give a different operator (a warning is issued when ``cu_seqlens_cmp == cu_seqlens_q``).

    Batches are packed along the first dimension ("TND", as in FlashAttention's varlen API);
    batch ``b`` owns query rows ``[cu_seqlens_q[b], cu_seqlens_q[b+1])`` and compressed key/value rows
    ``[cu_seqlens_cmp[b], cu_seqlens_cmp[b+1])``. Names: ``l = compress_block_size``, ``d =
    compress_stride``, ``l' = select_block_size``, ``K = select_block_count``, ``M = l'/d``,
    ``G = N1/N2``; ``Sq_b`` and ``C_b`` are the batch's query and compressed-token counts,
    ``Sel_b = ceil(C_b/M)`` its selection blocks; ``maxSq``, ``maxC``, ``maxSel`` their maxima.

    Args:
        query: ``[T, N1, D]``, bfloat16 / float16 (float32, float64: extensions), any strides.
            Query head ``h`` reads key/value head ``h // G``.
        key: ``[T2, N2, D]`` compressed keys, query's dtype, any strides. Rows past
            ``cu_seqlens_cmp[-1]`` are ignored.
        value: ``[T2, N2, D2]`` compressed values, ``D2 <= D``, query's dtype, any strides.
        cu_seqlens_q: ``B+1`` ints (list, tuple or 1-D integer CPU tensor), ``0 = cu[0] <= cu[1] <= ...``,
            ``cu[-1] = T``. Empty batches (``Sq_b = 0``) are allowed. A tensor is checked when the graph runs
            (torch.compile does not recompile for new values; lists are turned into tensors while tracing).
        cu_seqlens_cmp: ``B+1`` ints, same convention, ``cu[-1] <= T2``; every ``C_b >= 1``.
        compress_block_size, compress_stride, select_block_size: multiples of 16 with
            ``16 <= d <= l <= l' <= 128``, ``d <= 64``, ``l' % d == 0``.
        select_block_count: ``K`` in ``[1, 32]``. A batch with fewer selection blocks (``Sel_b < K``, a sequence
            shorter than ``l + (K-1)·l'`` tokens) is accepted: slots ``Sel_b..K-1`` of its rows hold -1, the
            family's empty-slot marker (docs/spec/compress_attention.md §10; the drop-in keeps ``K <= min_b Sel_b``).
        scale: multiplies ``q . k`` (used as float32); default ``1 / sqrt(D)``; must be finite. A Python or
            NumPy number, or a 0-d tensor; a tensor that requires grad (e.g. an ``nn.Parameter``) gets its
            gradient (not at ``scale = 0``). A tensor is read with ``.item()``: under torch.compile that is a
            graph break, so pass a Python float there.
        atten_mask: optional, at least ``[maxSq, maxC]`` bool/uint8 (a larger mask, e.g. one built once for the
            longest sequence, is read through its top-left ``[maxSq, maxC]`` part), any strides; **True removes**
            compressed token
            ``c`` from the softmax of query row ``s`` (position inside its batch, shared by batches and
            heads) -- the opposite of ``scaled_dot_product_attention``'s boolean mask, where True keeps. See
            :func:`nsa_ops.make_atten_mask`. A fully masked row gives the mean of the batch's values
            (docs/spec/compress_attention.md §5). The exact complement of the causal mask (SDPA's convention)
            is detected on three rows and raises ValueError (not while tracing).
        topk_mask: optional, at least ``[maxSq, maxSel]`` bool/uint8 (top-left part used); **True forces** block
            ``k`` into the top-k of row ``s``. See :func:`nsa_ops.make_topk_mask`.
        causal: apply the masks of docs/spec/compress_attention.md §9 from the lengths alone: query row ``s``
            loses compressed token ``c`` when ``c·d + l - 1 > s``, and blocks 0, ``s//l' - 1`` and ``s//l'`` are
            forced (the defaults of :func:`nsa_ops.make_atten_mask` / :func:`nsa_ops.make_topk_mask`, with the
            same results, bitwise), without a ``[maxSq, maxC]`` mask tensor (extra memory O(T) bytes instead of
            O(T·C)). ``atten_mask`` and ``topk_mask`` must then be None.

    Returns:
        :class:`CompressAttentionOutput` ``(attention_out [T, N1, D2] query dtype, topk_indices
        [T, N2, K] int32, softmax_max [T, N1, 8] float32, softmax_sum [T, N1, 8] float32)``. The
        statistics use the per-batch memory layout of docs/spec/compress_attention.md §4: read them with
        :func:`nsa_ops.softmax_stats_view` / :func:`nsa_ops.softmax_stats_dense` (``cu_seqlens_q=``). Only
        ``attention_out`` is differentiable (query, key, value, a tensor scale).

    Under ``torch.autocast("cpu", dtype)`` float32 query/key/value are cast to ``dtype`` first (as for
    scaled_dot_product_attention). ``torch.func.grad``/``vjp`` work; ``torch.vmap`` over query/key/value runs
    one call with the mapped copies as extra packed sequences.

    Raises:
        TypeError / ValueError: malformed Python arguments (the message names the argument).
        RuntimeError: other violations of docs/spec/compress_attention.md §6, from the operator (the message
        names the argument).
    """
    _check_tensor(query, "query", 3, "[T, N1, D]")
    _check_tensor(key, "key", 3, "[T2, N2, D]")
    _check_tensor(value, "value", 3, "[T2, N2, D2]")
    _check_tensor(atten_mask, "atten_mask", 2, "[maxSq, maxC]", optional=True)
    _check_tensor(topk_mask, "topk_mask", 2, "[maxSq, maxSel]", optional=True)
    l = int_arg(compress_block_size, "compress_block_size")
    d = int_arg(compress_stride, "compress_stride")
    lp = int_arg(select_block_size, "select_block_size")
    K = int_arg(select_block_count, "select_block_count")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if causal and (atten_mask is not None or topk_mask is not None):
        raise ValueError("causal=True applies the masks of docs/spec/compress_attention.md §9 itself: pass "
                         "atten_mask=None and topk_mask=None (or causal=False with your own masks)")
    tracing = is_tracing()
    scale = scale_arg(scale, "scale", query.shape[2])
    if not tracing:
        check_finite_scale(float(scale.detach()) if isinstance(scale, torch.Tensor) else scale, "scale")
    if tracing or isinstance(cu_seqlens_q, torch.Tensor) or isinstance(cu_seqlens_cmp, torch.Tensor):
        # Checked by torch.ops.nsa.cu_seqlens_prefix_sums when the graph runs (no values read here).
        seq_q = cu_seqlens_prefix_tensor(cu_seqlens_q, "cu_seqlens_q", query.shape[0])
        seq_c = cu_seqlens_prefix_tensor(cu_seqlens_cmp, "cu_seqlens_cmp", key.shape[0], total_exact=False,
                                         min_length=1)
        if seq_c.shape[0] != seq_q.shape[0]:
            raise ValueError(f"cu_seqlens_cmp must have as many entries as cu_seqlens_q ({seq_q.shape[0] + 1}), "
                             f"got {seq_c.shape[0] + 1}")
        cu_q, cu_c = cu_seqlens_q, cu_seqlens_cmp
    else:
        cu_q = cu_seqlens_list(cu_seqlens_q, "cu_seqlens_q")
        cu_c = cu_seqlens_list(cu_seqlens_cmp, "cu_seqlens_cmp")
        if len(cu_c) != len(cu_q):
            raise ValueError(f"cu_seqlens_cmp must have as many entries as cu_seqlens_q ({len(cu_q)}), got "
                             f"{len(cu_c)}")
        if cu_q[-1] != query.shape[0]:
            raise ValueError(f"cu_seqlens_q[-1] must equal the number of query rows T = {query.shape[0]}, got "
                             f"{cu_q[-1]}")
        if cu_c[-1] > key.shape[0]:
            raise ValueError(f"cu_seqlens_cmp[-1] must be <= the number of key rows T2 = {key.shape[0]}, got "
                             f"{cu_c[-1]}")
        for b in range(len(cu_c) - 1):
            if cu_c[b + 1] == cu_c[b]:
                raise ValueError(f"cu_seqlens_cmp must give every batch at least one compressed token; batch {b} "
                                 "has none")
        seq_q, seq_c = cu_q[1:], cu_c[1:]
    if not tracing and _is_plain(atten_mask) and _is_plain(topk_mask):
        _check_mask_convention(atten_mask, topk_mask, l, d, lp)
        _warn_raw_kv(cu_q if isinstance(cu_q, (list, torch.Tensor)) else list(cu_q),
                     cu_c if isinstance(cu_c, (list, torch.Tensor)) else list(cu_c), l)
    out = _run(query, key, value, scale, query.shape[1], l, d, lp, K, topk_mask, atten_mask, seq_q, seq_c, None,
               ext=True, causal=causal)
    return CompressAttentionOutput(*out)
