"""The command line (python -m nsa_ops): --help of every command, golden -> check round trips (.npy directory,
.safetensors, .npz), check naming the rows of planted differences, tie tolerance with the inputs, select-map
(PNG with matplotlib, the clear error without it), the compact benchmark."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nsa_ops
from nsa_ops import cli, golden, tolerance

REPO = Path(__file__).resolve().parents[2]
COMMANDS = ["bench", "golden", "check", "select-map"]


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _env():
    return dict(os.environ)  # nsa_ops is installed (.venv's .pth file, or a wheel): no PYTHONPATH needed


def make_case(root: Path, *, lens=(300, 130, 200), N1=4, N2=2, D=32, D2=16, K=2, zero_keys=False,
              bf16_as="uint16", seed=0) -> Path:
    """A bf16 varlen causal case as a directory of .npy files + args.json (docs/spec/compress_attention.md §9 masks)."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    C = nsa_ops.compressed_lengths(list(lens), 32, 16)
    sel = nsa_ops.selection_lengths(C, 16, 64)
    q = torch.randn(sum(lens), N1, D, generator=g).bfloat16()
    k = torch.randn(sum(C), N2, D, generator=g).bfloat16()
    if zero_keys:
        k.zero_()
    v = torch.randn(sum(C), N2, D2, generator=g).bfloat16()
    for name, t in (("query", q), ("key", k), ("value", v)):
        arr = t.view(torch.int16).numpy().view(np.uint16) if bf16_as == "uint16" else t.float().numpy()
        np.save(root / f"{name}.npy", arr)
    np.save(root / "atten_mask.npy", nsa_ops.make_atten_mask(max(lens), max(C), 32, 16).numpy())
    np.save(root / "topk_mask.npy", nsa_ops.make_topk_mask(max(lens), max(sel), 64).numpy().astype(np.uint8))
    args = dict(dtype="bf16", scale_value=D ** -0.5, head_num=N1, compress_block_size=32, compress_stride=16,
                select_block_size=64, select_block_count=K, actual_seq_qlen=nsa_ops.prefix_sums(list(lens)),
                actual_cmp_seq_kvlen=nsa_ops.prefix_sums(C))
    (root / "args.json").write_text(json.dumps(args))
    return root


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------------------------ --help
@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_each_command(capsys, command):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m nsa_ops " + command)
    assert "--help" in out


