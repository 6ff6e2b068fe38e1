"""The one cache-decoding driver: feed tokens through a KV cache in steps, attend after each.

:func:`decode` plays a model and a demanding caller at once. At each step
``(T, n_new)`` it takes the next ``n_new[b]`` tokens of every row b, pads
them to T with NaN (so a padding slot that leaked into an output would show),
appends their keys and values with ``cache.update``, fills the caller's input
buffers with NaN as soon as ``update`` returns (so a cache that kept a view
of them instead of a copy shows NaN), and lets the step's queries, at
positions ``t0 .. t0 + T - 1`` of their row, attend causally to what came
back. ``check_cache`` drives someone else's cache through it and ``refattn
verify`` refattn's own; both then compare its outputs with the oracle's full
causal attention over the whole history.

A cache's ``update`` may return ``(k, v, k_pos)`` or ``(k, v)`` (slots in
position order, ``0 .. n-1``); only a schedule with a ragged step passes
``n_new`` to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from array_api_compat import device

from refattn.attention import attention
from refattn.backends import Case, to_numpy
from refattn.caches import KVCache, make_cache

Step = tuple[int, list[int]]  #: (T, n_new per row)
Encode = Callable[[str, np.ndarray, np.ndarray], np.ndarray]


def uniform_steps(sizes: Sequence[int], batch: int) -> list[Step]:
    """Steps in which every row appends the same ``sizes[i]`` tokens."""
    return [(T, [T] * batch) for T in sizes]


def decode(
    cache: Any,
    case: Case,
    arrays: dict[str, np.ndarray],
    steps: Sequence[Step],
    *,
    encode: Encode | None = None,
    **options: Any,
) -> np.ndarray | str:
    """Feed each row's tokens through ``steps``; return the real tokens' outputs.

    Parameters
    ----------
    cache : an empty cache: refattn's, or anything with ``update(k_new, v_new)``
    case : the backend, device and dtype the step's arrays are made in
    arrays : float64 ``q (B, Hq, S, D)``, ``k``, ``v`` with every row's tokens
        in order, already rounded to the case's dtype
    steps : ``(T, n_new)`` per step
    encode : ``encode(name, x, positions)`` may transform q and k at their
        absolute positions before they are used (RoPE)
    **options : for attention, on top of what a refattn cache implies
        (``cache.attention_options``): the window someone else's cache keeps,
        scale, softcap, ALiBi slopes (NumPy arrays are moved to the case's backend)

    Returns
    -------
    (B, Hq, S, Dv) float64 NumPy, NaN where a row's schedule ended early; or,
    when the cache returned something unusable, a message saying what.
    """
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    B, Hq, S, _ = q.shape
    backend = case.backend

    def on_backend(x: np.ndarray) -> Any:
        return backend.asarray(np.ascontiguousarray(x), dtype=case.dtype, device=case.device)

    implied = getattr(cache, "attention_options", {})  # a refattn cache says how to attend to it
    attend = {n: on_backend(x) if isinstance(x, np.ndarray) else x
              for n, x in {**implied, **options}.items()}  # fmt: skip
    out = np.full((B, Hq, S, v.shape[-1]), np.nan)
    taken = [0] * B
    for T, n in steps:
        positions = np.array([t + np.arange(T) for t in taken], dtype=np.int64)  # (B, T)
        chunk = {name: _next_tokens(x, taken, n, T) for name, x in (("q", q), ("k", k), ("v", v))}
        if encode is not None:
            chunk = {name: encode(name, x, positions) if name != "v" else x
                     for name, x in chunk.items()}  # fmt: skip
        q_new, k_new, v_new = (on_backend(chunk[name]) for name in ("q", "k", "v"))
        ragged = any(m != T for m in n)
        returned = cache.update(k_new, v_new, n) if ragged else cache.update(k_new, v_new)
        _scribble(k_new, v_new)  # the caller reuses its buffers
        seen = _returned_slots(returned, B)
        if isinstance(seen, str):
            return seen
        k_all, v_all, k_pos = seen
        step_out = attention(q_new, k_all, v_all, causal=True, q_pos=on_backend(positions),
                             k_pos=on_backend(k_pos), **attend)  # fmt: skip
        result = to_numpy(step_out)
        for b in range(B):
            out[b, :, taken[b] : taken[b] + n[b]] = result[b, :, : n[b]]
            taken[b] += n[b]
    return out


def _next_tokens(x: np.ndarray, taken: list[int], n: list[int], T: int) -> np.ndarray:
    """Row b's next ``n[b]`` tokens of ``x`` (B, H, S, D), right-padded with NaN to T."""
    padded = np.full((*x.shape[:2], T, x.shape[3]), np.nan)
    for b, (start, m) in enumerate(zip(taken, n, strict=True)):
        padded[b, :, :m] = x[b, :, start : start + m]
    return padded


def _returned_slots(returned: Any, batch: int) -> tuple[Any, Any, np.ndarray] | str:
    """``(k, v, k_pos)`` from what ``update`` returned (k_pos as (B, n) int64 NumPy)."""
    if not isinstance(returned, tuple | list) or len(returned) not in (2, 3):
        return "update must return (k, v) or (k, v, k_pos)"
    k_all, v_all = returned[0], returned[1]
    n = k_all.shape[2]
    if len(returned) == 3:
        k_pos = np.asarray(to_numpy(returned[2])).astype(np.int64)
        if k_pos.ndim == 1:
            k_pos = np.broadcast_to(k_pos, (batch, n))
    else:
        k_pos = np.broadcast_to(np.arange(n), (batch, n))
    if k_pos.shape != (batch, n):
        return f"k_pos has shape {k_pos.shape}, expected {(batch, n)} for {n} slots"
    return k_all, v_all, k_pos


def _scribble(*arrays: Any) -> None:
    """Fill the caller's input arrays with NaN, where the library lets arrays be written."""
    for x in arrays:
        library = type(x).__module__.split(".")[0]
        if library == "torch":
            x.fill_(float("nan"))
        elif library in ("numpy", "cupy"):
            x[...] = np.nan


def cache_on(kind: str, case: Case, **shape: Any) -> KVCache:
    """An empty refattn cache of ``kind`` (:func:`refattn.caches.make_cache`) on the case's
    backend, device and dtype; ``shape`` is everything else make_cache takes."""
    sample = case.backend.asarray(np.zeros(1), dtype=case.dtype, device=case.device)
    return make_cache(kind, **shape, dtype=sample.dtype, device=device(sample),
                      xp=case.backend.namespace())  # fmt: skip
