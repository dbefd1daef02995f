"""Which instruction-set path the CPU backend runs, and why (``nsa_ops.cpu_isa_report()``).

The path is decided once per process (include/nsa/cpu.h, ``nsa::cpu_isa_report``): what cpuid + XCR0 allow, then
the faster of the candidate paths for bf16 inputs on this CPU (a table of known CPUs, else a one-time calibration
that times both GEMMs), then the ``NSA_CPU_ISA=scalar|avx2|avx512|avx512bf16`` override. ``nsa_ops.cpu_isa()``
gives the first and last of these as ``(detected, active)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._lib import load_library

load_library()

__all__ = ["CpuIsaReport", "cpu_isa_report"]


class CpuIsaReport(NamedTuple):
    """How the CPU backend's default path was chosen.

    detected:  the best path cpuid + XCR0 allow (``nsa_ops.cpu_isa()[0]``).
    preferred: the fastest path on this CPU before ``NSA_CPU_ISA``; it differs from ``detected`` where the
               vdpbf16ps path (avx512bf16) is slower than the fp32 FMA path (avx512). Only bf16 inputs see a
               difference between those two: fp32 and fp16 inputs run the same kernels on both.
    active:    what runs when no path is forced (``nsa_ops.cpu_isa()[1]``).
    cpu:       cpuid vendor, display family and model, e.g. ``"AMD family 0x19 model 0x11"``.
    basis:     ``"single path"`` (nothing to choose), ``"table"`` (a CPU the library knows),
               ``"calibration"`` (an unknown CPU with AVX-512 BF16: both GEMMs timed once in this process) or
               ``"NSA_CPU_ISA"`` (the override).
    reason:    why, in words (the measurement behind the table row, or the calibration's rates).
    """

    detected: str
    preferred: str
    active: str
    cpu: str
    basis: str
    reason: str


def cpu_isa_report() -> CpuIsaReport:
    """How the CPU backend's default instruction-set path was chosen (the same answer for the whole process)."""
    return CpuIsaReport(*torch.ops.nsa.cpu_isa_report())
