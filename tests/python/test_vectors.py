"""The shared reference vectors (<repo>/../shared/vectors, see its README): every case through the CPU op and
the C++ reference op. Agreement as the README states it: topk_indices identical, softmax statistics within
rtol 1e-5, attention_out within a rounding step of the dtype. The cases also go through this suite's own
fp64 model (two independent oracles)."""

import json

import numpy as np
import pytest
import torch

import nsa_ops  # noqa: F401  (loads torch.ops.nsa)
import spec_model
from conftest import vectors_dir

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BACKENDS = {"cpu": lambda: torch.ops.nsa.compress_attention, "reference": lambda: torch.ops.nsa.compress_attention_reference}


def _case_names():
    path = vectors_dir() / "cases.json"
    if not path.is_file():
        return ["<missing shared vectors>"]
    return [c["name"] for c in json.loads(path.read_text())]


def load_case(root, name):
    cases = {c["name"]: c for c in json.loads((root / "cases.json").read_text())}
    case = cases[name]
    dt = DTYPES[case["dtype"]]
    z = np.load(root / f"{name}.npz")
    t = {k: torch.from_numpy(z[k]) for k in z.files}
    args = dict(
        query=t["query"].to(dt), key=t["key"].to(dt), value=t["value"].to(dt),
        scale_value=case["scale_value"], head_num=case["head_num"],
        compress_block_size=case["compress_block_size"], compress_stride=case["compress_stride"],
        select_block_size=case["select_block_size"], select_block_count=case["select_block_count"],
        topk_mask=t.get("topk_mask"), atten_mask=t.get("atten_mask"),
        actual_seq_qlen=t["actual_seq_qlen"].tolist(), actual_cmp_seq_kvlen=t["actual_cmp_seq_kvlen"].tolist(),
        actual_sel_seq_kvlen=t["actual_sel_seq_kvlen"].tolist())
    # The archive holds exactly representable values: the conversion must not round.
    for k in ("query", "key", "value"):
        assert torch.equal(args[k].float(), t[k]), f"{name}: {k} is not exactly representable in {dt}"
    expected = {k: t[k] for k in ("attention_out", "topk_indices", "softmax_max", "softmax_sum")}
    return args, expected


def test_vectors_present(shared_vectors):
    names = _case_names()
    assert len(names) >= 5, names
    for n in names:
        assert (shared_vectors / f"{n}.npz").is_file(), f"missing {n}.npz in {shared_vectors}"


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("name", _case_names())
def test_shared_vector(shared_vectors, name, backend):
    args, exp = load_case(shared_vectors, name)
    out, topk, smax, ssum = BACKENDS[backend]()(**args)
    dt = args["query"].dtype
    assert out.dtype == dt and out.shape == exp["attention_out"].shape
    assert torch.equal(topk, exp["topk_indices"]), (
        f"{name}: topk_indices differ at {(topk != exp['topk_indices']).nonzero()[:5].tolist()}")
    # A tiny atol: a row maximum near 0 comes from cancellation in the fp32 dot product.
    torch.testing.assert_close(smax, exp["softmax_max"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ssum, exp["softmax_sum"], rtol=1e-5, atol=0.0)
    # attention_out: within one rounding step of the dtype (relative), plus fp32 accumulation noise.
    expo = exp["attention_out"].double()
    err = (out.double() - expo).abs()
    step = torch.finfo(dt).eps * expo.abs() + 1e-6 * args["value"].double().abs().max().item()
    assert (err <= step).all(), f"{name}: attention_out off by more than a rounding step: max err {err.max():.3e}"
    frac_equal = (out.float() == exp["attention_out"]).double().mean().item()
    assert frac_equal >= (0.5 if dt != torch.float32 else 0.0), f"{name}: only {frac_equal:.0%} elements identical"


@pytest.mark.parametrize("name", _case_names())
def test_shared_vector_matches_suite_model(shared_vectors, name):
    """The vectors' expectations agree with this suite's independent fp64 model."""
    args, exp = load_case(shared_vectors, name)
    res = spec_model.model_forward(**args)
    spec_model.check_stats(exp["softmax_max"], exp["softmax_sum"], res, what=name)
    spec_model.check_topk(exp["topk_indices"], res, args["actual_seq_qlen"], args["select_block_count"], what=name)
    dt = args["query"].dtype
    err = (exp["attention_out"].double() - res.attention_out).abs()
    assert (err <= torch.finfo(dt).eps * res.attention_out.abs() + 1e-6).all(), name
