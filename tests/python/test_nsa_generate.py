"""NSAAttention generation (docs/spec/nsa_layer.md "Generation (prefill and decode)"): prefill equals the training
forward; prefill + decode steps over the paged caches give, token by token, the training forward's outputs on the
whole sequences within a per-element bound; multi-token steps; the operator-selection mode; cache growth; errors;
the examples/generate.py smoke run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import nsa_ops

REPO = Path(__file__).resolve().parents[2]

# H, N1, N2, Dqk, Dv, l, d, l', K, w: small sizes (l = 32, d = 16, l' = 64: the paper's block geometry).
CFG_G2 = (64, 4, 2, 32, 32, 32, 16, 64, 4, 48)
CFG_G1 = (48, 2, 2, 32, 16, 32, 16, 64, 3, 40)
# Whole lengths and prompt lengths: shorter than l, prompts of 0 and of exactly one window, prompts whose decode
# crosses raw pages (P = 32 below), block starts (s % 64 < 15, where the operator's forced blocks differ) and
# completed windows ((S - 32) % 16 == 0).
WHOLE = [150, 90, 20, 70, 33]
PROMPT = [100, 32, 10, 0, 31]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny sizes: one thread is fastest and immune to spinning workers on a shared machine (torch's small fp32
    GEMMs took ~10 ms each with 2 threads on a loaded 2-core host)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _layer(cfg, dtype, seed=0):
    torch.manual_seed(seed)
    m = nsa_ops.NSAAttention(*cfg, dtype=dtype)
    with torch.no_grad():                        # non-uniform compression weights (the default is mean pooling)
        for p in (m.compress_weight_k, m.compress_weight_v):
            p.copy_(torch.randn(p.shape) * 0.2)
    return m


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of dtype's numbers at |x| (fp64 tensor; the smallest normal's spacing at 0)."""
    bits = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}[dtype]
    _, e = torch.frexp(x.double().abs().clamp_min(torch.finfo(dtype).tiny))
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), e - bits)


def _bound(m, aux, rows, ref_rows, dtype):
    """Per-element bound on |decode - training| for the output rows ``rows`` of the training forward.

    Both paths round each branch output o_c [N1·Dv] to the dtype and combine them in fp32 (§4 step 6); decode and
    training differ by rounding inside the branches (the decode compression rounds to nearest even where training
    rounds half away, compress.md §4 / decode.md §2; select_attention_infer rounds unnormalised probabilities,
    decode.md §6; summation orders; the projections' GEMM row count). Allowed: 4 ulps of the dtype at the largest
    branch magnitude of every element of o, carried through o_proj by |W|, plus 2 ulps of the output element and
    an fp32 term for the o_proj sum (N1·Dv products)."""
    W = m.o_proj.weight.detach().double().abs()                                  # [H, N1·Dv]
    mag = torch.stack([aux.o_cmp, aux.o_slc, aux.o_swa]).double().abs().amax(0)[rows]      # [n, N1, Dv]
    mag = mag.reshape(len(rows), -1)
    e_o = 4 * _ulp(mag, dtype)
    n = W.shape[1]
    return e_o @ W.T + 2 * _ulp(ref_rows, dtype) + n * 2.0 ** -24 * (mag @ W.T)


def _whole_and_prompts(cfg, dtype, whole, seed=1):
    """Random hidden states of the whole sequences, each followed by l + d extra tokens in the training batch:
    a training row s is then never among the last tokens of its sequence, whose current block the training
    selection cannot force (nsa_layer.md §5), while a decoder cannot know where a sequence ends (see the spec)."""
    H, l, d = cfg[0], cfg[5], cfg[6]
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, H, generator=g).to(dtype) for n in whole]
    extra = l + d
    cu = [0]
    for n in whole:
        cu.append(cu[-1] + n + extra)
    x_train = torch.cat([torch.cat([x, torch.randn(extra, H, generator=g).to(dtype)]) for x in xs])
    return xs, x_train, cu


def _check_rows(m, dtype, out, ref, aux, train_rows, where):
    rows = torch.tensor(train_rows)
    r = ref[rows].double()
    bound = _bound(m, aux, rows, r, dtype)
    err = (out.double() - r).abs()
    worst = (err / bound).max().item()
    assert (err <= bound).all(), f"{where}: decode differs from the training forward beyond the bound " \
                                 f"(worst ratio {worst:.2f}, max |diff| {err.max().item():.3g})"
    return err.max().item()


