"""Locating and loading the compiled operator library (``libnsa_ops_torch.so``).

Search order:

1. the environment variable ``NSA_OPS_LIB`` (the full path of the library);
2. a ``libnsa_ops_torch*.so`` inside this package's directory (an installed or copied build);
3. ``<repo>/build/torch_binding/libnsa_ops_torch.so`` (the CMake build made by ``scripts/setup.sh``).

Loading registers ``torch.ops.nsa.*``.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import torch

LIB_NAME = "libnsa_ops_torch.so"
_PACKAGE_DIR = Path(__file__).resolve().parent
_REPO_ROOT = _PACKAGE_DIR.parent.parent

_loaded_path: str | None = None


def candidate_paths() -> list[str]:
    """The places searched, in order (the first existing one is loaded)."""
    paths = []
    env = os.environ.get("NSA_OPS_LIB")
    if env:
        paths.append(env)
    paths.extend(sorted(glob.glob(str(_PACKAGE_DIR / "libnsa_ops_torch*.so"))))
    paths.append(str(_REPO_ROOT / "build" / "torch_binding" / LIB_NAME))
    return paths


def load_library() -> str:
    """Loads the operator library once and returns its path; raises ImportError when it is missing."""
    global _loaded_path
    if _loaded_path is not None:
        return _loaded_path
    env = os.environ.get("NSA_OPS_LIB")
    if env and not os.path.isfile(env):
        raise ImportError(f"nsa_ops: NSA_OPS_LIB={env!r} is not a file")
    tried = candidate_paths()
    for path in tried:
        if os.path.isfile(path):
            torch.ops.load_library(path)
            _loaded_path = path
            return path
    raise ImportError(
        "nsa_ops: the operator library libnsa_ops_torch.so was not found; build it with "
        "`bash scripts/setup.sh` (CMake, -DNSA_ENABLE_TORCH=ON) or set NSA_OPS_LIB. Tried: " + ", ".join(tried)
    )


def library_path() -> str | None:
    """Path of the loaded library (None before loading)."""
    return _loaded_path
