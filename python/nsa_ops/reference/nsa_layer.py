"""The NSA layer written out in plain PyTorch: the oracle of docs/spec/nsa_layer.md §7.

Nothing here calls an nsa-ops operator; every step is a few dense torch operations on one sequence at a time,
evaluated in the requested dtype (float64 by default: no intermediate rounding worth the name) and
differentiable by autograd, whose gradients are the reference gradients (docs/spec/nsa_layer.md §6).

Layout: ``T`` packed tokens, batch ``b`` owning rows ``[cu[b], cu[b+1])`` (local position ``s``); ``N1`` query
heads, ``N2`` key/value heads, ``G = N1 / N2`` (query head ``h`` reads KV head ``h // G``); ``Dqk``, ``Dv`` head
dimensions; ``l`` / ``d`` compression window and stride, ``l'`` selection block size, ``M = l'/d``, ``N = l//d``,
``K`` selection slots, ``w`` window. ``C_b`` compressed tokens (docs/spec/compress.md §3), ``Sel_b = ceil(C_b/M)``
selection blocks.

The same functions evaluated in bfloat16 or float32 (``dtype=``) are the "plain same-dtype implementation"
against which the tests size their tolerances (docs/spec/nsa_layer.md §9): every torch operation then rounds its
result to that dtype.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import torch

__all__ = [
    "NSAReferenceOutput",
    "CompressedBranch",
    "PARAMETER_NAMES",
    "CONFIG_NAMES",
    "nsa_layer_reference",
    "compress_tokens",
    "compressed_branch",
    "selected_branch",
    "window_branch",
]

FLT_MAX = 3.4028234663852886e38

# docs/spec/nsa_layer.md §2, in declaration order.
PARAMETER_NAMES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "g_proj.weight", "o_proj.weight",
                   "compress_weight_k", "compress_weight_v")
# The constructor's size arguments, docs/spec/nsa_layer.md §1.
CONFIG_NAMES = ("hidden_size", "num_heads", "num_kv_heads", "head_dim_qk", "head_dim_v", "compress_block_size",
                "compress_stride", "select_block_size", "select_block_count", "window_size")


class CompressedBranch(NamedTuple):
    """Step 3 of docs/spec/nsa_layer.md §4 for all batches.

    o_cmp:        ``[T, N1, Dv]``, zero on rows ``s < l - 1`` and on every row of a batch with ``C_b = 0``.
    topk_indices: ``[T, N2, K]`` int64, the ``K_b = min(K, Sel_b)`` chosen blocks sorted ascending, then -1;
                  ``[0, -1, ...]`` where ``C_b = 0``.
    scores:       ``[T, N2, maxSel]``, the group-summed importance scores with forced blocks set to +inf
                  (docs/spec/compress_attention.md §3.5-§3.7, the masks of docs/spec/nsa_layer.md §5); -inf
                  past the row's ``Sel_b`` (and everywhere for ``C_b = 0``). Detached.
    """

    o_cmp: torch.Tensor
    topk_indices: torch.Tensor
    scores: torch.Tensor


class NSAReferenceOutput(NamedTuple):
    """What :func:`nsa_layer_reference` returns: the layer output ``[T, H]``, the block indices used
    (``[T, N2, K]`` int64), the gates ``[T, N1, 3]`` and the three branch outputs ``[T, N1, Dv]``, all in the
    evaluation dtype, and the selection scores of :class:`CompressedBranch`."""

    output: torch.Tensor
    topk_indices: torch.Tensor
    gates: torch.Tensor
    o_cmp: torch.Tensor
    o_slc: torch.Tensor
    o_swa: torch.Tensor
    scores: torch.Tensor


def _mask_value(dtype: torch.dtype) -> float:
    """The score that stands for "masked": -FLT_MAX, or the dtype's most negative finite value if smaller."""
    return -min(FLT_MAX, torch.finfo(dtype).max)


def _cu_list(cu_seqlens: Any) -> list[int]:
    cu = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    cu = [int(c) for c in cu]
    if len(cu) < 2 or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must be B+1 >= 2 non-decreasing offsets starting at 0, got {cu}")
    return cu