def test_module_entry_point_lists_commands():
    r = subprocess.run([sys.executable, "-m", "nsa_ops", "--help"], capture_output=True, text=True, env=_env(),
                       cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    for command in COMMANDS:
        assert command in r.stdout
    r = subprocess.run([sys.executable, "-m", "nsa_ops"], capture_output=True, text=True, env=_env(), cwd=REPO,
                       timeout=120)
    assert r.returncode == 2 and "required" in r.stderr


# ------------------------------------------------------------------------------------------------ golden / check
def test_golden_check_round_trip(tmp_path, capsys):
    src = make_case(tmp_path / "in")
    code, out, err = run_cli(capsys, "golden", src, "-o", tmp_path / "cpu")
    assert code == 0, err
    assert "attention_out.npy: [630, 4, 16] float32 holding exact bfloat16 values" in out
    code, _, err = run_cli(capsys, "golden", src, "-o", tmp_path / "ref", "--backend", "reference",
                           "--bf16-storage", "uint16")
    assert code == 0, err

    man = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    assert man["dtype"] == "bf16" and man["backend"] == "reference"
    assert man["args"]["actual_seq_qlen"] == [300, 430, 630]
    assert man["outputs"]["attention_out"]["storage"] == "uint16 bit patterns of bfloat16"
    assert man["outputs"]["softmax_max"]["shape"] == [630, 4, 8]
    assert np.load(tmp_path / "ref" / "attention_out.npy").dtype == np.uint16
    assert np.load(tmp_path / "ref" / "topk_indices.npy").dtype == np.int32
    assert set(man["inputs"]["sha256"]) >= {"query.npy", "key.npy", "value.npy", "args.json"}

    # The two storages of bf16 hold the same values.
    a = torch.from_numpy(np.load(tmp_path / "cpu" / "attention_out.npy"))
    assert torch.equal(a, a.bfloat16().float())

    code, out, err = run_cli(capsys, "check", tmp_path / "cpu", tmp_path / "ref")
    assert code == 0, out + err
    assert out.rstrip().endswith("MATCH") and "MISMATCH" not in out
    code, out, _ = run_cli(capsys, "check", tmp_path / "cpu", tmp_path / "cpu", "--inputs", src)
    assert code == 0 and "max 0 ulps" in out


def test_golden_float32_inputs_and_exactness(tmp_path, capsys):
    src = make_case(tmp_path / "in", bf16_as="float32")
    code, _, err = run_cli(capsys, "golden", src, "-o", tmp_path / "a")
    assert code == 0, err
    src_u16 = make_case(tmp_path / "in16", bf16_as="uint16")
    run_cli(capsys, "golden", src_u16, "-o", tmp_path / "b")
    for name in golden.OUTPUT_NAMES:
        assert np.array_equal(np.load(tmp_path / "a" / f"{name}.npy"), np.load(tmp_path / "b" / f"{name}.npy"))

    q = np.load(src / "query.npy")
    q[3, 1, 2] = 0.1  # not a bf16 value
    np.save(src / "query.npy", q)
    code, _, err = run_cli(capsys, "golden", src, "-o", tmp_path / "c")
    assert code == 2 and "query" in err and "not exactly representable in bf16" in err and "[3, 1, 2]" in err
    code, _, err = run_cli(capsys, "golden", src, "-o", tmp_path / "c", "--round-inputs")
    assert code == 0, err


def test_golden_reports_bad_arguments(tmp_path, capsys):
    src = make_case(tmp_path / "in")
    args = json.loads((src / "args.json").read_text())
    code, _, err = run_cli(capsys, "golden", tmp_path / "missing", "-o", tmp_path / "o")
    assert code == 2 and "no such file or directory" in err
    args["head_num"] = 5
    (src / "args.json").write_text(json.dumps(args))
    code, _, err = run_cli(capsys, "golden", src, "-o", tmp_path / "o")
    assert code == 2 and "head_num" in err  # the operator's docs/spec/compress_attention.md §6 message names the argument
    del args["select_block_count"]
    (src / "args.json").write_text(json.dumps(args))
    code, _, err = run_cli(capsys, "golden", src, "-o", tmp_path / "o")
    assert code == 2 and "select_block_count" in err


def test_check_names_planted_differences(tmp_path, capsys):
    src = make_case(tmp_path / "in")
    run_cli(capsys, "golden", src, "-o", tmp_path / "gold")
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "gold", bad)

    # attention_out: 8 bf16 ulps at t = 350 (batch 1, s = 50), head 2.
    out = torch.from_numpy(np.load(bad / "attention_out.npy")).bfloat16()
    bits = out.view(torch.int16)
    bits[350, 2, 5] += 8
    np.save(bad / "attention_out.npy", out.float().numpy())
    # topk_indices: two entries swapped at t = 10 (batch 0), KV head 1.
    topk = np.load(bad / "topk_indices.npy")
    topk[10, 1, [0, 1]] = topk[10, 1, [1, 0]]
    np.save(bad / "topk_indices.npy", topk)
    # softmax_sum of t = 500 (batch 2, s = 70), head 3, found through docs/spec/compress_attention.md §4's per-batch layout.
    ssum = torch.from_numpy(np.load(bad / "softmax_sum.npy"))
    view = nsa_ops.softmax_stats_view(ssum, [300, 430, 630])[2]  # [N1, Sq_b] view of batch 2
    view[3, 70] *= 1.001
    np.save(bad / "softmax_sum.npy", ssum.numpy())

    code, out, _ = run_cli(capsys, "check", bad, tmp_path / "gold", "--json", tmp_path / "report.json")
    assert code == 1
    assert out.rstrip().endswith("MISMATCH")
    assert "attention_out: t = 350 (batch 1, s = 50), head 2: 1 elements beyond 2 ulps; worst j = 5" in out
    assert "(8 ulps)" in out
    assert "topk_indices: t = 10 (batch 0, s = 10), KV head 1:" in out
    assert "softmax_sum: t = 500 (batch 2, s = 70), head 3:" in out
    assert "softmax_max: 0 rows" in out
    rep = json.loads((tmp_path / "report.json").read_text())
    assert not rep["ok"]
    assert {(d["output"], d["t"], d["head"]) for d in rep["differences"]} == {
        ("topk_indices", 10, 1), ("attention_out", 350, 2), ("softmax_sum", 500, 3)}

    # With the inputs the swapped top-k entries still differ: a forced block (+FLT_MAX) against a scored one.
    code, out, _ = run_cli(capsys, "check", bad, tmp_path / "gold", "--inputs", src)
    assert code == 1 and "topk_indices: t = 10 (batch 0, s = 10), KV head 1:" in out


