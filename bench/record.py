"""Records the benchmark figures of this machine and renders the README's performance tables from them.

    .venv/bin/python bench/record.py run [--threads 2] [--only forward,backward]   # measure, save, render
    .venv/bin/python bench/record.py render                                       # README from the saved files

`run` executes each benchmark script of bench/ with ``--markdown --json-out`` (one after the other, nothing else
should run meanwhile), and writes ``bench/results/<cpu>.json``: the CPU model, its ISA path, the commit, the date,
the thread count, each benchmark's markdown table and legend, and its raw JSON. It also appends a dated entry
to ``bench/RESULTS.md`` (the history). `render` rewrites the part of README.md between the markers
``<!-- results:begin -->`` and ``<!-- results:end -->``: one section per CPU, the latest record of each.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS_DIR = BENCH / "results"
README = REPO / "README.md"
HISTORY = BENCH / "RESULTS.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
# What this script writes, relative to the repository: changes there do not change what is measured (benchlib's
# '-dirty' and the record's "dirty" leave them out).
RESULT_FILES = tuple(str(p.relative_to(REPO)) for p in (README, HISTORY, RESULTS_DIR))

# (name, script, extra arguments, what the table shows). Scripts that do not exist yet are skipped.
BENCHES = [
    ("forward", "bench_forward.py", [], "compressed attention forward (`npu_nsa_compress_attention`)"),
    ("backward", "bench_backward.py", [], "compressed attention backward and forward + backward"),
    ("compress", "bench_compress.py", [], "token compression (`npu_nsa_compress`), forward and backward"),
    ("select", "bench_select_attention.py", [], "selected attention (`npu_nsa_select_attention`), forward and backward"),
    ("window", "bench_window_attention.py", [], "sliding-window attention (`npu_fusion_attention` band mode)"),
    ("decode", "bench_decode.py", [], "one decode step over paged caches (the four decode operators) against dense paged attention"),
]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                fam = model = ""
                for l2 in Path("/proc/cpuinfo").read_text().splitlines():
                    if l2.startswith("cpu family") and not fam:
                        fam = l2.split(":", 1)[1].strip()
                    if l2.startswith("model\t") and not model:
                        model = l2.split(":", 1)[1].strip()
                return f"{name} (family {fam}, model {model})" if fam else name
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def extract_markdown(stdout: str) -> str:
    """The benchmark's markdown output: its '- ' header lines, the table and the legend after it."""
    lines = stdout.splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith("- ")), None)
    if start is None:
        start = next((i for i, l in enumerate(lines) if l.startswith("|")), len(lines))
    return "\n".join(lines[start:]).strip()