def _decode_all(m, cache, xs, prompt, whole, step_tokens):
    """Decode steps after prefill: at each step sequence b adds min(step_tokens(step, b), remaining) tokens.
    Returns {(b, position): output row}."""
    B = len(xs)
    pos = list(prompt)
    outs = {}
    step = 0
    while any(p < n for p, n in zip(pos, whole)):
        ql = [min(step_tokens(step, b), whole[b] - pos[b]) for b in range(B)]
        x = torch.cat([xs[b][pos[b]:pos[b] + ql[b]] for b in range(B)])
        o = m.decode_step(x, cache, query_lens=ql)
        r = 0
        for b in range(B):
            for i in range(ql[b]):
                outs[(b, pos[b] + i)] = o[r]
                r += 1
            pos[b] += ql[b]
        assert cache.seq_lens == pos
        step += 1
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cfg", [CFG_G2, CFG_G1], ids=["G2", "G1"])
def test_prefill_then_decode_matches_training_forward(cfg, dtype):
    m = _layer(cfg, dtype)
    xs, x_train, cu_train = _whole_and_prompts(cfg, dtype, WHOLE)
    with torch.no_grad():
        ref, aux = m(x_train, cu_train, return_aux=True)
        cache = m.new_cache(len(WHOLE), page_size=32, compressed_page_size=4)
        cu_p = [0]
        for n in PROMPT:
            cu_p.append(cu_p[-1] + n)
        x_p = torch.cat([x[:n] for x, n in zip(xs, PROMPT)])
        out_p = m.prefill(x_p, cu_p, cache)
        assert torch.equal(out_p, m(x_p, cu_p))                       # prefill is the training forward, bitwise
        assert cache.seq_lens == PROMPT
        outs = _decode_all(m, cache, xs, PROMPT, WHOLE, lambda step, b: 1)
    keys = sorted(outs)
    got = torch.stack([outs[k] for k in keys])
    worst = _check_rows(m, dtype, got, ref, aux, [cu_train[b] + s for b, s in keys], "token-by-token decode")
    assert worst < (1e-5 if dtype == torch.float32 else 2e-2)          # measured: 4.2e-7; bf16 3.9e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_multi_token_steps_match_training_forward(dtype):
    """Steps of 1 to 5 new tokens per sequence (0 for some sequences at some steps), windows completing inside a
    step: every row equals the training forward's within the bound."""
    cfg = CFG_G2
    m = _layer(cfg, dtype, seed=3)
    xs, x_train, cu_train = _whole_and_prompts(cfg, dtype, WHOLE, seed=4)
    with torch.no_grad():
        ref, aux = m(x_train, cu_train, return_aux=True)
        cache = m.new_cache(len(WHOLE), page_size=16)
        cu_p = [0]
        for n in PROMPT:
            cu_p.append(cu_p[-1] + n)
        m.prefill(torch.cat([x[:n] for x, n in zip(xs, PROMPT)]), cu_p, cache)
        outs = _decode_all(m, cache, xs, PROMPT, WHOLE, lambda step, b: (step + 2 * b) % 6)
    keys = sorted(outs)
    _check_rows(m, dtype, torch.stack([outs[k] for k in keys]), ref, aux, [cu_train[b] + s for b, s in keys],
                "multi-token decode")


def test_operator_selection_differs_only_at_block_starts():
    """selection="operator" keeps the blocks npu_nsa_compress_attention_infer forces (0, Sel'-2, Sel'-1): its rows
    equal the training ones within the bound except at positions s % l' < d - 1 (here 0..14), where the current
    block is not forced (decode.md §3 step 7 against nsa_layer.md §5); there some rows differ clearly."""
    cfg, dtype = CFG_G2, torch.float32
    lp, d = cfg[7], cfg[6]
    m = _layer(cfg, dtype, seed=5)
    whole, prompt = [200, 140], [60, 64]
    xs, x_train, cu_train = _whole_and_prompts(cfg, dtype, whole, seed=6)
    with torch.no_grad():
        ref, aux = m(x_train, cu_train, return_aux=True)
        cache = m.new_cache(2)
        m.prefill(torch.cat([x[:n] for x, n in zip(xs, prompt)]), [0, prompt[0], prompt[0] + prompt[1]], cache)
        outs = {}
        for s in range(max(whole)):
            ql = [1 if prompt[b] <= s < whole[b] else 0 for b in range(2)]
            if not any(ql):
                continue
            o = m.decode_step(torch.cat([xs[b][s:s + 1] for b in range(2) if ql[b]]), cache, query_lens=ql,
                              selection="operator")
            for r, b in enumerate(b for b in range(2) if ql[b]):
                outs[(b, s)] = o[r]
    same = [k for k in sorted(outs) if k[1] % lp >= d - 1]
    moved = [k for k in sorted(outs) if k[1] % lp < d - 1]
    _check_rows(m, dtype, torch.stack([outs[k] for k in same]), ref, aux, [cu_train[b] + s for b, s in same],
                "operator selection away from block starts")
    diff = torch.stack([(outs[k] - ref[cu_train[k[0]] + k[1]]).abs().max() for k in moved])
    assert (diff > 1e-3).sum() >= len(moved) // 2