def compress_tokens(x: torch.Tensor, weight: torch.Tensor, cu_seqlens: Sequence[int], l: int, d: int
                    ) -> tuple[torch.Tensor, list[int]]:
    """docs/spec/compress.md §3-§4: ``out[R_b + c, n, :] = sum_{j<l} weight[j, n] * x[cu[b] + c*d + j, n, :]``.

    x: ``[T, N, D]``; weight: ``[l, N]``. Returns ``([R, N, D], cu_cmp)`` with ``cu_cmp`` the B+1 offsets of the
    compressed rows (``C_b = (S_b - l)//d + 1`` when ``S_b >= l``, else 0)."""
    pieces, cu_cmp = [], [0]
    for b in range(len(cu_seqlens) - 1):
        start, S = cu_seqlens[b], cu_seqlens[b + 1] - cu_seqlens[b]
        C = (S - l) // d + 1 if S >= l else 0
        if C > 0:
            windows = x[start:start + (C - 1) * d + l].unfold(0, l, d)       # [C, N, D, l]
            pieces.append(torch.einsum("cnej,jn->cne", windows, weight))
        cu_cmp.append(cu_cmp[-1] + C)
    if not pieces:
        return x.new_zeros((0,) + tuple(x.shape[1:])), cu_cmp
    return torch.cat(pieces), cu_cmp


def _block_weights(M: int, N: int) -> list[int]:
    """docs/spec/compress_attention.md §3.5: w_i = min(i + 1, N, M + N - 1 - i), i < M + N - 1."""
    return [min(i + 1, N, M + N - 1 - i) for i in range(M + N - 1)]


