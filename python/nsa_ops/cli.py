"""Command line of nsa_ops: ``python -m nsa_ops <command>`` (or ``nsa-ops <command>`` once installed).

Commands (``--help`` on each says more):

* ``bench``: time the operator over sequence lengths against a plain PyTorch composition (GFLOP/s table,
  ``--plot`` PNG); ``--suite`` runs the source tree's full bench/bench_forward.py instead.
* ``golden``: run the operator on inputs read from .npy files / a .safetensors / an .npz file and write the four
  outputs as .npy plus manifest.json: golden data to check another implementation (e.g. the NPU's) against.
* ``check``: compare two output sets with the rules of nsa_ops.tolerance; names the rows (t, head) that differ
  and exits with status 1 on a mismatch.
* ``select-map``: run a causal example and draw which selection blocks each query picks (PNG heat map).
* ``isa``: which CPU instruction-set path runs by default and why (``nsa_ops.cpu_isa_report()``).

Exit status: 0 success, 1 check mismatch, 2 bad arguments or input files, 3 an optional package is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

from . import tolerance

EXIT_MISMATCH, EXIT_USAGE, EXIT_MISSING = 1, 2, 3


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("nsa-ops")
    except Exception:  # PackageNotFoundError and friends: running from the source tree
        return "0.1.0 (source tree)"


def _set_threads(n: Optional[int]) -> None:
    if n is not None:
        import torch

        if n < 1:
            raise ValueError(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)  # the binding passes torch.get_num_threads() to the CPU backend


def _int_list(text: str, name: str) -> list:
    try:
        out = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not out:
        raise ValueError(f"{name} must name at least one value")
    return out


# ------------------------------------------------------------------------------------------------ bench
def _suite_path() -> Optional[Path]:
    from . import _lib

    p = _lib._REPO_ROOT / "bench" / "bench_forward.py"
    return p if p.is_file() else None


def cmd_bench(args) -> int:
    _set_threads(args.threads)
    if args.suite:
        path = _suite_path()
        if path is None:
            print("bench --suite runs bench/bench_forward.py of the source tree, which is not here (an installed "
                  "package has only the compact benchmark: drop --suite)", file=sys.stderr)
            return EXIT_USAGE
        import importlib.util

        spec = importlib.util.spec_from_file_location("nsa_bench_forward", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        argv = list(args.suite_argv)
        if args.threads is not None and "--threads" not in argv:
            argv += ["--threads", str(args.threads)]
        return int(mod.main(argv) or 0)

    import torch

    import nsa_ops

    from . import _bench

    if args.plot:
        from .viz import require_matplotlib

        require_matplotlib()  # fail before the measurements, not after
    lens = _int_list(args.seq_lens, "--seq-lens")
    if args.dtype not in _bench.DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(_bench.DTYPES)}, got {args.dtype!r}")
    cases = [_bench.make_case(f"T={n}", args.dtype, [n], N1=args.heads, N2=args.kv_heads, D=args.dim, D2=args.dim_v,
                              l=args.compress_block_size, d=args.compress_stride, lp=args.select_block_size, K=args.topk)
             for n in lens]
    detected, active = nsa_ops.cpu_isa()
    basis = nsa_ops.cpu_isa_report().basis
    header = (f"nsa_ops {_version()} ({nsa_ops.library_path()}), torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, CPU ISA {active} (detected {detected}, chosen by {basis}); "
              f"median of {args.repeat} runs after {args.warmup} warm-up(s)")
    print(header)
    shape = cases[0].shape_str().replace(f"T={lens[0]} C={cases[0].cmp_lens[0]} ", "").replace(" masks", "")
    print(f"cases: {shape} {args.dtype}, causal masks of docs/spec/compress_attention.md §9; "
          f"T = {', '.join(map(str, lens))}", flush=True)
    results = _bench.run(cases, warmup=args.warmup, repeat=args.repeat, baseline=not args.no_composition,
                         seed=args.seed, progress=not args.no_progress)
    print(_bench.table(results))
    print("useful GFLOP = 2 * N1 * (D + D2) * (query, compressed token) pairs that atten_mask keeps; "
          "speed-up = composition time / nsa_ops time")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "results": results}, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        c = cases[0]
        title = (f"causal compressed attention, {c.dtype}, N1={c.N1} N2={c.N2} D={c.D} D2={c.D2} "
                 f"l={c.l} d={c.d} l'={c.lp} K={c.K}\n{torch.get_num_threads()} threads, CPU ISA {active}, "
                 f"torch {torch.__version__}, nsa_ops {_version()}")
        _bench.plot(results, args.plot, title)
        print(f"wrote {args.plot}")
    return 0


# ------------------------------------------------------------------------------------------------ isa
def cmd_isa(args) -> int:
    import nsa_ops

    r = nsa_ops.cpu_isa_report()
    if args.json:
        print(json.dumps(r._asdict(), indent=1))
        return 0
    print(f"CPU: {r.cpu}")
    print(f"detected:  {r.detected} (the best path cpuid + XCR0 allow)")
    print(f"preferred: {r.preferred} (the fastest path here, before NSA_CPU_ISA)")
    print(f"active:    {r.active} (what runs unless a path is forced)")
    print(f"chosen by: {r.basis}")
    print(f"why:       {r.reason}")
    return 0


# ------------------------------------------------------------------------------------------------ golden
def cmd_golden(args) -> int:
    from . import golden

    _set_threads(args.threads)
    inputs = golden.load_inputs(args.source, args.args, case=args.case, round_inputs=args.round_inputs)
    t0 = time.perf_counter()
    outputs = golden.run_golden(inputs, args.backend)
    elapsed = time.perf_counter() - t0
    manifest = golden.write_outputs(args.output, outputs, inputs, backend=args.backend,
                                    bf16_storage=args.bf16_storage)
    q, k, v = inputs.query, inputs.key, inputs.value
    print(f"golden: {inputs.source} ({inputs.dtype}): query {list(q.shape)}, key {list(k.shape)}, "
          f"value {list(v.shape)}, B = {len(inputs.lengths['actual_seq_qlen'])}, backend {args.backend} "
          f"({elapsed * 1e3:.1f} ms)")
    for name, e in manifest["outputs"].items():
        print(f"  {args.output}/{e['file']}: {e['shape']} {e['storage']}")
    print(f"  {args.output}/manifest.json")
    return 0


# ------------------------------------------------------------------------------------------------ check
def _peek_dtype(path: str) -> Optional[str]:
    mp = Path(path) / "manifest.json"
    if mp.is_file():
        try:
            return json.loads(mp.read_text()).get("dtype")
        except json.JSONDecodeError:
            return None
    return None


def cmd_check(args) -> int:
    from . import golden

    seq = _int_list(args.seq_qlen, "--seq-qlen") if args.seq_qlen else None
    dtype = args.dtype or _peek_dtype(args.expected) or _peek_dtype(args.actual)
    inputs = None
    if args.inputs:
        inputs = golden.load_inputs(args.inputs, args.args, case=args.case, round_inputs=args.round_inputs)
        dtype = dtype or inputs.dtype
        seq = seq or inputs.lengths["actual_seq_qlen"]
    a = golden.load_outputs(args.actual, dtype=dtype, seq_qlen=seq)
    b = golden.load_outputs(args.expected, dtype=dtype, seq_qlen=seq)
    res = golden.compare(a, b, inputs=inputs, out_ulps=args.out_ulps, out_acc_rtol=args.out_acc_rtol,
                         stats_rtol=args.stats_rtol,
                         stats_atol=args.stats_atol)
    print(f"check: {args.actual} against {args.expected}")
    print(res.report(limit=args.max_rows))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "ok": res.ok, "summary": res.summary, "notes": res.notes,
            "differences": [{"output": d.output, "t": d.t, "head": d.head, "batch": d.batch, "s": d.s,
                             "detail": d.detail} for d in res.differences]}, indent=1) + "\n")
    return 0 if res.ok else EXIT_MISMATCH


# ------------------------------------------------------------------------------------------------ select-map
def cmd_select_map(args) -> int:
    import torch

    import nsa_ops

    from . import viz

    viz.require_matplotlib()
    _set_threads(args.threads)
    T, N1, N2 = args.tokens, args.heads, args.kv_heads
    l, d, lp, K = args.compress_block_size, args.compress_stride, args.select_block_size, args.topk
    if N2 < 1 or N1 % N2:
        raise ValueError(f"--heads ({N1}) must be a multiple of --kv-heads ({N2})")
    C = nsa_ops.compressed_lengths([T], l, d)[0]
    if C < 1:
        raise ValueError(f"--tokens {T} gives no compressed token (need >= {l})")
    Sel = nsa_ops.selection_lengths([C], d, lp)[0]
    if K > Sel:
        raise ValueError(f"--topk {K} exceeds the {Sel} selection blocks of {T} tokens")
    if not 0 <= args.kv_head < N2:
        raise ValueError(f"--kv-head must be in [0, {N2}), got {args.kv_head}")
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    g = torch.Generator().manual_seed(args.seed)
    q = torch.randn(T, N1, args.dim, generator=g)
    k = torch.randn(C, N2, args.dim, generator=g)
    v = torch.randn(C, N2, args.dim_v, generator=g)
    landmarks = []
    if args.pattern == "planted":
        # A shared direction in every query and in the keys of a few "landmark" selection blocks: each query
        # attends to the landmarks it can see, so they show as columns starting at the causal frontier.
        # Block k scores the compressed tokens c in [M(k+1) - (M+N-2), M(k+1)] (docs/spec/compress_attention.md §3.5); those in
        # [Mk+1, Mk+M-N+1] count for block k alone, so a landmark lights up one column.
        M, Nw = lp // d, l // d
        u = torch.randn(args.dim, generator=g)
        u = u / u.norm()
        landmarks = sorted({int(x) for x in torch.linspace(Sel * 0.15, Sel * 0.8, 4).round().tolist()})
        q += 1.0 * u
        for blk in landmarks:
            lo, hi = blk * M + 1, blk * M + M - Nw + 2
            if lo >= hi:
                lo, hi = blk * M, (blk + 1) * M
            k[lo:min(C, hi)] += 4.0 * math.sqrt(args.dim) * u  # +4 on the scaled score
    am = nsa_ops.make_atten_mask(T, C, l, d)
    tm = nsa_ops.make_topk_mask(T, Sel, lp)
    out = nsa_ops.npu_nsa_compress_attention(q.to(dt), k.to(dt), v.to(dt), 1.0 / math.sqrt(args.dim), N1, l, d, lp,
                                             K, topk_mask=tm, atten_mask=am, actual_seq_qlen=[T],
                                             actual_cmp_seq_kvlen=[C])
    zero = viz.zero_score_blocks(am, T, C, l, d, lp)
    masked = viz.fully_masked_rows(am, T, C)
    title = (f"top-{K} of {Sel} selection blocks per query, KV head {args.kv_head}\n"
             f"causal, {T} tokens, l = {l}, d = {d}, l' = {lp}, G = {N1 // N2}, {args.pattern} keys"
             + (f" (landmark blocks {', '.join(map(str, landmarks))})" if landmarks else ""))
    path = viz.plot_selection(out.topk_indices if hasattr(out, "topk_indices") else out[1], tm, args.kv_head,
                              args.output, num_blocks=Sel, zero_score=zero, masked_rows=masked, title=title)
    extra = f"; landmark blocks {landmarks}" if landmarks else ""
    print(f"select-map: {T} tokens, C = {C}, Sel = {Sel}, K = {K}{extra}; wrote {path}")
    return 0


# ------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    ap = argparse.ArgumentParser(prog="python -m nsa_ops", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"nsa-ops {_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add_command(name: str, func, help: str, description: str, **defaults) -> argparse.ArgumentParser:
        """The subparser of command `name`: main() runs func(args); defaults are further parser-level defaults."""
        p = sub.add_parser(name, formatter_class=fmt, help=help, description=description)
        p.set_defaults(func=func, **defaults)
        return p

    def add_shape(p, tokens_help: bool = False):
        p.add_argument("--heads", type=int, default=32, help="query heads N1")
        p.add_argument("--kv-heads", type=int, default=2, help="key/value heads N2 (N1 %% N2 == 0)")
        p.add_argument("--dim", type=int, default=192, help="head dimension D of query and key")
        p.add_argument("--dim-v", type=int, default=128, help="head dimension D2 of value (<= D)")
        p.add_argument("--compress-block-size", type=int, default=32, help="l")
        p.add_argument("--compress-stride", type=int, default=16, help="d")
        p.add_argument("--select-block-size", type=int, default=64, help="l'")
        p.add_argument("--topk", type=int, default=16, help="select_block_count K")
        p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="element type")
        p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
        p.add_argument("--threads", type=int, default=None,
                       help="threads (torch.set_num_threads; the operator uses torch.get_num_threads())")

    p = add_command("bench", cmd_bench, help="time the operator against a plain PyTorch composition",
                    description="Times the operator on one causal sequence per length (docs/spec/compress_attention.md §9 masks) and the "
                    "same computation as plain PyTorch ops; prints a table of time, useful GFLOP/s "
                    "(2*N1*(D+D2)*visible pairs / s) and the speed-up. A progress bar runs on stderr (tqdm if "
                    "installed). --suite runs the source tree's bench/bench_forward.py instead.", suite_argv=[])
    p.add_argument("--seq-lens", default="1024,2048,4096,8192", help="comma-separated sequence lengths (tokens)")
    add_shape(p)
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs per method")
    p.add_argument("--repeat", type=int, default=3, help="measured runs per method (median kept)")
    p.add_argument("--no-composition", action="store_true", help="skip the PyTorch composition baseline")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--plot", metavar="PNG", help="plot throughput against sequence length (needs matplotlib)")
    p.add_argument("--json", metavar="FILE", help="write every figure to this JSON file")
    p.add_argument("--suite", action="store_true",
                   help="run bench/bench_forward.py of the source tree (its cases, baselines, peak and table) with "
                        "every argument after --suite, e.g. `bench --suite --cases bench-8k --markdown` "
                        "(`bench --suite --help` lists them)")

    p = add_command("golden", cmd_golden, help="write golden outputs (.npy + manifest) for given inputs",
                    description="Runs the operator on inputs from SOURCE and writes attention_out.npy, "
                    "topk_indices.npy, softmax_max.npy, softmax_sum.npy and manifest.json into --output. "
                    "SOURCE: a directory of .npy files (query, key, value, atten_mask, topk_mask, optionally "
                    "the length lists) with args.json, a .safetensors file or an .npz file. The arguments JSON "
                    "holds scale_value, head_num, compress_block_size, compress_stride, select_block_size, "
                    "select_block_count, actual_seq_qlen, actual_cmp_seq_kvlen (prefix sums), optionally "
                    "actual_sel_seq_kvlen and dtype (bf16/fp16/fp32). bf16 inputs: uint16 bit patterns, or "
                    "float32 values exactly representable in bf16. bf16 attention_out is written as float32 "
                    "holding the exact bf16 values (or --bf16-storage uint16: bit patterns); the manifest "
                    "says which. softmax_max/sum keep the operator's docs/spec/compress_attention.md §4 per-batch layout.")
    p.add_argument("source", help="input directory, .safetensors or .npz file")
    p.add_argument("-o", "--output", required=True, help="output directory (created)")
    p.add_argument("--args", default=None,
                   help="arguments JSON (default: SOURCE/args.json for a directory, the .safetensors metadata "
                        "entry nsa_args, or SOURCE with .json); may be a list of cases with names")
    p.add_argument("--case", default=None, help="which entry of a list-of-cases JSON (default: SOURCE's stem)")
    p.add_argument("--backend", default="cpu", choices=["cpu", "reference"],
                   help="cpu: the optimized operator; reference: the plain-loop oracle (slow)")
    p.add_argument("--bf16-storage", default="float32", choices=["float32", "uint16"],
                   help="how bf16 attention_out is stored in the .npy")
    p.add_argument("--round-inputs", action="store_true",
                   help="round float inputs to the dtype instead of rejecting values it cannot hold exactly")
    p.add_argument("--threads", type=int, default=None, help="threads (torch.set_num_threads)")

    p = add_command("check", cmd_check, help="compare two output sets with the rules of nsa_ops.tolerance",
                    description="Compares ACTUAL (e.g. the NPU's outputs) with EXPECTED (e.g. golden data) by "
                    "the rules of nsa_ops.tolerance: topk_indices identical (with --inputs: near ties of computed "
                    "scores may be ordered differently), softmax_max/sum within rtol + atol, attention_out "
                    "within --out-ulps units in the last place of the dtype (or --out-acc-rtol x max|expected|; "
                    "with --inputs, a row beyond that passes when every element of ACTUAL lies within the "
                    "per-element bound of the fp64 model of docs/spec/compress_attention.md §3). Each output "
                    "set is a directory written by `golden` (or any directory with the four .npy files), an "
                    ".npz or a .safetensors file. Prints the rows (t, head) that differ; exit status 1 on a "
                    "mismatch.")
    p.add_argument("actual", help="output set to check")
    p.add_argument("expected", help="reference output set (golden data)")
    p.add_argument("--inputs", default=None,
                   help="the inputs both were computed from (as for `golden`): enables the tie tolerance of "
                        "topk_indices and the per-element model bound of attention_out")
    p.add_argument("--args", default=None, help="arguments JSON of --inputs (as for `golden`)")
    p.add_argument("--case", default=None, help="entry of a list-of-cases arguments JSON")
    p.add_argument("--round-inputs", action="store_true", help="as for `golden`")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="dtype of attention_out when no manifest says it")
    p.add_argument("--seq-qlen", default=None,
                   help="actual_seq_qlen (comma-separated prefix sums) when no manifest says it")
    p.add_argument("--out-ulps", type=int, default=2, help="attention_out tolerance in ulps of the dtype")
    p.add_argument("--out-acc-rtol", type=float, default=1e-6,
                   help="attention_out also passes within this x max|expected attention_out| (fp32 accumulation "
                        "order; matters for values that cancel to near 0)")
    p.add_argument("--stats-rtol", type=float, default=tolerance.STATS_RTOL,
                   help="softmax_max/sum relative tolerance")
    p.add_argument("--stats-atol", type=float, default=tolerance.STATS_MAX_ATOL,
                   help="softmax_max/sum absolute tolerance")
    p.add_argument("--max-rows", type=int, default=20, help="differing rows to print")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")

    p = add_command("select-map", cmd_select_map, help="draw which blocks each query selects (PNG)",
                    description="Runs a causal example (docs/spec/compress_attention.md §9 masks from nsa_ops.make_atten_mask / "
                    "make_topk_mask) and writes a heat map of topk_indices: query position against selection "
                    "block, forced blocks and docs/spec/compress_attention.md §5 zero-score fillers in their own colours. "
                    "--pattern planted adds a few landmark blocks every query is drawn to. Needs matplotlib.")
    p.add_argument("-o", "--output", default="selection.png", help="PNG to write")
    p.add_argument("--tokens", type=int, default=4096,
                   help="sequence length T (4096 with l' = 64: 64 selection blocks, of which --topk 16 are kept)")
    add_shape(p)
    p.set_defaults(heads=4, kv_heads=1, dim=64, dim_v=64)
    p.add_argument("--kv-head", type=int, default=0, help="KV head to draw")
    p.add_argument("--pattern", default="planted", choices=["planted", "random"],
                   help="random: standard normal q/k/v; planted: + landmark blocks")

    p = add_command("isa", cmd_isa, help="which CPU instruction-set path runs by default, and why",
                    description="Prints nsa_ops.cpu_isa_report(): the path cpuid + XCR0 allow, the fastest path "
                    "on this CPU (for bf16 inputs: the vdpbf16ps path avx512bf16 or the fp32 FMA path avx512, "
                    "from a table of known CPUs, else a one-time calibration), the active path after "
                    "NSA_CPU_ISA, and the reason.")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return ap


def main(argv: Optional[list] = None) -> int:
    ap = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    suite_argv = []
    if argv[:1] == ["bench"] and "--suite" in argv:  # the rest belongs to bench_forward.py
        i = argv.index("--suite")
        argv, suite_argv = argv[:i + 1], argv[i + 1:]
    args = ap.parse_args(argv)
    if args.command == "bench":
        args.suite_argv = suite_argv
    from .golden import GoldenError
    from .viz import MissingDependency

    try:
        return int(args.func(args) or 0)
    except MissingDependency as e:
        print(f"nsa_ops {args.command}: {e}", file=sys.stderr)
        return EXIT_MISSING
    except (GoldenError, ValueError, FileNotFoundError) as e:
        print(f"nsa_ops {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:  # the operator's argument checks (docs/spec/compress_attention.md §6) name the argument
        print(f"nsa_ops {args.command}: the operator rejected the inputs: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
