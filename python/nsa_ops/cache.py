"""``nsa_ops.NSACache``: the paged decode state of one :class:`nsa_ops.NSAAttention` layer (docs/spec/nsa_layer.md,
"Generation (prefill and decode)"; the page geometry is docs/spec/decode.md §1 "Cache geometry").

Layout, for a batch of B sequences:

* raw pages ``key_pages [num_pages, P, N2, Dqk]`` and ``value_pages [num_pages, P, N2, Dv]``: raw position p of
  sequence b is row ``p % P`` of page ``page_ids(b)[p // P]``;
* compressed pages ``compressed_key_pages [num_cmp_pages, Pc, N2·Dqk]`` and
  ``compressed_value_pages [num_cmp_pages, Pc, N2·Dv]`` (heads flattened, as npu_nsa_compress_attention_infer
  reads them); compressed token c of sequence b (window ``[c·d, c·d + l)``) is in slot
  ``compressed_page_ids(b)[c // Pc]·Pc + c % Pc`` of the same memory viewed as ``[num_cmp_pages·Pc, N2, D]``
  (what npu_nsa_compress_infer writes);
* the per-sequence lengths S_b (raw tokens held).

Pages are taken from free lists when a sequence grows; when a pool runs out its storage doubles (a new tensor, the
old pages copied), so the caller never sizes anything. :meth:`NSACache.reset` returns every page to the pools.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["NSACache"]


class NSACache:
    """Paged raw and compressed key/value caches of one NSAAttention layer for B sequences.

    Created by :meth:`nsa_ops.NSAAttention.new_cache`; filled by :meth:`nsa_ops.NSAAttention.prefill` and grown by
    :meth:`nsa_ops.NSAAttention.decode_step`. Tensors it exposes (``key_pages``...) may be replaced by larger ones
    when a pool grows: read them again after each step."""

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim_qk: int, head_dim_v: int,
                 compress_block_size: int, compress_stride: int, *, page_size: int = 64,
                 compressed_page_size: Optional[int] = None, max_len: Optional[int] = None,
                 dtype: torch.dtype, device: Union[torch.device, str, None] = None) -> None:
        for value, name in ((batch_size, "batch_size"), (page_size, "page_size")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if compressed_page_size is None:
            compressed_page_size = page_size
        if isinstance(compressed_page_size, bool) or not isinstance(compressed_page_size, int) \
                or compressed_page_size < 1:
            raise ValueError(f"compressed_page_size must be an int >= 1, got {compressed_page_size!r}")
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 0):
            raise ValueError(f"max_len must be None or an int >= 0 (a sizing hint), got {max_len!r}")
        self.batch_size = batch_size
        self.num_kv_heads, self.head_dim_qk, self.head_dim_v = num_kv_heads, head_dim_qk, head_dim_v
        self.compress_block_size, self.compress_stride = compress_block_size, compress_stride
        self.page_size, self.compressed_page_size = page_size, compressed_page_size
        self.dtype, self.device = dtype, torch.device(device) if device is not None else torch.device("cpu")
        hint = max_len if max_len is not None else page_size
        raw_pages = max(1, batch_size * -(-hint // page_size))
        cmp_tokens = (hint - compress_block_size) // compress_stride + 1 if hint >= compress_block_size else 1
        cmp_pages = max(1, batch_size * -(-cmp_tokens // compressed_page_size))
        N2 = num_kv_heads
        self.key_pages = self._zeros(raw_pages, page_size, N2, head_dim_qk)
        self.value_pages = self._zeros(raw_pages, page_size, N2, head_dim_v)
        self.compressed_key_pages = self._zeros(cmp_pages, compressed_page_size, N2 * head_dim_qk)
        self.compressed_value_pages = self._zeros(cmp_pages, compressed_page_size, N2 * head_dim_v)
        self._free: list[int] = list(range(raw_pages - 1, -1, -1))         # pop() gives the lowest page first
        self._free_cmp: list[int] = list(range(cmp_pages - 1, -1, -1))
        self._pages: list[list[int]] = [[] for _ in range(batch_size)]
        self._cmp_pages: list[list[int]] = [[] for _ in range(batch_size)]
        self._lengths = [0] * batch_size
        self.prefilled = False

    # ---- state ----

    def _zeros(self, *shape: int) -> torch.Tensor:
        # Zero-filled: pages rows not yet written hold finite values (no operator reads them, §4 "What is validated").
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    @property
    def seq_lens(self) -> list[int]:
        """S_b, the raw tokens held for each sequence."""
        return list(self._lengths)

    def num_compressed(self, b: int) -> int:
        """C_b = (S_b - l)//d + 1 if S_b >= l, else 0: the compressed tokens held for sequence b (compress.md §3)."""
        S, l, d = self._lengths[b], self.compress_block_size, self.compress_stride
        return (S - l) // d + 1 if S >= l else 0

    def page_ids(self, b: int) -> list[int]:
        return list(self._pages[b])

    def compressed_page_ids(self, b: int) -> list[int]:
        return list(self._cmp_pages[b])

    @property
    def num_pages(self) -> int:
        return self.key_pages.shape[0]

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def reset(self) -> None:
        """Returns every page to the free lists and empties every sequence (the storage is kept)."""
        for b in range(self.batch_size):
            self._free.extend(reversed(self._pages[b]))
            self._free_cmp.extend(reversed(self._cmp_pages[b]))
            self._pages[b], self._cmp_pages[b] = [], []
        self._lengths = [0] * self.batch_size
        self.prefilled = False

    def __repr__(self) -> str:
        n_cmp = self.compressed_key_pages.shape[0]
        return (f"NSACache(batch_size={self.batch_size}, seq_lens={self._lengths}, page_size={self.page_size}, "
                f"pages={self.num_pages - len(self._free)}/{self.num_pages}, compressed_page_size="
                f"{self.compressed_page_size}, compressed_pages={n_cmp - len(self._free_cmp)}/{n_cmp}, "
                f"dtype={self.dtype})")

    # ---- page allocation ----

    @staticmethod
    def _grown(t: torch.Tensor, extra: int) -> torch.Tensor:
        new = torch.zeros((t.shape[0] + extra,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        new[:t.shape[0]] = t
        return new

    def _take_raw(self) -> int:
        if not self._free:
            n = self.key_pages.shape[0]
            self.key_pages, self.value_pages = self._grown(self.key_pages, n), self._grown(self.value_pages, n)
            self._free = list(range(2 * n - 1, n - 1, -1))
        return self._free.pop()

    def _take_cmp(self) -> int:
        if not self._free_cmp:
            n = self.compressed_key_pages.shape[0]
            self.compressed_key_pages = self._grown(self.compressed_key_pages, n)
            self.compressed_value_pages = self._grown(self.compressed_value_pages, n)
            self._free_cmp = list(range(2 * n - 1, n - 1, -1))
        return self._free_cmp.pop()

    def _reserve(self, b: int, length: int) -> None:
        """Pages for S_b = ``length`` raw tokens and the compressed tokens they complete."""
        while len(self._pages[b]) * self.page_size < length:
            self._pages[b].append(self._take_raw())
        l, d = self.compress_block_size, self.compress_stride
        self._reserve_compressed(b, (length - l) // d + 1 if length >= l else 0)

    def _reserve_compressed(self, b: int, C: int) -> None:
        """Compressed pages for C compressed tokens of sequence b."""
        while len(self._cmp_pages[b]) * self.compressed_page_size < C:
            self._cmp_pages[b].append(self._take_cmp())

    # ---- addressing ----

    def _raw_slots(self, b: int, start: int, stop: int) -> list[int]:
        P, pages = self.page_size, self._pages[b]
        return [pages[p // P] * P + p % P for p in range(start, stop)]

    def compressed_slot(self, b: int, c: int) -> int:
        """The row of the compressed cache viewed as ``[num_cmp_pages·Pc, N2, D]`` holding compressed token c of b
        (docs/spec/decode.md §1 "Cache geometry")."""
        Pc = self.compressed_page_size
        return self._cmp_pages[b][c // Pc] * Pc + c % Pc

    def block_table(self, batches: list[int], compressed: bool = False) -> torch.Tensor:
        """int32 ``[len(batches), max_pages]`` page numbers of the given sequences, -1 past each one's pages."""
        lists = [(self._cmp_pages if compressed else self._pages)[b] for b in batches]
        width = max([1] + [len(p) for p in lists])
        return torch.tensor([p + [-1] * (width - len(p)) for p in lists], dtype=torch.int32, device=self.device)

    def _write_raw(self, slots: list[int], key: torch.Tensor, value: torch.Tensor) -> None:
        """Rows ``key [n, N2, Dqk]`` / ``value [n, N2, Dv]`` into the raw pages at the given flat slots."""
        idx = torch.tensor(slots, dtype=torch.int64, device=self.device)
        N2 = self.num_kv_heads
        self.key_pages.view(-1, N2, self.head_dim_qk).index_copy_(0, idx, key.to(self.dtype))
        self.value_pages.view(-1, N2, self.head_dim_v).index_copy_(0, idx, value.to(self.dtype))

    def compressed_key_slots(self) -> torch.Tensor:
        """The compressed key pages viewed as npu_nsa_compress_infer's cache ``[num_slots, N2, Dqk]``."""
        return self.compressed_key_pages.view(-1, self.num_kv_heads, self.head_dim_qk)

    def compressed_value_slots(self) -> torch.Tensor:
        return self.compressed_value_pages.view(-1, self.num_kv_heads, self.head_dim_v)
