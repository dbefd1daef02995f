"""After set-up, nsa_ops imports from any directory: scripts/setup.sh puts <repo>/python on the path of the
.venv's interpreter (a .pth file in its site-packages). The check runs that interpreter from / with a clean
environment (no PYTHONPATH; PATH and HOME only, plus NSA_OPS_LIB when this run tests a library built
elsewhere), imports nsa_ops, and calls the operator against its reference."""

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, torch, nsa_ops
g = torch.Generator().manual_seed(0)
T, C = 96, 5
q = torch.randn(T, 4, 32, generator=g).bfloat16()
k = torch.randn(C, 2, 32, generator=g).bfloat16()
v = torch.randn(C, 2, 16, generator=g).bfloat16()
args = (q, k, v, 32 ** -0.5, 4, 32, 16, 64, 2)
kw = dict(atten_mask=nsa_ops.make_atten_mask(T, C, 32, 16), topk_mask=nsa_ops.make_topk_mask(T, 2, 64),
          actual_seq_qlen=[T], actual_cmp_seq_kvlen=[C])
out = nsa_ops.npu_nsa_compress_attention(*args, **kw)
ref = torch.ops.nsa.compress_attention_reference(*args, kw["topk_mask"], kw["atten_mask"], [T], [C], None)
print(json.dumps({"package": nsa_ops.__file__, "library": nsa_ops.library_path(),
                  "shapes": [list(t.shape) for t in out], "topk_equal": torch.equal(out[1], ref[1]),
                  "out_max_diff": float((out[0].float() - ref[0].float()).abs().max())}))
"""


def test_venv_python_imports_nsa_ops_from_root_with_a_clean_environment():
    py = REPO / ".venv" / "bin" / "python"
    assert py.is_file(), f"{py} missing: run `bash scripts/setup.sh` (it creates .venv and installs nsa_ops there)"
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/")}
    if os.environ.get("NSA_OPS_LIB"):
        env["NSA_OPS_LIB"] = os.environ["NSA_OPS_LIB"]
    r = subprocess.run([str(py), "-c", CHILD], cwd="/", env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"import nsa_ops from / failed:\n{r.stderr[-3000:]}"
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(res["package"]).resolve() == REPO / "python" / "nsa_ops" / "__init__.py", res["package"]
    assert res["shapes"] == [[96, 4, 16], [96, 2, 2], [96, 4, 8], [96, 4, 8]]
    assert res["topk_equal"] and res["out_max_diff"] <= 2.0 ** -6, res