def run(args) -> int:
    sys.path.insert(0, str(REPO / "python"))
    import nsa_ops  # noqa: F401  (fails early with a clear message when the library is not built)

    detected, active = nsa_ops.cpu_isa()
    isa = {"detected": detected, "active": active}
    try:  # how the path was chosen (libraries built before nsa_ops.cpu_isa_report existed lack it)
        rep = nsa_ops.cpu_isa_report()
        isa.update(preferred=rep.preferred, basis=rep.basis, reason=rep.reason)
    except (AttributeError, RuntimeError):
        pass
    model = cpu_model()
    record = {
        "cpu": model,
        "isa": isa,
        "commit": git("rev-parse", "--short", "HEAD"),
        # uncommitted changes other than the files this script writes
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".",
                          *(f":!{f}" for f in RESULT_FILES))),
        "date": _dt.date.today().isoformat(),
        "threads": args.threads,
        "benches": {},
    }
    only = set(args.only.split(",")) if args.only else None
    env = dict(os.environ)
    for name, script, extra, what in BENCHES:
        if only and name not in only:
            continue
        path = BENCH / script
        if not path.is_file():
            print(f"[record] {script}: not present, skipped", flush=True)
            continue
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            json_out = tmp.name
        cmd = [sys.executable, str(path), "--markdown", "--json-out", json_out, "--threads", str(args.threads), *extra]
        print(f"[record] {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
        sys.stdout.write(proc.stdout[-4000:])
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            print(f"[record] {script} failed (exit {proc.returncode}); not recorded", flush=True)
            continue
        raw = None
        try:
            raw = json.loads(Path(json_out).read_text())
        except (OSError, ValueError):
            pass
        finally:
            Path(json_out).unlink(missing_ok=True)
        record["benches"][name] = {"what": what, "markdown": extract_markdown(proc.stdout), "raw": raw,
                                   "commit": record["commit"], "dirty": record["dirty"], "date": record["date"]}
    if not record["benches"]:
        print("[record] nothing measured", file=sys.stderr)
        return 1
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"{slug(model)}.json"
    previous = json.loads(out.read_text()) if out.is_file() else None
    if previous and only:  # a partial run keeps the other benchmarks' latest figures
        for k, v in previous.get("benches", {}).items():
            record["benches"].setdefault(k, v)
    out.write_text(json.dumps(record, indent=1) + "\n")
    append_history(record, only)
    render()
    print(f"[record] wrote {out.relative_to(REPO)}, {HISTORY.relative_to(REPO)}, README.md", flush=True)
    return 0


def section(record: dict) -> str:
    isa = record["isa"]
    dirty = " + uncommitted changes" if record.get("dirty") else ""
    basis = f", chosen by {isa['basis']}" if isa.get("basis") else ""
    out = [f"### {record['cpu']}", "",
           f"ISA path `{isa['active']}` (detected `{isa['detected']}`{basis}), {record['threads']} threads, commit "
           f"`{record['commit']}`{dirty}, measured {record['date']} with `bench/record.py run`. "
           "`% peak` is against the attainable peak of the input dtype (bench/README.md).", ""]
    order = [n for n, *_ in BENCHES]  # the order of BENCHES, whatever order the runs recorded them in
    for name, b in sorted(record["benches"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
        # a partial run keeps the other benchmarks' figures: say when one was measured at another commit or date
        when = ""
        if (b.get("commit"), b.get("date")) != (record["commit"], record["date"]):
            dirty_b = " + uncommitted changes" if b.get("dirty") else ""
            when = f" (measured at commit `{b.get('commit', 'unknown')}`{dirty_b}, {b.get('date', 'unknown date')})"
        out += [f"**{name}**: {b['what']}{when}", "", b["markdown"], ""]
    return "\n".join(out)


def render() -> None:
    records = []
    for p in sorted(RESULTS_DIR.glob("*.json")) if RESULTS_DIR.is_dir() else []:
        records.append(json.loads(p.read_text()))
    records.sort(key=lambda r: r.get("date", ""), reverse=True)
    body = "\n".join(section(r) for r in records) if records else "_No figures recorded yet._\n"
    text = README.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
    a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
    README.write_text(text[:a] + "\n" + body.rstrip() + "\n" + text[b:])


def append_history(record: dict, only) -> None:
    entry = [f"## {record['date']}: {record['cpu']}, commit {record['commit']}", ""]
    for name, b in record["benches"].items():
        if only and name not in only:
            continue
        entry += [f"**{name}**: {b['what']}", "", b["markdown"], ""]
    text = HISTORY.read_text() if HISTORY.is_file() else "# Benchmark history\n\n"
    marker = "<!-- newest first -->"
    if marker in text:
        i = text.index(marker) + len(marker)
        text = text[:i] + "\n\n" + "\n".join(entry) + text[i:]
    else:
        text += "\n" + "\n".join(entry)
    HISTORY.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the benchmarks, save bench/results/<cpu>.json, render README")
    r.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    r.add_argument("--only", help="comma-separated subset of: " + ", ".join(n for n, *_ in BENCHES))
    sub.add_parser("render", help="rewrite README's results block from bench/results/*.json")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        return run(args)
    render()
    return 0


if __name__ == "__main__":
    sys.exit(main())
