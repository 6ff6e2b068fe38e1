r"""Measuring a library's conventions by calling it directly on inputs whose answer is obvious.

With every query and key zero, every visible key scores the same, so a
query's output is the plain mean of the values it sees; with the values
the identity matrix (key :math:`j`'s value is the unit vector
:math:`e_j`), that mean *is* the set it sees: entry :math:`j` is
:math:`1/n` for each of the :math:`n` visible keys and 0 elsewhere, and the
lse is :math:`\log n`. A probe calls the library on :func:`one_hot_inputs`
with its own arguments (its causal flag, its window, its mask), reads back
which keys each query saw with :func:`seen`, and names the convention with
the classifiers below, so that the docs' convention table is what was
measured, not what was remembered. What a bottom-right causal call gives two
queries over four keys, read back:

>>> import numpy as np
>>> q, k, v = one_hot_inputs(q_len=2, k_len=4)
>>> out = np.array([[1/3, 1/3, 1/3, 0], [1/4, 1/4, 1/4, 1/4]])  # what bottom-right gives
>>> seen(out)
[(0, 1, 2), (0, 1, 2, 3)]
>>> alignment_of(seen(out), k_len=4)
'bottom-right'
>>> lse_of(np.log(np.array([3.0, 4.0], dtype=np.float32)), [3, 4])
'natural log, float32'
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def one_hot_inputs(
    *, q_len: int, k_len: int, head_dim: int | None = None, dtype: str = "float32"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q (Sq, D) and k (Sk, D) zeros, v (Sk, Sk) the identity: every output row is the mean
    of the visible keys' unit vectors. ``head_dim`` defaults to ``k_len`` (q, k, v alike)."""
    D = k_len if head_dim is None else head_dim
    q = np.zeros((q_len, D), dtype=dtype)  # (Sq, D)
    k = np.zeros((k_len, D), dtype=dtype)  # (Sk, D)
    v = np.eye(k_len, dtype=dtype)  # (Sk, Sk)
    return q, k, v


def seen(out: np.ndarray, *, tol: float = 1e-3) -> list[tuple[int, ...]]:
    """Per query row of ``out`` (Sq, Sk) from :func:`one_hot_inputs`, the keys it saw:
    the entries near ``1/n`` for the ``n`` entries that are not near 0."""
    rows: list[tuple[int, ...]] = []
    for row in np.asarray(out, dtype=np.float64):
        if not np.all(np.isfinite(row)):
            rows.append(())
            continue
        rows.append(tuple(int(j) for j in np.flatnonzero(np.abs(row) > tol)))
    return rows


def alignment_of(sets: Sequence[tuple[int, ...]], *, k_len: int) -> str:
    """Where causal queries sit, from the keys each saw with fewer queries than keys.

    ``"bottom-right"``: query :math:`i` of :math:`S_q` sees keys up to
    :math:`S_k - S_q + i`, the KV-cache alignment; ``"top-left"``: up to
    :math:`i`; anything else is spelled out.
    """
    Sq = len(sets)
    bottom = [tuple(range(k_len - Sq + i + 1)) for i in range(Sq)]
    top = [tuple(range(min(i + 1, k_len))) for i in range(Sq)]
    if list(sets) == bottom:
        return "bottom-right"
    if list(sets) == top:
        return "top-left"
    return f"neither: queries saw {list(sets)}"


def reach_of(keys: tuple[int, ...], query_at: int) -> str:
    """The keys one query at position ``query_at`` saw, as a reach: ``"q-2 .. q"`` (3 keys)."""
    if not keys:
        return "no key"
    lo, hi = keys[0] - query_at, keys[-1] - query_at
    contiguous = list(keys) == list(range(keys[0], keys[-1] + 1))
    span = f"q{lo:+d}" if lo else "q"
    end = f"q{hi:+d}" if hi else "q"
    text = f"{span} .. {end} ({len(keys)} key{'s' if len(keys) != 1 else ''})"
    return text if contiguous else f"{text}, with gaps: {list(keys)}"


def empty_row_of(row: np.ndarray, v: np.ndarray | None = None) -> str:
    """What a query with no visible key got: ``"0"``, ``"NaN"``, ``"mean of V"`` (every key
    weighed alike, as a mask of the dtype's lowest value gives), or the values."""
    row = np.asarray(row, dtype=np.float64)
    if np.all(np.isnan(row)):
        return "NaN"
    if np.any(~np.isfinite(row)):
        return f"non-finite: {row.tolist()}"
    if np.all(row == 0):
        return "0"
    if v is not None:
        mean = np.asarray(v, dtype=np.float64).mean(axis=0)
        if mean.shape == row.shape and np.allclose(row, mean, atol=1e-3):
            return "mean of V"
    return f"other: {np.round(row, 4).tolist()}"


def lse_of(lse: np.ndarray, counts: Sequence[int]) -> str:
    """The lse's base and dtype, from rows that saw ``counts`` keys each (all scores 0, so
    the natural lse is :math:`\\log n`): ``"natural log, float32"``, ``"log2, float16"``."""
    values = np.asarray(lse, dtype=np.float64).reshape(-1)
    n = np.asarray(counts, dtype=np.float64).reshape(-1)
    dtype = np.asarray(lse).dtype.name
    if values.shape != n.shape:
        return f"unexpected shape {np.asarray(lse).shape} for {len(n)} rows"
    for base, name in ((math.e, "natural log"), (2.0, "log2")):
        if np.allclose(values, np.log(n) / math.log(base), atol=1e-3):
            return f"{name}, {dtype}"
    return f"neither natural nor base 2: {values.tolist()}, {dtype}"


def overflow_inputs(
    *, head_dim: int = 8, dtype: str = "float16"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """One query, two keys and a scale whose product :math:`q \\cdot k = 8 \\cdot 128^2 = 131072`
    overflows float16 (largest 65504) while the scaled score, :math:`131072 / 2^{14} = 8`, does
    not: q (1, D), k (2, D), v (2, D), scale.

    A library that forms :math:`q k^T` in float16 returns NaN or infinity;
    one that forms it in float32 returns the finite softmax of (8, 0).
    """
    q = np.full((1, head_dim), 128.0, dtype=dtype)  # (1, D)
    k = np.stack([np.full(head_dim, 128.0), np.zeros(head_dim)]).astype(dtype)  # (2, D)
    v = np.stack([np.ones(head_dim), np.zeros(head_dim)]).astype(dtype)  # (2, D)
    return q, k, v, 2.0**-14


def scores_of(out: np.ndarray) -> str:
    """The dtype :math:`q k^T` was formed in, from the output on :func:`overflow_inputs`."""
    row = np.asarray(out, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(row)):
        return "float16: q·k overflows where the scaled score would not"
    expected = 1.0 / (1.0 + math.exp(-8.0))  # the weight of key 0
    if np.allclose(row, expected, atol=2e-3):
        return "float32 or wider"
    return f"other: output {np.round(row, 4).tolist()} (expected {expected:.4f})"