def test_check_shape_mismatch_and_missing_files(tmp_path, capsys):
    a = make_case(tmp_path / "a", lens=(300,))
    b = make_case(tmp_path / "b", lens=(301,))
    run_cli(capsys, "golden", a, "-o", tmp_path / "oa")
    run_cli(capsys, "golden", b, "-o", tmp_path / "ob")
    code, out, _ = run_cli(capsys, "check", tmp_path / "oa", tmp_path / "ob")
    assert code == 1 and "shapes differ" in out
    (tmp_path / "ob" / "topk_indices.npy").unlink()
    code, _, err = run_cli(capsys, "check", tmp_path / "oa", tmp_path / "ob")
    assert code == 2 and "missing topk_indices.npy" in err


def test_check_tie_tolerance_needs_the_inputs(tmp_path, capsys):
    # All keys zero: P is uniform over the visible compressed tokens. Row t = 300 of a 400-token sequence
    # (C = 24, Sel = 6, M = 4, weights [1, 2, 2, 2, 1]) sees c = 0..16 (16c + 31 <= 300): blocks 0..3 score
    # 8/17 each, block 4 1/17 (only c = 16), block 5 zero. Forced (docs/spec/compress_attention.md §9): block 0
    # and the local blocks 3, 4. K = 4: [0, 3, 4] (forced, ties at +FLT_MAX by index), then 1 (tied with 2, the
    # smaller index wins). The forced blocks' tie is exact (+FLT_MAX is assigned, not computed): their order is
    # required; the computed scores of blocks 1 and 2 are a tie the check accepts either way.
    src = make_case(tmp_path / "in", lens=(400,), zero_keys=True, K=4)
    run_cli(capsys, "golden", src, "-o", tmp_path / "gold")
    swapped = tmp_path / "swapped"
    shutil.copytree(tmp_path / "gold", swapped)
    topk = np.load(swapped / "topk_indices.npy")
    t = 300
    assert topk[t, 0].tolist() == [0, 3, 4, 1]

    def check_with(row, *extra):
        topk[t, 0] = row
        np.save(swapped / "topk_indices.npy", topk)
        return run_cli(capsys, "check", swapped, tmp_path / "gold", *extra)

    code, out, _ = check_with([0, 4, 3, 1])
    assert code == 1 and "topk_indices: t = 300 (batch 0, s = 300), KV head 0: [0, 4, 3, 1] vs [0, 3, 4, 1]" in out
    assert "give the inputs for tie tolerance" in out
    code, out, _ = check_with([0, 4, 3, 1], "--inputs", src)
    assert code == 1 and "[0, 4, 3, 1] vs [0, 3, 4, 1]" in out  # forced blocks out of the §3.8 order
    code, out, _ = check_with([0, 3, 4, 2], "--inputs", src)
    assert code == 0, out
    assert "1 more differ only by tied scores, accepted" in out
    # Blocks whose scores differ are still a difference with the inputs.
    code, out, _ = check_with([0, 3, 4, 5], "--inputs", src)
    assert code == 1 and "[0, 3, 4, 5] vs [0, 3, 4, 1]" in out
    code, out, _ = check_with([0, 3, 4, 4], "--inputs", src)  # a duplicate is never a tie
    assert code == 1 and "[0, 3, 4, 4] vs [0, 3, 4, 1]" in out


