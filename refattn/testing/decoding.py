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

:func:`decode_layers` drives several layers through the same steps, as a
model does: at each step every layer in turn appends its own keys and
values and attends, each through its own window.

**Aliasing.** A cache may hand back arrays that share memory with the
caller's ``k_new`` or ``v_new`` (a dynamic cache whose first update returns
the input itself). Whether that is allowed is the caller's contract: with
``may_alias=False`` it is reported as its own finding,
:data:`ALIASES`, before any value is compared; with ``may_alias=True`` the
caller gives those buffers up to the cache and does not scribble on them.
Sharing is read from the arrays themselves (``np.shares_memory`` on NumPy,
the storage on PyTorch, the allocation on CuPy); for another library whose
arrays can be written it is seen by what the scribbling does to what was
returned. A cache that keeps a view of the inputs and returns it later,
after the caller rewrote them, returns NaN: wrong values, either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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


#: The finding of a cache that returned arrays sharing memory with the caller's input.
ALIASES = "aliases the caller's input"


@dataclass(frozen=True)
class Layer:
    """One layer of a decoding: how its cache appends, its history, how its queries attend.

    ``update(k_new, v_new)`` (or ``update(k_new, v_new, n_new)`` on a ragged
    step) appends and returns what the cache's ``update`` does; ``arrays``
    holds the layer's float64 ``q, k, v`` (B, H, S, D), rounded to the case's
    dtype; ``options`` are keyword arguments of attention on top of causal
    (a window, sink tokens, a scale: NumPy arrays are moved to the backend).
    """

    update: Callable[..., Any]
    arrays: dict[str, np.ndarray]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Unusable:
    """What a cache returned could not be judged: why, and the finding when it is one."""

    message: str
    finding: str = ""


