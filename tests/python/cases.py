"""Input builders: the shape matrix (seeded random inputs in the operator's argument form), and the small valid
call that the argument and hostile-input tests vary one argument at a time."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import nsa_ops


@dataclass(frozen=True)
class Case:
    name: str
    sq: tuple           # per-batch query rows Sq_b
    c: tuple            # per-batch compressed tokens C_b
    n1: int = 4
    n2: int = 2
    d: int = 32         # head dim of query/key
    d2: int = 32        # head dim of value
    l: int = 32         # compress_block_size
    stride: int = 16    # compress_stride
    lp: int = 64        # select_block_size
    k: int = 1          # select_block_count
    dtype: torch.dtype = torch.bfloat16
    atten: str = "none"     # none | causal | random (with fully masked rows)
    topk: str = "none"      # none | local | random | dense (more forced than K)
    layout: str = "contiguous"  # contiguous | strided (transposed / sliced / expanded views)
    keys: str = "randn"     # randn | zero (every score ties)
    scale: float | None = None  # default 1/sqrt(D)
    extra_kv_rows: int = 0  # key/value rows past the last prefix sum (ignored by the operator)
    seed: int = 0
    sel_len: bool = True    # pass actual_sel_seq_kvlen

    @property
    def M(self) -> int:
        return self.lp // self.stride

    @property
    def sel(self) -> list:
        return nsa_ops.selection_lengths(list(self.c), self.stride, self.lp)


def _round(x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    return x.to(dt)


def make_args(case: Case) -> dict:
    g = torch.Generator().manual_seed(case.seed)
    dt = case.dtype
    T, T2 = sum(case.sq), sum(case.c) + case.extra_kv_rows
    max_sq, max_c, max_sel = max(case.sq), max(case.c), max(case.sel)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    if case.layout == "strided":
        # query: a [N1, T, D+3] buffer seen as [T, N1, D]; key: every other row of a [2*T2, D, N2] buffer,
        # transposed; value: every other element of the last dim.
        query = randn(case.n1, T, case.d + 3).to(dt).permute(1, 0, 2)[:, :, :case.d]
        key = randn(2 * T2, case.d, case.n2).to(dt)[::2].transpose(1, 2)
        value = randn(T2, case.n2, 2 * case.d2).to(dt)[:, :, ::2]
        assert not (query.is_contiguous() or key.is_contiguous() or value.is_contiguous())
    else:
        query, key, value = randn(T, case.n1, case.d).to(dt), randn(T2, case.n2, case.d).to(dt), \
            randn(T2, case.n2, case.d2).to(dt)
    if case.keys == "zero":
        key = torch.zeros_like(key)

    atten_mask = None
    if case.atten == "causal":
        atten_mask = nsa_ops.make_atten_mask(max_sq, max_c, case.l, case.stride)
    elif case.atten == "random":
        atten_mask = torch.rand(max_sq, max_c, generator=g) < 0.4
        atten_mask[::7] = True  # fully masked rows (docs/spec/compress_attention.md §5)
    topk_mask = None
    if case.topk == "local":
        topk_mask = nsa_ops.make_topk_mask(max_sq, max_sel, case.lp)
    elif case.topk == "random":
        topk_mask = torch.rand(max_sq, max_sel, generator=g) < 0.15
    elif case.topk == "dense":
        topk_mask = torch.rand(max_sq, max_sel, generator=g) < 0.7  # often more forced blocks than K
        topk_mask[1::5] = True
    if case.layout == "strided":
        if atten_mask is not None:  # transposed uint8 view
            atten_mask = atten_mask.to(torch.uint8).t().contiguous().t()
            assert not atten_mask.is_contiguous()
        if topk_mask is not None:   # a column slice of a wider buffer
            wide = torch.zeros(max_sq, 2 * max_sel + 1, dtype=torch.bool)
            wide[:, 1::2] = topk_mask
            topk_mask = wide[:, 1::2]
            assert not topk_mask.is_contiguous()

    scale = case.scale if case.scale is not None else case.d ** -0.5
    return dict(query=query, key=key, value=value, scale_value=scale, head_num=case.n1,
                compress_block_size=case.l, compress_stride=case.stride, select_block_size=case.lp,
                select_block_count=case.k, topk_mask=topk_mask, atten_mask=atten_mask,
                actual_seq_qlen=nsa_ops.prefix_sums(case.sq), actual_cmp_seq_kvlen=nsa_ops.prefix_sums(case.c),
                actual_sel_seq_kvlen=nsa_ops.prefix_sums(case.sel) if case.sel_len else None)


BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


def base_args(dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict:
    """A valid call: B = 2, Sq = [8, 12], C = [5, 7], N1 = 4, N2 = 2, D = 32, D2 = 16, (l, d, l') = (32, 16, 64):
    M = 4, Sel = [2, 2]; maxSq = 12, maxC = 7, maxSel = 2."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        query=torch.randn(20, 4, 32, generator=g).to(dtype), key=torch.randn(12, 2, 32, generator=g).to(dtype),
        value=torch.randn(12, 2, 16, generator=g).to(dtype), scale_value=0.2, head_num=4, compress_block_size=32,
        compress_stride=16, select_block_size=64, select_block_count=2,
        topk_mask=torch.zeros(12, 2, dtype=torch.bool), atten_mask=torch.zeros(12, 7, dtype=torch.bool),
        actual_seq_qlen=[8, 20], actual_cmp_seq_kvlen=[5, 12], actual_sel_seq_kvlen=[2, 4])


