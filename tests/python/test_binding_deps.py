"""The operator library links only the torch it runs with.

A binding that needs two torch installations (say the .venv's torch and Debian's libtorch-dev, whose
libc10.so.1.13 sits in /usr/lib/<arch>) loads two copies of c10: its first exception (an argument error)
then crashes the process. torch_binding/CMakeLists.txt links only the configured torch's files; these tests
check the built library itself:

* its shared-library dependencies as the dynamic loader resolves them (``ldd``): every libc10* / libtorch* /
  libshm* lies in the lib directory of the torch imported here, none is missing, and c10 and torch are there;
* the running process: after ``import nsa_ops`` no c10/torch library is mapped from anywhere else.

Run as a script, it checks one library file and exits 1 with the list of offending dependencies
(scripts/setup.sh runs it on the freshly built binding):

    .venv/bin/python tests/python/test_binding_deps.py build/torch_binding/libnsa_ops_torch.so
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

# torch's own libraries: c10, torch, torch_cpu, torch_python, torch_global_deps, shm (and their CUDA kin).
TORCH_LIB_NAME = re.compile(r"^lib(c10|torch|shm)[^/]*\.so")


def torch_lib_dir() -> Path:
    """The lib directory of the torch this interpreter imports (symbolic links resolved)."""
    import torch

    return (Path(torch.__file__).parent / "lib").resolve()


def parse_ldd(text: str) -> list[tuple[str, str | None]]:
    """ldd's output as (name, resolved path or None when not found); the vdso and the loader are skipped."""
    deps = []
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"^(\S+) => (not found|(\S+) \(0x[0-9a-f]+\))$", line)
        if m:
            deps.append((m.group(1), m.group(3)))
    return deps


def ldd(lib: str | os.PathLike) -> list[tuple[str, str | None]]:
    """The shared libraries `lib` needs, resolved by the dynamic loader (ldd, RUNPATH and all)."""
    out = subprocess.run(["ldd", os.fspath(lib)], check=True, capture_output=True, text=True).stdout
    return parse_ldd(out)


def inside(path: str | os.PathLike, directory: Path) -> bool:
    return Path(path).resolve().is_relative_to(directory)


def foreign_torch_deps(deps: list[tuple[str, str | None]], lib_dir: Path) -> list[str]:
    """The torch libraries among `deps` that are missing or lie outside `lib_dir`, as readable lines."""
    bad = []
    for name, path in deps:
        if not TORCH_LIB_NAME.match(name):
            continue
        if path is None:
            bad.append(f"{name} => not found")
        elif not inside(path, lib_dir):
            bad.append(f"{name} => {path} (outside {lib_dir})")
    return bad


def mapped_files() -> list[str]:
    """Files mapped into this process (/proc/self/maps), each once."""
    files = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/"):
                path = parts[5].strip()
                if path not in files:
                    files.append(path)
    return files


# ------------------------------------------------------------------------------------------------ tests

def _library() -> str:
    import nsa_ops

    path = nsa_ops.library_path()
    assert path is not None and os.path.isfile(path), path
    return path


def test_library_links_only_the_imported_torch():
    lib_dir = torch_lib_dir()
    deps = ldd(_library())
    assert foreign_torch_deps(deps, lib_dir) == []
    # Not vacuous: the library does need c10 and torch, resolved inside the imported torch.
    names = {name for name, _ in deps}
    assert any(n.startswith("libc10") for n in names), names
    assert any(n.startswith("libtorch") for n in names), names


def test_process_maps_one_torch():
    _library()
    lib_dir = torch_lib_dir()
    torch_files = [p for p in mapped_files() if TORCH_LIB_NAME.match(os.path.basename(p))]
    assert any(os.path.basename(p).startswith("libc10") for p in torch_files), torch_files
    assert [p for p in torch_files if not inside(p, lib_dir)] == []


def test_checker_flags_a_mixed_binary():
    # ldd of the binding built on a machine with Debian's libtorch-dev before the link was made hermetic.
    venv = "/repo/.venv/lib/python3.11/site-packages/torch/lib"
    text = f"""\tlinux-vdso.so.1 (0x00007ffc3b1f2000)
\tlibc10.so.1.13 => /lib/x86_64-linux-gnu/libc10.so.1.13 (0x00007f31609e4000)
\tlibtorch_cpu.so => {venv}/libtorch_cpu.so (0x00007f314be00000)
\tlibc10.so => {venv}/libc10.so (0x00007f31608b4000)
\tlibtorch.so => {venv}/libtorch.so (0x00007f31608b1000)
\tlibstdc++.so.6 => /lib/x86_64-linux-gnu/libstdc++.so.6 (0x00007f316066c000)
\tlibtorch_global_deps.so => not found
\t/lib64/ld-linux-x86-64.so.2 (0x00007f3160a2f000)
"""
    deps = parse_ldd(text)
    assert [n for n, _ in deps] == ["libc10.so.1.13", "libtorch_cpu.so", "libc10.so", "libtorch.so",
                                     "libstdc++.so.6", "libtorch_global_deps.so"]
    bad = foreign_torch_deps(deps, Path(venv))
    assert bad == [f"libc10.so.1.13 => /lib/x86_64-linux-gnu/libc10.so.1.13 (outside {venv})",
                   "libtorch_global_deps.so => not found"]
    # The same dependencies all inside torch's directory pass.
    assert foreign_torch_deps([(n, p) for n, p in deps if n not in ("libc10.so.1.13", "libtorch_global_deps.so")],
                              Path(venv)) == []


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} <libnsa_ops_torch.so>", file=sys.stderr)
        return 2
    lib_dir = torch_lib_dir()
    bad = foreign_torch_deps(ldd(argv[1]), lib_dir)
    if bad:
        print(f"{argv[1]} links torch libraries that are not those of the torch in use ({lib_dir}):", file=sys.stderr)
        for line in bad:
            print("  " + line, file=sys.stderr)
        print("A binary linking two torch installations crashes on its first error: configure a fresh build "
              "folder (torch_binding/CMakeLists.txt links only the configured torch's files).", file=sys.stderr)
        return 1
    print(f"{argv[1]}: c10/torch dependencies all in {lib_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
