"""Decode through a KV cache and measure it against the oracle's full attention.

:func:`attend_step` is one decode step as a model runs it: note where the new
queries sit, update the cache, attend. :func:`decode_schedule` feeds each row's
real tokens through a schedule of ragged steps, padding every step with NaN so
that a padding slot that leaked into an output would show, and returns the
outputs of the real tokens. :func:`measure_cache` compares them, row by row,
with the loop oracle over the row's whole history.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from refattn.attention import attention
from refattn.backends import Case
from refattn.caches import KVCache, QuantizedCache, SlidingWindowCache
from refattn.caches import make_cache as make_empty_cache
from refattn.namespace import Array
from refattn.testing.agreement import Agreement, Oracle, share
from refattn.testing.tolerance import max_abs_error, quantized_error_bound, spec_error_bound

Step = tuple[int, list[int]]  # (T, n_new per row)


def make_cache(kind: str, case: Case, *, batch: int, kv_heads: int, head_dim: int, capacity: int,
               window: int = 4, sink_tokens: int = 1, block_size: int = 3,
               block_order: list[int] | None = None, bits: int = 8) -> KVCache:  # fmt: skip
    """A cache of ``kind`` on the case's backend, holding at least ``capacity`` tokens a row."""
    xp = case.backend.namespace()
    sample = case.backend.asarray(np.zeros(1), dtype=case.dtype, device=case.device)
    from array_api_compat import device

    return make_empty_cache(
        kind,
        batch=batch,
        kv_heads=kv_heads,
        head_dim=head_dim,
        capacity=capacity,
        window=window,
        sink_tokens=sink_tokens,
        block_size=block_size,
        block_order=block_order,
        bits=bits,
        dtype=sample.dtype,
        device=device(sample),
        xp=xp,
    )


def window_options(cache: KVCache) -> dict[str, Any]:
    """What attention needs to see a cache's tokens the way the cache keeps them."""
    if isinstance(cache, SlidingWindowCache):
        return {"window": cache.window, "sink_tokens": cache.sink_tokens}
    return {}


def attend_step(
    cache: KVCache, q_new: Array, k_new: Array, v_new: Array, n_new: list[int] | None = None,
    **options: Any,
) -> Array:  # fmt: skip
    """One decode step: the new queries sit at ``lengths + i``; update; attend causally."""
    xp = cache.xp
    T = q_new.shape[2]
    q_pos = cache.lengths[:, None] + xp.arange(T, dtype=xp.int64, device=cache.device)[None, :]
    k, v, k_pos = cache.update(k_new, v_new, n_new)
    return attention(
        q_new, k, v, causal=True, q_pos=q_pos, k_pos=k_pos, **window_options(cache), **options
    )


def decode_schedule(
    cache: KVCache,
    case: Case,
    arrays: dict[str, np.ndarray],
    steps: list[Step],
    *,
    encode: Callable[[str, np.ndarray, np.ndarray], np.ndarray] | None = None,
    **options: Any,
) -> np.ndarray:
    """Feed each row's tokens through ``steps``; return the real tokens' outputs.

    ``arrays`` holds float64 ``q (B, Hq, S, D)``, ``k``, ``v`` with every row's
    tokens in order, already rounded to the case's dtype (as are array
    ``options``); step ``(T, n)`` takes the next ``n[b]`` tokens of row b and
    pads them to T with NaN. ``encode(name, x, positions)`` may transform
    q and k at their absolute positions before they are used (RoPE). Returns
    (B, Hq, S, Dv) float64 with NaN where a row's schedule ended early.
    """
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    B, Hq, S, _ = q.shape
    on_backend = {
        name: case.backend.asarray(x, dtype=case.dtype, device=case.device)
        if isinstance(x, np.ndarray)
        else x
        for name, x in options.items()
    }
    out = np.full((B, Hq, S, v.shape[-1]), np.nan)
    taken = [0] * B
    for T, n in steps:
        chunk = {}
        positions = np.full((B, T), 0, dtype=np.int64)
        for name, x in (("q", q), ("k", k), ("v", v)):
            padded = np.full((*x.shape[:2], T, x.shape[3]), np.nan)
            for b in range(B):
                padded[b, :, : n[b]] = x[b, :, taken[b] : taken[b] + n[b]]
                positions[b] = taken[b] + np.arange(T)
            if encode is not None and name in ("q", "k"):
                padded = encode(name, padded, positions)
            chunk[name] = case.backend.asarray(padded, dtype=case.dtype, device=case.device)
        result = case.backend.to_numpy(
            attend_step(cache, chunk["q"], chunk["k"], chunk["v"], n, **on_backend)
        )
        for b in range(B):
            out[b, :, taken[b] : taken[b] + n[b]] = result[b, :, : n[b]]
            taken[b] += n[b]
    return out


def random_steps(
    rng: np.random.Generator, batch: int, length: int, *, max_chunk: int = 6
) -> list[Step]:
    """A ragged schedule: a prefill of any length per row, then chunks of 1 or more."""
    left = [length] * batch
    steps: list[Step] = []
    first = True
    while any(left):
        T = int(rng.integers(1, (length if first else max_chunk) + 1))
        n = [int(rng.integers(0, min(T, r) + 1)) if r else 0 for r in left]
        if not any(n):
            b = int(np.argmax(left))
            n[b] = min(T, left[b])
        steps.append((T, n))
        left = [r - m for r, m in zip(left, n, strict=True)]
        first = False
    return steps


def measure_cache(
    cache: KVCache, case: Case, arrays: dict[str, np.ndarray], steps: list[Step], oracle: Oracle,
    **options: Any,
) -> Agreement:  # fmt: skip
    """Decode through ``cache`` and compare every row with the oracle's full causal pass."""
    decoded = decode_schedule(cache, case, arrays, steps, **options)
    attend = {**window_options(cache), **options}
    worst: Agreement | None = None
    for b in range(arrays["q"].shape[0]):
        row = {name: arrays[name][b : b + 1] for name in ("q", "k", "v")}
        ref_out, _, weights = oracle(**row, causal=True, **attend, return_weights=True)
        bounds = {**row, **{n: x for n, x in options.items() if isinstance(x, np.ndarray)}}
        allowed = spec_error_bound(
            bounds, dtype=case.dtype, scale=options.get("scale"), out=ref_out, weights=weights
        ).out
        if isinstance(cache, QuantizedCache):
            allowed += quantized_error_bound(
                row["q"], row["k"], row["v"], bits=cache.bits, dtype=case.dtype,
                scale=options.get("scale"),
            )  # fmt: skip
        agreement = Agreement(max_abs_error(decoded[b : b + 1], ref_out), allowed, 0.0, 1.0)
        if worst is None or share(agreement.error, agreement.allowed) > share(
            worst.error, worst.allowed
        ):
            worst = agreement
    assert worst is not None
    return worst
