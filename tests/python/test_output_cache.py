"""The cache of large CPU outputs (torch_binding/output_cache.h, nsa_ops.cpu_output_cache_info): a freed output's
block is reused by the next output of its size and rewritten in full, small outputs bypass it, the limit
(NSA_CPU_OUTPUT_CACHE_MB, read once per process: those cases run in subprocesses) bounds what it keeps, and
empty_cpu_output_cache returns it. The counters are per process, so the checks here use differences."""

import os
import subprocess
import sys
import threading

import pytest
import torch

import nsa_ops

MIB = 1 << 20


def _inputs(T=8192, N=2, D=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, N, D, generator=g).bfloat16()  # input_grad: T * N * D * 2 bytes = 4 MiB at the defaults
    w = (torch.randn(32, N, generator=g) / 32).bfloat16()
    out = nsa_ops.npu_nsa_compress(x, w, 32, 16, actual_seq_len=[T])
    grad = torch.randn(out.shape, generator=g).bfloat16()
    return grad, x, w, T


def _grad(grad, x, w, T):
    return nsa_ops.npu_nsa_compress_grad(grad, x, w, 32, 16, actual_seq_len=[T])


def test_freed_output_block_is_reused_and_rewritten_in_full():
    args = _inputs()
    want = [t.clone() for t in _grad(*args)]
    first, _ = _grad(*args)
    ptr = first.data_ptr()
    assert ptr % (2 * MIB) == 0  # a block of whole 2 MiB pages
    first.fill_(float("nan"))  # what the next call finds in the reused block
    del first
    before = nsa_ops.cpu_output_cache_info()
    assert before.cached_bytes >= 4 * MIB
    second, wgrad = _grad(*args)
    after = nsa_ops.cpu_output_cache_info()
    assert second.data_ptr() == ptr
    assert after.hits == before.hits + 1 and after.misses == before.misses
    assert torch.equal(second, want[0]) and torch.equal(wgrad, want[1])
    # the tensor is an ordinary resizable CPU tensor
    second.resize_(2, *second.shape)
    second.fill_(1.0)
    assert second.sum().item() == second.numel()


def test_small_outputs_bypass_the_cache():
    args = _inputs(T=1000)  # input_grad of 0.5 MiB
    before = nsa_ops.cpu_output_cache_info()
    for _ in range(3):
        _grad(*args)
    after = nsa_ops.cpu_output_cache_info()
    assert (after.hits, after.misses) == (before.hits, before.misses)


def test_empty_cache_returns_the_free_blocks():
    args = _inputs()
    ig, _ = _grad(*args)
    del ig
    assert nsa_ops.cpu_output_cache_info().cached_blocks >= 1
    nsa_ops.empty_cpu_output_cache()
    info = nsa_ops.cpu_output_cache_info()
    assert info.cached_bytes == 0 and info.cached_blocks == 0


def test_threads_allocating_and_freeing_at_once():
    args = _inputs()
    want = _grad(*args)[0].clone()
    errors = []

    def run():
        try:
            for _ in range(8):
                ig, _ = _grad(*args)
                if not torch.equal(ig, want):
                    errors.append("result differs")
                del ig
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def _in_subprocess(limit: str, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, NSA_CPU_OUTPUT_CACHE_MB=limit)
    if nsa_ops.library_path():
        env["NSA_OPS_LIB"] = nsa_ops.library_path()
    prelude = ("import torch, nsa_ops\n"
               "def grad(T=8192):\n"
               "    x = torch.randn(T, 2, 128).bfloat16(); w = (torch.randn(32, 2) / 32).bfloat16()\n"
               "    g = torch.randn(nsa_ops.npu_nsa_compress(x, w, 32, 16, actual_seq_len=[T]).shape).bfloat16()\n"
               "    return nsa_ops.npu_nsa_compress_grad(g, x, w, 32, 16, actual_seq_len=[T])[0]\n")
    return subprocess.run([sys.executable, "-c", prelude + code], env=env, capture_output=True, text=True,
                          timeout=300)


def test_limit_zero_disables_the_cache():
    p = _in_subprocess("0", "for _ in range(3): grad()\ni = nsa_ops.cpu_output_cache_info()\n"
                            "assert i.limit_bytes == 0 and i.hits == 0 and i.misses == 0 and i.cached_bytes == 0, i\n")
    assert p.returncode == 0, p.stderr[-2000:]


def test_limit_bounds_the_free_blocks():
    # three 4 MiB outputs alive at once, then freed: an 8 MiB limit keeps two of them, and the oldest freed goes
    p = _in_subprocess("8", "a, b, c = grad(), grad(), grad()\npa, pb, pc = a.data_ptr(), b.data_ptr(), c.data_ptr()\n"
                            "del a, b, c\ni = nsa_ops.cpu_output_cache_info()\n"
                            "assert i.limit_bytes == 8 << 20 and i.cached_bytes == 8 << 20 and i.cached_blocks == 2, i\n"
                            "assert i.live_blocks == 0 and i.misses == 3, i\n"
                            "d = grad()\nassert d.data_ptr() == pc, 'the most recently freed block first'\n"
                            "big = grad(T=20000)\ndel big\n"
                            "i = nsa_ops.cpu_output_cache_info()\nassert i.cached_bytes <= 8 << 20, i\n")
    assert p.returncode == 0, p.stderr[-2000:]


@pytest.mark.parametrize("value", ["abc", "-1", "12x"])
def test_bad_limit_is_an_error_naming_the_variable(value):
    p = _in_subprocess(value, "try:\n    grad()\nexcept RuntimeError as e:\n    print('ERR', e)\n")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "ERR" in p.stdout and "NSA_CPU_OUTPUT_CACHE_MB" in p.stdout and value in p.stdout, p.stdout[-2000:]
