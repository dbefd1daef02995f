"""Golden data for checking an implementation of the operator (e.g. the NPU's) against this one.

Two halves, used by ``python -m nsa_ops golden`` and ``python -m nsa_ops check``:

* :func:`load_inputs` + :func:`run_golden` + :func:`write_outputs`: read ``query``/``key``/``value``, the masks
  and the arguments, run the operator, write the four outputs as ``.npy`` files plus ``manifest.json``.
* :func:`load_outputs` + :func:`compare`: compare two output sets with the rules of :mod:`nsa_ops.tolerance` and name the
  rows ``(t, head)`` that differ.

Input formats (:func:`load_inputs`):

* a directory holding ``query.npy``, ``key.npy``, ``value.npy`` and optionally ``atten_mask.npy``,
  ``topk_mask.npy`` and the length lists ``actual_seq_qlen.npy``, ``actual_cmp_seq_kvlen.npy``,
  ``actual_sel_seq_kvlen.npy``; the arguments in ``args.json`` inside it (or given separately);
* one ``.safetensors`` file with the same tensor names (read with the ``safetensors`` package when it is
  installed, else with the small reader here); arguments from a JSON file, or from the file's metadata
  entry ``nsa_args`` (a JSON string);
* one ``.npz`` archive with the same names (the layout of the reference vectors in tests/data/vectors).

The arguments JSON is an object with ``scale_value``, ``head_num``, ``compress_block_size``,
``compress_stride``, ``select_block_size``, ``select_block_count``, ``actual_seq_qlen``,
``actual_cmp_seq_kvlen`` (prefix sums, no leading 0; or as tensors, see above), optionally
``actual_sel_seq_kvlen`` and ``dtype`` (``bf16``, ``fp16``, ``fp32``). It may also be a list of such objects
with a ``name`` each (like ``cases.json`` of the reference vectors): the entry named like the input file's stem is
used, or the one named by ``case``.

Element types of the inputs. NumPy has no bfloat16, so bf16 data is given either as ``uint16`` arrays holding
the bf16 bit patterns, or as ``float32`` arrays holding values that bf16 represents exactly (checked: a value
that would round is an error unless ``round_inputs=True``); ``dtype`` in the arguments then says ``bf16``.
fp16 may come as ``float16``, ``uint16`` bit patterns or exact ``float32``; fp32 as ``float32``. Without
``dtype`` the arrays' own type decides (``float16`` -> fp16, ``float32`` -> fp32, safetensors' ``BF16`` -> bf16).
Masks: bool, or integers (non-zero = set).

Output files (:func:`write_outputs`): ``attention_out.npy`` ([T, N1, D2]), ``topk_indices.npy`` ([T, N2, K]
int32), ``softmax_max.npy`` and ``softmax_sum.npy`` ([T, N1, 8] float32, memory in the per-batch
layout of docs/spec/compress_attention.md §4, exactly as the operator returns them), and ``manifest.json``. bf16 ``attention_out`` is stored as
``float32`` holding the exact bf16 values (default; ``np.load`` gives usable numbers and ``.astype`` back to
bf16 is exact) or, with ``bf16_storage="uint16"``, as the raw bit patterns; the manifest records which
(``outputs.attention_out.storage``). fp16 is stored as ``float16``, fp32 as ``float32``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import tolerance

__all__ = [
    "DTYPES",
    "OUTPUT_NAMES",
    "Inputs",
    "OutputSet",
    "Difference",
    "Comparison",
    "load_inputs",
    "run_golden",
    "write_outputs",
    "load_outputs",
    "compare",
    "read_safetensors",
    "write_safetensors",
]

FORMAT = "nsa-ops golden 1"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
SCALAR_NAMES = ("scale_value", "head_num", "compress_block_size", "compress_stride", "select_block_size",
                "select_block_count")
LENGTH_NAMES = ("actual_seq_qlen", "actual_cmp_seq_kvlen", "actual_sel_seq_kvlen")
TENSOR_NAMES = ("query", "key", "value", "atten_mask", "topk_mask")
OUTPUT_NAMES = ("attention_out", "topk_indices", "softmax_max", "softmax_sum")
STATS_LAYOUT = ("[T, N1, 8] float32; memory per batch (docs/spec/compress_attention.md §4): batch b starts at float 8*N1*(query rows before b), "
                "ordered [N1][Sq_b][8], each value repeated 8 times")



class GoldenError(ValueError):
    """A malformed input or output set (the message names the file or the argument)."""


# ------------------------------------------------------------------------------------------------ safetensors
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "BOOL": np.bool_}


def read_safetensors(path: str | Path, *, use_package: Optional[bool] = None) -> tuple[dict, dict]:
    """Tensors and metadata of a ``.safetensors`` file: ``({name: torch.Tensor}, {key: str})``.

    use_package: True = the ``safetensors`` package (ImportError if missing), False = the reader here (the
    format is an 8-byte little-endian header length, a JSON header of dtype/shape/data_offsets per tensor
    and ``__metadata__``, then the little-endian data), None = the package when installed.
    BF16 tensors come back as torch.bfloat16.
    """
    path = Path(path)
    if use_package is None or use_package:
        try:
            from safetensors import safe_open
        except ImportError:
            if use_package:
                raise ImportError("reading .safetensors with the package needs it: pip install safetensors") from None
        else:
            out = {}
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                for name in f.keys():
                    out[name] = f.get_tensor(name)
            return out, meta
    raw = path.read_bytes()
    if len(raw) < 8:
        raise GoldenError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise GoldenError(f"{path}: not a safetensors file (header length {n} past the end)")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GoldenError(f"{path}: unreadable safetensors header ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    data = memoryview(raw)[8 + n:]
    out = {}
    for name, info in header.items():
        st = info.get("dtype")
        if st not in _ST_DTYPES:
            raise GoldenError(f"{path}: tensor {name!r} has an unsupported safetensors dtype {st!r}")
        b, e = info["data_offsets"]
        arr = np.frombuffer(data[b:e], dtype=np.dtype(_ST_DTYPES[st]).newbyteorder("<")).reshape(info["shape"])
        t = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))
        out[name] = t.view(torch.bfloat16) if st == "BF16" else t
    return out, dict(meta)


def write_safetensors(path: str | Path, tensors: dict, metadata: Optional[dict] = None) -> None:
    """Writes torch tensors (bf16/fp16/fp32/fp64, integer, bool) as a ``.safetensors`` file (no package needed)."""
    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        if t.dtype not in names:
            raise GoldenError(f"write_safetensors: tensor {name!r} has an unsupported dtype {t.dtype}")
        arr = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
        blob = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for blob in blobs:
            f.write(blob)


# ------------------------------------------------------------------------------------------------ inputs
@dataclasses.dataclass
class Inputs:
    """Everything one call of the operator needs, plus where it came from."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    atten_mask: Optional[torch.Tensor]
    topk_mask: Optional[torch.Tensor]
    scalars: dict          # SCALAR_NAMES -> value
    lengths: dict          # LENGTH_NAMES -> list[int] or None
    dtype: str             # bf16 | fp16 | fp32
    source: str
    files: dict            # name -> sha256 of the file(s) read

    def call_args(self) -> dict:
        """Keyword arguments of :func:`nsa_ops.npu_nsa_compress_attention`."""
        return dict(query=self.query, key=self.key, value=self.value, **self.scalars, topk_mask=self.topk_mask,
                    atten_mask=self.atten_mask, **self.lengths)

    @property
    def seq_lens(self) -> list[int]:
        out, prev = [], 0
        for x in self.lengths["actual_seq_qlen"]:
            out.append(x - prev)
            prev = x
        return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _to_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    arr = np.asarray(x)
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr).copy()
    return torch.from_numpy(arr)


