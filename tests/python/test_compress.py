"""The KV compression operator (docs/spec/compress.md) from Python: torch.ops.nsa.compress / compress_backward, the
drop-ins nsa_ops.npu_nsa_compress / npu_nsa_compress_grad and the Pythonic nsa_ops.compress.

The oracle is an independent plain-PyTorch model written here: per batch, ``unfold`` of the tokens into windows and
an ``einsum`` with the weight, in fp64, differentiated by autograd for the gradients. The comparison is the §9
rule: a result must be the fp64 value rounded with the contract's rule (half away from zero for the forward, to
nearest even for the gradients), except within the fp32 summation error (``(terms + 1) * 2^-24 * sum|terms|``) of a
rounding boundary, where the neighbour is accepted too.
"""

import inspect
import math

import pytest
import torch

import nsa_ops

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.nsa, "compress"),
                                reason="the loaded library was built without the compress operator")

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


# ------------------------------------------------------------------------------------------ the model
def batches(lens):
    """(start, S_b) per batch from torch_npu-style prefix sums."""
    out, prev = [], 0
    for x in lens:
        out.append((prev, x - prev))
        prev = x
    return out


def model_forward(x, w, l, d, lens):
    """§4 in the dtype of x and w (fp64 in the tests), differentiable: unfold + einsum per batch."""
    N, D = x.shape[1], x.shape[2]
    rows = []
    for start, S in batches(lens):
        if S >= l:
            win = x[start:start + S].unfold(0, l, d)  # [C, N, D, l]: window c = tokens [c*d, c*d + l)
            rows.append(torch.einsum("cndl,ln->cnd", win, w))
    return torch.cat(rows) if rows else x.new_zeros(0, N, D)


def model_all(x, w, g, l, d, lens):
    """fp64 values and absolute sums of output, input_grad and weight_grad, and the terms of each input_grad."""
    x64, w64, g64 = x.double(), w.double(), g.double()
    out = model_forward(x64, w64, l, d, lens)
    out_abs = model_forward(x64.abs(), w64.abs(), l, d, lens)

    def vjp(xx, ww, gg):
        xx, ww = xx.clone().requires_grad_(True), ww.clone().requires_grad_(True)
        o = model_forward(xx, ww, l, d, lens)
        if o.numel() == 0:
            return torch.zeros_like(xx), torch.zeros_like(ww)
        return torch.autograd.grad(o, (xx, ww), gg)

    ig, wg = vjp(x64, w64, g64)
    ig_abs, _ = vjp(x64, w64.abs(), g64.abs())
    _, wg_abs = vjp(x64.abs(), w64, g64.abs())
    terms, _ = vjp(x64, torch.ones_like(w64), torch.ones_like(g64))
    return dict(out=out, out_abs=out_abs, ig=ig, ig_abs=ig_abs, ig_terms=terms, wg=wg, wg_abs=wg_abs,
                wg_terms=g.shape[0] * g.shape[2])


def round_model(v, dtype, away):
    """v (fp64) rounded to dtype's values to nearest, ties away from zero or to even; directly from fp64 (no
    intermediate fp32); fp32/fp64: unchanged (no final rounding, §4)."""
    if dtype in (torch.float32, torch.float64):
        return v
    p, emin, emax = (8, -126, 127) if dtype == torch.bfloat16 else (11, -14, 15)
    a = v.abs()
    _, e = torch.frexp(a)
    E = torch.clamp(e - 1, min=emin)                       # a in [2^E, 2^(E+1)) (or subnormal spacing)
    q = torch.ldexp(a, (p - 1 - E).double())               # a in units of the spacing: exact
    fl = torch.floor(q)
    frac = q - fl
    odd = torch.remainder(fl, 2) == 1
    up = (frac > 0.5) | ((frac == 0.5) & (torch.ones_like(odd) if away else odd))
    y = torch.ldexp(fl + up.double(), (E - p + 1).double())
    max_finite = (2.0 ** p - 1) * 2.0 ** (emax - p + 1)
    y = torch.where(y > max_finite, torch.full_like(y, math.inf), y)
    y = torch.copysign(y, v)
    return torch.where(torch.isfinite(v) & (a > 0), y, v)