def args_with(**changes):
    """A maker of base_args() with some arguments replaced: a value, or a function of the base arguments."""
    def make():
        a = base_args()
        for k, v in changes.items():
            a[k] = v(a) if callable(v) else v
        return a
    return make

# The shape matrix. Sized for the slow reference (T <= a few hundred, C <= ~150, N1 <= 8).
MATRIX = [
    # causal masks (fully masked rows t < l-1) and the paper's forced blocks, one sequence of 512 tokens
    Case("causal-512tok-bf16", sq=(512,), c=(31,), n1=4, n2=2, d=64, d2=32, k=4, atten="causal", topk="local"),
    Case("causal-2seq-fp16", sq=(200, 130), c=(11, 7), n1=2, n2=1, d=48, d2=48, k=2, dtype=F16,
         atten="causal", topk="local"),
    # varlen with an empty batch, G = 3, D != D2, random masks with fully masked rows
    Case("varlen-empty-G3-fp16", sq=(37, 0, 64, 5), c=(20, 7, 33, 9), n1=6, n2=2, d=40, d2=24, k=2, dtype=F16,
         atten="random", topk="random"),
    Case("empty-first-batch-bf16", sq=(0, 45), c=(5, 17), n1=2, n2=2, d=32, d2=16, k=2, atten="random"),
    # G = 1, D not a multiple of 16, fp32
    Case("G1-D7-fp32", sq=(50, 13), c=(30, 2), n1=3, n2=3, d=7, d2=5, k=1, dtype=F32, atten="random"),
    # G = 4 and G = 8
    Case("G4-bf16", sq=(100,), c=(60,), n1=8, n2=2, d=48, d2=40, k=8, topk="random"),
    Case("G8-fp16", sq=(70, 30), c=(40, 44), n1=8, n2=1, d=24, d2=8, k=5, dtype=F16, atten="random",
         topk="random"),
    Case("G2-large-D-bf16", sq=(96,), c=(40,), n1=4, n2=2, d=192, d2=128, k=4, atten="random"),
    # C_b in {1, M-1, M, M+1, large} (M = 4), then {M+1, 2M-1, 2M, 2M+1, large} with K = 2
    Case("C-edges-K1-bf16", sq=(5, 6, 7, 8, 120), c=(1, 3, 4, 5, 150), n1=2, n2=1, d=32, d2=16, k=1,
         atten="random", topk="random"),
    Case("C-edges-K2-fp32", sq=(9, 4, 11, 3, 60), c=(5, 7, 8, 9, 100), n1=4, n2=4, d=16, d2=16, k=2, dtype=F32,
         atten="random"),
    # other block geometries: (l, d, l') -> weights
    Case("l16-d16-lp16-bf16", sq=(40,), c=(30,), l=16, stride=16, lp=16, k=6, atten="random", topk="random"),
    Case("l64-d16-lp64-fp16", sq=(48, 33), c=(21, 17), l=64, stride=16, lp=64, k=3, dtype=F16),
    Case("l32-d32-lp64-bf16", sq=(60,), c=(25,), l=32, stride=32, lp=64, k=4, atten="random"),
    Case("l32-d16-lp128-fp32", sq=(70,), c=(50,), l=32, stride=16, lp=128, k=5, dtype=F32, topk="random"),
    Case("l48-d16-lp96-bf16", sq=(64,), c=(37,), n1=6, n2=3, l=48, stride=16, lp=96, k=3, atten="random"),
    Case("l128-d64-lp128-fp16", sq=(30,), c=(9,), l=128, stride=64, lp=128, k=4, dtype=F16),
    # forced blocks, often more than K
    Case("forced-dense-bf16", sq=(80, 20), c=(40, 24), n1=4, n2=1, k=3, atten="random", topk="dense"),
    Case("forced-dense-K1-fp32", sq=(30,), c=(12,), n1=2, n2=1, k=1, dtype=F32, topk="dense"),
    # ties: zero keys, every score ties; the order comes from the index rule alone
    Case("ties-zero-keys-bf16", sq=(40, 24), c=(13, 32), n1=4, n2=2, k=4, keys="zero"),
    Case("ties-zero-keys-masked-fp16", sq=(40,), c=(20,), n1=2, n2=1, k=5, keys="zero", dtype=F16,
         atten="random", topk="random"),
    # sharp softmax (large scale)
    Case("sharp-scale-bf16", sq=(64,), c=(33,), n1=4, n2=2, d=32, d2=32, k=4, scale=1.5, atten="random"),
    # non-contiguous q/k/v and masks
    Case("strided-bf16", sq=(37, 0, 50), c=(15, 3, 26), n1=4, n2=2, d=40, d2=24, k=1, layout="strided",
         atten="random", topk="random", extra_kv_rows=5),
    Case("strided-fp16-G8", sq=(64,), c=(30,), n1=8, n2=1, d=16, d2=16, k=3, dtype=F16, layout="strided",
         atten="causal", topk="dense"),
    Case("strided-fp32", sq=(33, 17), c=(9, 12), n1=3, n2=1, d=20, d2=12, k=2, dtype=F32, layout="strided",
         atten="random", topk="random"),
    # fp64 (testing extension), no sel lengths, extra key rows
    Case("fp64-extension", sq=(25, 15), c=(10, 14), n1=2, n2=1, d=16, d2=8, k=2, dtype=F64, atten="random",
         sel_len=False, extra_kv_rows=3),
]
