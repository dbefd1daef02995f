"""Pieces of the Python benchmarks of the source tree (bench_forward.py, bench_backward.py, seed_example.py) that
an installed package does not need; see bench/README.md.

* the options the benchmarks share, the commit and ISA being measured, the thread count;
* the machine's peak (bench/peak_probe --json, else nominal figures);
* scaled_dot_product_attention baselines.

Cases, inputs, FLOP counts, the plain PyTorch composition and timing are nsa_ops._bench's (one implementation
for these scripts and ``python -m nsa_ops bench``), re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

try:
    import nsa_ops
    from nsa_ops._bench import (  # noqa: F401  (re-exported for the benchmark scripts)
        DTYPES,
        FLT_MAX,
        Case,
        Inputs,
        Timing,
        composition,
        dense_flop,
        make_case,
        make_inputs,
        rows_per_chunk,
        score_weights,
        time_fn,
        useful_flop,
        visible_pairs,
    )
except Exception as e:  # ImportError, or the library failing to load
    sys.exit(f"ERROR: cannot import nsa_ops ({type(e).__name__}: {e})\n"
             "       `bash scripts/setup.sh` builds the operator library and installs nsa_ops into .venv; run the "
             "benchmarks with .venv/bin/python")

ROOT = Path(__file__).resolve().parent.parent

# Nominal peaks of 2 Zen 4 cores at about 3.6 GHz, in GFLOP/s, used only when peak_probe is not built (measure
# instead: a Zen 5 core does two 512-bit vdpbf16ps per cycle, not one).
NOMINAL_PEAK = {"bf16": 465.0, "fp32": 231.0}


# ------------------------------------------------------------------------------------------------ nsa_ops
def add_common_arguments(ap, unit: str, composition_help: str) -> None:
    """The options bench_forward.py and bench_backward.py share: threads, timing, inputs, baselines' chunking,
    the check, output formats and the peak, and the choice of cases. `unit` names what one timing measures
    ("method", "measurement")."""
    ap.add_argument("--cases", default="default", help="comma-separated case names, 'default' or 'all' (see --list)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--threads", type=int, default=None, help="threads for torch and the operator (default: all)")
    ap.add_argument("--warmup", type=int, default=1, help=f"warm-up runs per {unit} (default 1)")
    ap.add_argument("--repeat", type=int, default=5, help=f"measured runs per {unit}, median kept (default 5)")
    ap.add_argument("--budget", type=float, default=20.0,
                    help=f"stop measuring a {unit} after this many seconds of measured runs (default 20)")
    ap.add_argument("--chunk-mb", type=float, default=1024.0,
                    help="baselines: chunk query rows so one fp32 score block stays under this (default 1024)")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the inputs")
    ap.add_argument("--no-check", action="store_true", help="skip the check against the fp32 composition")
    ap.add_argument("--no-composition", action="store_true", help=composition_help)
    ap.add_argument("--markdown", action="store_true", help="print the summary table in markdown")
    ap.add_argument("--json-out", help="write every figure to this JSON file")
    ap.add_argument("--peak-json", help="read the peak from a saved `peak_probe --json` output")
    ap.add_argument("--no-probe", action="store_true", help="do not run peak_probe (use nominal peaks)")
    ap.add_argument("--fresh-peak", action="store_true",
                    help="use this run's probe only, not the best of earlier runs (build/bench/peak_cache.json)")
    ap.add_argument("--peak-bf16", type=float, help="bf16 peak in GFLOP/s (overrides the probe)")
    ap.add_argument("--peak-fp32", type=float, help="fp32 peak in GFLOP/s (overrides the probe)")


def fmt_ms(t: Optional[float]) -> str:
    """Seconds as milliseconds: one decimal below a second, none above; '-' for None."""
    return "-" if t is None else (f"{t * 1e3:.1f}" if t < 1 else f"{t * 1e3:.0f}")


def render_table(head: list, rows: list, markdown: bool) -> str:
    """A summary table: markdown, or columns padded to their widest cell."""
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        w = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
        lines = ["  ".join(h.ljust(w[i]) for i, h in enumerate(head))]
        lines += ["  ".join(c.ljust(w[i]) for i, c in enumerate(row)) for row in rows]
    return "\n".join(lines)


def list_cases(cases: dict, tag: Callable[[str], str]) -> int:
    """--list: one line per case (name, dtype, tag, shape); returns the exit status 0."""
    for name, c in cases.items():
        print(f"{name:<15} {c.dtype:<5} {tag(name):<8} {c.shape_str()}")
    return 0


def case_names(spec: str, cases: dict, default: list, extra: tuple = ()) -> Optional[list]:
    """The case names that --cases asks for ('default', 'all' or a comma-separated list), plus `extra`; None,
    after a message on stderr, when one is unknown."""
    names = (list(default) if spec == "default" else list(cases) if spec == "all"
             else [n.strip() for n in spec.split(",") if n.strip()])
    names += [n for n in extra if n not in names]
    bad = [n for n in names if n not in cases]
    if bad:
        print(f"unknown case(s): {', '.join(bad)}; known: {', '.join(cases)}", file=sys.stderr)
        return None
    return names


def start(args, unit: str, timing_note: str = "") -> tuple:
    """Threads, nsa_ops, the peak and the printed header of a benchmark run (options of add_common_arguments;
    `unit` names what one timing measures, `timing_note` is added to the timing line)."""
    threads = set_threads(args.threads)
    peak = get_peak(threads, args.peak_json, not args.no_probe, args.peak_bf16, args.peak_fp32,
                    use_cache=not args.fresh_peak)
    header = [
        f"nsa_ops {git_describe()} ({nsa_ops.library_path()}), torch {torch.__version__}, "
        f"{threads} threads (torch.get_num_threads() = {torch.get_num_threads()}, NSA_NUM_THREADS = "
        f"{os.environ.get('NSA_NUM_THREADS')}), {isa_str(nsa_ops)}",
        peak.describe(),
        f"timing: median of up to {args.repeat} runs after {args.warmup} warm-up(s), at most "
        f"{args.budget:.0f} s of measured runs per {unit}{timing_note}; seed {args.seed}",
    ]
    print("\n".join(header), flush=True)
    return threads, nsa_ops, peak, header


def finish(args, header: list, peak: "Peak", results: list, table_text: str, legend: str) -> int:
    """Prints the summary table (after the header again with --markdown) and the legend, writes --json-out;
    status 1 when a case's check failed."""
    print()
    if args.markdown:
        print("\n".join("- " + h for h in header))
        print()
    print(table_text)
    print("\n" + legend)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"header": header, "peak": {"bf16": peak.bf16, "fp32": peak.fp32, "source": peak.source,
                                                  "probe": peak.probe},
                       "results": results}, f, indent=1)
    failed = [r["case"] for r in results if r.get("check") and not r["check"]["ok"]]
    if failed:
        print(f"\nCHECK MISMATCH in: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def import_nsa_ops():
    """nsa_ops, imported when this module was (with a clear message and status 2 when that failed)."""
    return nsa_ops


def git_describe() -> str:
    """Short commit of the working tree (+ '-dirty' when files other than the ones bench/record.py writes,
    record.RESULT_FILES, differ from it), for the record of which backend was measured."""
    from record import RESULT_FILES  # bench/record.py (standard library only)

    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--", ".",
                                *(f":!{f}" for f in RESULT_FILES)],
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def isa_str(nsa_ops) -> str:
    """The CPU backend's active ISA path (and the detected one), from nsa_ops.cpu_isa() when it exists."""
    env = os.environ.get("NSA_CPU_ISA")
    try:
        detected, active = nsa_ops.cpu_isa()
        s = f"ISA {active}" + (f" (detected {detected})" if detected != active else "")
    except Exception:
        s = "ISA unknown"
    return s + (f", NSA_CPU_ISA={env}" if env else "")


