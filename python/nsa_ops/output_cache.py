"""The cache of the operators' large CPU outputs (``nsa_ops.cpu_output_cache_info()``, ``empty_cpu_output_cache()``).

torch's CPU allocator returns large blocks to the system when their tensor is freed, so each call would write its
large outputs into fresh pages, which the kernel zeroes at their first write (for the memory-bound compression
backward at 64k tokens, as long as the operator itself). The operators therefore take CPU outputs of 4 MiB or more
from a cache of blocks of whole 2 MiB pages (advised as transparent huge pages): a block freed by its tensor is
reused by the next output of the same rounded size. At most ``NSA_CPU_OUTPUT_CACHE_MB`` MiB of free blocks are kept
(read once per process; default 256; 0 disables the cache), the oldest freed dropped first. Values never depend on
it: every output is written in full.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._lib import load_library

load_library()

__all__ = ["CpuOutputCacheInfo", "cpu_output_cache_info", "empty_cpu_output_cache"]


class CpuOutputCacheInfo(NamedTuple):
    """The output cache now.

    limit_bytes:   ``NSA_CPU_OUTPUT_CACHE_MB`` in bytes (0: disabled).
    cached_bytes:  free blocks kept for reuse.
    cached_blocks: how many.
    live_blocks:   blocks held by tensors now.
    hits:          outputs served by a kept block, since the process started.
    misses:        outputs that took new memory.
    """

    limit_bytes: int
    cached_bytes: int
    cached_blocks: int
    live_blocks: int
    hits: int
    misses: int


def cpu_output_cache_info() -> CpuOutputCacheInfo:
    """The cache's limit, contents and counters (see the module docstring)."""
    return CpuOutputCacheInfo(*torch.ops.nsa.cpu_output_cache_info())


def empty_cpu_output_cache() -> None:
    """Returns every free block to the system; blocks held by tensors come back to the cache when freed."""
    torch.ops.nsa.cpu_output_cache_clear()
