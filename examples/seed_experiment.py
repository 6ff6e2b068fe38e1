r"""The seed experiment: one causal self-attention layer, run with and without a KV cache.

A minGPT-style ``CausalSelfAttention`` layer (``c_attn`` makes q, k and v, the
heads attend causally through :func:`refattn.attention`, ``c_proj`` mixes the
heads back) reads one random sequence in two ways:

- **without a cache**, the full causal pass: all T tokens at once, token t's
  query seeing keys 0..t;
- **with a cache**, as a generator runs it: a *prefill* pass over the first
  3 tokens, whose keys and values go into a :class:`refattn.StaticCache`, then
  one *decode* step per remaining token, which computes q, k and v for that
  token only, appends its k and v, and attends from its one query to every
  cached key.

Why keys and values are cached and queries are not: token t's query is used
once, for token t's own output, while its key and value are read again by the
query of every later token. Keeping them makes the decode step of the s-th
token one query against s keys, O(s) work. Without them, producing the s-th
token means recomputing the causal pass over all s tokens, O(s^2): every
token's projections again, and every query against every key.

The script shows

(a) that the two runs agree to rounding (``np.allclose``, and the largest
    difference);
(b) that they are not bit-equal, and why: the same terms are added in a
    different order. NumPy hands a one-row product to another BLAS routine
    than a (T, .) product, and a softmax normaliser summed over a row padded
    with exact zeros is grouped differently from one summed over the visible
    terms alone. Each stage is fed the same inputs both ways, so every
    difference it prints is that stage's own; the orders are then written out
    and checked term by term against what NumPy returned;
(c) that earlier outputs never change: decoding more tokens leaves the outputs
    already emitted, and the cached keys and values, bitwise as they were;
    recomputing the full pass over a longer sequence keeps its earlier rows
    only to rounding;
(d) the cost of the s-th token as s grows, timed and counted in FLOPs.

Run::

    python examples/seed_experiment.py --tokens 16 --plot cost_per_token.png
"""

from __future__ import annotations

import argparse
import math
import statistics
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, cast

import numpy as np

import refattn
from refattn.testing.tolerance import ROUNDING_EPS, rounding_tolerance

#: Tokens the cached run reads in its one prefill pass before decoding.
PREFILL = 3
DTYPES = ("float32", "float64")


# -- the layer ------------------------------------------------------------------


@dataclass(frozen=True)
class CausalSelfAttention:
    """The weights of minGPT's ``CausalSelfAttention``.

    ``c_attn`` makes q, k and v from each token; ``c_proj`` mixes the heads' outputs.
    """

    w_attn: np.ndarray  # (C, 3C)
    b_attn: np.ndarray  # (3C,)
    w_proj: np.ndarray  # (C, C)
    b_proj: np.ndarray  # (C,)
    n_head: int

    @property
    def d_model(self) -> int:
        return int(self.w_attn.shape[0])

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.w_attn.dtype

    @classmethod
    def random(
        cls, rng: np.random.Generator, d_model: int, n_head: int, dtype: Any = np.float32
    ) -> CausalSelfAttention:
        """Weights of variance 1/d_model, so that q, k and v have unit variance and the
        scores are of order 1 (minGPT's 0.02 would leave the softmax nearly uniform)."""
        if d_model < 1 or n_head < 1 or d_model % n_head:
            raise ValueError(
                f"d_model must be a positive multiple of n_head; got d_model={d_model}, "
                f"n_head={n_head}"
            )
        C = d_model
        return cls(
            w_attn=(rng.standard_normal((C, 3 * C)) / math.sqrt(C)).astype(dtype),
            b_attn=(0.1 * rng.standard_normal(3 * C)).astype(dtype),
            w_proj=(rng.standard_normal((C, C)) / math.sqrt(C)).astype(dtype),
            b_proj=(0.1 * rng.standard_normal(C)).astype(dtype),
            n_head=n_head,
        )

    def astype(self, dtype: Any) -> CausalSelfAttention:
        """The same weights in another dtype (float32 weights widen to float64 exactly)."""
        return CausalSelfAttention(
            w_attn=self.w_attn.astype(dtype),
            b_attn=self.b_attn.astype(dtype),
            w_proj=self.w_proj.astype(dtype),
            b_proj=self.b_proj.astype(dtype),
            n_head=self.n_head,
        )


