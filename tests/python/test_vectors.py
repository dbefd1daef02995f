"""The reference vectors of tests/data/vectors (see its README): every case through the CPU op and the C++
reference op. Agreement: topk_indices identical; softmax statistics within nsa_ops.tolerance.STATS_RTOL;
attention_out element by element within the bound of nsa_ops.tolerance around this suite's fp64 model (the
vectors' own attention_out too: two independent oracles), and for bf16/fp16 at least half of the elements
bitwise equal to the vectors' (a different rounding mode would leave about half of them one ulp off)."""

import json

import numpy as np
import pytest
import torch

import nsa_ops  # noqa: F401  (loads torch.ops.nsa)
import spec_model
from conftest import vectors_dir
from nsa_ops import tolerance

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BACKENDS = {"cpu": lambda: torch.ops.nsa.compress_attention, "reference": lambda: torch.ops.nsa.compress_attention_reference}


def _case_names():
    path = vectors_dir() / "cases.json"
    if not path.is_file():
        return ["<missing reference vectors>"]
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


def test_vectors_present(vectors):
    names = _case_names()
    assert len(names) >= 5, names
    for n in names:
        assert (vectors / f"{n}.npz").is_file(), f"missing {n}.npz in {vectors}"


def check_out_against_model(out, res, what):
    """attention_out (ours or the vectors') element by element within the model's bound (nsa_ops.tolerance)."""
    err = (out.double() - res.attention_out).abs()
    bad = err > res.out_bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} attention_out elements beyond their bound; first at "
                           f"{bad.nonzero()[0].tolist()}: error {float(err[bad][0]):.3e} > "
                           f"{float(res.out_bound[bad][0]):.3e}")


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("name", _case_names())
def test_vector(vectors, name, backend):
    args, exp = load_case(vectors, name)
    out, topk, smax, ssum = BACKENDS[backend]()(**args)
    dt = args["query"].dtype
    assert out.dtype == dt and out.shape == exp["attention_out"].shape
    assert torch.equal(topk, exp["topk_indices"]), (
        f"{name}: topk_indices differ at {(topk != exp['topk_indices']).nonzero()[:5].tolist()}")
    for what, got, want, atol in (("softmax_max", smax, exp["softmax_max"], tolerance.STATS_MAX_ATOL),
                                  ("softmax_sum", ssum, exp["softmax_sum"], 0.0)):
        bad = tolerance.stats_errors(got, want, atol=atol)
        assert not bad.any(), f"{name}: {what} beyond rtol {tolerance.STATS_RTOL:g} at {bad.nonzero()[:5].tolist()}"
    check_out_against_model(out, spec_model.model_forward(**args), name)
    if dt in (torch.bfloat16, torch.float16):
        frac_equal = (out == exp["attention_out"].to(dt)).double().mean().item()
        assert frac_equal >= 0.5, f"{name}: only {frac_equal:.0%} of attention_out bitwise equal to the vectors"


@pytest.mark.parametrize("name", _case_names())
def test_vector_matches_suite_model(vectors, name):
    """The vectors' expectations agree with this suite's independent fp64 model: statistics, top-k by the tie
    rule, attention_out element by element within the bound of nsa_ops.tolerance."""
    args, exp = load_case(vectors, name)
    res = spec_model.model_forward(**args)
    spec_model.check_stats(exp["softmax_max"], exp["softmax_sum"], res, what=name)
    spec_model.check_topk(exp["topk_indices"], res, args["actual_seq_qlen"], args["select_block_count"], what=name)
    dt = args["query"].dtype
    assert torch.equal(exp["attention_out"].to(dt).float(), exp["attention_out"]), f"{name}: not {dt} values"
    check_out_against_model(exp["attention_out"].to(dt), res, f"{name} (the vectors' attention_out)")