def test_check_accepts_a_rounding_flip_of_p_with_the_inputs(tmp_path, capsys):
    # docs/spec/compress_attention.md §3.4 rounds P to bf16 before P.V. A P_c whose exact value lies within the
    # fp32 error bound of P (nsa_ops.tolerance.p_rel_error) of a bf16 rounding midpoint may be rounded the other
    # way by a correct implementation, which moves the output by ulp(P_c) |v_cj|. Plant the output of such an
    # implementation where that exceeds 2 ulps of the output: accepted with the inputs, not without; the same
    # change from a P_c far from a midpoint, or three times the change, is a mismatch either way.
    src = make_case(tmp_path / "in", lens=(300,))
    run_cli(capsys, "golden", src, "-o", tmp_path / "gold")
    q = torch.from_numpy(np.load(src / "query.npy").view(np.int16)).view(torch.bfloat16).double()
    k = torch.from_numpy(np.load(src / "key.npy").view(np.int16)).view(torch.bfloat16).double()
    v = torch.from_numpy(np.load(src / "value.npy").view(np.int16)).view(torch.bfloat16).double()
    scale = float(np.float32(32 ** -0.5))
    bf = torch.bfloat16
    risky = safe = None  # (|change| / ulp of the output, t, h, j, exact output after the change)
    for t in range(31, 300):
        C = (t - 31) // 16 + 1  # visible compressed tokens: 16c + 31 <= t
        for h in range(4):
            kk, vv = k[:C, h // 2], v[:C, h // 2]
            sc = (kk @ q[t, h]) * scale
            p = torch.softmax(sc, dim=0)
            p_err = tolerance.p_rel_error(sc, (kk.abs() @ q[t, h].abs()) * scale, torch.ones(C, dtype=torch.bool),
                                          32, bf)
            pr = tolerance.round_to(p, bf)
            ref = pr @ vv
            at_risk = tolerance.flip_mask(p, bf, p_err)
            other = pr + torch.sign(p - pr) * tolerance.ulp(p, bf)  # the other neighbour of each P_c
            for c in range(C):
                flipped = pr.clone()
                flipped[c] = other[c]
                new = flipped @ vv
                ratio = ((new - ref).abs() / tolerance.ulp(ref, bf)).max()
                j = int(((new - ref).abs() / tolerance.ulp(ref, bf)).argmax())
                entry = (float(ratio), t, h, j, float(new[j]))
                if at_risk[c] and (risky is None or entry[0] > risky[0]):
                    risky = entry
                if not at_risk[c] and (safe is None or entry[0] > safe[0]):
                    safe = entry
    assert risky[0] > 4 and safe[0] > 4, (risky, safe)
    gold = np.load(tmp_path / "gold" / "attention_out.npy")
    flipped = tmp_path / "flipped"
    shutil.copytree(tmp_path / "gold", flipped)

    def check_planted(entry, *extra, factor=1.0):
        _, t, h, j, value = entry
        arr = gold.copy()
        arr[t, h, j] = float(torch.tensor(gold[t, h, j] + factor * (value - gold[t, h, j])).to(bf).float())
        np.save(flipped / "attention_out.npy", arr)
        return run_cli(capsys, "check", flipped, tmp_path / "gold", *extra)

    _, t, h, _, _ = risky
    code, out_text, _ = check_planted(risky)
    assert code == 1 and f"attention_out: t = {t} (batch 0, s = {t}), head {h}: 1 elements beyond 2 ulps" in out_text
    code, out_text, _ = check_planted(risky, "--inputs", src)
    assert code == 0, out_text
    assert "1 more rows within the bound of the fp64 model, accepted" in out_text
    code, out_text, _ = check_planted(risky, "--inputs", src, factor=3.0)
    assert code == 1, out_text
    code, out_text, _ = check_planted(safe, "--inputs", src)
    assert code == 1, out_text


def test_golden_safetensors_and_npz(tmp_path, capsys):
    src = make_case(tmp_path / "in")
    run_cli(capsys, "golden", src, "-o", tmp_path / "npy")
    args = json.loads((src / "args.json").read_text())
    tensors = {"query": torch.from_numpy(np.load(src / "query.npy").view(np.int16)).view(torch.bfloat16),
               "key": torch.from_numpy(np.load(src / "key.npy").view(np.int16)).view(torch.bfloat16),
               "value": torch.from_numpy(np.load(src / "value.npy").view(np.int16)).view(torch.bfloat16),
               "atten_mask": torch.from_numpy(np.load(src / "atten_mask.npy")),
               "topk_mask": torch.from_numpy(np.load(src / "topk_mask.npy"))}
    st = tmp_path / "case.safetensors"
    golden.write_safetensors(st, tensors, {"nsa_args": json.dumps({k: v for k, v in args.items() if k != "dtype"})})
    # The built-in reader and, when installed, the safetensors package read the same.
    mine, meta = golden.read_safetensors(st, use_package=False)
    assert mine["query"].dtype == torch.bfloat16 and torch.equal(mine["query"], tensors["query"])
    assert json.loads(meta["nsa_args"])["head_num"] == 4
    try:
        import safetensors  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install safetensors"):
            golden.read_safetensors(st, use_package=True)
    else:
        theirs, meta2 = golden.read_safetensors(st, use_package=True)
        assert meta2 == meta and all(torch.equal(theirs[k], mine[k]) for k in mine)

    code, out, err = run_cli(capsys, "golden", st, "-o", tmp_path / "st")
    assert code == 0, err
    assert "(bf16)" in out  # dtype from the BF16 tensors themselves
    np.savez(tmp_path / "case.npz", **{k: np.load(src / f"{k}.npy") for k in
                                       ("query", "key", "value", "atten_mask", "topk_mask")})
    code, _, err = run_cli(capsys, "golden", tmp_path / "case.npz", "--args", src / "args.json", "-o", tmp_path / "nz")
    assert code == 0, err
    for name in golden.OUTPUT_NAMES:
        ref = np.load(tmp_path / "npy" / f"{name}.npy")
        assert np.array_equal(np.load(tmp_path / "st" / f"{name}.npy"), ref)
        assert np.array_equal(np.load(tmp_path / "nz" / f"{name}.npy"), ref)
    code, out, _ = run_cli(capsys, "check", tmp_path / "st", tmp_path / "npy")
    assert code == 0, out


# ------------------------------------------------------------------------------------------------ select-map
def test_select_map_writes_png_or_says_matplotlib_is_missing(tmp_path, capsys):
    png = tmp_path / "sel.png"
    argv = ["select-map", "-o", png, "--tokens", "512", "--topk", "4"]
    code, out, err = run_cli(capsys, *argv)
    if _has_matplotlib():
        assert code == 0, err
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width >= 600 and height >= 500
        assert "Sel = 8, K = 4" in out and str(png) in out
    else:
        assert code == 3 and not png.exists()
        assert "needs matplotlib" in err and "pip install matplotlib" in err


def test_select_map_without_matplotlib_gives_a_clear_error(tmp_path):
    # Whether or not matplotlib is installed here: hide it and check the message and the exit status.
    code = ("import sys; sys.modules['matplotlib'] = None; from nsa_ops.cli import main; "
            f"sys.exit(main(['select-map', '-o', {str(tmp_path / 'x.png')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 3, r.stderr
    assert "select-map: this needs matplotlib, which is not installed: pip install matplotlib" in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_plot_selection_colours(tmp_path):
    if not _has_matplotlib():
        pytest.skip("matplotlib is not installed (the CLI's error is tested above)")
    from nsa_ops import viz

    topk = torch.tensor([[[0, 1]], [[0, 2]], [[1, 3]]], dtype=torch.int32)
    forced = torch.tensor([[True, False, False, False], [True, False, False, False], [False, True, False, False]])
    path = viz.plot_selection(topk, forced, 0, tmp_path / "p.png", num_blocks=5)
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="kv_head"):
        viz.plot_selection(topk, None, 1, tmp_path / "q.png")


# ------------------------------------------------------------------------------------------------ bench
def test_bench_compact(tmp_path, capsys):
    js = tmp_path / "b.json"
    argv = ["bench", "--seq-lens", "256,512", "--heads", "4", "--kv-heads", "1", "--dim", "32", "--dim-v", "16",
            "--topk", "2", "--warmup", "0", "--repeat", "1", "--threads", "1", "--json", js]
    if _has_matplotlib():
        argv += ["--plot", tmp_path / "b.png"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "nsa_ops ms" in out and "speed-up" in out
    assert "/4" in err  # the progress bar: 2 lengths x (ours, composition)
    res = json.loads(js.read_text())["results"]
    assert [r["tokens"] for r in res] == [256, 512]
    for r in res:
        assert r["gflops"] > 0 and r["composition_s"] > 0
        # useful GFLOP = 2 N1 (D + D2) * visible pairs of the causal mask
        C = (r["tokens"] - 32) // 16 + 1
        pairs = int((~nsa_ops.make_atten_mask(r["tokens"], C, 32, 16)).sum())
        assert r["useful_gflop"] == pytest.approx(2 * 4 * 48 * pairs / 1e9)
    if _has_matplotlib():
        assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_rejects_too_few_blocks_and_missing_suite(capsys, monkeypatch):
    code, _, err = run_cli(capsys, "bench", "--seq-lens", "256", "--topk", "16", "--no-progress")
    assert code == 2 and "--topk 16 exceeds the 4 selection blocks of 256 tokens" in err
    monkeypatch.setattr(cli, "_suite_path", lambda: None)
    code, _, err = run_cli(capsys, "bench", "--suite")
    assert code == 2 and "bench/bench_forward.py" in err