def _select_args(doc: Any, source: Path, case: Optional[str], where: str) -> dict:
    if isinstance(doc, list):
        names = [d.get("name") for d in doc if isinstance(d, dict)]
        want = case or source.stem
        for d in doc:
            if isinstance(d, dict) and d.get("name") == want:
                return d
        raise GoldenError(f"{where}: no entry named {want!r} (entries: {', '.join(map(str, names))}); "
                          "choose one with --case")
    if not isinstance(doc, dict):
        raise GoldenError(f"{where}: the arguments must be a JSON object (or a list of objects with a name)")
    return doc


def _float_to_dtype(name: str, t: torch.Tensor, dt: torch.dtype, round_inputs: bool) -> torch.Tensor:
    if not t.dtype.is_floating_point:
        if t.dtype in (torch.int16, torch.uint16) and dt in (torch.bfloat16, torch.float16):
            return t.view(torch.int16).view(dt)  # bit patterns
        raise GoldenError(f"{name}: {DTYPE_NAMES[dt]} data must be floats or uint16 bit patterns, got {t.dtype}")
    if t.dtype == dt:
        return t
    out = t.to(dt)
    if not round_inputs:
        back = out.to(t.dtype)
        bad = ~((back == t) | (torch.isnan(back) & torch.isnan(t)))
        if bool(bad.any()):
            i = tuple(int(v) for v in bad.nonzero()[0].tolist())
            raise GoldenError(f"{name}: {int(bad.sum())} values are not exactly representable in "
                              f"{DTYPE_NAMES[dt]} (first at {list(i)}: {float(t[i])!r}); store them exactly, or "
                              "pass --round-inputs to round to nearest even")
    return out


