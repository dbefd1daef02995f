"""Concurrency and determinism through Python (each output element has exactly one writer: results are
identical whatever the thread count).

* Calls from several Python threads at once (ThreadPoolExecutor; the operator runs with the GIL
  released) give bitwise the same outputs, and the same gradients, as the same calls made one by one;
  the inputs are shared between the threads (read-only).
* Repeats, and torch.set_num_threads(1 / 2 / 3 / 7) (the binding passes torch's intra-op thread count to
  the CPU backend), give bitwise equal outputs and gradients.
* A sequence alone equals the same sequence inside a batch, bitwise: attention_out and topk_indices rows,
  and the statistics' per-batch memory block (docs/spec/compress_attention.md §4: batch b owns floats [8 N1 q_b, 8 N1 q_{b+1})).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import nsa_ops


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous().view(-1)
    return t.view(torch.uint8) if t.dtype.is_floating_point else t


def _same(a, b) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and x.dtype == y.dtype and torch.equal(_bits(x), _bits(y))
                                    for x, y in zip(a, b))


def _case(kind: str) -> dict:
    """Three shapes: bf16 varlen (an empty batch, random masks with fully masked rows, forced blocks, G = 4);
    fp16 causal (docs/spec/compress_attention.md §9 masks, G = 1, several query tiles); fp32 strided inputs (G = 3, band mask)."""
    g = torch.Generator().manual_seed({"bf16": 1, "fp16": 2, "fp32": 3}[kind])
    if kind == "bf16":
        sq, c, n1, n2, d, d2, blk, k = [37, 0, 50, 13], [40, 9, 61, 17], 8, 2, 40, 24, (32, 16, 64), 2
        dt = torch.bfloat16
    elif kind == "fp16":
        sq, c, n1, n2, d, d2, blk, k = [90, 41], [70, 33], 2, 2, 32, 32, (32, 16, 64), 4
        dt = torch.float16
    else:
        sq, c, n1, n2, d, d2, blk, k = [25, 64], [12, 50], 3, 1, 20, 12, (64, 32, 128), 1
        dt = torch.float32
    l, stride, lp = blk
    M = lp // stride
    T, T2 = sum(sq), sum(c) + 2
    q = torch.randn(T, n1, d, generator=g).to(dt)
    key = torch.randn(T2, n2, d, generator=g).to(dt)
    value = torch.randn(T2, n2, d2, generator=g).to(dt)
    max_sq, max_c = max(sq), max(c)
    max_sel = -(-max_c // M)
    if kind == "bf16":
        am = torch.rand(max_sq, max_c, generator=g) < 0.3
        am[torch.rand(max_sq, generator=g) < 0.15] = True
        tm = torch.rand(max_sq, max_sel, generator=g) < 0.1
    elif kind == "fp16":
        am = nsa_ops.make_atten_mask(max_sq, max_c, l, stride)
        tm = nsa_ops.make_topk_mask(max_sq, max_sel, lp)
    else:
        s = torch.arange(max_sq).unsqueeze(1)
        cc = torch.arange(max_c).unsqueeze(0)
        end = s * max_c // max_sq + 1
        am = ~((cc <= end) & (cc > end - 7))
        tm = None
        q = q.transpose(0, 1).contiguous().transpose(0, 1)                  # non-contiguous layouts
        key = torch.randn(T2, n2, 2 * d, generator=g).to(dt)[:, :, ::2]
        value = torch.randn(n2, T2, d2, generator=g).to(dt).transpose(0, 1)
    cq = [sum(sq[:i + 1]) for i in range(len(sq))]
    cc_ = [sum(c[:i + 1]) for i in range(len(c))]
    return dict(query=q, key=key, value=value, scale_value=1.0 / d ** 0.5, head_num=n1, compress_block_size=l,
                compress_stride=stride, select_block_size=lp, select_block_count=k, topk_mask=tm, atten_mask=am,
                actual_seq_qlen=cq, actual_cmp_seq_kvlen=cc_, actual_sel_seq_kvlen=None)


KINDS = ["bf16", "fp16", "fp32"]


@pytest.fixture(scope="module")
def cases():
    return {k: _case(k) for k in KINDS}


def _forward(a: dict, via: str):
    if via == "drop_in":
        return tuple(nsa_ops.npu_nsa_compress_attention(**a))
    if via == "tensor_lengths":
        b = dict(a)
        b["actual_seq_qlen"] = torch.tensor(a["actual_seq_qlen"])
        b["actual_cmp_seq_kvlen"] = torch.tensor(a["actual_cmp_seq_kvlen"])
        return tuple(nsa_ops.npu_nsa_compress_attention(**b))
    if via == "op":
        return tuple(torch.ops.nsa.compress_attention(
            a["query"], a["key"], a["value"], a["scale_value"], a["head_num"], a["compress_block_size"],
            a["compress_stride"], a["select_block_size"], a["select_block_count"], a["topk_mask"], a["atten_mask"],
            a["actual_seq_qlen"], a["actual_cmp_seq_kvlen"], None))
    if via == "keyword":
        out = nsa_ops.compress_attention(
            a["query"], a["key"], a["value"], cu_seqlens_q=[0] + a["actual_seq_qlen"],
            cu_seqlens_cmp=[0] + a["actual_cmp_seq_kvlen"], compress_block_size=a["compress_block_size"],
            compress_stride=a["compress_stride"], select_block_size=a["select_block_size"],
            select_block_count=a["select_block_count"], scale=a["scale_value"], atten_mask=a["atten_mask"],
            topk_mask=a["topk_mask"])
        return tuple(out)
    raise ValueError(via)


def _grads(a: dict):
    """Forward + backward of a fixed weighted sum of attention_out: (outputs..., dq, dk, dv)."""
    q, k, v = (a[n].detach().clone().requires_grad_(True) for n in ("query", "key", "value"))
    b = dict(a, query=q, key=k, value=v)
    out = nsa_ops.npu_nsa_compress_attention(**b)
    w = torch.linspace(-1.0, 1.0, out[0].numel(), dtype=torch.float32).view(out[0].shape)
    (out[0].float() * w).sum().backward()
    return tuple(t.detach() for t in out) + (q.grad, k.grad, v.grad)


VIAS = ["drop_in", "tensor_lengths", "op", "keyword"]


def test_concurrent_calls_equal_serial_calls(cases):
    serial = {(k, via): _forward(cases[k], via) for k in KINDS for via in VIAS}
    for (k, via), out in serial.items():  # every entry point agrees with the drop-in
        assert _same(out, serial[(k, "drop_in")]), (k, via)
    jobs = [(k, via) for _ in range(4) for k in KINDS for via in VIAS]
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda j: (j, _forward(cases[j[0]], j[1])), jobs))
    bad = [j for j, out in results if not _same(out, serial[j])]
    assert not bad, f"concurrent results differ from serial ones for {bad}"


def test_concurrent_reference_and_cpu_calls_do_not_interfere(cases):
    a = cases["bf16"]

    def ref():
        return tuple(torch.ops.nsa.compress_attention_reference(
            a["query"], a["key"], a["value"], a["scale_value"], a["head_num"], a["compress_block_size"],
            a["compress_stride"], a["select_block_size"], a["select_block_count"], a["topk_mask"], a["atten_mask"],
            a["actual_seq_qlen"], a["actual_cmp_seq_kvlen"], None))

    want_ref, want_cpu = ref(), _forward(a, "drop_in")
    with ThreadPoolExecutor(max_workers=4) as pool:
        futs = [pool.submit(ref if i % 2 else (lambda: _forward(a, "drop_in"))) for i in range(8)]
        outs = [f.result() for f in futs]
    for i, out in enumerate(outs):
        assert _same(out, want_ref if i % 2 else want_cpu), i


def test_concurrent_backward_equals_serial(cases):
    serial = {k: _grads(cases[k]) for k in KINDS}
    jobs = [k for _ in range(3) for k in KINDS]
    with ThreadPoolExecutor(max_workers=5) as pool:
        results = list(pool.map(lambda k: (k, _grads(cases[k])), jobs))
    bad = [k for k, g in results if not _same(g, serial[k])]
    assert not bad, f"concurrent gradients differ from serial ones for {bad}"


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("kind", KINDS)
def test_repeats_and_thread_counts_are_bitwise_equal(cases, kind, restore_threads):
    a = cases[kind]
    torch.set_num_threads(1)
    base = _grads(a)
    for n in (1, 2, 3, 7, 2, 1):
        torch.set_num_threads(n)
        assert _same(_grads(a), base), f"num_threads={n}"
        assert _same(_forward(a, "drop_in"), base[:4]), f"num_threads={n} (forward only)"


def _extract(a: dict, b: int) -> dict:
    """Batch b of a as a call of its own (masks: the top-left [Sq_b, C_b] / [Sq_b, Sel_b] blocks)."""
    q0 = ([0] + a["actual_seq_qlen"])[b]
    q1 = a["actual_seq_qlen"][b]
    c0 = ([0] + a["actual_cmp_seq_kvlen"])[b]
    c1 = a["actual_cmp_seq_kvlen"][b]
    sq, c = q1 - q0, c1 - c0
    M = a["select_block_size"] // a["compress_stride"]
    sel = -(-c // M)
    one = dict(a)
    one.update(query=a["query"][q0:q1], key=a["key"][c0:c1], value=a["value"][c0:c1], actual_seq_qlen=[sq],
               actual_cmp_seq_kvlen=[c], actual_sel_seq_kvlen=None)
    if a["atten_mask"] is not None:
        one["atten_mask"] = a["atten_mask"][:sq, :c]
    if a["topk_mask"] is not None:
        one["topk_mask"] = a["topk_mask"][:sq, :sel]
    return one


@pytest.mark.parametrize("kind", KINDS)
def test_sequence_alone_equals_sequence_in_batch(cases, kind):
    a = cases[kind]
    full = _forward(a, "drop_in")
    n1 = a["head_num"]
    checked = 0
    for b in range(len(a["actual_seq_qlen"])):
        q0 = ([0] + a["actual_seq_qlen"])[b]
        q1 = a["actual_seq_qlen"][b]
        if q1 == q0:
            continue
        one = _extract(a, b)
        if one["select_block_count"] > -(-one["actual_cmp_seq_kvlen"][0] // (a["select_block_size"] //
                                                                            a["compress_stride"])):
            continue
        out = _forward(one, "drop_in")
        assert torch.equal(_bits(out[0]), _bits(full[0][q0:q1])), (kind, b, "attention_out")
        assert torch.equal(out[1], full[1][q0:q1]), (kind, b, "topk_indices")
        for i, name in ((2, "softmax_max"), (3, "softmax_sum")):
            block = full[i].reshape(-1)[8 * n1 * q0:8 * n1 * q1]
            assert torch.equal(_bits(out[i].reshape(-1)), _bits(block)), (kind, b, name)
        checked += 1
    assert checked >= 2
