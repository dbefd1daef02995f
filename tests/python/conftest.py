"""pytest set-up for the nsa_ops Python suite: where the reference vectors are, and a report header naming the
operator library and the CPU instruction set in use.

nsa_ops itself is imported as installed: scripts/setup.sh puts <repo>/python on the .venv's path (a .pth file),
a wheel installs the package; this suite's own helpers (cases.py, spec_model.py) sit beside the tests, where
pytest's rootdir-relative import finds them.
"""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def vectors_dir() -> Path:
    """<repo>/tests/data/vectors (see its README); the environment variable NSA_VECTORS_DIR overrides."""
    env = os.environ.get("NSA_VECTORS_DIR")
    return Path(env) if env else REPO / "tests" / "data" / "vectors"


@pytest.fixture(scope="session")
def vectors() -> Path:
    path = vectors_dir()
    if not (path / "cases.json").is_file():
        pytest.fail(f"reference vectors not found at {path} (expected cases.json and <name>.npz there: "
                    "tests/data/vectors of the repository, or the directory NSA_VECTORS_DIR names)")
    return path


def pytest_report_header(config):
    try:
        import nsa_ops
    except ImportError as e:  # the tests report it properly
        return [f"nsa_ops: not importable ({e})"]
    detected, active = nsa_ops.cpu_isa()
    return [f"nsa_ops: {Path(nsa_ops.__file__).parent}, library {nsa_ops.library_path()}; "
            f"CPU ISA detected {detected}, active {active}"]
