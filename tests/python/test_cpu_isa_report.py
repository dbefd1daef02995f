"""nsa_ops.cpu_isa_report(): how the CPU backend's default path was chosen (include/nsa/cpu.h, src/cpu/isa.h).
NSA_CPU_ISA is read once per process, so the override cases run in subprocesses (started together)."""

import json
import os
import subprocess
import sys

import pytest

import nsa_ops

ORDER = ["scalar", "avx2", "avx512", "avx512bf16"]
BASES = {"single path", "table", "calibration", "NSA_CPU_ISA"}


def _reports(envs: list) -> list:
    """cpu_isa_report() of one fresh process per NSA_CPU_ISA value (None: unset), as dicts."""
    code = "import json, nsa_ops; print(json.dumps(nsa_ops.cpu_isa_report()._asdict()))"
    procs = []
    for value in envs:
        env = {k: v for k, v in os.environ.items() if k != "NSA_CPU_ISA"}
        if value is not None:
            env["NSA_CPU_ISA"] = value
        if nsa_ops.library_path():
            env["NSA_OPS_LIB"] = nsa_ops.library_path()
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    out = []
    for value, p in zip(envs, procs):
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, f"NSA_CPU_ISA={value}: {stderr[-2000:]}"
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def test_report_agrees_with_cpu_isa():
    r = nsa_ops.cpu_isa_report()
    assert isinstance(r, nsa_ops.CpuIsaReport)
    assert (r.detected, r.active) == nsa_ops.cpu_isa()
    assert r.basis in BASES
    assert r.reason
    assert ORDER.index(r.preferred) <= ORDER.index(r.detected)
    assert ORDER.index(r.active) <= ORDER.index(r.detected)
    assert r == nsa_ops.cpu_isa_report()  # decided once per process
    if os.environ.get("NSA_CPU_ISA") is None:
        assert r.active == r.preferred and r.basis != "NSA_CPU_ISA"


def test_override_and_reproducibility_across_processes():
    here = nsa_ops.cpu_isa_report()
    detected = here.detected
    plain_a, avx2, bogus = _reports([None, "avx2", "fast"])
    # unset: the speed choice; a table (or single-path) decision is the same in every process
    assert plain_a["detected"] == detected
    assert plain_a["active"] == plain_a["preferred"]
    assert plain_a["basis"] in {"single path", "table", "calibration"}
    if plain_a["basis"] != "calibration":
        assert plain_a["preferred"] == here.preferred
        if os.environ.get("NSA_CPU_ISA") is None:
            assert plain_a == here._asdict()
    # a path name replaces the speed choice, capped at what the CPU runs
    want = ORDER[min(ORDER.index("avx2"), ORDER.index(detected))]
    assert avx2["active"] == want and avx2["basis"] == "NSA_CPU_ISA"
    assert avx2["preferred"] == plain_a["preferred"] or plain_a["basis"] == "calibration"
    assert "NSA_CPU_ISA=avx2" in avx2["reason"]
    # anything else is ignored, and the reason says so
    assert bogus["active"] == bogus["preferred"] and bogus["basis"] != "NSA_CPU_ISA"
    assert "NSA_CPU_ISA=fast is not a path name" in bogus["reason"]


def test_cli_isa(capsys):
    from nsa_ops import cli

    assert cli.main(["isa", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r == nsa_ops.cpu_isa_report()._asdict()
    assert cli.main(["isa"]) == 0
    text = capsys.readouterr().out
    assert f"active:    {r['active']}" in text and f"chosen by: {r['basis']}" in text


@pytest.mark.skipif(nsa_ops.cpu_isa()[0] != "avx512bf16", reason="needs a CPU with AVX-512 BF16 (two candidates)")
def test_known_cpus_are_not_timed():
    """On a CPU the table knows the report cites the table, never a calibration (the project's machines: AMD
    Zen 4 / Zen 5, Intel with AVX-512 BF16)."""
    r = nsa_ops.cpu_isa_report()
    if r.cpu.startswith("AMD family 0x19") or r.cpu.startswith("AMD family 0x1a") or r.cpu.startswith(
            "Intel family 0x6 "):
        assert r.basis in {"table", "NSA_CPU_ISA"}, r
        assert r.preferred == ("avx512" if r.cpu.startswith("Intel") else "avx512bf16"), r