def test_cache_pages_grow_and_reset():
    """One page per sequence at first (page_size 16): the pools double as sequences grow; block tables list each
    sequence's pages; results equal (bitwise) those of a cache sized up front; reset() returns every page."""
    cfg, dtype = CFG_G2, torch.float32
    m = _layer(cfg, dtype, seed=7)
    whole, prompt = [90, 50, 3], [40, 0, 1]
    xs, _, _ = _whole_and_prompts(cfg, dtype, whole, seed=8)
    cu_p = [0, 40, 40, 41]
    x_p = torch.cat([x[:n] for x, n in zip(xs, prompt)])
    with torch.no_grad():
        small = m.new_cache(3, page_size=16, compressed_page_size=2)
        big = m.new_cache(3, page_size=16, compressed_page_size=2, max_len=128)
        pages0 = small.num_pages
        assert pages0 == 3 and big.num_pages == 24
        for c in (small, big):
            m.prefill(x_p, cu_p, c)
        a = _decode_all(m, small, xs, prompt, whole, lambda step, b: 1 + step % 3)
        b_ = _decode_all(m, big, xs, prompt, whole, lambda step, b: 1 + step % 3)
    assert all(torch.equal(a[k], b_[k]) for k in a)
    assert small.seq_lens == whole and small.num_pages > pages0
    for b, n in enumerate(whole):
        assert len(small.page_ids(b)) == -(-n // 16)
        assert len(small.compressed_page_ids(b)) >= -(-small.num_compressed(b) // 2)
    all_pages = sum((small.page_ids(b) for b in range(3)), [])
    assert len(set(all_pages)) == len(all_pages)                         # no page shared by two sequences
    table = small.block_table([0, 1, 2])
    assert table.dtype == torch.int32 and table[1, :4].tolist() == small.page_ids(1) and table[2, 1].item() == -1
    used = small.num_pages - small.num_free_pages
    assert used == len(all_pages)
    small.reset()
    assert small.seq_lens == [0, 0, 0] and small.num_free_pages == small.num_pages and not small.prefilled
    with torch.no_grad():                                                # reused after reset: same results
        m.prefill(x_p, cu_p, small)
        again = _decode_all(m, small, xs, prompt, whole, lambda step, b: 1 + step % 3)
    assert all(torch.equal(a[k], again[k]) for k in a)


def test_errors_are_clear():
    cfg = CFG_G2
    m = _layer(cfg, torch.float32)
    H = cfg[0]
    cache = m.new_cache(2)
    x1 = torch.randn(2, H)
    with pytest.raises(RuntimeError, match=r"decode_step before prefill"):
        m.decode_step(x1, cache)
    with pytest.raises(ValueError, match=r"cu_seqlens describes 3 sequences but the cache holds batch_size = 2"):
        m.prefill(torch.randn(6, H), [0, 2, 4, 6], cache)
    m.prefill(torch.randn(5, H), [0, 3, 5], cache)
    with pytest.raises(RuntimeError, match=r"prefill needs an empty cache"):
        m.prefill(torch.randn(5, H), [0, 3, 5], cache)
    with pytest.raises(ValueError, match=r"hidden_states has 3 rows but the new tokens per sequence"):
        m.decode_step(torch.randn(3, H), cache)
    with pytest.raises(ValueError, match=r"query_lens must have batch_size = 2 entries"):
        m.decode_step(x1, cache, query_lens=[1, 0, 1])
    with pytest.raises(ValueError, match=r"query_lens must be >= 0"):
        m.decode_step(x1, cache, query_lens=[3, -1])
    with pytest.raises(ValueError, match=r"selection must be 'training' or 'operator'"):
        m.decode_step(x1, cache, selection="npu")
    with pytest.raises(ValueError, match=r"hidden_states must be \[T, hidden_size = 64\]"):
        m.decode_step(torch.randn(2, H + 1), cache)
    with pytest.raises(ValueError, match=r"hidden_states must have the parameters' dtype"):
        m.decode_step(x1.double(), cache)
    with pytest.raises(TypeError, match=r"cache must be an NSACache"):
        m.decode_step(x1, cache=None)
    other = nsa_ops.NSAAttention(*CFG_G1)
    with pytest.raises(ValueError, match=r"cache was not made for this layer"):
        other.decode_step(torch.randn(2, CFG_G1[0]), cache)
    with pytest.raises(ValueError, match=r"dtype must be the parameters' dtype"):
        m.new_cache(2, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"page_size must be an int >= 1"):
        m.new_cache(2, page_size=0)
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1"):
        m.new_cache(0)
    assert cache.seq_lens == [3, 2]                                       # failed calls changed nothing
    out = m.decode_step(x1, cache)                                        # and the cache still works
    assert out.shape == (2, H) and cache.seq_lens == [4, 3]
    assert m.decode_step(torch.randn(0, H), cache, query_lens=0).shape == (0, H)


def test_decode_needs_no_grad_and_returns_no_graph():
    """Parameters require grad (a trained module): decode_step still runs (inside no_grad) and returns a tensor
    without history; prefill keeps the forward's graph when grad mode is on."""
    m = _layer(CFG_G2, torch.float32)
    cache = m.new_cache(1)
    x = torch.randn(40, CFG_G2[0])
    out = m.prefill(x, [0, 40], cache)
    assert out.requires_grad
    o = m.decode_step(torch.randn(1, CFG_G2[0]), cache)
    assert not o.requires_grad


def test_generate_example_smoke(capsys):
    """examples/generate.py --smoke (run in this process): trains a few steps of the tiny model, generates with
    the decode path, checks the decoded logits against the full forward, prints tokens/s."""
    spec = importlib.util.spec_from_file_location("generate_example", REPO / "examples" / "generate.py")
    example = importlib.util.module_from_spec(spec)
    sys.modules["generate_example"] = example
    spec.loader.exec_module(example)
    assert example.main(["--smoke"]) == 0
    text = capsys.readouterr().out
    assert "tokens/s" in text and "max |decode - forward| logits" in text


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_fills_raw_and_compressed_pages(dtype):
    """After prefill, raw position p of sequence b holds k_proj / v_proj of its token (bitwise) at
    page_ids(b)[p // P], row p % P, and compressed slot c holds nsa_ops.compress's row c (bitwise, training
    rounding) at the slot of decode.md §1, across page boundaries (P = 16, Pc = 3)."""
    cfg = CFG_G2
    H, N2, Dqk, Dv, l, d = cfg[0], cfg[2], cfg[3], cfg[4], cfg[5], cfg[6]
    m = _layer(cfg, dtype, seed=9)
    lens = [70, 0, 31, 32, 100]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    x = torch.randn(cu[-1], H).to(dtype)
    cache = m.new_cache(len(lens), page_size=16, compressed_page_size=3)
    with torch.no_grad():
        m.prefill(x, cu, cache)
        k = m.k_proj(x).view(-1, N2, Dqk)
        v = m.v_proj(x).view(-1, N2, Dv)
        kc, cu_c = nsa_ops.compress(k, m.compress_weight_k, cu_seqlens=cu, compress_block_size=l, compress_stride=d)
        vc, _ = nsa_ops.compress(v, m.compress_weight_v, cu_seqlens=cu, compress_block_size=l, compress_stride=d)
    assert cache.seq_lens == lens and cache.prefilled
    for b, n in enumerate(lens):
        pages = cache.page_ids(b)
        assert len(pages) == -(-n // 16)
        for p in range(n):
            assert torch.equal(cache.key_pages[pages[p // 16], p % 16], k[cu[b] + p])
            assert torch.equal(cache.value_pages[pages[p // 16], p % 16], v[cu[b] + p])
        C = cache.num_compressed(b)
        assert C == int(cu_c[b + 1] - cu_c[b]) == ((n - l) // d + 1 if n >= l else 0)
        for c in range(C):
            page, row = cache.compressed_page_ids(b)[c // 3], c % 3
            assert cache.compressed_slot(b, c) == page * 3 + row
            assert torch.equal(cache.compressed_key_pages[page, row].view(N2, Dqk), kc[cu_c[b] + c])
            assert torch.equal(cache.compressed_value_pages[page, row].view(N2, Dv), vc[cu_c[b] + c])
