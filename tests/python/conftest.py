"""pytest set-up for the nsa_ops Python suite: makes <repo>/python importable and locates the shared vectors."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python"))


def vectors_dir() -> Path:
    """<repo>/../shared/vectors (CI has shared/ beside the clone); NSA_VECTORS_DIR overrides."""
    env = os.environ.get("NSA_VECTORS_DIR")
    return Path(env) if env else REPO.parent / "shared" / "vectors"


@pytest.fixture(scope="session")
def shared_vectors() -> Path:
    path = vectors_dir()
    if not (path / "cases.json").is_file():
        pytest.fail(f"shared reference vectors not found at {path} (expected cases.json and <name>.npz there; "
                    "the repository expects shared/ beside the clone, or set NSA_VECTORS_DIR)")
    return path


def pytest_report_header(config):
    try:
        import nsa_ops
    except ImportError as e:  # the tests report it properly
        return [f"nsa_ops: not importable ({e})"]
    detected, active = nsa_ops.cpu_isa()
    return [f"nsa_ops: library {nsa_ops.library_path()}; CPU ISA detected {detected}, active {active}"]