def load_inputs(source: str | Path, args: str | Path | dict | None = None, *, case: Optional[str] = None,
                round_inputs: bool = False, use_safetensors_package: Optional[bool] = None) -> Inputs:
    """Reads one call's inputs (see the module doc for the formats). Raises GoldenError naming what is wrong."""
    source = Path(source)
    files: dict = {}
    meta: dict = {}
    if source.is_dir():
        tensors = {}
        for name in TENSOR_NAMES + LENGTH_NAMES:
            p = source / f"{name}.npy"
            if p.is_file():
                tensors[name] = _to_tensor(np.load(p, allow_pickle=False))
                files[p.name] = _sha256(p)
        if args is None:
            args = source / "args.json"
    elif source.suffix == ".safetensors":
        tensors, meta = read_safetensors(source, use_package=use_safetensors_package)
        files[source.name] = _sha256(source)
    elif source.suffix == ".npz":
        with np.load(source, allow_pickle=False) as z:
            tensors = {k: _to_tensor(z[k]) for k in z.files}
        files[source.name] = _sha256(source)
    elif not source.exists():
        raise GoldenError(f"{source}: no such file or directory")
    else:
        raise GoldenError(f"{source}: expected a directory of .npy files, a .safetensors or an .npz file")
    for name in ("query", "key", "value"):
        if name not in tensors:
            raise GoldenError(f"{source}: missing the tensor {name!r}")

    if isinstance(args, dict):
        doc, where = args, "args"
    elif args is not None:
        ap = Path(args)
        if not ap.is_file():
            if source.is_dir() and ap == source / "args.json":
                raise GoldenError(f"{source}: no args.json in the directory (give the arguments with --args)")
            raise GoldenError(f"{ap}: no such arguments file")
        try:
            doc = json.loads(ap.read_text())
        except json.JSONDecodeError as e:
            raise GoldenError(f"{ap}: not valid JSON ({e})") from None
        files[ap.name] = _sha256(ap)
        where = str(ap)
    elif "nsa_args" in meta:
        try:
            doc = json.loads(meta["nsa_args"])
        except json.JSONDecodeError as e:
            raise GoldenError(f"{source}: metadata nsa_args is not valid JSON ({e})") from None
        where = f"{source} (metadata nsa_args)"
    else:
        sibling = source.with_suffix(".json")
        if not sibling.is_file():
            raise GoldenError(f"{source}: no arguments: give --args ARGS.json (or put {sibling.name} beside it)")
        doc = json.loads(sibling.read_text())
        files[sibling.name] = _sha256(sibling)
        where = str(sibling)
    doc = _select_args(doc, source, case, where)

    scalars = {}
    for name in SCALAR_NAMES:
        if name not in doc:
            raise GoldenError(f"{where}: missing the argument {name!r}")
        if name == "scale_value":
            if isinstance(doc[name], bool) or not isinstance(doc[name], (int, float)):
                raise GoldenError(f"{where}: scale_value must be a number, got {doc[name]!r}")
            scalars[name] = float(doc[name])
            continue
        scalars[name] = doc[name]
        if isinstance(scalars[name], bool) or not isinstance(scalars[name], int):
            raise GoldenError(f"{where}: {name} must be an integer, got {scalars[name]!r}")
    lengths: dict = {}
    for name in LENGTH_NAMES:
        val = doc.get(name)
        if val is None and name in tensors:
            val = tensors[name].reshape(-1).tolist()
        if val is None and name != "actual_sel_seq_kvlen":
            raise GoldenError(f"{where}: missing the argument {name!r} (a list of prefix sums), "
                              f"neither in the JSON nor as a tensor")
        if val is not None and (not isinstance(val, list) or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                     for x in val)):
            raise GoldenError(f"{where}: {name} must be a list of integers, got {val!r}")
        lengths[name] = val

    q = tensors["query"]
    dname = doc.get("dtype")
    if dname is None:
        if q.dtype in DTYPE_NAMES:
            dname = DTYPE_NAMES[q.dtype]
        else:
            raise GoldenError(f"{where}: give \"dtype\" (bf16, fp16, fp32): query is stored as {q.dtype}")
    if dname not in DTYPES:
        raise GoldenError(f"{where}: dtype must be one of {', '.join(DTYPES)}, got {dname!r}")
    dt = DTYPES[dname]
    qkv = [_float_to_dtype(n, tensors[n], dt, round_inputs) for n in ("query", "key", "value")]
    masks = []
    for name in ("atten_mask", "topk_mask"):
        m = tensors.get(name)
        if m is not None and m.dtype not in (torch.bool, torch.uint8):
            if m.dtype.is_floating_point:
                raise GoldenError(f"{name}: must be bool or integer (non-zero = set), got {m.dtype}")
            m = m != 0
        masks.append(m)
    return Inputs(*qkv, *masks, scalars=scalars, lengths=lengths, dtype=dname, source=str(source), files=files)