def set_threads(n: Optional[int]) -> int:
    """Uses n threads in torch and in the operator (NSA_NUM_THREADS); default: every core."""
    n = n or os.cpu_count() or 1
    os.environ["NSA_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    return n


# ------------------------------------------------------------------------------------------------ peak
@dataclasses.dataclass
class Peak:
    bf16: float          # GFLOP/s, vdpbf16ps on all threads (the fp32 FMA figure where there is no vdpbf16ps)
    fp32: float          # GFLOP/s, fp32 FMA on all threads
    source: str          # how it was obtained (one line)
    probe: Optional[dict] = None  # peak_probe's JSON when measured

    @property
    def bf16_inputs(self) -> float:
        """The attainable peak of bf16 inputs: the larger of the vdpbf16ps and fp32 FMA peaks. bf16 widens exactly
        to fp32, so either unit can do the products; which is faster depends on the CPU (vdpbf16ps is twice the
        FMA rate on AMD Zen 4 / 5, half of it on Intel Emerald Rapids)."""
        return max(self.bf16, self.fp32)

    def for_dtype(self, dtype: torch.dtype) -> float:
        """The attainable peak of an input dtype, the denominator of "% peak": bf16_inputs for bf16, the fp32 FMA
        peak for fp16 and fp32 (no fp16 dot-product instruction is used)."""
        return self.bf16_inputs if dtype == torch.bfloat16 else self.fp32

    def describe(self) -> str:
        return (f"peak of bf16 inputs {self.bf16_inputs:.0f} GFLOP/s (the larger of vdpbf16ps {self.bf16:.0f} and "
                f"fp32 FMA {self.fp32:.0f}), of fp16 / fp32 inputs {self.fp32:.0f} GFLOP/s ({self.source})")


def find_peak_probe() -> Optional[Path]:
    for cand in (ROOT / "build" / "bench" / "peak_probe", ROOT / "build" / "peak_probe"):
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    found = shutil.which("peak_probe")
    return Path(found) if found else None


PEAK_CACHE = ROOT / "build" / "bench" / "peak_cache.json"


def peak_cache_key(data: dict) -> str:
    """The cache key of a probe: brand string, cpuid display family and model, threads. The brand string alone is
    not enough: VMs of Zen 3, Zen 4 and Zen 5 hosts all say "AMD EPYC"."""
    return f"{data.get('cpu', '?')}|{data.get('cpu_family', '?')}|{data.get('cpu_model', '?')}|{data['threads']}"


def merge_with_cache(data: dict, cache_path: Path = PEAK_CACHE) -> tuple[dict, bool]:
    """Per-kernel maximum of this probe and the earlier ones on the same CPU (peak_cache_key) and thread count
    (stored in cache_path, updated). A peak is a property of the machine: a run on a machine busy with
    other work measures less, never more, so the best figure seen is the better estimate.
    Returns (merged data, whether an earlier figure was higher). A probe without cpuid family / model (a
    peak_probe built before it printed them) cannot tell those CPUs apart: it is used alone, and not cached."""
    if "cpu_family" not in data or "cpu_model" not in data:
        return data, False
    key = peak_cache_key(data)
    try:
        with open(cache_path) as f:
            cache = json.load(f)
    except Exception:
        cache = {}
    old = cache.get(key)
    merged = json.loads(json.dumps(data))
    used_old = False
    if old:
        for name, k in merged["kernels"].items():
            o = old["kernels"].get(name)
            if not (k.get("supported") and o and o.get("supported")):
                continue
            for f in ("gflops_1t", "gflops_all"):
                if o[f] > k[f]:
                    k[f], used_old = o[f], True
    peaks = {"bf16": None, "fp32": None}
    for k in merged["kernels"].values():
        if k.get("supported"):
            cur = peaks[k["kind"]]
            peaks[k["kind"]] = k["gflops_all"] if cur is None else max(cur, k["gflops_all"])
    known = [p for p in peaks.values() if p is not None]
    peaks["bf16_inputs"] = max(known) if known else None
    merged["peak_gflops"] = peaks
    cache[key] = merged
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        with open(cache_path, "w") as f:
            json.dump(cache, f, indent=1)
    except OSError:
        pass
    return merged, used_old


def get_peak(threads: int, peak_json: Optional[str] = None, probe: bool = True,
             bf16: Optional[float] = None, fp32: Optional[float] = None, use_cache: bool = True) -> Peak:
    """The machine's peak: --peak-bf16/--peak-fp32 overrides, else a saved or fresh peak_probe --json
    (a fresh one merged with the best earlier figures, see merge_with_cache), else the nominal
    figures (with a note saying so)."""
    data, source = None, None
    if peak_json:
        with open(peak_json) as f:
            data = json.load(f)
        source = f"peak_probe JSON {peak_json}"
    elif probe:
        exe = find_peak_probe()
        if exe is not None:
            try:
                out = subprocess.run([str(exe), "--json", "--threads", str(threads), "--seconds", "0.2",
                                      "--repeats", "5"], capture_output=True, text=True, check=True, timeout=120)
                data = json.loads(out.stdout)
                source = f"measured now by {exe.relative_to(ROOT) if exe.is_relative_to(ROOT) else exe}"
                if use_cache:
                    now = dict(data["peak_gflops"])
                    data, used_old = merge_with_cache(data)
                    if used_old:
                        source += (f" (now: bf16 {now['bf16'] or 0:.0f}, fp32 {now['fp32'] or 0:.0f}; best of "
                                   f"earlier runs kept, {PEAK_CACHE.relative_to(ROOT)})")
            except Exception as e:  # keep going with the nominal figures
                print(f"note: peak_probe failed ({e}); using nominal peaks", file=sys.stderr)
    pb = pf = None
    if data is not None:
        pb, pf = data["peak_gflops"].get("bf16"), data["peak_gflops"].get("fp32")
        used = [k.get("instr", name) for name, k in data["kernels"].items() if k.get("supported")]
        source += (f", {data['threads']} threads, chains of {' / '.join(used) or 'no supported kernel'}, best of "
                   f"{data['repeats']} x {data['seconds']:.2f} s, clock ~{data['clock_ghz_est']:.2f} GHz")
        if pb is None and pf is not None:
            # no vdpbf16ps on this CPU (AVX2 only, or AVX-512 without BF16): bf16 inputs are widened to
            # fp32 and run on the FMA units, so the fp32 FMA rate is their peak
            pb = pf
            source += "; no bf16 dot-product instruction here: the fp32 FMA peak is the bf16 inputs' peak"
        elif pb is not None and pf is not None and pf > pb:
            source += "; vdpbf16ps is slower than fp32 FMA here: bf16 inputs are measured against the FMA peak"
        busy = []
        for name, k in data["kernels"].items():
            if k.get("supported") and k["gflops_all"] < 0.8 * data["threads"] * k["gflops_1t"]:
                busy.append(name)
        if busy:
            source += f"; WARNING: all-core figure < 0.8 x threads x 1-thread for {', '.join(busy)} (busy machine?)"
    if pb is None or pf is None:
        why = ("--no-probe" if not probe and not peak_json else
               "peak_probe not built: cmake --build build --target peak_probe" if find_peak_probe() is None
               else "peak_probe gave no figure")
        note = f"nominal Zen 4 figures (benchlib.NOMINAL_PEAK); {why}"
        pb = pb if pb is not None else NOMINAL_PEAK["bf16"]
        pf = pf if pf is not None else NOMINAL_PEAK["fp32"]
        source = source + "; " + note if source else note
    if bf16 is not None or fp32 is not None:
        pb, pf = bf16 or pb, fp32 or pf
        source = "given on the command line" + (f" (probe: {source})" if data else "")
    return Peak(bf16=float(pb), fp32=float(pf), source=source, probe=data)


# ------------------------------------------------------------------------------------------------ baselines
def sdpa(case: Case, x: Inputs, row_chunk: Optional[int], pad_v: bool = False) -> torch.Tensor:
    """scaled_dot_product_attention per batch (attention only, no selection): q viewed [1, N1, rows, D],
    k/v [1, N2, C, *], enable_gqa=True, attn_mask = ~atten_mask (SDPA's True means "attend").

    pad_v=False: the call as is; with D2 != D torch's CPU flash kernel refuses and SDPA runs the math
    path, which materialises [N1, rows, C]: so rows are chunked (row_chunk). pad_v=True: V zero-padded
    to D (the padding done inside the timed call) so that the flash kernel runs; no chunking needed.
    """
    q, k, v = x.query, x.key, x.value
    T, N1, D = q.shape
    out = torch.empty(T, N1, case.D2, dtype=q.dtype)
    q0s = [0] + x.seq_qlen[:-1]
    c0s = [0] + x.cmp_kvlen[:-1]
    for b, sq in enumerate(case.seq_lens):
        C = case.cmp_lens[b]
        q0, c0 = q0s[b], c0s[b]
        kb = k[c0:c0 + C].permute(1, 0, 2).unsqueeze(0)
        vb = v[c0:c0 + C].permute(1, 0, 2).unsqueeze(0)
        if pad_v and case.D2 != D:
            vb = F.pad(vb, (0, D - case.D2))
        step = sq if (pad_v or row_chunk is None) else row_chunk
        for r0 in range(0, sq, step):
            r1 = min(r0 + step, sq)
            qb = q[q0 + r0:q0 + r1].permute(1, 0, 2).unsqueeze(0)
            mask = None if x.atten_mask is None else ~x.atten_mask[r0:r1, :C].bool()
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=x.scale, enable_gqa=True)
            out[q0 + r0:q0 + r1] = o[0, :, :, :case.D2].permute(1, 0, 2)
    return out