def assert_rule(got, value, abs_sum, terms, dtype, away, what):
    """The §9 rule, element by element."""
    u = 2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24
    tiny = 2.0 ** -1074 if dtype == torch.float64 else 2.0 ** -149
    terms = torch.as_tensor(terms, dtype=torch.float64)
    tol = (terms + 1) * u * abs_sum * 1.0000001 + (terms + 1) * tiny
    lo, hi = round_model(value - tol, dtype, away), round_model(value + tol, dtype, away)
    g = got.double()
    ok = ((g >= lo) & (g <= hi)) | (torch.isnan(g) & torch.isnan(value))
    if not bool(ok.all()):
        i = (~ok).nonzero()[0].tolist()
        t = tuple(i)
        raise AssertionError(f"{what}[{t}]: got {g[t].item()!r}, fp64 model {value[t].item()!r}, accepted "
                             f"[{lo[t].item()!r}, {hi[t].item()!r}] ({dtype})")


def make_case(dtype, seq=(40, 0, 17, 31, 64), N=2, D=24, l=32, d=16, seed=0, leading_zero=False):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(seq).cumsum(0).tolist()
    if leading_zero:
        lens = [0] + lens
    T = lens[-1]
    x = torch.randn(T, N, D, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(l, N, generator=gen, dtype=torch.float64).to(dtype)
    R = sum((S - l) // d + 1 for _, S in batches(lens) if S >= l)
    g = torch.randn(R, N, D, generator=gen, dtype=torch.float64).to(dtype)
    return x, w, g, lens


def check_against_model(x, w, g, l, d, lens, out, ig, wg):
    m = model_all(x, w, g, l, d, lens)
    assert out.shape == m["out"].shape and out.dtype == x.dtype and out.is_contiguous()
    assert_rule(out, m["out"], m["out_abs"], l, x.dtype, True, "output")
    assert ig.shape == x.shape and ig.dtype == x.dtype and ig.is_contiguous()
    assert wg.shape == w.shape and wg.dtype == w.dtype and wg.is_contiguous()
    assert_rule(ig, m["ig"], m["ig_abs"], m["ig_terms"], x.dtype, False, "input_grad")
    assert_rule(wg, m["wg"], m["wg_abs"], m["wg_terms"], x.dtype, False, "weight_grad")
    # rows no window covers: exactly +0
    uncovered = m["ig_terms"] == 0
    assert torch.equal(ig[uncovered].double(), torch.zeros_like(ig[uncovered].double()))


# ------------------------------------------------------------------------------------------ the model itself
def test_rounding_model_examples():
    v = torch.tensor([257.0, -257.0, 259.0, 1 + 2 ** -8, 2049.0, 65520.0, 0.0, -0.0, 2.0 ** -25, 5 * 2.0 ** -25],
                     dtype=torch.float64)
    assert round_model(v[:4], torch.bfloat16, True).tolist() == [258.0, -258.0, 260.0, 1 + 2 ** -7]
    assert round_model(v[:4], torch.bfloat16, False).tolist() == [256.0, -256.0, 260.0, 1.0]
    assert round_model(v[4:6], torch.float16, True).tolist() == [2050.0, math.inf]
    assert round_model(v[4:6], torch.float16, False).tolist() == [2048.0, math.inf]
    assert round_model(v[8:], torch.float16, True).tolist() == [2.0 ** -24, 3 * 2.0 ** -24]  # subnormal ties
    assert round_model(v[8:], torch.float16, False).tolist() == [0.0, 2 * 2.0 ** -24]
    # nearest even equals torch's own conversion
    r = torch.randn(10000, dtype=torch.float64) * 10.0 ** torch.randint(-8, 5, (10000,)).double()
    for dt in (torch.bfloat16, torch.float16):
        assert torch.equal(round_model(r.float().double(), dt, False), r.float().to(dt).double())


# ------------------------------------------------------------------------------------------ values
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [
    dict(seq=(40, 0, 17, 31, 64), N=2, D=24, l=32, d=16),      # NSA's l, d; empty and short batches
    dict(seq=(48, 16, 15), N=3, D=16, l=16, d=16),             # l = d
    dict(seq=(50, 6, 7, 29), N=3, D=13, l=7, d=3),             # odd sizes
    dict(seq=(10, 3, 0), N=2, D=8, l=16, d=8),                 # R = 0
])
def test_forward_and_backward_match_the_model(dtype, shape):
    x, w, g, lens = make_case(dtype, **shape)
    l, d = shape["l"], shape["d"]
    out = nsa_ops.npu_nsa_compress(x, w, l, d, actual_seq_len=lens)
    ig, wg = nsa_ops.npu_nsa_compress_grad(g, x, w, l, d, actual_seq_len=lens)
    check_against_model(x, w, g, l, d, lens, out, ig, wg)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_op_equals_the_cpu_backend(dtype):
    x, w, g, lens = make_case(dtype, seed=1)
    out = torch.ops.nsa.compress(x, w, 32, 16, lens)
    assert torch.equal(out, torch.ops.nsa.compress_reference(x, w, 32, 16, lens))
    ig, wg = torch.ops.nsa.compress_backward(g, x, w, 32, 16, lens)
    ig_r, wg_r = torch.ops.nsa.compress_backward_reference(g, x, w, 32, 16, lens)
    assert torch.equal(ig, ig_r)  # same order of additions; weight_grad's order differs (within the rule)
    m = model_all(x, w, g, 32, 16, lens)
    assert_rule(wg_r, m["wg"], m["wg_abs"], m["wg_terms"], dtype, False, "weight_grad (reference)")


def test_forward_rounds_half_away_and_backward_to_even():
    # §8 B: bf16 256 + 1 = 257 -> 258 (rha); weight_grad 257 -> 256 (rne)
    x = torch.tensor([[[256.0]], [[1.0]]], dtype=torch.bfloat16)
    out = nsa_ops.npu_nsa_compress(x, torch.ones(2, 1, dtype=torch.bfloat16), 2, 2, actual_seq_len=[2])
    assert out.item() == 258.0
    xh = torch.tensor([[[2048.0]], [[1.0]]], dtype=torch.float16)
    assert nsa_ops.npu_nsa_compress(xh, torch.ones(2, 1, dtype=torch.float16), 2, 2, actual_seq_len=[2]).item() == 2050.0
    ig, wg = nsa_ops.npu_nsa_compress_grad(torch.ones(2, 1, 1, dtype=torch.bfloat16), x,
                                           torch.ones(1, 1, dtype=torch.bfloat16), 1, 1, actual_seq_len=[2])
    assert wg.item() == 256.0 and ig.flatten().tolist() == [1.0, 1.0]


def test_example_c_lengths_of_the_npu_backward_test():
    x, w, g, _ = make_case(torch.float32, seq=(5, 44), N=2, D=16)
    lens = [0, 5, 49]
    out = nsa_ops.npu_nsa_compress(x, w, 32, 16, actual_seq_len=lens)
    assert out.shape == (1, 2, 16)
    assert torch.equal(out, nsa_ops.npu_nsa_compress(x, w, 32, 16, actual_seq_len=[5, 49]))  # leading 0 = empty batch
    g = torch.randn(1, 2, 16)
    ig, wg = nsa_ops.npu_nsa_compress_grad(g, x, w, 32, 16, actual_seq_len=lens)
    assert torch.count_nonzero(ig[:5]) == 0 and torch.count_nonzero(ig[37:]) == 0
    torch.testing.assert_close(wg, torch.einsum("nj,wnj->wn", g[0], x[5:37]), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ lengths and layouts
def test_lengths_as_list_tuple_and_tensors_agree():
    x, w, g, lens = make_case(torch.bfloat16, seed=2, leading_zero=True)
    ref = nsa_ops.npu_nsa_compress(x, w, 32, 16, actual_seq_len=lens)
    ref_g = nsa_ops.npu_nsa_compress_grad(g, x, w, 32, 16, actual_seq_len=lens)
    for form in (tuple(lens), torch.tensor(lens), torch.tensor(lens, dtype=torch.int32),
                 torch.tensor([0] + lens)[1:]):  # a strided view
        assert torch.equal(nsa_ops.npu_nsa_compress(x, w, 32, 16, actual_seq_len=form), ref)
        ig, wg = nsa_ops.npu_nsa_compress_grad(g, x, w, 32, 16, actual_seq_len=form)
        assert torch.equal(ig, ref_g[0]) and torch.equal(wg, ref_g[1])


def test_non_contiguous_inputs_give_the_same_bits():
    x, w, g, lens = make_case(torch.float16, seed=3)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)                # other strides, same values
    xs = torch.cat([x, x], dim=2)[:, :, ::2].clone()[:, :, :]           # values differ: build a strided copy instead
    xs = torch.empty(x.shape[0], x.shape[1], 2 * x.shape[2], dtype=x.dtype)[:, :, ::2]
    xs.copy_(x)                                                          # inner stride 2
    wt = w.t().contiguous().t()
    gs = torch.empty(g.shape[2], g.shape[1], g.shape[0], dtype=g.dtype).permute(2, 1, 0)
    gs.copy_(g)
    ref = nsa_ops.npu_nsa_compress(x, w, 32, 16, actual_seq_len=lens)
    ref_g = nsa_ops.npu_nsa_compress_grad(g, x, w, 32, 16, actual_seq_len=lens)
    for xx in (xt, xs):
        assert not xx.is_contiguous()
        assert torch.equal(nsa_ops.npu_nsa_compress(xx, wt, 32, 16, actual_seq_len=lens), ref)
        ig, wg = nsa_ops.npu_nsa_compress_grad(gs, xx, wt, 32, 16, actual_seq_len=lens)
        assert torch.equal(ig, ref_g[0]) and torch.equal(wg, ref_g[1])


def test_empty_output_and_zero_gradients():
    x = torch.randn(20, 2, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, 2, dtype=torch.float64, requires_grad=True)
    out = nsa_ops.npu_nsa_compress(x, w, 16, 8, actual_seq_len=[10, 20])  # both batches short
    assert out.shape == (0, 2, 8)
    out.sum().backward()
    assert torch.count_nonzero(x.grad) == 0 and torch.count_nonzero(w.grad) == 0
    # T = 0
    e = nsa_ops.npu_nsa_compress(torch.empty(0, 2, 8), torch.randn(4, 2), 4, 2, actual_seq_len=[0])
    assert e.shape == (0, 2, 8)


# ------------------------------------------------------------------------------------------ the Python API
NPU_COMPRESS = [("input", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
                ("weight", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
                ("compress_block_size", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
                ("compress_stride", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
                ("actual_seq_len", inspect.Parameter.KEYWORD_ONLY, None)]


def test_drop_in_signatures_equal_torch_npu():
    sig = [(p.name, p.kind, p.default) for p in inspect.signature(nsa_ops.npu_nsa_compress).parameters.values()]
    assert sig == NPU_COMPRESS
    sig = [(p.name, p.kind, p.default) for p in inspect.signature(nsa_ops.npu_nsa_compress_grad).parameters.values()]
    assert sig == [("grad", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty)] + NPU_COMPRESS
    with pytest.raises(TypeError):  # actual_seq_len is keyword-only, as in torch_npu
        nsa_ops.npu_nsa_compress(torch.zeros(4, 1, 1), torch.zeros(4, 1), 4, 4, [4])


@pytest.mark.parametrize("name", ["compress", "compress_reference"])
def test_schemas(name):
    schema = getattr(torch.ops.nsa, name).default._schema
    assert [a.name for a in schema.arguments] == ["input", "weight", "compress_block_size", "compress_stride",
                                                  "actual_seq_len"]
    assert schema.arguments[-1].default_value is None
    schema = torch.ops.nsa.compress_backward.default._schema
    assert [a.name for a in schema.arguments][:3] == ["grad", "input", "weight"]
    assert [r.name for r in schema.returns] == ["input_grad", "weight_grad"]


@pytest.mark.parametrize("tensor", [False, True])
def test_pythonic_api(tensor):
    x, w, g, lens = make_case(torch.bfloat16, seed=4)
    cu = [0] + lens
    cu_arg = torch.tensor(cu, dtype=torch.int32) if tensor else cu
    r = nsa_ops.compress(x, w, cu_seqlens=cu_arg, compress_block_size=32, compress_stride=16)
    assert isinstance(r, nsa_ops.CompressOutput)
    assert torch.equal(r.output, nsa_ops.npu_nsa_compress(x, w, 32, 16, actual_seq_len=cu[1:]))
    want = [0]
    for _, S in batches(lens):
        want.append(want[-1] + ((S - 32) // 16 + 1 if S >= 32 else 0))
    if tensor:
        assert isinstance(r.cu_seqlens_cmp, torch.Tensor) and r.cu_seqlens_cmp.dtype == torch.int32
        assert r.cu_seqlens_cmp.tolist() == want
    else:
        assert r.cu_seqlens_cmp == want
    assert r.cu_seqlens_cmp[-1] == r.output.shape[0]


@pytest.mark.parametrize("cu,error,pattern", [
    ([5, 40, 169], ValueError, r"cu_seqlens must start with 0"),
    ([0, 50, 40, 169], ValueError, r"cu_seqlens must be non-decreasing"),
    ([0], ValueError, r"cu_seqlens must have B\+1 >= 2"),
    ("0,169", TypeError, r"cu_seqlens"),
    ([0, 1.5], ValueError, r"cu_seqlens\[1\] must be an int"),
    ([0, 100], RuntimeError, r"actual_seq_len\[-1\] must equal"),
])
def test_pythonic_api_errors_name_the_argument(cu, error, pattern):
    x, w, _, _ = make_case(torch.float32, seed=5)
    with pytest.raises(error, match=pattern):
        nsa_ops.compress(x, w, cu_seqlens=cu, compress_block_size=32, compress_stride=16)
    if isinstance(cu, list) and all(isinstance(v, int) for v in cu) and len(cu) >= 1:
        with pytest.raises(error, match=pattern):
            nsa_ops.compress(x, w, cu_seqlens=torch.tensor(cu), compress_block_size=32, compress_stride=16)


@pytest.mark.parametrize("change,pattern", [
    (dict(lens=None), r"actual_seq_len must be given"),
    (dict(lens=[]), r"actual_seq_len must have at least one element"),
    (dict(lens=[40, 100]), r"actual_seq_len\[-1\] must equal the number of input rows T = input.size\(0\) = 152"),
    (dict(lens=[60, 40, 152]), r"actual_seq_len must be non-decreasing"),
    (dict(lens=[-1, 152]), r"actual_seq_len\[0\] must be >= 0"),
    (dict(l=0), r"compress_block_size must be >= 1"),
    (dict(d=0), r"compress_stride must be >= 1"),
    (dict(d=64), r"compress_stride \(64\) must be <= compress_block_size \(32\)"),
    (dict(w_shape=(16, 2)), r"weight must have shape \[compress_block_size, N\]"),
    (dict(w_shape=(32, 3)), r"weight must have shape \[compress_block_size, N\]"),
    (dict(w_dtype=torch.float16), r"weight must have the dtype of input"),
    (dict(x_dtype=torch.int32), r"input must be bfloat16, float16, float32 or float64"),
    (dict(x_shape=(152, 48)), r"input must be a 3-D tensor"),
    (dict(w_shape=(32,)), r"weight must be a 2-D tensor"),
    (dict(lens=torch.tensor([[152]])), r"actual_seq_len must be a 1-D integer tensor"),
    (dict(lens=torch.tensor([152.0])), r"actual_seq_len must be an int64 or int32 tensor"),
])
def test_forward_errors_name_the_argument(change, pattern):
    lens = change.get("lens", [40, 152])
    x = torch.randn(*change.get("x_shape", (152, 2, 24))).to(change.get("x_dtype", torch.float32))
    w = torch.randn(*change.get("w_shape", (32, 2))).to(change.get("w_dtype", torch.float32))
    with pytest.raises(RuntimeError, match=pattern):
        nsa_ops.npu_nsa_compress(x, w, change.get("l", 32), change.get("d", 16), actual_seq_len=lens)


def test_backward_errors_name_the_argument():
    x, w, g, lens = make_case(torch.float32, seed=6)
    with pytest.raises(RuntimeError, match=r"grad must have the output's shape \[R, N, D\]"):
        nsa_ops.npu_nsa_compress_grad(g[1:], x, w, 32, 16, actual_seq_len=lens)
    with pytest.raises(RuntimeError, match=r"grad must have the dtype of input"):
        nsa_ops.npu_nsa_compress_grad(g.double(), x, w, 32, 16, actual_seq_len=lens)
    with pytest.raises(RuntimeError, match=r"grad must be a 3-D tensor"):
        nsa_ops.npu_nsa_compress_grad(g[0], x, w, 32, 16, actual_seq_len=lens)
    with pytest.raises(RuntimeError, match=r"actual_seq_len must be given"):
        nsa_ops.npu_nsa_compress_grad(g, x, w, 32, 16)
    with pytest.raises(RuntimeError, match=r"grad must have the output's shape"):
        nsa_ops.npu_nsa_compress_grad(g[1:], x, w, 32, 16, actual_seq_len=torch.tensor(lens))


def test_meta_kernel_shapes():
    x = torch.empty(1073, 2, 192, dtype=torch.bfloat16, device="meta")
    w = torch.empty(32, 2, dtype=torch.bfloat16, device="meta")
    out = nsa_ops.npu_nsa_compress(x, w, 32, 16, actual_seq_len=[0, 5, 49, 1073])
    assert (out.shape, out.dtype, out.device.type) == ((64, 2, 192), torch.bfloat16, "meta")
    ig, wg = nsa_ops.npu_nsa_compress_grad(torch.empty(64, 2, 192, dtype=torch.bfloat16, device="meta"), x, w, 32, 16,
                                           actual_seq_len=[0, 5, 49, 1073])
    assert ig.shape == x.shape and wg.shape == w.shape and ig.device.type == "meta"
    with pytest.raises(RuntimeError, match=r"actual_seq_len\[-1\] must equal"):
        nsa_ops.npu_nsa_compress(x, w, 32, 16, actual_seq_len=[0, 5, 49])
    with pytest.raises(RuntimeError, match=r"grad must have the output's shape"):
        nsa_ops.npu_nsa_compress_grad(torch.empty(63, 2, 192, dtype=torch.bfloat16, device="meta"), x, w, 32, 16,
                                      actual_seq_len=[0, 5, 49, 1073])


# ------------------------------------------------------------------------------------------ PyTorch contract
@pytest.mark.parametrize("tensor_lengths", [False, True])
def test_opcheck(tensor_lengths):
    x, w, g, lens = make_case(torch.float32, seq=(40, 0, 17, 64), N=2, D=8, seed=7)
    L = torch.tensor(lens) if tensor_lengths else lens
    x.requires_grad_(True)
    w.requires_grad_(True)
    g.requires_grad_(True)
    fwd = torch.ops.nsa.compress.tensor_lengths if tensor_lengths else torch.ops.nsa.compress.default
    bwd = torch.ops.nsa.compress_backward.tensor_lengths if tensor_lengths else torch.ops.nsa.compress_backward.default
    torch.library.opcheck(fwd, (x, w, 32, 16, L))
    torch.library.opcheck(bwd, (g, x, w, 32, 16, L))


@pytest.mark.parametrize("entry", ["list", "tensor", "pythonic"])
def test_gradcheck_and_gradgradcheck_fp64(entry):
    x, w, _, lens = make_case(torch.float64, seq=(14, 3, 0, 19), N=2, D=2, l=8, d=3, seed=8)

    def f(x, w):
        if entry == "list":
            return nsa_ops.npu_nsa_compress(x, w, 8, 3, actual_seq_len=lens)
        if entry == "tensor":
            return nsa_ops.npu_nsa_compress(x, w, 8, 3, actual_seq_len=torch.tensor(lens))
        return nsa_ops.compress(x, w, cu_seqlens=[0] + lens, compress_block_size=8, compress_stride=3).output

    inputs = (x.requires_grad_(True), w.requires_grad_(True))
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_gradients_of_low_precision_inputs_follow_the_rule():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x, w, g, lens = make_case(dtype, seed=9)
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = nsa_ops.npu_nsa_compress(xr, wr, 32, 16, actual_seq_len=lens)
        ig, wg = torch.autograd.grad(out, (xr, wr), g)
        check_against_model(x, w, g, 32, 16, lens, out.detach(), ig, wg)


@pytest.mark.parametrize("api", ["dropin", "pythonic"])
def test_compile_fullgraph_forward_backward_without_recompiling(api):
    """torch.compile(fullgraph=True) of forward + backward with tensor lengths: new batch compositions (and so new
    output row counts R) with the same tensor shapes reuse the compiled graph."""
    import torch._dynamo
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return aot_autograd(fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g)(gm, example_inputs)

    def step(x, w, cu):
        if api == "dropin":
            out = nsa_ops.npu_nsa_compress(x, w, 32, 16, actual_seq_len=cu[1:])
            return out.float().square().sum()
        r = nsa_ops.compress(x, w, cu_seqlens=cu, compress_block_size=32, compress_stride=16)
        return r.output.float().square().sum() + r.cu_seqlens_cmp[-1]

    compiled = torch.compile(step, backend=backend, fullgraph=True)
    for seq in [(100, 100, 100), (50, 200, 50), (0, 31, 269), (300, 0, 0)]:
        cu = torch.tensor([0] + torch.tensor(seq).cumsum(0).tolist())
        x = torch.randn(300, 2, 24, dtype=torch.bfloat16)
        w = torch.randn(32, 2, dtype=torch.bfloat16)
        xc, wc = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = compiled(xc, wc, cu)
        loss.backward()
        xe, we = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss_e = step(xe, we, cu)
        loss_e.backward()
        assert torch.equal(loss, loss_e)
        assert torch.equal(xc.grad, xe.grad) and torch.equal(wc.grad, we.grad)
    assert len(compiles) == 1, f"expected one compilation, got {len(compiles)}"


# ------------------------------------------------------------------------------------------ end to end
def test_feeds_compress_attention_end_to_end():
    """Raw keys and values compressed with their own weights feed compressed attention directly: cu_seqlens_cmp is
    its cu_seqlens_cmp (and its [1:] the drop-in's actual_cmp_seq_kvlen). Gradients reach the raw keys, values and
    both weights; fp64 gradcheck of the whole composition."""
    gen = torch.Generator().manual_seed(10)
    seq = [40, 57]
    cu = [0, 40, 97]
    N1, N2, D, D2, l, d = 4, 2, 8, 6, 32, 16
    q = torch.randn(97, N1, D, generator=gen, dtype=torch.float64)
    k_raw = torch.randn(97, N2, D, generator=gen, dtype=torch.float64)
    v_raw = torch.randn(97, N2, D2, generator=gen, dtype=torch.float64)
    wk = torch.randn(l, N2, generator=gen, dtype=torch.float64) / l
    wv = torch.randn(l, N2, generator=gen, dtype=torch.float64) / l

    def attend(q, k_raw, v_raw, wk, wv):
        k = nsa_ops.compress(k_raw, wk, cu_seqlens=cu, compress_block_size=l, compress_stride=d)
        v = nsa_ops.compress(v_raw, wv, cu_seqlens=cu, compress_block_size=l, compress_stride=d)
        assert k.cu_seqlens_cmp == v.cu_seqlens_cmp == [0, 1, 3]
        return nsa_ops.compress_attention(q, k.output, v.output, cu_seqlens_q=cu, cu_seqlens_cmp=k.cu_seqlens_cmp,
                                          compress_block_size=l, compress_stride=d, select_block_size=32,
                                          select_block_count=1).attention_out

    out = attend(q, k_raw, v_raw, wk, wv)
    # the drop-ins give the same result
    k = nsa_ops.npu_nsa_compress(k_raw, wk, l, d, actual_seq_len=cu[1:])
    v = nsa_ops.npu_nsa_compress(v_raw, wv, l, d, actual_seq_len=cu[1:])
    out2 = nsa_ops.npu_nsa_compress_attention(q, k, v, 1 / math.sqrt(D), N1, l, d, 32, 1,
                                              actual_seq_qlen=cu[1:], actual_cmp_seq_kvlen=[1, 3])[0]
    assert torch.equal(out, out2)
    inputs = tuple(t.clone().requires_grad_(True) for t in (q, k_raw, v_raw, wk, wv))
    assert torch.autograd.gradcheck(attend, inputs, fast_mode=True)
    # bf16 end to end: runs and produces gradients for every raw input
    inputs = tuple(t.to(torch.bfloat16).requires_grad_(True) for t in (q, k_raw, v_raw, wk, wv))
    attend(*inputs).float().sum().backward()
    for t in inputs[1:]:
        assert t.grad is not None and torch.count_nonzero(t.grad) > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_casts_to_the_autocast_dtype_and_gradients_reach_fp32(dtype):
    x = torch.randn(96, 2, 16, requires_grad=True)
    w = torch.randn(32, 2, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        out = nsa_ops.npu_nsa_compress(x, w, 32, 16, actual_seq_len=torch.tensor([40, 96]))
        res = nsa_ops.compress(x, w, cu_seqlens=[0, 40, 96], compress_block_size=32, compress_stride=16)
    ref = nsa_ops.npu_nsa_compress(x.detach().to(dtype), w.detach().to(dtype), 32, 16, actual_seq_len=[40, 96])
    assert out.dtype == dtype and torch.equal(out, ref) and torch.equal(res.output, ref)
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    # float64 is left alone (as CPU autocast does)
    with torch.autocast("cpu", dtype=dtype):
        assert nsa_ops.npu_nsa_compress(x.double(), w.double(), 32, 16, actual_seq_len=[40, 96]).dtype == torch.float64
