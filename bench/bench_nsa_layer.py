#!/usr/bin/env python3
"""The whole NSA layer (nsa_ops.NSAAttention, docs/spec/nsa_layer.md) forward + backward on CPU, against the same
layer with dense causal attention and against the reference composition in plain PyTorch; time and peak memory of
each (see bench/README.md, "NSA layer").

Variants, each measured in its own child process (so that its peak resident set is its own):

* **nsa**: ``out = NSAAttention(x, cu)``, then ``out.backward(dy)`` (gradients of the seven parameters and of x);
* **dense**: the same module's q/k/v/o projections (same weights), attention by
  ``torch.nn.functional.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` per sequence, flash kernel
  forced (V zero-padded to Dqk inside the timed call: the CPU flash kernel needs Dv = Dqk), no gates, no
  compression; forward + backward as for nsa;
* **reference**: ``nsa_ops.reference.nsa_layer_reference`` (docs/spec/nsa_layer.md §7) evaluated in the layer's
  dtype (the "plain same-dtype implementation": dense [S, N1, S] masked tensors per sequence), forward + backward
  by autograd.

Per variant: the median wall time of forward + backward (``--repeat`` runs after ``--warmup``), the CPU time per
thread of the same runs, the child's resident set before the first call (``base``: library, parameters, inputs),
its peak (VmHWM of /proc/self/status) and the bytes autograd saved for the backward during one forward (unique
storages packed by ``torch.autograd.graph.saved_tensors_hooks``: the activations). A child runs under an
address-space limit (``--mem-cap-gb``) and a timeout (``--child-timeout``); a variant that exceeds either is
reported as such, not measured. The reference is skipped where its estimated memory (about 12 dense [S, N1, S]
tensors) exceeds the cap, unless ``--force-reference``.

    .venv/bin/python bench/bench_nsa_layer.py                    # 2k, 8k, 32k (dense at 32k dominates: ~5 min)
    .venv/bin/python bench/bench_nsa_layer.py --cases 8k --variants nsa,dense --markdown
    .venv/bin/python bench/bench_nsa_layer.py --quick            # tiny sizes, a few seconds (the test suite)
    .venv/bin/python bench/bench_nsa_layer.py --list
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
CHILD_TAG = "NSA_LAYER_BENCH_RESULT "


@dataclasses.dataclass
class LayerCase:
    name: str
    seq_lens: list
    hidden: int = 2048
    N1: int = 32
    N2: int = 2
    Dqk: int = 192
    Dv: int = 128
    l: int = 32
    d: int = 16
    lp: int = 64
    K: int = 16
    window: int = 512
    dtype: str = "bf16"
    warmup: int = 1            # defaults of this case (--warmup / --repeat override them)
    repeat: int = 3

    @property
    def T(self) -> int:
        return sum(self.seq_lens)

    def shape_str(self) -> str:
        lens = self.seq_lens if len(self.seq_lens) <= 4 else f"{len(self.seq_lens)} seqs"
        return (f"T={self.T} {lens} H={self.hidden} N1={self.N1} N2={self.N2} Dqk={self.Dqk} Dv={self.Dv} "
                f"l={self.l} d={self.d} l'={self.lp} K={self.K} w={self.window}")

    def module_args(self) -> tuple:
        return (self.hidden, self.N1, self.N2, self.Dqk, self.Dv, self.l, self.d, self.lp, self.K, self.window)


# The paper's block sizes (l = 32, d = 16, l' = 64, K = 16, w = 512) and head dimensions (Dqk = 192, Dv = 128) with
# the head counts of bench_window_attention.py (N1 = 32 over N2 = 2, GQA groups of 16), H = 2048; bf16, the dtype the
# layer trains in. At 32k a dense causal run takes minutes: one run, no warm-up.
CASES = {
    "2k": LayerCase("2k", [2048]),
    "8k": LayerCase("8k", [8192]),
    "32k": LayerCase("32k", [32768], warmup=0, repeat=1),
    "8k-varlen": LayerCase("8k-varlen", [1024, 1536, 2560, 3072]),
    "8k-fp32": LayerCase("8k-fp32", [8192], dtype="fp32"),
    "quick": LayerCase("quick", [320, 192], hidden=64, N1=4, N2=2, Dqk=32, Dv=32, K=4, window=64, warmup=0,
                       repeat=1),
}
DEFAULT_CASES = ["2k", "8k", "32k"]
VARIANTS = ("nsa", "dense", "reference")


# ------------------------------------------------------------------------------------------------ child
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def child_main(spec: dict) -> int:
    """Measures one (case, variant) in this process and prints one result line (CHILD_TAG + JSON)."""
    import resource

    if spec.get("mem_cap_bytes"):
        cap = int(spec["mem_cap_bytes"])
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    sys.path.insert(0, str(HERE.parent))
    import torch
    import torch.nn.functional as F

    import benchlib as bl

    case = LayerCase(**spec["case"])
    variant = spec["variant"]
    threads = bl.set_threads(spec["threads"])
    nsa_ops = bl.import_nsa_ops()
    from nsa_ops.reference import nsa_layer_reference

    dt = bl.DTYPES[case.dtype]
    torch.manual_seed(spec["seed"])
    layer = nsa_ops.NSAAttention(*case.module_args(), dtype=dt)
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    x = torch.randn(case.T, case.hidden, generator=g).to(dt).requires_grad_(True)
    dy = torch.randn(case.T, case.hidden, generator=g).to(dt)
    cu = [0]
    for L in case.seq_lens:
        cu.append(cu[-1] + L)
    leaves = [x] + list(layer.parameters())

    def dense_forward():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        T = x.shape[0]
        q = layer.q_proj(x).view(T, case.N1, case.Dqk)
        k = layer.k_proj(x).view(T, case.N2, case.Dqk)
        v = layer.v_proj(x).view(T, case.N2, case.Dv)
        outs = []
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            for b, L in enumerate(case.seq_lens):
                s0 = cu[b]
                qb = q[s0:s0 + L].transpose(0, 1).unsqueeze(0)                 # [1, N1, L, Dqk]
                kb = k[s0:s0 + L].transpose(0, 1).unsqueeze(0)
                vb = F.pad(v[s0:s0 + L].transpose(0, 1).unsqueeze(0), (0, case.Dqk - case.Dv))
                o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=case.Dqk ** -0.5,
                                                   enable_gqa=case.N1 != case.N2)
                outs.append(o[0, :, :, :case.Dv].transpose(0, 1))               # [L, N1, Dv]
        return layer.o_proj(torch.cat(outs).reshape(T, case.N1 * case.Dv))

    params = dict(layer.named_parameters())
    forward = {
        "nsa": lambda: layer(x, cu),
        "dense": dense_forward,
        "reference": lambda: nsa_layer_reference(params, x, cu, layer.config, dtype=dt).output,
    }[variant]

    result = {"case": case.name, "variant": variant, "threads": threads, "isa": bl.isa_str(nsa_ops)}
    result["base_rss_kb"] = _status_kb("VmRSS")
    # Activations: bytes of the unique storages autograd packs for the backward during a forward (hooks active in
    # every timed run, the largest figure of a run kept; the hook only records the storage).
    saved = {"run": {}, "max": 0}

    def pack(t):
        st = t.untyped_storage()
        saved["run"][(st.data_ptr(), st.nbytes())] = st.nbytes()
        return t

    def measured_step():
        saved["run"] = {}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward()
        saved["max"] = max(saved["max"], sum(saved["run"].values()))
        saved["run"] = {}
        out.backward(dy)
        for t in leaves:
            t.grad = None

    try:
        timing = bl.time_fn(measured_step, spec["warmup"], spec["repeat"], spec["budget"], threads)
    except (MemoryError, RuntimeError) as e:
        text = f"{type(e).__name__}: {e}"
        oom = isinstance(e, MemoryError) or "alloc" in str(e).lower() or "memory" in str(e).lower()
        result["error"] = ("out of memory under the cap" if oom else "failed") + f" ({text[:300]})"
        result["peak_rss_kb"] = _status_kb("VmHWM")
        print(CHILD_TAG + json.dumps(result), flush=True)
        return 0
    result["saved_bytes"] = saved["max"]
    result.update(wall_s=timing.median, runs_s=timing.runs, cpu_per_thread_s=timing.cpu_per_thread,
                  cpu_s=timing.cpu, warmup=timing.warmup, peak_rss_kb=_status_kb("VmHWM"),
                  grad_bytes=sum(t.numel() * t.element_size() for t in leaves))
    print(CHILD_TAG + json.dumps(result), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------ parent
def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_child(case: LayerCase, variant: str, args, threads: int) -> dict:
    spec = {"case": dataclasses.asdict(case), "variant": variant, "threads": threads, "seed": args.seed,
            "warmup": case.warmup if args.warmup is None else args.warmup,
            "repeat": case.repeat if args.repeat is None else args.repeat, "budget": args.budget,
            "mem_cap_bytes": int(args.mem_cap_gb * 2 ** 30) if args.mem_cap_gb > 0 else 0}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(HERE), "--child", json.dumps(spec)], capture_output=True,
                              text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"case": case.name, "variant": variant, "error": f"timed out after {args.child_timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_TAG)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        why = ("killed by signal " + str(-proc.returncode)) if proc.returncode < 0 else f"exit {proc.returncode}"
        return {"case": case.name, "variant": variant, "error": f"child {why}: {' | '.join(tail)[:400]}"}
    res = json.loads(lines[-1][len(CHILD_TAG):])
    res["child_wall_s"] = time.perf_counter() - t0
    return res


def reference_estimate_bytes(case: LayerCase) -> int:
    """Peak memory the reference composition needs, estimated: it holds about 12 dense [S, N1, S] tensors of the
    layer's dtype for the longest sequence at its peak (3.3 GB measured at S = 2048 with 32 heads in bf16, where one
    such tensor is 256 MiB)."""
    size = 2 if case.dtype in ("bf16", "fp16") else 4
    return 12 * max(case.seq_lens) ** 2 * case.N1 * size


def mb(kb_or_bytes, unit: str = "kb") -> str:
    if kb_or_bytes is None:
        return "-"
    return f"{kb_or_bytes / (1024 if unit == 'kb' else 2 ** 20):.0f}"


def table(results: list, bl, markdown: bool) -> str:
    head = ["case", "variant", "fwd+bwd ms", "CPU ms/thread", "vs nsa (CPU)", "peak RSS MB", "base RSS MB",
            "peak - base MB", "saved for bwd MB", "note"]
    rows = []
    for r in results:
        ours = next((o for o in results if o["case"] == r["case"] and o["variant"] == "nsa" and "error" not in o),
                    None)
        if "error" in r:
            rows.append([r["case"], r["variant"], "-", "-", "-", mb(r.get("peak_rss_kb")), mb(r.get("base_rss_kb")),
                         "-", mb(r.get("saved_bytes"), "b"), r["error"][:120]])
            continue
        ratio = "-" if ours is None else f"{r['cpu_per_thread_s'] / ours['cpu_per_thread_s']:.2f}x"
        runs = len(r["runs_s"])
        rows.append([r["case"], r["variant"], bl.fmt_ms(r["wall_s"]), bl.fmt_ms(r["cpu_per_thread_s"]), ratio,
                     mb(r["peak_rss_kb"]), mb(r["base_rss_kb"]), mb(r["peak_rss_kb"] - r["base_rss_kb"]),
                     mb(r["saved_bytes"], "b"), f"{runs} run{'s' if runs > 1 else ''}, {r['warmup']} warm-up"])
    return bl.render_table(head, rows, markdown)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(json.loads(argv[1]))
    sys.path.insert(0, str(HERE.parent))
    import benchlib as bl

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.add_common_arguments(ap, "variant", "(unused here)")
    ap.set_defaults(warmup=None, repeat=None)   # None: the case's own (1 + 3 runs; 32k: 0 + 1)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of " + ", ".join(VARIANTS))
    ap.add_argument("--quick", action="store_true", help="the tiny 'quick' case only, no peak probe (seconds)")
    ap.add_argument("--mem-cap-gb", type=float, default=None,
                    help="address-space limit of each child in GiB (default: 60 %% of MemAvailable at start, at "
                         "most 16; 0: none)")
    ap.add_argument("--force-reference", action="store_true",
                    help="run the reference even where its estimated memory exceeds the cap (it is skipped there)")
    ap.add_argument("--child-timeout", type=float, default=1800.0, help="seconds per variant (default 1800)")
    args = ap.parse_args(argv)
    if args.list:
        for name, c in CASES.items():
            print(f"{name:<10} {c.dtype:<5} {'default' if name in DEFAULT_CASES else '':<8} {c.shape_str()}")
        return 0
    if args.quick:
        args.cases, args.no_probe = "quick", True
    names = bl.case_names(args.cases, CASES, DEFAULT_CASES)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if names is None or bad or not variants:
        if bad or not variants:
            print(f"unknown variant(s): {', '.join(bad) or '(none)'}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if args.mem_cap_gb is None:
        args.mem_cap_gb = min(16.0, 0.6 * mem_available_bytes() / 2 ** 30)
    warmup, repeat = args.warmup, args.repeat
    if warmup is None or repeat is None:           # for the printed header only: the cases' own counts
        args.warmup = warmup if warmup is not None else "1 (32k: 0)"
        args.repeat = repeat if repeat is not None else "3 (32k: 1)"
    threads, _, peak, header = bl.start(args, "variant", "; CPU time per thread printed beside")
    args.warmup, args.repeat = warmup, repeat
    header.append(f"each variant in its own process, address space capped at {args.mem_cap_gb:.1f} GiB"
                  if args.mem_cap_gb > 0 else "each variant in its own process, no memory cap")
    print(header[-1], flush=True)
    results = []
    for n in names:
        case = CASES[n]
        print(f"\n== {case.name} ({case.dtype}): {case.shape_str()}", flush=True)
        for variant in variants:
            need = reference_estimate_bytes(case)
            if variant == "reference" and not args.force_reference and 0 < args.mem_cap_gb * 2 ** 30 < need:
                r = {"case": case.name, "variant": variant,
                     "error": f"skipped: needs about {need / 2 ** 30:.0f} GiB > the cap (--force-reference runs it)"}
            else:
                r = run_child(case, variant, args, threads)
            results.append(r)
            if "error" in r:
                print(f"   {variant:<9}: {r['error']}", flush=True)
            else:
                print(f"   {variant:<9}: fwd+bwd {bl.fmt_ms(r['wall_s']):>8} ms (runs "
                      f"{', '.join(bl.fmt_ms(t) for t in r['runs_s'])}; CPU per thread "
                      f"{bl.fmt_ms(r['cpu_per_thread_s'])} ms); RSS base {mb(r['base_rss_kb'])} MB, peak "
                      f"{mb(r['peak_rss_kb'])} MB; saved for backward {mb(r['saved_bytes'], 'b')} MB", flush=True)
    return bl.finish(args, header, peak, results, table(results, bl, args.markdown),
                     "fwd+bwd = one forward and backward of the layer (gradients of x and of every parameter), "
                     "median wall time; CPU ms/thread = process CPU time of the same runs / threads; vs nsa = the "
                     "variant's CPU time / NSAAttention's; dense = same projections + SDPA flash is_causal; "
                     "reference = nsa_layer_reference in the layer's dtype; base RSS = resident set before the "
                     "first call (library, parameters, inputs); peak RSS = the child's VmHWM; saved for bwd = "
                     "unique storages autograd keeps from one forward (the activations).")


if __name__ == "__main__":
    sys.exit(main())