def split_heads(t: np.ndarray, n_head: int) -> np.ndarray:
    """(B, T, C) -> (B, H, T, C // H)."""
    B, T, C = t.shape
    return t.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)  # (B, H, T, hd)


def merge_heads(y: np.ndarray) -> np.ndarray:
    """(B, H, T, hd) -> (B, T, H * hd)."""
    B, H, T, hd = y.shape
    return y.transpose(0, 2, 1, 3).reshape(B, T, H * hd)  # (B, T, C)


def project_qkv(
    layer: CausalSelfAttention, x: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``c_attn``: (B, T, C) -> q, k, v, each (B, H, T, hd)."""
    qkv = x @ layer.w_attn + layer.b_attn  # (B, T, 3C)
    q, k, v = np.split(qkv, 3, axis=-1)  # (B, T, C) each
    return split_heads(q, layer.n_head), split_heads(k, layer.n_head), split_heads(v, layer.n_head)


def attention_layer_full(layer: CausalSelfAttention, x: np.ndarray) -> np.ndarray:
    """The layer without a cache, all of x at once: (B, T, C) -> (B, T, C)."""
    q, k, v = project_qkv(layer, x)  # (B, H, T, hd) each
    y = cast(np.ndarray, refattn.attention(q, k, v, causal=True))  # (B, H, T, hd)
    return merge_heads(y) @ layer.w_proj + layer.b_proj  # (B, T, C)


def attention_layer_cached(
    layer: CausalSelfAttention, x_new: np.ndarray, cache: refattn.StaticCache
) -> np.ndarray:
    """The layer on new tokens only, (B, n, C) -> (B, n, C): their keys and values
    join the cache, and their queries attend to everything cached."""
    n = x_new.shape[1]
    q, k, v = project_qkv(layer, x_new)  # (B, H, n, hd) each
    q_pos = cache.lengths[:, None] + np.arange(n)  # (B, n): where the new tokens sit
    k_all, v_all, k_pos = cache.update(k, v)  # (B, H, s, hd) twice, (B, s)
    y = refattn.attention(q, k_all, v_all, causal=True, q_pos=q_pos, k_pos=k_pos)
    y = cast(np.ndarray, y)  # (B, H, n, hd); no lse asked for
    return merge_heads(y) @ layer.w_proj + layer.b_proj  # (B, n, C)


def new_cache(layer: CausalSelfAttention, batch: int, max_len: int) -> refattn.StaticCache:
    """An empty cache for the layer's keys and values (a KV head per query head)."""
    return refattn.StaticCache(
        batch=batch,
        kv_heads=layer.n_head,
        head_dim=layer.d_model // layer.n_head,
        max_len=max_len,
        dtype=layer.dtype,
    )


def schedule(tokens: int, prefill: int) -> list[int]:
    """Tokens per pass: the prefill (if any), then one token per decode step.

    >>> schedule(6, 3)
    [3, 1, 1, 1]
    >>> schedule(2, 0)
    [1, 1]
    """
    return ([prefill] if prefill else []) + [1] * (tokens - prefill)


def cached_passes(
    layer: CausalSelfAttention, x: np.ndarray, prefill: int, cache: refattn.StaticCache
) -> list[np.ndarray]:
    """Feed x to the layer pass by pass through ``cache``; each pass's (B, n, C) output."""
    outputs, start = [], 0
    for n in schedule(x.shape[1], prefill):
        outputs.append(attention_layer_cached(layer, x[:, start : start + n], cache))
        start += n
    return outputs


def decode_with_cache(layer: CausalSelfAttention, x: np.ndarray, prefill: int) -> np.ndarray:
    """The layer with a fresh cache: prefill, then a token per step, (B, T, C) -> (B, T, C)."""
    cache = new_cache(layer, x.shape[0], x.shape[1])
    return np.concatenate(cached_passes(layer, x, prefill, cache), axis=1)


# -- (b) where the bits part ----------------------------------------------------


def rows_differing(a: np.ndarray, b: np.ndarray) -> int:
    """How many rows (vectors along the last axis) of a and b differ in some bit."""
    return int(np.sum(np.any(a != b, axis=-1)))


def ulps(a: np.ndarray, b: np.ndarray) -> float:
    """``max |a - b|`` in units of the last place of the largest entry compared.

    Rounding noise at the scale of the values; an entry that is small by
    cancellation would count its own ulps in the thousands.
    """
    if a.size == 0:
        return 0.0
    largest = np.max(np.maximum(np.abs(a), np.abs(b)))
    return float(np.max(np.abs(a - b)) / np.spacing(largest))


@dataclass(frozen=True)
class Stage:
    """One product or sum, computed as the full pass does it and as the cached run does."""

    name: str
    full: str  # what the full pass computes
    cached: str  # what the cached run computes
    differing: int  # entries that differ in some bit
    of: int
    ulps: float


def compare(name: str, full: str, cached: str, a: np.ndarray, b: np.ndarray) -> Stage:
    return Stage(name, full, cached, int(np.sum(a != b)), a.size, ulps(a, b))


def softmax_terms(s: np.ndarray) -> np.ndarray:
    """``exp(s - max)`` of causal (..., T, T) scores, exactly 0 where hidden: what the
    softmax normaliser sums, computed as refattn computes it."""
    T = s.shape[-1]
    s = np.where(np.tril(np.ones((T, T), dtype=bool)), s, -np.inf)
    return np.exp(s - np.max(s, axis=-1, keepdims=True))  # (..., T, T)


def scaled_scores(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(B, H, T, hd), (B, H, T, hd) -> (B, H, T, T); q scaled first, as refattn does."""
    return (q * (1.0 / math.sqrt(q.shape[-1]))) @ np.swapaxes(k, -1, -2)


def stages_for_token(layer: CausalSelfAttention, x: np.ndarray, t: int) -> list[Stage]:
    """Token t's part of every product, as rows of the full pass's product and as the
    cached run's own product, both fed the full pass's inputs so nothing upstream differs."""
    _, T, C = x.shape
    q, k, v = project_qkv(layer, x)  # (B, H, T, hd) each
    hd = q.shape[-1]
    n, seen = min(PREFILL, T), slice(0, t + 1)  # prefill tokens; the keys a step at t reads
    qkv = x @ layer.w_attn  # (B, T, 3C)
    s = scaled_scores(q, k)  # (B, H, T, T)
    e = softmax_terms(s)  # (B, H, T, T)
    p = e / np.sum(e, axis=-1, keepdims=True)  # (B, H, T, T), 0 above the diagonal
    pv = p @ v  # (B, H, T, hd)
    y = merge_heads(pv)  # (B, T, C)
    proj = y @ layer.w_proj  # (B, T, C)

    qkv_prefill = x[:, :n] @ layer.w_attn  # (B, n, 3C)
    qkv_step = (x[:, t : t + 1] @ layer.w_attn)[:, 0]  # (B, 3C)
    s_step = scaled_scores(q[:, :, t : t + 1], k[:, :, seen])[:, :, 0]  # (B, H, t+1)
    pv_step = (p[:, :, t : t + 1, seen] @ v[:, :, seen])[:, :, 0]  # (B, H, hd)
    proj_step = (y[:, t : t + 1] @ layer.w_proj)[:, 0]  # (B, C)
    return [
        compare("c_attn, prefill", f"rows 0-{n - 1} of ({T}, {C}) @ W_attn",
                f"({n}, {C}) @ W_attn", qkv[:, :n], qkv_prefill),
        compare("c_attn", f"row {t} of ({T}, {C}) @ W_attn", f"(1, {C}) @ W_attn",
                qkv[:, t], qkv_step),
        compare("q k^T, each head", f"row {t} of ({T}, {hd}) @ ({hd}, {T})",
                f"(1, {hd}) @ ({hd}, {t + 1})", s[:, :, t, seen], s_step),
        compare("p v, each head", f"row {t} of ({T}, {T}) @ ({T}, {hd})",
                f"(1, {t + 1}) @ ({t + 1}, {hd})", pv[:, :, t], pv_step),
        compare("c_proj", f"row {t} of ({T}, {C}) @ W_proj", f"(1, {C}) @ W_proj",
                proj[:, t], proj_step),
    ]  # fmt: skip


def normaliser_stage(layer: CausalSelfAttention, x: np.ndarray) -> tuple[Stage, int]:
    """Every row's softmax normaliser in every head, summed over the full pass's whole
    row (hidden terms exact zeros) and over the visible terms alone, as a step sums it.

    Also returns for how many rows :func:`pairwise_sum` reproduces ``np.sum``
    bitwise both ways.
    """
    q, k, _ = project_qkv(layer, x)
    B, H, T, _ = q.shape
    e = softmax_terms(scaled_scores(q, k))  # (B, H, T, T)
    whole_row = np.sum(e, axis=-1)  # (B, H, T)
    visible_only = np.empty_like(whole_row)  # (B, H, T)
    reproduced = 0
    for b, h, t in np.ndindex(B, H, T):
        row = e[b, h, t]  # (T,): t + 1 visible terms, then exact zeros
        visible_only[b, h, t] = np.sum(row[: t + 1])
        reproduced += bool(
            pairwise_sum(row) == whole_row[b, h, t]
            and pairwise_sum(row[: t + 1]) == visible_only[b, h, t]
        )
    stage = compare("softmax sum", f"row t: {T} terms", "t + 1 terms", whole_row, visible_only)
    return stage, reproduced


def pairwise_sum(a: np.ndarray) -> np.floating[Any]:
    """A 1-d array summed in NumPy's order: fewer than 8 terms left to right; up to 128
    in 8 interleaved partial sums, combined as a tree, with the remainder added last;
    longer arrays split in two halves (the first a multiple of 8), each summed so.

    >>> a = np.float32([1.0] + [2**-24] * 8)  # 1, then eight halves of an ulp of 1
    >>> float(np.sum(a)) == float(pairwise_sum(a)) == 1 + 2**-21
    True
    >>> float(np.cumsum(a)[-1])  # left to right, every half ulp is rounded away
    1.0
    """
    add = a.dtype.type
    n = len(a)
    if n < 8:
        total = add(0)
        for term in a:
            total = add(total + term)
        return total
    if n > 128:
        half = n // 2 - (n // 2) % 8
        return add(pairwise_sum(a[:half]) + pairwise_sum(a[half:]))
    whole = n - n % 8
    r = [add(term) for term in a[:8]]
    for i in range(8, whole, 8):
        r = [add(r[j] + a[i + j]) for j in range(8)]
    total = add(add(add(r[0] + r[1]) + add(r[2] + r[3])) + add(add(r[4] + r[5]) + add(r[6] + r[7])))
    for term in a[whole:]:
        total = add(total + term)
    return total


def fma(a: np.floating[Any], b: np.floating[Any], c: np.floating[Any]) -> np.floating[Any]:
    """``a * b + c`` rounded once, as a fused multiply-add instruction computes it.

    Exact in rationals, then rounded to float64 and on to a's dtype. For float32,
    rounding twice differs from rounding once only when the float64 value lands exactly
    halfway between two float32 values, about once in 2**29 (a candidate order would
    then miss an entry, never gain one it should not).
    """
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    return a.dtype.type(float(exact))


def chunked_dot(a: np.ndarray, b: np.ndarray, chunk: int, chains: int) -> np.floating[Any]:
    """``sum_d a_d b_d`` in chunks of ``chunk`` terms added to a running total; within a
    chunk, ``chains`` FMA accumulators take the terms in turn and are added at the end."""
    add = a.dtype.type
    total = add(0)
    for start in range(0, len(a), chunk):
        acc = [add(0)] * chains
        for d in range(start, min(start + chunk, len(a))):
            acc[d % chains] = fma(a[d], b[d], acc[d % chains])
        partial = acc[0]
        for other in acc[1:]:
            partial = add(partial + other)
        total = add(total + partial)
    return total


#: Orders a BLAS kernel might add a dot product's terms in: (chunk, chains), with
#: chunk 0 meaning all the terms in one chunk.
ORDERS = {
    "one FMA chain": (0, 1),
    "2 interleaved FMA chains": (0, 2),
    "4 interleaved FMA chains": (0, 4),
    "8 interleaved FMA chains": (0, 8),
    "chunks of 4, each one FMA chain, added up": (4, 1),
    "chunks of 8, each one FMA chain, added up": (8, 1),
    "chunks of 4, each 2 interleaved FMA chains, added up": (4, 2),
    "chunks of 8, each 2 interleaved FMA chains, added up": (8, 2),
}


def dot_in_order(a: np.ndarray, b: np.ndarray, order: str) -> np.floating[Any]:
    """``a @ b`` added in one of the :data:`ORDERS`."""
    chunk, chains = ORDERS[order]
    return chunked_dot(a, b, chunk or len(a), chains)


def closest_order(x_row: np.ndarray, w: np.ndarray, product: np.ndarray) -> tuple[str, int]:
    """The order that reproduces most of ``product`` bitwise, and how many entries.

    ``product`` (n,) holds entries NumPy computed from ``x_row`` (C,) and the columns
    of ``w`` (C, n), as part of whatever larger product the caller made.
    """
    hits = {
        order: sum(dot_in_order(x_row, w[:, j], order) == product[j] for j in range(w.shape[1]))
        for order in ORDERS
    }
    best = max(hits, key=lambda order: hits[order])
    return best, int(hits[best])


# -- (c) earlier outputs --------------------------------------------------------


def earlier_outputs_kept(
    layer: CausalSelfAttention, x: np.ndarray, tokens: int, prefill: int
) -> tuple[bool, bool]:
    """Decode x[:, :tokens], then the rest of x through the same cache.

    Returns whether a fresh cached run over all of x gives the first ``tokens``
    outputs bitwise as the shorter run gave them, and whether the cache still
    holds their keys and values bitwise as before the later tokens came.
    """
    B, T, _ = x.shape
    cache = new_cache(layer, B, T)
    first = np.concatenate(cached_passes(layer, x[:, :tokens], prefill, cache), axis=1)
    k_then, v_then = (a.copy() for a in cache.view()[:2])  # (B, H, tokens, hd) each
    cached_passes(layer, x[:, tokens:], 0, cache)
    k_now, v_now, _ = cache.view()  # (B, H, T, hd) each
    longer = decode_with_cache(layer, x, prefill)  # (B, T, C)
    outputs_kept = np.array_equal(longer[:, :tokens], first)
    cache_kept = np.array_equal(k_now[:, :, :tokens], k_then) and np.array_equal(
        v_now[:, :, :tokens], v_then
    )
    return bool(outputs_kept), bool(cache_kept)


def prefix_rows(layer: CausalSelfAttention, x: np.ndarray) -> tuple[int, int, float, bool]:
    """The full pass over x[:, :t] against the first t rows of the full pass over x, for
    t = 1..T-1: rows differing in some bit, rows compared, the largest difference, and
    whether all are ``np.allclose``."""
    T = x.shape[1]
    tol = rounding_tolerance(x.dtype)
    whole = attention_layer_full(layer, x)  # (B, T, C)
    differing, compared, largest, close = 0, 0, 0.0, True
    for t in range(1, T):
        prefix, rows = attention_layer_full(layer, x[:, :t]), whole[:, :t]  # (B, t, C) each
        differing += rows_differing(prefix, rows)
        compared += prefix.shape[0] * t
        largest = max(largest, float(np.max(np.abs(prefix - rows))))
        close = close and np.allclose(prefix, rows, rtol=tol, atol=tol)
    return differing, compared, largest, bool(close)


# -- (d) cost per token ---------------------------------------------------------


def flops_cached_step(s: int, d_model: int) -> int:
    """Matmul FLOPs (a multiply-add is 2) of the decode step of the s-th token, which
    attends to s keys (its own included): c_attn, q k^T, p v, c_proj.

    >>> flops_cached_step(1, 64) == 8 * 64 * 64 + 4 * 64
    True
    """
    C = d_model
    return 2 * C * 3 * C + 2 * s * C + 2 * s * C + 2 * C * C


def flops_full_pass(s: int, d_model: int) -> int:
    """Matmul FLOPs of the full causal pass over s tokens as refattn computes it (all
    s x s scores, the hidden half masked after): s times a decode step's."""
    C = d_model
    return s * (2 * C * 3 * C + 2 * C * C) + 2 * s * s * C + 2 * s * s * C


def time_cached_step(layer: CausalSelfAttention, x: np.ndarray, s: int, repeats: int) -> float:
    """Median seconds of the s-th token's decode step, the s - 1 before it cached."""
    _, k, v = project_qkv(layer, x[:, : s - 1])  # (B, H, s-1, hd) each
    times = []
    for _ in range(repeats):
        cache = new_cache(layer, x.shape[0], s)
        if s > 1:
            cache.update(k, v)  # the earlier tokens, not timed
        start = time.perf_counter()
        attention_layer_cached(layer, x[:, s - 1 : s], cache)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_uncached_token(layer: CausalSelfAttention, x: np.ndarray, s: int, repeats: int) -> float:
    """Median seconds to produce the s-th token without a cache: the full pass over s tokens."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        attention_layer_full(layer, x[:, :s])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sweep_positions(max_len: int) -> list[int]:
    """Powers of two from 8 below max_len, then max_len.

    >>> sweep_positions(100), sweep_positions(4)
    ([8, 16, 32, 64, 100], [4])
    """
    positions = [max_len]
    while positions[0] > 8:
        positions.insert(0, 2 ** math.ceil(math.log2(positions[0]) - 1))
    return positions


@dataclass(frozen=True)
class Cost:
    """The cost of producing the s-th token, both ways."""

    s: int
    cached: float  # seconds, median
    uncached: float
    flops_cached: int
    flops_uncached: int


def cost_sweep(
    layer: CausalSelfAttention, rng: np.random.Generator, max_len: int, repeats: int
) -> list[Cost]:
    x = rng.standard_normal((1, max_len, layer.d_model)).astype(layer.dtype)  # (1, S, C)
    C = layer.d_model
    return [
        Cost(
            s=s,
            cached=time_cached_step(layer, x, s, repeats),
            uncached=time_uncached_token(layer, x, s, repeats),
            flops_cached=flops_cached_step(s, C),
            flops_uncached=flops_full_pass(s, C),
        )
        for s in sweep_positions(max_len)
    ]


def plot_costs(costs: Sequence[Cost], path: str) -> None:
    """Time per token against position, both ways, log-log; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"    matplotlib is not installed: no plot written to {path}")
        return
    s = [c.s for c in costs]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(s, [c.cached * 1e3 for c in costs], "o-", label="KV cache: one query, s keys")
    ax.plot(s, [c.uncached * 1e3 for c in costs], "s-", label="no cache: full pass over s tokens")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("s (tokens in context)")
    ax.set_ylabel("ms per token (median)")
    ax.set_title("Cost of producing the s-th token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"    plot written to {path}")


# -- the report -----------------------------------------------------------------


def say(text: str, indent: int = 4) -> None:
    """Print a paragraph of the report, wrapped; a "- " item hangs under its first word."""
    pad = " " * indent
    hang = pad + "  " if text.startswith("- ") else pad
    print(textwrap.fill(text, width=96, initial_indent=pad, subsequent_indent=hang))


def report_agreement(full: np.ndarray, cached: np.ndarray) -> None:
    tol = rounding_tolerance(full.dtype)
    close = np.allclose(cached, full, rtol=tol, atol=tol)
    largest = np.max(np.abs(cached - full))
    print("(a) The two runs agree to rounding")
    say(f"np.allclose(cached, full, rtol={tol:.3g}, atol={tol:.3g}): {close}")
    say(f"(rtol = atol = {ROUNDING_EPS} machine epsilons of {full.dtype})")
    say(
        f"max |cached - full| = {largest:.3g}, {ulps(cached, full):.2g} ulp of the largest "
        f"output ({np.max(np.abs(full)):.3g})"
    )


def report_bits(
    layer: CausalSelfAttention,
    x: np.ndarray,
    full: np.ndarray,
    cached: np.ndarray,
    rng: np.random.Generator,
) -> None:
    T, n = x.shape[1], min(PREFILL, x.shape[1])
    print("(b) ...but they are not bit-equal")
    say(
        f"output rows that differ in some bit: {rows_differing(cached, full)} of {T} "
        f"(the prefill's: {rows_differing(cached[:, :n], full[:, :n])} of {n}, "
        f"the decoded: {rows_differing(cached[:, n:], full[:, n:])} of {T - n})"
    )
    by_length = {}
    for length in (1, 2, 3, 4, 5, 8, 16, 32):
        xn = rng.standard_normal((1, length, layer.d_model)).astype(layer.dtype)
        decoded = decode_with_cache(layer, xn, min(PREFILL, length))
        by_length[length] = rows_differing(decoded, attention_layer_full(layer, xn))
    say("the same count for fresh sequences of T tokens:")
    print("      T         " + "".join(f"{length:>4}" for length in by_length))
    print("      differing " + "".join(f"{d:>4}" for d in by_length.values()))
    equal = [length for length, d in by_length.items() if d == 0]
    if equal and max(equal) <= PREFILL:
        say(
            f"Bit-equal for T = {', '.join(map(str, equal))}: there the cached run is the prefill "
            "alone, which computes the full pass's own products."
        )
    report_stages(layer, x)


def report_stages(layer: CausalSelfAttention, x: np.ndarray) -> None:
    """Each stage of the last token, both ways from the same inputs, and the orders behind it."""
    T = x.shape[1]
    t = T - 1
    norm, reproduced = normaliser_stage(layer, x)
    print()
    say(f"Stage by stage for the last token (t = {t}), both ways fed the full pass's inputs:")
    print(
        f"      {'stage':<18}{'full pass':<33}{'cached run':<22}{'entries differing':>18}  largest"
    )
    for st in [*stages_for_token(layer, x, t), norm]:
        differing = f"{st.differing} of {st.of}"
        print(f"      {st.name:<18}{st.full:<33}{st.cached:<22}{differing:>18}  {st.ulps:.2g} ulp")
    say(
        "(largest: max |difference| in ulps of the largest entry compared; the softmax sums are "
        "those of every row t in every head)",
        indent=6,
    )
    print()
    say("Why: the same terms, added in another order.")
    say(
        f"- softmax sum: given the same scores, the full pass's row t holds the cached step's "
        f"t + 1 terms, bitwise, then {T} - t - 1 exact zeros. Adding zero is exact, so only the "
        "grouping differs: np.sum adds fewer than 8 terms left to right and more in 8 "
        f"interleaved partial sums. That order, written out (pairwise_sum), gives both sums "
        f"bitwise for {reproduced} of {norm.of} rows."
    )
    entries = min(16, 3 * layer.d_model)
    say(
        f"- c_attn: each entry is a sum of {layer.d_model} products x_d W_dj. Of {len(ORDERS)} "
        f"orders tried, the one that gives most of token {t}'s first {entries} entries bitwise:"
    )
    products = {
        f"row {t} of the full pass's product": (x @ layer.w_attn)[0, t, :entries],
        "the cached run's (1, C) product": (x[:, t : t + 1] @ layer.w_attn)[0, 0, :entries],
    }
    for label, product in products.items():
        order, hits = closest_order(x[0, t], layer.w_attn[:, :entries], product)
        print(f"        {label + ':':<37}{order} ({hits} of {entries})")


def report_earlier_outputs(layer: CausalSelfAttention, x: np.ndarray) -> None:
    T = x.shape[1]
    longer = np.concatenate([x, x[:, ::-1]], axis=1)  # (B, 2T, C): T more tokens
    outputs_kept, cache_kept = earlier_outputs_kept(layer, longer, T, min(PREFILL, T))
    print("(c) Earlier outputs never change")
    say(
        f"cached run, {T} more tokens decoded: the first {T} outputs are bitwise as first "
        f"decoded: {outputs_kept}; their cached k and v are bitwise unchanged: {cache_kept}"
    )
    if T < 2:
        return
    differing, compared, largest, close = prefix_rows(layer, x)
    say(
        f"full pass over the first t tokens against the first t rows of the pass over all {T}, "
        f"t=1..{T - 1}: np.allclose: {close}, max |difference| {largest:.3g}; rows that "
        f"differ in some bit: {differing} of {compared}"
    )
    if differing:
        say(
            "So recomputing keeps the earlier rows only to rounding: a (t, C) product's rows are "
            "not always computed as the first rows of a longer one's (the prefill line of (b))."
        )


def report_costs(costs: Sequence[Cost]) -> None:
    widths = (6, 10, 12, 7, 13, 15, 7)
    header = ("s", "cached ms", "uncached ms", "ratio", "cached MFLOP", "uncached MFLOP", "ratio")
    print("(d) The cost of the s-th token: median time, and matmul FLOPs")
    print("    " + " ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    for c in costs:
        row = (
            f"{c.s}",
            f"{c.cached * 1e3:.3f}",
            f"{c.uncached * 1e3:.3f}",
            f"{c.uncached / c.cached:.1f}",
            f"{c.flops_cached / 1e6:.3f}",
            f"{c.flops_uncached / 1e6:.1f}",
            f"{c.flops_uncached / c.flops_cached:.0f}",
        )
        print("    " + " ".join(f"{v:>{w}}" for v, w in zip(row, widths, strict=True)))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16, help="sequence length T (default 16)")
    parser.add_argument("--d-model", type=int, default=64, help="model width C (default 64)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")
    parser.add_argument(
        "--max-len", type=int, default=2048, help="last position of the cost sweep (default 2048)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timings per median (default 5)")
    parser.add_argument("--plot", metavar="PATH", help="save the cost figure here (matplotlib)")
    args = parser.parse_args(argv)
    for name in ("tokens", "d_model", "heads", "max_len", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.d_model % args.heads:
        parser.error(f"--d-model {args.d_model} is not a multiple of --heads {args.heads}")

    rng = np.random.default_rng(args.seed)
    layer = CausalSelfAttention.random(rng, args.d_model, args.heads, np.dtype(args.dtype))
    x = rng.standard_normal((1, args.tokens, args.d_model)).astype(layer.dtype)  # (B, T, C)
    prefill = min(PREFILL, args.tokens)
    print(f"One causal self-attention layer: d_model={args.d_model}, {args.heads} heads, "
          f"{args.dtype}, seed {args.seed}")  # fmt: skip
    print(f"{args.tokens} tokens; the cached run: a prefill of {prefill}, then "
          f"{args.tokens - prefill} decode steps")  # fmt: skip

    full = attention_layer_full(layer, x)  # (B, T, C)
    cached = decode_with_cache(layer, x, prefill)  # (B, T, C)
    for report in (
        lambda: report_agreement(full, cached),
        lambda: report_bits(layer, x, full, cached, rng),
        lambda: report_earlier_outputs(layer, x),
    ):
        print()
        report()
    print()
    costs = cost_sweep(layer, rng, args.max_len, args.repeats)
    report_costs(costs)
    if args.plot:
        plot_costs(costs, args.plot)


if __name__ == "__main__":
    main()
