"""End to end: from per-token keys/values to NSA's compressed attention, as a training step would do it.

    python examples/compress_attention_end_to_end.py [--tokens 1024,1500,2048] [--compile]

nsa_ops.compress_attention does NOT compress: it attends over keys/values that are already compressed (one row
per window of l = compress_block_size tokens, every d = compress_stride tokens). The steps:

1. per-token q, k, v of B packed sequences ("TND": [T, heads, dim]) and their offsets cu_seqlens (B+1 ints);
2. compress k and v per sequence: nsa_ops.compress (a learnable weight per window position and head, the NPU's
   npu_nsa_compress) when this nsa_ops has it, else mean pooling over each window;
3. the compressed offsets cu_seqlens_cmp (C_b = (S_b - l)//d + 1 rows for a sequence of S_b >= l tokens);
4. the causal masks of docs/spec/compress_attention.md §9: causal=True applies them from the lengths (no mask
   tensor); --explicit-masks builds them with make_atten_mask / make_topk_mask instead (True = REMOVE / FORCE, the
   opposite of scaled_dot_product_attention's boolean mask), with the same results;
5. compress_attention, a loss, backward: gradients reach q, the per-token k/v and the compression weights.

A sequence shorter than l + (K-1)·l' tokens has fewer than K selection blocks: its rows' missing slots in
topk_indices hold -1 (the default --tokens include one such sequence).
"""

from __future__ import annotations

import argparse
import math

import torch

import nsa_ops