def run_golden(inputs: Inputs, backend: str = "cpu") -> tuple:
    """Runs the operator (``cpu``: torch.ops.nsa.compress_attention; ``reference``: the plain-loop oracle)."""
    import nsa_ops  # noqa: F401  (registers torch.ops.nsa)

    if backend == "cpu":
        op = torch.ops.nsa.compress_attention
    elif backend == "reference":
        op = torch.ops.nsa.compress_attention_reference
    else:
        raise ValueError(f"backend must be 'cpu' or 'reference', got {backend!r}")
    return tuple(op(**inputs.call_args()))


def _versions() -> dict:
    import nsa_ops

    try:
        from importlib.metadata import version

        pkg = version("nsa-ops")
    except Exception:  # running from the source tree
        pkg = None
    detected, active = nsa_ops.cpu_isa()
    try:  # how the path was chosen (a library built before cpu_isa_report lacks it)
        basis = nsa_ops.cpu_isa_report().basis
    except (AttributeError, RuntimeError):
        basis = None
    return {"nsa_ops": pkg, "torch": torch.__version__, "library": nsa_ops.library_path(),
            "cpu_isa_detected": detected, "cpu_isa_active": active, "cpu_isa_basis": basis}


def write_outputs(outdir: str | Path, outputs: tuple, inputs: Inputs, *, backend: str = "cpu",
                  bf16_storage: str = "float32") -> dict:
    """Writes the four outputs as .npy files and manifest.json into ``outdir`` (created); returns the manifest."""
    if bf16_storage not in ("float32", "uint16"):
        raise ValueError(f"bf16_storage must be 'float32' or 'uint16', got {bf16_storage!r}")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    out, topk, smax, ssum = outputs
    entries = {}
    for name, t in zip(OUTPUT_NAMES, (out, topk, smax, ssum)):
        t = t.detach().contiguous().cpu()
        storage = str(t.dtype).replace("torch.", "")
        if t.dtype == torch.bfloat16:
            if bf16_storage == "uint16":
                arr = t.view(torch.int16).numpy().view(np.uint16)
                storage = "uint16 bit patterns of bfloat16"
            else:
                arr = t.float().numpy()
                storage = "float32 holding exact bfloat16 values"
        else:
            arr = t.numpy()
        p = outdir / f"{name}.npy"
        np.save(p, arr, allow_pickle=False)
        entries[name] = {"file": p.name, "shape": list(t.shape), "npy_dtype": str(arr.dtype), "storage": storage,
                         "sha256": _sha256(p)}
    entries["softmax_max"]["layout"] = entries["softmax_sum"]["layout"] = STATS_LAYOUT
    manifest = {
        "format": FORMAT,
        "operator": "npu_nsa_compress_attention (docs/spec/compress_attention.md)",
        "backend": backend,
        "dtype": inputs.dtype,
        "args": {**inputs.scalars, **{k: v for k, v in inputs.lengths.items()}},
        "shapes": {"query": list(inputs.query.shape), "key": list(inputs.key.shape),
                   "value": list(inputs.value.shape),
                   "atten_mask": None if inputs.atten_mask is None else list(inputs.atten_mask.shape),
                   "topk_mask": None if inputs.topk_mask is None else list(inputs.topk_mask.shape)},
        "inputs": {"source": str(Path(inputs.source).resolve()), "sha256": inputs.files},
        "outputs": entries,
        "versions": _versions(),
    }
    (outdir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# ------------------------------------------------------------------------------------------------ outputs
@dataclasses.dataclass
class OutputSet:
    """Four outputs read back: attention_out as a torch tensor of the operator's dtype, the rest as given."""

    attention_out: torch.Tensor
    topk_indices: torch.Tensor
    softmax_max: torch.Tensor
    softmax_sum: torch.Tensor
    dtype: Optional[str]
    seq_qlen: Optional[list]    # actual_seq_qlen (prefix sums) when known
    manifest: Optional[dict]
    source: str


def load_outputs(source: str | Path, *, dtype: Optional[str] = None, seq_qlen: Optional[list] = None) -> OutputSet:
    """Reads an output set: a directory written by :func:`write_outputs` (or any directory with the four .npy
    files), an .npz or a .safetensors file holding the four names. ``dtype`` / ``seq_qlen`` fill in what a
    set without manifest.json does not say."""
    source = Path(source)
    manifest = None
    if source.is_dir():
        mp = source / "manifest.json"
        if mp.is_file():
            manifest = json.loads(mp.read_text())
        arrays = {}
        for name in OUTPUT_NAMES:
            p = source / f"{name}.npy"
            if not p.is_file():
                raise GoldenError(f"{source}: missing {name}.npy")
            arrays[name] = _to_tensor(np.load(p, allow_pickle=False))
    elif source.suffix == ".npz":
        with np.load(source, allow_pickle=False) as z:
            missing = [n for n in OUTPUT_NAMES if n not in z.files]
            if missing:
                raise GoldenError(f"{source}: missing {', '.join(missing)}")
            arrays = {n: _to_tensor(z[n]) for n in OUTPUT_NAMES}
            if seq_qlen is None and "actual_seq_qlen" in z.files:
                seq_qlen = [int(x) for x in z["actual_seq_qlen"].reshape(-1)]
    elif source.suffix == ".safetensors":
        tensors, _ = read_safetensors(source)
        missing = [n for n in OUTPUT_NAMES if n not in tensors]
        if missing:
            raise GoldenError(f"{source}: missing {', '.join(missing)}")
        arrays = {n: tensors[n] for n in OUTPUT_NAMES}
        if seq_qlen is None and "actual_seq_qlen" in tensors:
            seq_qlen = tensors["actual_seq_qlen"].reshape(-1).tolist()
    elif not source.exists():
        raise GoldenError(f"{source}: no such file or directory")
    else:
        raise GoldenError(f"{source}: expected an output directory, an .npz or a .safetensors file")
    if manifest is not None:
        dtype = dtype or manifest.get("dtype")
        if seq_qlen is None:
            seq_qlen = manifest.get("args", {}).get("actual_seq_qlen")
    out = arrays["attention_out"]
    if dtype is None:
        dtype = DTYPE_NAMES.get(out.dtype)
    if dtype is not None and dtype not in DTYPES:
        raise GoldenError(f"{source}: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype is not None:
        dt = DTYPES[dtype]
        if out.dtype in (torch.int16, torch.uint16):
            if dt == torch.float32:
                raise GoldenError(f"{source}: attention_out holds 16-bit patterns but the dtype is fp32")
            out = out.view(torch.int16).view(dt)
        elif out.dtype != dt:
            out = out.to(dt)  # exact for values stored exactly (float32 holding bf16/fp16 values)
    return OutputSet(out, arrays["topk_indices"], arrays["softmax_max"], arrays["softmax_sum"], dtype,
                     None if seq_qlen is None else [int(x) for x in seq_qlen], manifest, str(source))


# ------------------------------------------------------------------------------------------------ compare
@dataclasses.dataclass
class Difference:
    output: str        # which output
    t: int             # query row (global, packed)
    head: int          # query head (attention_out, statistics) or KV head (topk_indices)
    batch: Optional[int]
    s: Optional[int]   # row inside its batch
    detail: str

    def row(self) -> str:
        where = f" (batch {self.batch}, s = {self.s})" if self.batch is not None else ""
        kind = "KV head" if self.output == "topk_indices" else "head"
        return f"t = {self.t}{where}, {kind} {self.head}"

    def __str__(self) -> str:
        return f"{self.output}: {self.row()}: {self.detail}"


@dataclasses.dataclass
class Comparison:
    ok: bool
    summary: list        # one line per output
    differences: list    # Difference, one per differing row (t, head) and output
    notes: list

    def report(self, limit: int = 20) -> str:
        lines = list(self.summary)
        if self.differences:
            lines.append(f"rows that differ ({len(self.differences)}"
                         + (f", first {limit} shown" if len(self.differences) > limit else "") + "):")
            lines += ["  " + str(d) for d in self.differences[:limit]]
        lines += self.notes
        lines.append("MATCH" if self.ok else "MISMATCH")
        return "\n".join(lines)


def _batch_of(seq_qlen: Optional[list], t: int) -> tuple[Optional[int], Optional[int]]:
    if not seq_qlen:
        return None, None
    prev = 0
    for b, end in enumerate(seq_qlen):
        if t < end:
            return b, t - prev
        prev = end
    return None, None


def _stats_rows(T: int, N1: int, seq_qlen: list) -> tuple[np.ndarray, np.ndarray]:
    """For every float of a [T, N1, 8] statistic in the §4 layout: its query row t and head h."""
    t_of = np.empty(T * N1 * 8, dtype=np.int64)
    h_of = np.empty(T * N1 * 8, dtype=np.int64)
    q0 = 0
    for end in seq_qlen:
        sq = end - q0
        n = N1 * sq * 8
        idx = np.arange(n)
        base = 8 * N1 * q0
        if n:
            h_of[base:base + n] = idx // (sq * 8)
            t_of[base:base + n] = q0 + (idx // 8) % sq
        q0 = end
    return t_of, h_of


class _RowModel:
    """fp64 model of docs/spec/compress_attention.md §3 for single rows, with the bounds of
    :mod:`nsa_ops.tolerance` (tie tolerance of the top-k and the per-element bound of attention_out need the
    inputs)."""

    def __init__(self, inputs: Inputs):
        self.x = inputs
        s = inputs.scalars
        self.scale = float(np.float32(s["scale_value"]))
        self.M = s["select_block_size"] // s["compress_stride"]
        self.N = s["compress_block_size"] // s["compress_stride"]
        self.N1 = inputs.query.shape[1]
        self.N2 = inputs.key.shape[1]
        self.G = self.N1 // self.N2
        self.D = inputs.query.shape[2]
        self.dtype = inputs.query.dtype
        self.q = inputs.query.double()
        self.k = inputs.key.double()
        self.v = inputs.value.double()
        self.cq = [0] + list(inputs.lengths["actual_seq_qlen"])
        self.cc = [0] + list(inputs.lengths["actual_cmp_seq_kvlen"])

    def _batch(self, t: int) -> tuple[int, int]:
        for b in range(len(self.cq) - 1):
            if self.cq[b] <= t < self.cq[b + 1]:
                return b, t - self.cq[b]
        raise IndexError(t)

    def probs(self, t: int, h: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(P of row t, head h (exact, §3.1-§3.3), the bound of an implementation's relative error of P [1],
        batch)."""
        b, s = self._batch(t)
        c0, c1 = self.cc[b], self.cc[b + 1]
        k = self.k[c0:c1, h // self.G]
        sc = (k @ self.q[t, h]) * self.scale
        dot_abs = (k.abs() @ self.q[t, h].abs()) * abs(self.scale)
        visible = torch.ones_like(sc, dtype=torch.bool)
        if self.x.atten_mask is not None:
            visible = ~self.x.atten_mask[s, :c1 - c0].bool()
        p_err = tolerance.p_rel_error(sc, dot_abs, visible, self.D, self.dtype)
        sc = torch.where(visible, sc, torch.tensor(-tolerance.FLT_MAX, dtype=torch.float64))
        p = torch.exp(sc - sc.max())
        return p / p.sum(), p_err, b

    def scores(self, t: int, n2: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(importance of every selection block of row t, KV head n2 (forced blocks +inf), the relative error
        bound of one computed score [1])."""
        total = None
        rel = 0.0
        for g in range(self.G):
            p, p_err, b = self.probs(t, n2 * self.G + g)
            total = p if total is None else total + p
            rel = torch.maximum(p_err, torch.as_tensor(rel, dtype=torch.float64))
        C = total.shape[0]
        sel = -(-C // self.M)
        sc = torch.zeros(sel, dtype=torch.float64)
        for kk in range(sel):
            for i in range(self.M + self.N - 1):
                c = self.M * (kk + 1) - i
                if 0 <= c < C:
                    sc[kk] += min(i + 1, self.N, self.M + self.N - 1 - i) * total[c]
        if self.x.topk_mask is not None:
            _, s = self._batch(t)
            forced = self.x.topk_mask[s, :sel].bool()
            sc = torch.where(forced, torch.tensor(math.inf, dtype=torch.float64), sc)
        return sc, rel + tolerance.gamma(self.G * (self.M + self.N - 1) + 1, self.dtype)

    def topk_ok(self, t: int, n2: int, idx: list) -> bool:
        """Whether ``idx`` is a top-k of row t, KV head n2 by the rule of tolerance.topk_slot_errors."""
        sc, rel = self.scores(t, n2)
        bad, _ = tolerance.topk_slot_errors(torch.tensor(idx), sc, rel, self.G * self.M * self.N)
        return not bool(bad.any())

    def out_row(self, t: int, h: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention_out of row t, head h (exact sum of the rounded P times V, §3.4), its per-element bound)."""
        p, p_err, b = self.probs(t, h)
        v = self.v[self.cc[b]:self.cc[b + 1], h // self.G]
        ref = tolerance.round_to(p, self.dtype) @ v if self.dtype in tolerance.LOW_PRECISION else p @ v
        return ref, tolerance.attention_out_bound(ref, self.dtype, p, v, p_err)


def compare(a: OutputSet, b: OutputSet, *, inputs: Optional[Inputs] = None, out_ulps: int = 2,
            out_acc_rtol: float = 1e-6, stats_rtol: float = tolerance.STATS_RTOL,
            stats_atol: float = tolerance.STATS_MAX_ATOL) -> Comparison:
    """Compares output set ``a`` (e.g. the NPU's) with ``b`` (the golden data).

    * topk_indices: identical; with ``inputs`` a differing row (t, KV head) is accepted when both lists are a
      top-k of the scores of the fp64 model (docs/spec/compress_attention.md §3) by the rule of
      :func:`nsa_ops.tolerance.topk_slot_errors`: distinct in-range blocks, the model's score at each equal to the
      model's k-th within the tolerance of an fp32 score, the same index wherever that score is separated from
      its neighbours or forced (ties and near ties of computed scores may be ordered differently).
    * softmax_max, softmax_sum: ``|a - b| <= stats_rtol |b| + stats_atol`` element by element of the [T, N1, 8]
      arrays (§4 layout; the row (t, head) of each float is worked out from actual_seq_qlen).
    * attention_out: within ``out_ulps`` units in the last place of the dtype, or within
      ``out_acc_rtol * max|b|`` (the fp32 accumulation of P.V in another order: a value that cancels to near 0
      has few correct ulps, most visibly in fp32); with ``inputs``, a row (t, head) beyond that is accepted when
      every element of ``a`` lies within :func:`nsa_ops.tolerance.attention_out_bound` of the fp64 model (the
      rule the test suite applies to this operator: the final rounding, the fp32 accumulation, and the
      §3.4 roundings of P that P's fp32 error can turn the other way).
    NaN equals NaN at the same place.
    """
    diffs: list = []
    summary: list = []
    notes: list = []
    ok = True
    seq_qlen = a.seq_qlen or b.seq_qlen
    model = _RowModel(inputs) if inputs is not None else None

    def where(t: int) -> tuple:
        return _batch_of(seq_qlen, t)

    for name in OUTPUT_NAMES:
        ta, tb = getattr(a, name), getattr(b, name)
        if tuple(ta.shape) != tuple(tb.shape):
            summary.append(f"{name}: shapes differ: {list(ta.shape)} vs {list(tb.shape)}")
            ok = False
    if not ok:
        return Comparison(False, summary, [], notes)

    # topk_indices
    ka, kb = a.topk_indices.to(torch.int64), b.topk_indices.to(torch.int64)
    rows = (ka != kb).any(dim=-1).nonzero().tolist()
    accepted = 0
    for t, n2 in rows:
        la, lb = ka[t, n2].tolist(), kb[t, n2].tolist()
        if model is not None and model.topk_ok(t, n2, la) and model.topk_ok(t, n2, lb):
            accepted += 1
            continue
        bb, s = where(t)
        diffs.append(Difference("topk_indices", t, n2, bb, s, f"{la} vs {lb}"))
    n_topk = len(rows) - accepted
    summary.append(f"topk_indices: {n_topk} of {ka.shape[0] * ka.shape[1]} rows (t, KV head) differ"
                   + (f" ({accepted} more differ only by tied scores, accepted)" if accepted else "")
                   + ("" if model is not None or not rows else " (identical required; give the inputs for "
                      "tie tolerance)"))
    ok &= n_topk == 0

    # statistics
    T, N1 = a.softmax_max.shape[0], a.softmax_max.shape[1]
    if seq_qlen is None:
        notes.append("note: actual_seq_qlen unknown (no manifest): statistics rows assume one batch")
    t_of = h_of = None
    for name in ("softmax_max", "softmax_sum"):
        sa = getattr(a, name).double().reshape(-1)
        sb = getattr(b, name).double().reshape(-1)
        same = (sa == sb) | (torch.isnan(sa) & torch.isnan(sb))
        bad = tolerance.stats_errors(sa, sb, rtol=stats_rtol, atol=stats_atol).nonzero().reshape(-1)
        rel = ((sa - sb).abs() / sb.abs().clamp_min(1e-30))[~same]
        worst = float(rel.max()) if rel.numel() else 0.0
        seen = set()
        if bad.numel():
            if t_of is None:
                t_of, h_of = _stats_rows(T, N1, seq_qlen or [T])
            for i in bad.tolist():
                key = (int(t_of[i]), int(h_of[i]))
                if key in seen:
                    continue
                seen.add(key)
                bb, s = where(key[0])
                diffs.append(Difference(name, key[0], key[1], bb, s,
                                        f"{float(sa[i])!r} vs {float(sb[i])!r}"))
        summary.append(f"{name}: {len(seen)} rows (t, head) beyond rtol {stats_rtol:g} + atol {stats_atol:g}; "
                       f"max relative difference {worst:.3g}")
        ok &= not seen

    # attention_out
    oa, ob = a.attention_out, b.attention_out
    if oa.dtype != ob.dtype or oa.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        summary.append(f"attention_out: dtypes differ or unsupported ({oa.dtype} vs {ob.dtype})")
        return Comparison(False, summary, diffs, notes)
    u = tolerance.ulp_distance(oa, ob)
    acc = out_acc_rtol * float(ob.double().abs().nan_to_num(0.0, 0.0, 0.0).max()) if ob.numel() else 0.0
    bad = (u > out_ulps) & ~((oa.double() - ob.double()).abs() <= acc)
    model_ok = 0
    row_bad = bad.any(dim=-1).nonzero().tolist()
    n_out = 0
    for t, h in row_bad:
        cols = bad[t, h].nonzero().reshape(-1)
        if model is not None:
            ref, bound = model.out_row(t, h)
            if bool(((oa[t, h].double() - ref).abs() <= bound).all()):
                model_ok += 1
                continue
        j = int(cols[u[t, h][cols].argmax()])
        bb, s = where(t)
        n_out += 1
        diffs.append(Difference("attention_out", t, h, bb, s,
                                f"{int(cols.numel())} elements beyond {out_ulps} ulps; worst j = {j}: "
                                f"{float(oa[t, h, j])!r} vs {float(ob[t, h, j])!r} ({int(u[t, h, j])} ulps)"))
    maxu = int(u.max()) if u.numel() else 0
    summary.append(f"attention_out ({a.dtype or oa.dtype}): {n_out} of {oa.shape[0] * oa.shape[1]} rows (t, head) "
                   f"beyond {out_ulps} ulps (+ {out_acc_rtol:g} x max|expected| = {acc:.3g} for the fp32 "
                   f"accumulation order); max {maxu} ulps"
                   + (f" ({model_ok} more rows within the bound of the fp64 model, accepted)" if model_ok else ""))
    ok &= n_out == 0
    diffs.sort(key=lambda d: (d.t, d.head, OUTPUT_NAMES.index(d.output)))
    return Comparison(bool(ok), summary, diffs, notes)
