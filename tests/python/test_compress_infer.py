"""nsa_ops.npu_nsa_compress_infer (torch.ops.nsa.compress_infer): docs/spec/decode.md §2.

An independent fp64 model (plain loops over the paged cache through the block table), the §5 worked example, the
in-place contract (the cache object is returned and only eligible batches' slots change), the CPU backend equal to
the reference bit for bit, argument errors naming the argument with nothing written, the refusal of inputs that
require grad, opcheck, and torch.compile with tensor lengths.
"""

import numpy as np
import pytest
import torch

import nsa_ops

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def model(inp, weight, slots, l, d, table, lens, cache):
    """§2 in fp64: the exact window sums, written into a float64 copy of the cache (untouched rows as they are)."""
    x = inp.double().numpy()
    w = weight.double().numpy()
    out = cache.double().numpy().copy()
    P = x.shape[1]
    written = np.zeros(out.shape[0], dtype=bool)
    for b, S in enumerate(lens):
        if S < l or (S - l) % d:
            continue
        acc = np.zeros(out.shape[1:])
        for t in range(l):
            pos = S - l + t
            acc += w[t][:, None] * x[table[b][pos // P], pos % P]
        out[slots[b]] = acc
        written[slots[b]] = True
    return out, written


def make_case(dtype, P, N, D, l, d, lens, seed=0, spare_pages=3, num_slots=None):
    g = torch.Generator().manual_seed(seed)
    need = [(S + P - 1) // P for S in lens]
    num_pages = sum(need) + spare_pages
    perm = torch.randperm(num_pages, generator=g).tolist()
    maxp = max(need) + 1
    table, k = [], 0
    for n in need:  # shuffled pages, -1 padding after each batch's own
        table.append(perm[k:k + n] + [-1] * (maxp - n))
        k += n
    B = len(lens)
    num_slots = num_slots or 2 * B + 1
    slots = torch.randperm(num_slots, generator=g)[:B].tolist()
    inp = (torch.rand(num_pages, P, N, D, generator=g) * 4 - 2).to(dtype)
    weight = (torch.rand(l, N, generator=g) * 2 - 1).to(dtype)
    cache = (torch.rand(num_slots, N, D, generator=g) + 10).to(dtype)
    return inp, weight, torch.tensor(slots, dtype=torch.int32), torch.tensor(table, dtype=torch.int32), cache


def check_model(inp, weight, slots, l, d, table, lens, before, after):
    want, written = model(inp, weight, slots.tolist(), l, d, table.tolist(), lens, before)
    got = after.double().numpy()
    assert np.array_equal(got[~written], before.double().numpy()[~written]), "a row no eligible batch names changed"
    # the final rne (half an ulp of the dtype) plus the fp32 accumulation: 2 l eps32 sum |w x| (bounded here by
    # l * max|w| * max|x|)
    eps = torch.finfo(after.dtype).eps
    bound = 2 * l * 2**-24 * l * weight.double().abs().max().item() * inp.double().abs().max().item()
    tol = eps * np.abs(want[written]) + bound
    assert np.all(np.abs(got[written] - want[written]) <= tol)


def test_worked_example_section5():
    """§5: P = 64, l = 32, d = 16, lengths [80, 81, 20], tables [[5, 2], [7, 1], [3, 0]], slots [10, 11, 12]."""
    inp = torch.arange(8 * 64 * 1 * 2, dtype=torch.float32).reshape(8, 64, 1, 2) % 7 - 3
    weight = (torch.arange(32, dtype=torch.float32) % 3 - 1).reshape(32, 1)
    cache = torch.full((16, 1, 2), 5.0)
    table = torch.tensor([[5, 2], [7, 1], [3, 0]], dtype=torch.int32)
    slots = torch.tensor([10, 11, 12], dtype=torch.int32)
    out = nsa_ops.npu_nsa_compress_infer(inp, weight, slots, 32, 16, 64, block_table=table,
                                         actual_seq_len=[80, 81, 20], cache=cache)
    assert out is cache
    tokens = torch.cat([inp[5, 48:64], inp[2, 0:16]])  # batch 0's tokens 48..79
    want = (weight[:, :, None] * tokens).sum(0)
    assert torch.equal(cache[10], want)  # small integers: exact
    others = torch.ones(16, dtype=torch.bool)
    others[10] = False
    assert torch.all(cache[others] == 5.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P,l,d", [(1, 4, 2), (5, 8, 4), (16, 32, 16), (7, 5, 5)])
def test_random_vs_model_and_reference(dtype, P, l, d):
    lens = [l, l + d, 3 * l + 1, 0, 2 * l + 2 * d, l - 1]  # eligible, eligible, not, empty, eligible, short
    inp, weight, slots, table, cache = make_case(dtype, P, 3, 19, l, d, lens, seed=P + l)
    before = cache.clone()
    ref = cache.clone()
    torch.ops.nsa.compress_infer_reference(inp, weight, slots, l, d, P, block_table=table, actual_seq_len=lens,
                                           cache=ref)
    out = nsa_ops.npu_nsa_compress_infer(inp, weight, slots, l, d, P, block_table=table, actual_seq_len=lens,
                                         cache=cache)
    assert out is cache
    assert torch.equal(cache.view(torch.uint8) if dtype != torch.float32 else cache, ref.view(torch.uint8)
                       if dtype != torch.float32 else ref)
    check_model(inp, weight, slots, l, d, table, lens, before, cache)


def test_strided_views_and_tensor_lengths():
    """Non-contiguous input / weight / cache (read and written in place) and lengths as an int32 tensor."""
    lens = [48, 33, 64]
    inp, weight, slots, table, cache = make_case(torch.bfloat16, 8, 2, 12, 32, 16, lens, seed=4)
    big = torch.zeros(cache.shape[0], cache.shape[1], 2 * cache.shape[2], dtype=cache.dtype)
    view = big[:, :, ::2]
    view.copy_(cache)
    inp_nc = inp.transpose(2, 3).contiguous().transpose(2, 3)
    expect = cache.clone()
    nsa_ops.npu_nsa_compress_infer(inp, weight, slots, 32, 16, 8, block_table=table, actual_seq_len=lens,
                                   cache=expect)
    out = nsa_ops.npu_nsa_compress_infer(inp_nc, weight.t().contiguous().t(), slots, 32, 16, 8, block_table=table,
                                         actual_seq_len=torch.tensor(lens, dtype=torch.int32), cache=view)
    assert out is view
    assert torch.equal(view, expect)
    assert torch.all(big[:, :, 1::2] == 0)


def test_rounds_to_nearest_even():
    """§2: ties round to even (the training compress rounds half away): bf16 1 + 2^-8 -> 1."""
    inp = torch.zeros(1, 2, 1, 1, dtype=torch.bfloat16)
    inp[0, 0, 0, 0] = 1.0
    inp[0, 1, 0, 0] = 2.0**-8
    cache = torch.zeros(1, 1, 1, dtype=torch.bfloat16)
    nsa_ops.npu_nsa_compress_infer(inp, torch.ones(2, 1, dtype=torch.bfloat16), torch.tensor([0], dtype=torch.int32),
                                   2, 1, 2, block_table=torch.tensor([[0]], dtype=torch.int32), actual_seq_len=[2],
                                   cache=cache)
    assert cache.item() == 1.0


def _args():
    inp, weight, slots, table, cache = make_case(torch.float32, 4, 2, 8, 8, 4, [8, 12], seed=1)
    return dict(input=inp, weight=weight, slot_mapping=slots, compress_block_size=8, compress_stride=4,
                page_block_size=4, block_table=table, actual_seq_len=[8, 12], cache=cache)


@pytest.mark.parametrize("change,message", [
    (dict(block_table=None), "block_table must be given"),
    (dict(actual_seq_len=None), "actual_seq_len must be given"),
    (dict(actual_seq_len=[8, 12, 4]), "slot_mapping must have B = 3 entries"),
    (dict(actual_seq_len=[8, -1]), "actual_seq_len[1] must be >= 0"),
    (dict(slot_mapping=torch.tensor([3, 3], dtype=torch.int32)), "slot_mapping must name distinct cache rows"),
    (dict(slot_mapping=torch.tensor([0, 99], dtype=torch.int32)), "slot_mapping[1] = 99 must be a row of cache"),
    (dict(slot_mapping=torch.tensor([0, 1])), "slot_mapping must be an int32 tensor"),
    (dict(block_table=torch.tensor([[0, 1, 2], [3, -1, 4]], dtype=torch.int32)), "block_table[1, 1] = -1 must be a page"),
    (dict(block_table=torch.tensor([[0, 1, 2], [3, 4, 99]], dtype=torch.int32)), "block_table[1, 2] = 99 must be a page"),
    (dict(actual_seq_len=[8, 16]), "block_table[1, 3] = -1 must be a page of input"),
    (dict(actual_seq_len=[8, 24]), "compresses tokens [16, 24) which need page index 4"),
    (dict(page_block_size=8), "page_block_size (8) must equal input.shape[1]"),
    (dict(compress_stride=9), "compress_stride (9) must be <= compress_block_size (8)"),
    (dict(weight=torch.zeros(7, 2)), "weight must have shape [compress_block_size, N] = [8, 2]"),
    (dict(cache=torch.zeros(4, 2, 9)), "cache must have shape [num_slots, N, D]"),
    (dict(cache=torch.zeros(4, 2, 8, dtype=torch.float64)), "cache must have the dtype of input"),
    (dict(input=torch.zeros(4, 4, 8)), "input must be a 4-D tensor"),
])
def test_argument_errors(change, message):
    args = _args()
    args.update(change)
    before = args["cache"].clone()
    kw = {k: args.pop(k) for k in ("block_table", "actual_seq_len", "cache")}
    with pytest.raises(RuntimeError) as e:
        nsa_ops.npu_nsa_compress_infer(*args.values(), **kw)
    assert message in str(e.value)
    if kw["cache"].shape == before.shape and kw["cache"].dtype == before.dtype:
        assert torch.equal(kw["cache"], before)  # nothing written on error


def test_no_derivative():
    """No backward exists (§2): inputs that require grad are refused in grad mode, accepted under no_grad."""
    args = _args()
    args["weight"] = args["weight"].requires_grad_()
    kw = {k: args.pop(k) for k in ("block_table", "actual_seq_len", "cache")}
    with pytest.raises(RuntimeError, match="has no derivative .*weight requires grad"):
        nsa_ops.npu_nsa_compress_infer(*args.values(), **kw)
    with torch.no_grad():
        nsa_ops.npu_nsa_compress_infer(*args.values(), **kw)


@pytest.mark.parametrize("tensor_lengths", [False, True])
def test_opcheck(tensor_lengths):
    """Schema (the cache is declared mutated, nothing else), fake tensor and autograd registration checks for both
    overloads; the AOT dispatch check runs once (the .tensor_lengths overload, the one torch.compile uses)."""
    args = _args()
    kw = {k: args.pop(k) for k in ("block_table", "actual_seq_len", "cache")}
    op = torch.ops.nsa.compress_infer.default
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if tensor_lengths:
        kw["actual_seq_len"] = torch.tensor(kw["actual_seq_len"])
        op = torch.ops.nsa.compress_infer.tensor_lengths
        utils += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(op, tuple(args.values()), kw, test_utils=utils)


def test_compile_updates_cache_in_place():
    """Under torch.compile (fullgraph) the cache is still updated in place; new lengths as tensor values."""
    args = _args()
    kw = {k: args.pop(k) for k in ("block_table", "actual_seq_len", "cache")}
    cache = kw.pop("cache")
    expect = cache.clone()
    nsa_ops.npu_nsa_compress_infer(*args.values(), **kw, cache=expect)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(inp, weight, slots, table, lens, cache):
        return nsa_ops.npu_nsa_compress_infer(inp, weight, slots, 8, 4, 4, block_table=table, actual_seq_len=lens,
                                              cache=cache)

    out = step(args["input"], args["weight"], args["slot_mapping"], kw["block_table"],
               torch.tensor(kw["actual_seq_len"]), cache)
    assert torch.equal(cache, expect)
    assert torch.equal(out, expect)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_equal_training_compress(dtype):
    """Decode consistency (§2): compressing step by step into a paged cache gives the training operator's rows for the
    same windows (npu_nsa_compress, compress.md §4): bitwise in fp32 (same fp32 sums, no rounding), within one ulp
    in bf16 (rne here, rha there: they differ only on exact ties)."""
    l, d, P, N, D, S = 8, 4, 3, 2, 24, 41
    g = torch.Generator().manual_seed(9)
    seq = (torch.rand(S, N, D, generator=g) * 4 - 2).to(dtype)
    weight = (torch.rand(l, N, generator=g) * 2 - 1).to(dtype)
    pages = (S + P - 1) // P
    perm = torch.randperm(pages, generator=g)
    paged = torch.zeros(pages, P, N, D, dtype=dtype)
    for p in range(S):  # raw token p of the sequence at page perm[p // P], row p % P
        paged[perm[p // P], p % P] = seq[p]
    table = perm.to(torch.int32)[None, :]
    C = (S - l) // d + 1
    cache = torch.zeros(C + 2, N, D, dtype=dtype)
    for s in range(1, S + 1):  # one decode step per appended token; slot c for compressed token c
        c = (s - l) // d if s >= l else 0
        nsa_ops.npu_nsa_compress_infer(paged, weight, torch.tensor([c], dtype=torch.int32), l, d, P,
                                       block_table=table, actual_seq_len=torch.tensor([s]), cache=cache)
    train = nsa_ops.npu_nsa_compress(seq, weight, l, d, actual_seq_len=[S])
    assert train.shape[0] == C
    if dtype == torch.float32:
        assert torch.equal(cache[:C], train)
    else:
        ulp = torch.finfo(dtype).eps * train.float().abs()
        assert torch.all((cache[:C].float() - train.float()).abs() <= ulp)
    assert torch.all(cache[C:] == 0)


def test_compile_new_lengths_do_not_recompile():
    """Decode steps with new lengths (same tensor shapes) reuse one compiled graph (.tensor_lengths overload)."""
    import torch._dynamo.testing

    args = _args()
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    step = torch.compile(lambda inp, w, s, t, lens, c: nsa_ops.npu_nsa_compress_infer(
        inp, w, s, 8, 4, 4, block_table=t, actual_seq_len=lens, cache=c), backend=cnt, fullgraph=True)
    for lens in ([8, 12], [4, 8], [6, 10]):
        cache = args["cache"].clone()
        expect = args["cache"].clone()
        nsa_ops.npu_nsa_compress_infer(args["input"], args["weight"], args["slot_mapping"], 8, 4, 4,
                                       block_table=args["block_table"], actual_seq_len=lens, cache=expect)
        step(args["input"], args["weight"], args["slot_mapping"], args["block_table"], torch.tensor(lens), cache)
        assert torch.equal(cache, expect)
    assert cnt.frame_count == 1
