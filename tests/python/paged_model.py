"""fp64 models of the paged decode attention operators (docs/spec/decode.md §4 select_attention_infer, §9
paged_window_attention), written from the contract with plain Python loops over the paged cache and NumPy, and
the per-element comparison rule of the tests. Also a builder of random paged cases (shuffled pages, -1 padding in
the block table, NaN in every cache row that no position < S_b maps to, so that a read of it shows).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch

F32_EPS = 2.0 ** -23
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def rha(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """rha_T of the float32 value of x (to nearest, ties away from zero), as float64; identity for fp32/fp64."""
    x = np.asarray(x, dtype=np.float64)
    if dtype == torch.bfloat16:
        u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
        r = ((u + 0x8000) >> 16) << 16
        return r.astype(np.uint32).view(np.float32).astype(np.float64)
    if dtype == torch.float16:
        f = x.astype(np.float32).astype(np.float64)
        a = f.astype(np.float16).astype(np.float64)  # nearest, ties to even
        toward = np.where(f > a, np.inf, -np.inf)
        b = np.nextafter(a.astype(np.float16), toward.astype(np.float16)).astype(np.float64)
        tie = (f != a) & (np.abs(f - a) == np.abs(f - b))
        return np.where(tie & (np.abs(b) > np.abs(a)), b, a)
    return x


def rne(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    return torch.tensor(np.asarray(x, dtype=np.float64)).to(torch.float32).to(dtype).double().numpy()


def ulp(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """One unit in the last place of the dtype at |x|."""
    prec, emin = {torch.bfloat16: (8, -126), torch.float16: (11, -14), torch.float32: (24, -126),
                  torch.float64: (53, -1022)}[dtype]
    x = np.abs(np.asarray(x, dtype=np.float64))
    _, e = np.frexp(np.where(x > 0, x, 1.0))
    e = np.where(x > 0, e, emin + 1)
    e = np.maximum(e, emin + 1)
    return np.ldexp(1.0, e - prec)


@dataclass
class PagedCase:
    """A paged decode case: per-batch q_b and S_b, caches [num_pages, P, N2, D|Dv], a shuffled block table."""

    dtype: torch.dtype
    q: list
    s: list
    N1: int
    N2: int
    D: int
    Dv: int
    P: int
    query: torch.Tensor = None  # [T, N1, D]
    key: torch.Tensor = None  # [num_pages, P, N2, D]
    value: torch.Tensor = None  # [num_pages, P, N2, Dv]
    table: torch.Tensor = None  # [B, max_pages] int32
    topk: torch.Tensor = None  # [T, N2, K] int32
    lp: int = 1
    K: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def B(self) -> int:
        return len(self.s)

    def page_row(self, b: int, p: int) -> tuple[int, int]:
        return int(self.table[b, p // self.P]), p % self.P


def make_case(dtype, q, s, N1, N2, D, Dv, P, *, seed=0, spare=2, low=-2.0, high=2.0) -> PagedCase:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    c = PagedCase(dtype, list(q), list(s), N1, N2, D, Dv, P)
    pages = [math.ceil(x / P) for x in s]
    max_pages = max(pages) + 1
    num_pages = sum(pages) + spare
    perm = list(range(num_pages))
    rng.shuffle(perm)
    table = torch.full((c.B, max_pages), -1, dtype=torch.int32)
    it = iter(perm)
    for b, n in enumerate(pages):
        for k in range(n):
            table[b, k] = next(it)
    c.table = table
    key = torch.full((num_pages, P, N2, D), float("nan"), dtype=torch.float64)
    value = torch.full((num_pages, P, N2, Dv), float("nan"), dtype=torch.float64)
    for b in range(c.B):
        for p in range(s[b]):
            pg, r = c.page_row(b, p)
            key[pg, r] = torch.empty(N2, D, dtype=torch.float64).uniform_(low, high, generator=gen)
            value[pg, r] = torch.empty(N2, Dv, dtype=torch.float64).uniform_(low, high, generator=gen)
    c.key, c.value = key.to(dtype), value.to(dtype)
    c.query = torch.empty(sum(q), N1, D, dtype=torch.float64).uniform_(low, high, generator=gen).to(dtype)
    return c


def random_topk(c: PagedCase, lp: int, K: int, *, seed=0, p_empty=0.2) -> None:
    """K slots per (token, KV head): -1 with probability p_empty, else a valid block (duplicates allowed)."""
    rng = random.Random(seed)
    c.lp, c.K = lp, K
    rows = []
    for b in range(c.B):
        blocks = math.ceil(c.s[b] / lp)
        for _ in range(c.q[b]):
            rows.append([[-1 if rng.random() < p_empty else rng.randrange(blocks) for _ in range(K)]
                         for _ in range(c.N2)])
    c.topk = torch.tensor(rows, dtype=torch.int32).reshape(sum(c.q), c.N2, K)


def select_positions(c: PagedCase, b: int, i: int, t: int, n2: int) -> list[int]:
    """§4 step 1: slot x gives [x l', min((x+1) l', L_i)), L_i = S_b - (q_b - 1 - i); -1 slots are empty."""
    L = c.s[b] - (c.q[b] - 1 - i)
    out = []
    for x in c.topk[t, n2].tolist():
        if x != -1:
            out.extend(range(x * c.lp, min((x + 1) * c.lp, L)))
    return out


def window_positions(c: PagedCase, b: int, i: int, window: int) -> list[int]:
    """§9: [max(0, L_i - window), L_i)."""
    L = c.s[b] - (c.q[b] - 1 - i)
    return list(range(max(0, L - window), L))


def model(c: PagedCase, scale: float, *, select: bool, window: int = 0, normalised: bool | None = None,
          extra: dict | None = None):
    """fp64 model of §4 steps 3-4 (select: the slots' positions, unnormalised P rounded half away, division last)
    or of §9 (the window's positions, normalised P rounded half away), over the paged cache; ``normalised``
    overrides which P is rounded (the training select_attention rounds the normalised one). Returns (out, tol,
    zero) as [T, N1, Dv] arrays: the unrounded value, the per-element tolerance (one ulp of the dtype at the value
    for the final rounding, twice the largest effect of one P rounding flipping, and the fp32 accumulation and
    dot-product errors times the sum of |P v|), and the rows that must be exactly zero. When ``extra`` is a dict,
    it receives "exact" (the attention with P unrounded) and "budget" (a bound of |rounded-P result - exact|
    before the final rounding: half an ulp of each rounded P times |v|, plus the fp32 terms)."""
    if normalised is None:
        normalised = not select
    dt = c.dtype
    low = dt in (torch.bfloat16, torch.float16)
    G = c.N1 // c.N2
    scale = float(np.float32(scale))
    q = c.query.double().numpy()
    k = c.key.double().numpy()
    v = c.value.double().numpy()
    T = sum(c.q)
    out = np.zeros((T, c.N1, c.Dv))
    tol = np.zeros_like(out)
    exact = np.zeros_like(out)
    budget = np.zeros_like(out)
    zero = np.zeros(out.shape, dtype=bool)
    t = 0
    for b in range(c.B):
        for i in range(c.q[b]):
            for h in range(c.N1):
                n2 = h // G
                pos = select_positions(c, b, i, t, n2) if select else window_positions(c, b, i, window)
                if not pos:
                    zero[t, h] = True
                    continue
                kk = np.stack([k[c.page_row(b, p)[0], c.page_row(b, p)[1], n2] for p in pos])
                vv = np.stack([v[c.page_row(b, p)[0], c.page_row(b, p)[1], n2] for p in pos])
                prod = kk * q[t, h][None, :]
                S = prod.sum(axis=1) * scale
                dot_rel = (c.D * F32_EPS * np.abs(prod).sum(axis=1) * abs(scale)).max()
                e = np.exp(S - S.max())
                l_sum = e.sum()
                pe = e / l_sum if normalised else e
                pr = rha(pe, dt) if low else pe
                acc = (pr[:, None] * vv).sum(axis=0)
                pv_abs = (np.abs(pr)[:, None] * np.abs(vv)).sum(axis=0)
                flip = (ulp(pe, dt)[:, None] * np.abs(vv)).max(axis=0) if low else np.zeros(c.Dv)
                half = (0.5 * ulp(pe, dt)[:, None] * np.abs(vv)).sum(axis=0) if low else np.zeros(c.Dv)
                if not normalised:
                    acc, pv_abs, flip, half = acc / l_sum, pv_abs / l_sum, flip / l_sum, half / l_sum
                out[t, h] = acc
                fp = (64 * F32_EPS + 2 * dot_rel) * pv_abs
                tol[t, h] = ulp(acc, dt) + 2 * flip + fp
                exact[t, h] = ((e / l_sum)[:, None] * vv).sum(axis=0)
                budget[t, h] = half + fp
            t += 1
    if extra is not None:
        extra["exact"], extra["budget"] = exact, budget
    return out, tol, zero


def assert_close(got: torch.Tensor, out: np.ndarray, tol: np.ndarray, zero: np.ndarray) -> None:
    """Every element within its tolerance; rows the contract makes zero exactly +0."""
    g = got.double().numpy().reshape(out.shape)
    assert np.all(g[zero] == 0) and not np.any(np.signbit(g[zero])), "rows without entry must be +0"
    err = np.abs(g - out)
    bad = ~zero & ~(err <= tol)
    if bad.any():
        idx = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{bad.sum()} elements out of tolerance; first {idx}: got {g[idx]}, model {out[idx]}, "
                             f"error {err[idx]} > tolerance {tol[idx]}")
