"""The operator's contract with PyTorch: the drop-in's signature equals torch_npu's, the schema, the Meta
kernel (shapes/dtypes without data), torch.library.opcheck, library loading."""

import inspect
import os
import subprocess
import sys

import pytest
import torch

import nsa_ops
from cases import MATRIX, make_args

# torch_npu.npu_nsa_compress_attention's prototype (as torch_npu documents it; docs/spec/compress_attention.md §1).
NPU_PARAMS = [
    ("query", inspect.Parameter.empty), ("key", inspect.Parameter.empty), ("value", inspect.Parameter.empty),
    ("scale_value", inspect.Parameter.empty), ("head_num", inspect.Parameter.empty),
    ("compress_block_size", inspect.Parameter.empty), ("compress_stride", inspect.Parameter.empty),
    ("select_block_size", inspect.Parameter.empty), ("select_block_count", inspect.Parameter.empty),
    ("topk_mask", None), ("atten_mask", None), ("actual_seq_qlen", None), ("actual_cmp_seq_kvlen", None),
    ("actual_sel_seq_kvlen", None),
]


def test_drop_in_signature_equals_torch_npu():
    sig = inspect.signature(nsa_ops.npu_nsa_compress_attention)
    got = [(p.name, p.default) for p in sig.parameters.values()]
    assert got == NPU_PARAMS
    assert all(p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD for p in sig.parameters.values())


@pytest.mark.parametrize("name", ["compress_attention", "compress_attention_reference"])
def test_schema_matches_torch_npu(name):
    schema = getattr(torch.ops.nsa, name).default._schema
    args = [(a.name, a.default_value if a.has_default_value() else inspect.Parameter.empty) for a in schema.arguments]
    assert args == NPU_PARAMS
    assert [r.name for r in schema.returns] == ["attention_out", "topk_indices", "softmax_max", "softmax_sum"]


def test_positional_call_in_torch_npu_order():
    a = make_args(MATRIX[2])
    pos = [a[k] for k, _ in NPU_PARAMS]
    for x, y in zip(nsa_ops.npu_nsa_compress_attention(*pos), torch.ops.nsa.compress_attention(**a)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_meta_kernel_shapes_and_dtypes(dtype):
    q = torch.empty(300, 8, 40, dtype=dtype, device="meta")
    k = torch.empty(50, 2, 40, dtype=dtype, device="meta")
    v = torch.empty(50, 2, 24, dtype=dtype, device="meta")
    am = torch.empty(100, 30, dtype=torch.bool, device="meta")
    out, topk, smax, ssum = nsa_ops.npu_nsa_compress_attention(
        q, k, v, 0.1, 8, 32, 16, 64, 5, None, am, [200, 300], [20, 50], [5, 13])
    assert (out.shape, out.dtype, out.device.type) == ((300, 8, 24), dtype, "meta")
    assert (topk.shape, topk.dtype) == ((300, 2, 5), torch.int32)
    assert (smax.shape, smax.dtype) == ((300, 8, 8), torch.float32)
    assert (ssum.shape, ssum.dtype) == ((300, 8, 8), torch.float32)


@pytest.mark.parametrize("changes,pattern", [
    (dict(q=(300, 8)), r"query must be a 3-D"),
    (dict(k_dtype=torch.float16), r"key must have the dtype of query"),
    (dict(head_num=4), r"head_num must equal"),
    (dict(k=(50, 3, 40), v=(50, 3, 24)), r"multiple of the number of key/value heads"),
    (dict(K=0), r"select_block_count must be in"),
    (dict(mask_dtype=torch.float32), r"atten_mask must be a bool"),
])
def test_meta_kernel_checks(changes, pattern):
    c = dict(q=(300, 8, 40), k=(50, 2, 40), v=(50, 2, 24), k_dtype=torch.bfloat16, head_num=8, K=5,
             mask_dtype=torch.bool)
    c.update(changes)
    meta = dict(dtype=torch.bfloat16, device="meta")
    q, k = torch.empty(c["q"], **meta), torch.empty(c["k"], dtype=c["k_dtype"], device="meta")
    v = torch.empty(c["v"], **meta)
    am = torch.empty(100, 30, dtype=c["mask_dtype"], device="meta")
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.nsa.compress_attention(q, k, v, 0.1, c["head_num"], 32, 16, 64, c["K"], None, am, [300], [50])


def test_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode
    a = make_args(MATRIX[2])
    with FakeTensorMode() as mode:
        fa = {k: (mode.from_tensor(v) if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
        out = torch.ops.nsa.compress_attention(**fa)
    real = torch.ops.nsa.compress_attention(**a)
    for f, r in zip(out, real):
        assert f.shape == r.shape and f.dtype == r.dtype


@pytest.mark.parametrize("case", [MATRIX[2], MATRIX[21]], ids=lambda c: c.name)
def test_opcheck(case):
    a = make_args(case)
    names = [k for k, _ in NPU_PARAMS]
    # test_schema, test_autograd_registration, test_faketensor, test_aot_dispatch_dynamic (no input requires grad:
    # the backward op comes separately).
    torch.library.opcheck(torch.ops.nsa.compress_attention.default, tuple(a[k] for k in names))


def test_library_is_loaded_from_the_search_path():
    path = nsa_ops.library_path()
    assert path and os.path.isfile(path)
    assert path in nsa_ops._lib.candidate_paths()
    assert hasattr(torch.ops.nsa, "compress_attention")


def test_missing_library_is_a_clear_import_error(tmp_path):
    env = dict(os.environ, NSA_OPS_LIB=str(tmp_path / "nope.so"))
    code = "import nsa_ops"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=120)
    assert r.returncode != 0 and "NSA_OPS_LIB" in r.stderr, r.stderr[-2000:]


def test_torch_compile_fullgraph():
    """The drop-in traces into one graph (the Meta kernel supplies the shapes) and gives the eager results."""
    a = make_args(MATRIX[2])
    f = torch.compile(nsa_ops.npu_nsa_compress_attention, backend="aot_eager", fullgraph=True)
    for x, y in zip(f(**a), nsa_ops.npu_nsa_compress_attention(**a)):
        assert torch.equal(x, y)