def mean_pool_windows(x: torch.Tensor, cu_seqlens: list[int], l: int, d: int) -> torch.Tensor:
    """Compressed rows by mean pooling (used when nsa_ops.compress is not available): for each sequence b, row c
    is the mean of tokens [c*d, c*d + l) of the sequence; sequences shorter than l give no row. x: [T, N, D] ->
    [sum_b C_b, N, D]. Differentiable (plain torch ops)."""
    rows = []
    for b in range(len(cu_seqlens) - 1):
        seq = x[cu_seqlens[b]:cu_seqlens[b + 1]]                    # [S_b, N, D]
        if seq.shape[0] >= l:
            windows = seq.unfold(0, l, d)                           # [C_b, N, D, l]
            rows.append(windows.mean(dim=-1))
    return torch.cat(rows) if rows else x.new_zeros(0, *x.shape[1:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1024,1500,300", help="tokens per sequence (each >= l = 32)")
    ap.add_argument("--explicit-masks", action="store_true", help="pass make_atten_mask/make_topk_mask masks "
                    "instead of causal=True")
    ap.add_argument("--compile", action="store_true", help="run the step under torch.compile(fullgraph=True)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    # The paper's block sizes: windows of l = 32 tokens every d = 16, selection blocks of l' = 64 tokens, K = 16.
    l, d, lp, K = 32, 16, 64, 16
    N1, N2, D, Dv = 8, 2, 64, 64            # 8 query heads share 2 key/value heads (G = 4)
    dtype = torch.bfloat16

    lengths = [int(x) for x in args.tokens.split(",")]
    if min(lengths) < l:
        raise SystemExit(f"every sequence needs >= l = {l} tokens (one compressed token)")
    cu_seqlens = nsa_ops.prefix_sums(lengths, leading_zero=True)     # [0, S_0, S_0 + S_1, ...]
    T = cu_seqlens[-1]

    g = torch.Generator().manual_seed(args.seed)
    # 1. per-token projections (here random leaf tensors standing in for the model's q/k/v projections)
    q = torch.randn(T, N1, D, generator=g).to(dtype).requires_grad_()
    k = torch.randn(T, N2, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(T, N2, Dv, generator=g).to(dtype).requires_grad_()

    # 2.-3. compression and the compressed offsets
    if hasattr(nsa_ops, "compress"):
        w_k = torch.full((l, N2), 1.0 / l, dtype=dtype, requires_grad=True)   # starts as mean pooling
        w_v = torch.full((l, N2), 1.0 / l, dtype=dtype, requires_grad=True)
        k_cmp, cu_seqlens_cmp = nsa_ops.compress(k, w_k, cu_seqlens=cu_seqlens, compress_block_size=l,
                                                 compress_stride=d)
        v_cmp, _ = nsa_ops.compress(v, w_v, cu_seqlens=cu_seqlens, compress_block_size=l, compress_stride=d)
        how = "nsa_ops.compress (learnable window weights)"
    else:
        # Mean pooling over each window: NSA's compression is a learnable function of the window; the mean is its
        # simplest stand-in and gives rows in the layout compress_attention expects.
        w_k = w_v = None
        k_cmp = mean_pool_windows(k, cu_seqlens, l, d)
        v_cmp = mean_pool_windows(v, cu_seqlens, l, d)
        cu_seqlens_cmp = nsa_ops.prefix_sums(nsa_ops.compressed_lengths(lengths, l, d), leading_zero=True)
        how = "mean pooling"
    cmp_lengths = nsa_ops.compressed_lengths(lengths, l, d)
    assert list(cu_seqlens_cmp) == nsa_ops.prefix_sums(cmp_lengths, leading_zero=True)

    # 4. masks: causal=True, or explicit ones sized for the longest sequence (rows: position inside a sequence)
    masks = {"causal": True}
    if args.explicit_masks:
        max_sq, max_c = max(lengths), max(cmp_lengths)
        max_sel = nsa_ops.selection_lengths([max_c], d, lp)[0]
        masks = {"atten_mask": nsa_ops.make_atten_mask(max_sq, max_c, l, d),   # True = token not yet complete
                 "topk_mask": nsa_ops.make_topk_mask(max_sq, max_sel, lp)}     # True = forced (first + 2 local)

    # 5. the operator, a loss, backward
    def step(q, k_cmp, v_cmp, cu_q, cu_c):
        out = nsa_ops.compress_attention(
            q, k_cmp, v_cmp, cu_seqlens_q=cu_q, cu_seqlens_cmp=cu_c, compress_block_size=l, compress_stride=d,
            select_block_size=lp, select_block_count=K, **masks)
        return out, out.attention_out.float().square().mean()

    cu_q, cu_c = torch.tensor(cu_seqlens), torch.tensor(list(cu_seqlens_cmp))   # tensors: no recompiles
    run = torch.compile(step, fullgraph=True) if args.compile else step
    out, loss = run(q, k_cmp, v_cmp, cu_q, cu_c)
    loss.backward()

    print(f"{len(lengths)} sequences of {lengths} tokens (T = {T}); compressed by {how}: C_b = {cmp_lengths} "
          f"(rows of key/value: {k_cmp.shape[0]}), Sel_b = {nsa_ops.selection_lengths(cmp_lengths, d, lp)}")
    empty = int((out.topk_indices == -1).sum())
    print(f"attention_out {tuple(out.attention_out.shape)} {out.attention_out.dtype}, "
          f"topk_indices {tuple(out.topk_indices.shape)} (selection blocks for the selected-attention branch; "
          f"{empty} empty slots = -1 in sequences with fewer than K = {K} blocks)")
    dense_max = nsa_ops.softmax_stats_dense(out.softmax_max, cu_seqlens_q=cu_seqlens)   # [T, N1]
    print(f"softmax_max as [T, N1]: {tuple(dense_max.shape)}; row 0 of sequence 0 sees no complete window: "
          f"max = {dense_max[0, 0].item():.3g} (fully masked, §5)")
    grads = {"q": q.grad, "k": k.grad, "v": v.grad}
    if w_k is not None:
        grads.update(w_k=w_k.grad, w_v=w_v.grad)
    print("loss", f"{loss.item():.6f}; gradient norms:",
          ", ".join(f"{name} {x.float().norm().item():.4g}" for name, x in grads.items()))
    assert all(x is not None and math.isfinite(x.float().norm().item()) for x in grads.values())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