def decode(
    cache: Any,
    case: Case,
    arrays: dict[str, np.ndarray],
    steps: Sequence[Step],
    *,
    encode: Encode | None = None,
    may_alias: bool = False,
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
    may_alias : whether the cache may return the caller's own arrays (see the
        module docstring)
    **options : for attention, on top of what a refattn cache implies
        (``cache.attention_options``): the window someone else's cache keeps,
        scale, softcap, ALiBi slopes (NumPy arrays are moved to the case's backend)

    Returns
    -------
    (B, Hq, S, Dv) float64 NumPy, NaN where a row's schedule ended early; or,
    when the cache returned something unusable, a message saying what.
    """
    implied = getattr(cache, "attention_options", {})  # a refattn cache says how to attend to it
    layer = Layer(cache.update, arrays, {**implied, **options})
    result = decode_layers([layer], case, steps, encode=encode, may_alias=may_alias)
    if isinstance(result, Unusable):
        return f"{result.finding}: {result.message}" if result.finding else result.message
    return result[0]


def decode_layers(
    layers: Sequence[Layer],
    case: Case,
    steps: Sequence[Step],
    *,
    encode: Encode | None = None,
    may_alias: bool = False,
) -> list[np.ndarray] | Unusable:
    """Feed every layer's tokens through ``steps``, layer after layer at each step; return
    each layer's outputs, (B, Hq, S, Dv) float64 NumPy (NaN where a row's schedule ended
    early), or why what a cache returned cannot be judged (naming the layer when there are
    several)."""
    backend = case.backend

    def on_backend(x: np.ndarray) -> Any:
        return backend.asarray(np.ascontiguousarray(x), dtype=case.dtype, device=case.device)

    def named(at: int, text: str) -> str:
        return f"layer {at}: {text}" if len(layers) > 1 else text

    # each layer's attention, as the backend runs a whole function best (jitted on JAX): its
    # scalar options bound, its arrays (ALiBi slopes) passed with the step's
    attend = [backend.compiled(attention, causal=True, **{
        n: x for n, x in layer.options.items() if not isinstance(x, np.ndarray)})
        for layer in layers]  # fmt: skip
    given = [{n: on_backend(x) for n, x in layer.options.items() if isinstance(x, np.ndarray)}
             for layer in layers]  # fmt: skip
    B, Hq, S, _ = layers[0].arrays["q"].shape
    outs = [np.full((B, Hq, S, layer.arrays["v"].shape[-1]), np.nan) for layer in layers]
    taken = [0] * B
    for i, (T, n) in enumerate(steps):
        positions = np.array([t + np.arange(T) for t in taken], dtype=np.int64)  # (B, T)
        ragged = any(m != T for m in n)
        for at, layer in enumerate(layers):
            chunk = {name: _next_tokens(layer.arrays[name], taken, n, T) for name in "qkv"}
            if encode is not None:
                chunk = {name: encode(name, x, positions) if name != "v" else x
                         for name, x in chunk.items()}  # fmt: skip
            q_new, k_new, v_new = (on_backend(chunk[name]) for name in "qkv")
            returned = layer.update(k_new, v_new, n) if ragged else layer.update(k_new, v_new)
            seen = _returned_slots(returned, B)
            if isinstance(seen, str):
                return Unusable(named(at, seen))
            k_all, v_all, k_pos = seen
            inputs = {"k_new": k_new, "v_new": v_new}
            shared = _aliased({"k": k_all, "v": v_all}, inputs)
            if shared and not may_alias:
                pairs = " and ".join(f"{o} sharing memory with the caller's {x}" for o, x in shared)
                text = (
                    f"update returned {pairs} at step {i}: a caller that reuses them rewrites them"
                )
                return Unusable(named(at, text), finding=ALIASES)
            before = _readable(k_all, v_all) if shared is None else None
            given_up = {x for _, x in shared or ()}  # buffers the caller leaves to the cache
            _scribble(*(x for name, x in inputs.items() if name not in given_up))
            if before is not None and not may_alias and _readable(k_all, v_all) != before:
                text = (
                    f"what update returned at step {i} changed when the caller rewrote its inputs"
                )
                return Unusable(named(at, text), finding=ALIASES)
            step_out = attend[at](q_new, k_all, v_all, q_pos=on_backend(positions),
                                  k_pos=on_backend(k_pos), **given[at])  # fmt: skip
            result = to_numpy(step_out)
            for b in range(B):
                outs[at][b, :, taken[b] : taken[b] + n[b]] = result[b, :, : n[b]]
        taken = [t + m for t, m in zip(taken, n, strict=True)]
    return outs


def _aliased(returned: dict[str, Any], inputs: dict[str, Any]) -> list[tuple[str, str]] | None:
    """The (returned, input) names of the pairs that share memory; None when the library
    gives no way to tell."""
    pairs = []
    for out_name, out in returned.items():
        for in_name, x in inputs.items():
            shares = _shares_memory(out, x)
            if shares is None:
                return None
            if shares:
                pairs.append((out_name, in_name))
    return pairs


def _shares_memory(a: Any, b: Any) -> bool | None:
    """Whether two arrays share memory: NumPy's own test, PyTorch's storage, CuPy's
    allocation; None for a library without one (array-api-strict hides its arrays: a caller
    cannot write them, so sharing cannot hurt and is reported as none)."""
    library = type(b).__module__.split(".")[0]
    if type(a).__module__.split(".")[0] != library:
        return False  # a cache that moved the arrays to another library copied them
    if library == "numpy":
        return bool(np.shares_memory(a, b))
    if library == "torch":
        return bool(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())
    if library == "cupy":
        return bool(a.data.mem.ptr == b.data.mem.ptr)
    if library == "array_api_strict":
        return False
    return None


def _readable(*arrays: Any) -> list[bytes]:
    """The arrays' contents, to see whether writing the caller's inputs changed them."""
    return [np.asarray(to_numpy(x), dtype=np.float64).tobytes() for x in arrays]


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
            k_pos = np.array(np.broadcast_to(k_pos, (batch, n)))  # writable: torch takes it
    else:
        k_pos = np.tile(np.arange(n), (batch, 1))
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