def _compressed_one(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, scale: float, l: int, d: int, lp: int,
                    K_b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of step 3 with C_b >= 1: (o [S, N1, Dv] with rows s < l-1 zeroed, the K_b chosen blocks
    [S, N2, K_b] in descending score order, the final scores [S, N2, Sel_b])."""
    S, N1, _ = q.shape
    C, N2, _ = kc.shape
    G, M, N = N1 // N2, lp // d, l // d
    s = torch.arange(S).unsqueeze(1)
    c = torch.arange(C).unsqueeze(0)
    hidden = c * d + l - 1 > s                                              # §5 atten_mask, [S, C]
    kh, vh = kc.repeat_interleave(G, dim=1), vc.repeat_interleave(G, dim=1)
    logits = torch.einsum("shd,chd->shc", q, kh) * scale
    logits = logits.masked_fill(hidden.unsqueeze(1), _mask_value(q.dtype))  # replaced, not added
    P = torch.softmax(logits, dim=-1)                                       # uniform on fully masked rows
    o = torch.einsum("shc,chd->shd", P, vh)
    o = torch.where((torch.arange(S) >= l - 1).view(S, 1, 1), o, torch.zeros_like(o))

    # Importance of selection block k: sum_i w_i P[M(k+1) - i], P = 0 outside [0, C); group sum over G heads.
    Sel = -(-C // M)
    taps = torch.arange(M + N - 1)
    src = M * (torch.arange(Sel).unsqueeze(1) + 1) - taps.unsqueeze(0)       # [Sel, M+N-1]
    inside = (src >= 0) & (src < C)
    wts = torch.tensor(_block_weights(M, N), dtype=P.dtype) * inside.to(P.dtype)
    Pd = P.detach()
    gathered = Pd[..., src.clamp(0, C - 1)]                                 # [S, N1, Sel, M+N-1]
    score = (gathered * wts).sum(-1).view(S, N2, G, Sel).sum(2)            # [S, N2, Sel]

    cur = torch.arange(S).unsqueeze(1) // lp
    k = torch.arange(Sel).unsqueeze(0)
    forced = (k < 1) | ((k <= cur) & (k > cur - 2))                        # §5 topk_mask
    score = score.masked_fill(forced.unsqueeze(1), float("inf"))
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices  # ties: smaller index first
    return o, order[..., :K_b], score


def compressed_branch(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, cu_seqlens: Sequence[int],
                      cu_cmp: Sequence[int], *, l: int, d: int, lp: int, K: int, scale: float
                      ) -> CompressedBranch:
    """docs/spec/nsa_layer.md §4 step 3 for all batches (see :class:`CompressedBranch`).

    q: ``[T, N1, Dqk]``; kc ``[R, N2, Dqk]`` and vc ``[R, N2, Dv]`` as returned by :func:`compress_tokens` with
    the offsets ``cu_cmp``."""
    T, N1, _ = q.shape
    N2, Dv = kc.shape[1], vc.shape[2]
    M = lp // d
    sels = [-(-(cu_cmp[b + 1] - cu_cmp[b]) // M) for b in range(len(cu_seqlens) - 1)]
    max_sel = max(sels, default=0)
    o_parts, topk_parts, score_parts = [], [], []
    for b in range(len(cu_seqlens) - 1):
        start, S = cu_seqlens[b], cu_seqlens[b + 1] - cu_seqlens[b]
        if S == 0:
            continue
        C = cu_cmp[b + 1] - cu_cmp[b]
        topk = torch.full((S, N2, K), -1, dtype=torch.long)
        scores = torch.full((S, N2, max_sel), -float("inf"), dtype=q.dtype)
        if C == 0:
            o_parts.append(q.new_zeros(S, N1, Dv))
            topk[..., 0] = 0                                                # block 0 holds the whole sequence
        else:
            K_b = min(K, sels[b])
            o, chosen, sc = _compressed_one(q[start:start + S], kc[cu_cmp[b]:cu_cmp[b + 1]],
                                            vc[cu_cmp[b]:cu_cmp[b + 1]], scale, l, d, lp, K_b)
            o_parts.append(o)
            topk[..., :K_b] = torch.sort(chosen, dim=-1).values
            scores[..., :sels[b]] = sc
        topk_parts.append(topk)
        score_parts.append(scores)
    if not o_parts:
        return CompressedBranch(q.new_zeros(T, N1, Dv), torch.full((T, N2, K), -1, dtype=torch.long),
                                q.new_zeros(T, N2, max_sel))
    return CompressedBranch(torch.cat(o_parts), torch.cat(topk_parts), torch.cat(score_parts))


def _nonempty_sequences(cu_seqlens: Sequence[int]):
    """(start, S_b) of every batch with S_b > 0, in order."""
    for b in range(len(cu_seqlens) - 1):
        if cu_seqlens[b + 1] > cu_seqlens[b]:
            yield cu_seqlens[b], cu_seqlens[b + 1] - cu_seqlens[b]


def selected_branch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: torch.Tensor,
                    cu_seqlens: Sequence[int], *, lp: int, scale: float) -> torch.Tensor:
    """docs/spec/nsa_layer.md §4 step 4 (docs/spec/select_attention.md §3-§4, §6, causal; self-attention).

    Entry (slot j, offset r) of row s names key position ``p = topk[s, n2, j]*l' + r``; it is visible iff the
    slot is not -1, ``p < S_b`` and ``p <= s``. Visible entries form a multiset (a block named twice counts
    twice), evaluated here as a per-key count: ``P_p = n_p exp(S_p - m) / sum_p' n_p' exp(S_p' - m)``. Rows
    without a visible entry give 0 (and zero gradient). Returns ``[T, N1, Dv]``."""
    T, N1, _ = q.shape
    N2, Dv = k.shape[1], v.shape[2]
    G = N1 // N2
    out = []
    for start, S in _nonempty_sequences(cu_seqlens):
        qb, kb, vb = q[start:start + S], k[start:start + S], v[start:start + S]
        idx = topk[start:start + S].long()                                   # [S, N2, K]
        pos = idx.unsqueeze(-1) * lp + torch.arange(lp)                       # [S, N2, K, l']
        visible = (idx.unsqueeze(-1) >= 0) & (pos < S) & (pos <= torch.arange(S).view(S, 1, 1, 1))
        counts = torch.zeros(S, N2, S, dtype=q.dtype)
        counts.scatter_add_(2, pos.clamp(0, S - 1).flatten(2), visible.flatten(2).to(q.dtype))
        counts = counts.repeat_interleave(G, dim=1)                           # [S, N1, S]
        kh, vh = kb.repeat_interleave(G, dim=1), vb.repeat_interleave(G, dim=1)
        logits = torch.einsum("shd,jhd->shj", qb, kh) * scale
        present = counts > 0
        logits = logits.masked_fill(~present, _mask_value(q.dtype))
        m = logits.amax(dim=-1, keepdim=True)
        e = counts * torch.exp(logits - m)                                    # 0 where nothing is visible
        total = e.sum(dim=-1, keepdim=True)
        P = e / torch.where(total > 0, total, torch.ones_like(total))
        out.append(torch.einsum("shj,jhd->shd", P, vh))
    return torch.cat(out) if out else q.new_zeros(T, N1, Dv)


def window_branch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Sequence[int], *, window: int,
                  scale: float) -> torch.Tensor:
    """docs/spec/nsa_layer.md §4 step 5: query position i sees keys ``max(0, i - w + 1) <= j <= i`` of its own
    sequence (never empty). Returns ``[T, N1, Dv]``."""
    T, N1, _ = q.shape
    N2, Dv = k.shape[1], v.shape[2]
    G = N1 // N2
    out = []
    for start, S in _nonempty_sequences(cu_seqlens):
        qb = q[start:start + S]
        kh = k[start:start + S].repeat_interleave(G, dim=1)
        vh = v[start:start + S].repeat_interleave(G, dim=1)
        i, j = torch.arange(S).unsqueeze(1), torch.arange(S).unsqueeze(0)
        visible = (j <= i) & (j > i - window)
        logits = torch.einsum("ihd,jhd->ihj", qb, kh) * scale
        P = torch.softmax(logits.masked_fill(~visible.unsqueeze(1), _mask_value(q.dtype)), dim=-1)
        out.append(torch.einsum("ihj,jhd->ihd", P, vh))
    return torch.cat(out) if out else q.new_zeros(T, N1, Dv)


def _config_value(config: Any, name: str) -> int:
    value = config[name] if isinstance(config, Mapping) else getattr(config, name)
    return int(value)


def nsa_layer_reference(params: Mapping[str, torch.Tensor], hidden_states: torch.Tensor, cu_seqlens: Any,
                        config: Any, *, topk_override: Optional[torch.Tensor] = None,
                        dtype: torch.dtype = torch.float64) -> NSAReferenceOutput:
    """The NSA layer of docs/spec/nsa_layer.md §3-§4 in plain PyTorch (the §7 oracle).

    Args:
        params: the seven parameters by their names (``PARAMETER_NAMES``; e.g. ``dict(module.named_parameters())``
            or a state dict). They and ``hidden_states`` are converted to ``dtype`` (differentiably), so
            gradients reach float64 leaves passed here unchanged.
        hidden_states: ``[T, H]``, the sequences packed along T.
        cu_seqlens: B+1 offsets (list, tuple or 1-D integer tensor), leading 0, non-decreasing, last = T.
        config: the ten sizes by the constructor's names (``CONFIG_NAMES``), as a mapping or attributes (an
            :class:`nsa_ops.NSAAttention` or its ``config`` dict).
        topk_override: optional ``[T, N2, K]`` integer indices used for the selected branch instead of the
            oracle's own choice (tests pass the module's ``aux.topk_indices`` so that continuous outputs are
            compared for the same discrete choice). -1 marks an empty slot.
        dtype: evaluation dtype; float64 is the oracle, a lower precision gives the plain same-dtype
            implementation.

    Returns: :class:`NSAReferenceOutput`; ``topk_indices`` are the indices used (the override if given).
    """
    H, N1, N2, Dqk, Dv, l, d, lp, K, w = (_config_value(config, n) for n in CONFIG_NAMES)
    cu = _cu_list(cu_seqlens)
    p = {name: params[name].to(dtype) for name in PARAMETER_NAMES}
    x = hidden_states.to(dtype)
    T = x.shape[0]
    if cu[-1] != T:
        raise ValueError(f"cu_seqlens[-1] must equal T = {T}, got {cu[-1]}")
    # docs/spec/nsa_layer.md §4 step 1: the operators use 1/sqrt(Dqk) as a float32; so does the oracle.
    scale = float(torch.tensor(1.0 / math.sqrt(Dqk), dtype=torch.float32))

    q = (x @ p["q_proj.weight"].T).view(T, N1, Dqk)                          # step 1
    k = (x @ p["k_proj.weight"].T).view(T, N2, Dqk)
    v = (x @ p["v_proj.weight"].T).view(T, N2, Dv)
    gates = torch.sigmoid(x @ p["g_proj.weight"].T).view(T, N1, 3)
    kc, cu_cmp = compress_tokens(k, p["compress_weight_k"], cu, l, d)        # step 2
    vc, _ = compress_tokens(v, p["compress_weight_v"], cu, l, d)
    cmp = compressed_branch(q, kc, vc, cu, cu_cmp, l=l, d=d, lp=lp, K=K, scale=scale)   # step 3
    topk = cmp.topk_indices if topk_override is None else topk_override.long()
    o_slc = selected_branch(q, k, v, topk, cu, lp=lp, scale=scale)          # step 4
    o_swa = window_branch(q, k, v, cu, window=w, scale=scale)               # step 5
    o = gates[..., 0:1] * cmp.o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_swa   # step 6
    out = o.reshape(T, N1 * Dv) @ p["o_proj.weight"].T
    return NSAReferenceOutput(out, topk, gates, cmp.o_cmp, o_slc, o_swa, cmp.scores)
