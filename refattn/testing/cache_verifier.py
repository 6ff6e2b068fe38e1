r"""Check someone else's KV cache against the spec: ``check_cache``.

A cache passes when decoding through it equals full causal attention. For a
drawn history (:class:`~refattn.testing.problems.CacheSpec`: rows, heads, a
prefill, then decode steps and chunks), every step appends the next tokens'
keys and values with ``cache.update(k_new, v_new)``, which returns ``(k, v)``
or ``(k, v, k_pos)``; the step's queries, at positions ``t0 .. t0+T-1``, then
attend causally to what came back (with ``k_pos``, or ``0 .. n-1`` when the
cache returns none). Stacked, the steps' outputs must equal the oracle's
causal attention over the whole history (windowed, with sinks, for a cache
that keeps a window) by DESIGN's tolerance rule; a quantizing cache gets
:func:`~refattn.testing.tolerance.quantized_error_bound` on top.

The checker plays a demanding caller: it reuses its input buffers, and fills
them with NaN as soon as ``update`` returns, so a cache that keeps a view of
its inputs instead of a copy shows NaN.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from refattn.attention import attention
from refattn.backends import Case
from refattn.backends.base import round_to
from refattn.testing.problems import CacheSpec, cache_history
from refattn.testing.report import Outcome, Report
from refattn.testing.search import qualified_name, resolve_case, search
from refattn.testing.strategies import cache_features_of, cache_specs
from refattn.testing.tolerance import (
    max_abs_error,
    quantized_error_bound,
)
from refattn.testing.verifier import Unsupported, allowance, to_numpy

CacheFactory = Callable[..., Any]


def check_schedule(
    factory: CacheFactory,
    spec: CacheSpec,
    *,
    backend: str = "numpy",
    dtype: str = "float32",
    device: str | None = None,
) -> Outcome:
    """Decode one history through a new cache from ``factory``; judge it by the tolerance rule.

    ``factory(batch=, kv_heads=, head_dim=, max_len=, dtype=, device=, xp=)``
    makes an empty cache (refattn's ``StaticCache`` takes exactly these).

    >>> import refattn
    >>> from refattn.testing.problems import CacheSpec
    >>> check_schedule(refattn.StaticCache, CacheSpec(steps=(3, 1, 2))).passed
    True
    """
    case = resolve_case(backend, device, dtype)
    start = Outcome(spec=spec, dtype=dtype, backend=backend, device=case.device)
    history = cache_history(spec)
    q, k, v = (round_to(x, dtype).astype(np.float64) for x in (history.q, history.k, history.v))
    options: dict[str, Any] = {"window": spec.window, "sink_tokens": spec.sink_tokens}
    # The oracle: causal attention over the whole history, in float64.
    ref_out, _, allowed = allowance({"q": q, "k": k, "v": v}, {"causal": True, **options}, dtype)
    try:
        decoded = _decode(factory, spec, case, q, k, v, options)
    except Unsupported as exc:
        return start.but(unsupported=str(exc) or "unsupported")
    except Exception as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return start.but(message=f"raised {exc!r} at {where.filename}:{where.lineno}")
    if isinstance(decoded, str):
        return start.but(message=decoded)
    out_allowed = allowed.out
    if spec.bits is not None:
        out_allowed += quantized_error_bound(q, k, v, bits=spec.bits, dtype=dtype)
    return start.but(error=max_abs_error(decoded, ref_out), allowed=out_allowed)


def _decode(
    factory: CacheFactory,
    spec: CacheSpec,
    case: Case,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    options: dict[str, Any],
) -> np.ndarray | str:
    """Every step's outputs, stacked (B, Hq, S, D); or what the cache did wrong."""
    backend, dtype, device = case.backend, case.dtype, case.device
    xp = backend.namespace()
    sample = backend.asarray(np.zeros(1), dtype=dtype, device=device)
    cache = factory(
        batch=spec.batch, kv_heads=spec.kv_heads, head_dim=spec.head_dim,
        max_len=spec.length, dtype=sample.dtype, device=device, xp=xp,
    )  # fmt: skip
    outs, t0 = [], 0
    for T in spec.steps:
        t1 = t0 + T
        k_new = backend.asarray(k[:, :, t0:t1], dtype=dtype, device=device)
        v_new = backend.asarray(v[:, :, t0:t1], dtype=dtype, device=device)
        returned = cache.update(k_new, v_new)
        _scribble(k_new, v_new)  # the caller reuses its buffers
        if not isinstance(returned, tuple | list) or len(returned) not in (2, 3):
            return "update must return (k, v) or (k, v, k_pos)"
        k_all, v_all = returned[0], returned[1]
        n = k_all.shape[2]
        if len(returned) == 3:
            k_pos = to_numpy(returned[2]).astype(np.int64)
            if k_pos.ndim == 1:
                k_pos = np.broadcast_to(k_pos, (spec.batch, n))
        else:
            k_pos = np.broadcast_to(np.arange(n), (spec.batch, n))
        if k_pos.shape != (spec.batch, n):
            return f"k_pos has shape {k_pos.shape}, expected {(spec.batch, n)} for {n} slots"
        q_step = backend.asarray(q[:, :, t0:t1], dtype=dtype, device=device)
        q_pos = backend.asarray(np.broadcast_to(np.arange(t0, t1), (spec.batch, T)).copy(),
                                dtype=dtype, device=device)  # fmt: skip
        out = attention(
            q_step, k_all, v_all, causal=True, q_pos=q_pos,
            k_pos=backend.asarray(np.ascontiguousarray(k_pos), dtype=dtype, device=device),
            **options,
        )  # fmt: skip
        outs.append(to_numpy(out))
        t0 = t1
    return np.concatenate(outs, axis=2)


def _scribble(*arrays: Any) -> None:
    """Fill the caller's input arrays with NaN, where the library lets arrays be written."""
    for x in arrays:
        module = type(x).__module__.split(".")[0]
        if module == "torch":
            x.fill_(float("nan"))
        elif module in ("numpy", "cupy"):
            x[...] = np.nan


def check_cache(
    factory: CacheFactory,
    *,
    backend: str = "numpy",
    device: str | None = None,
    dtypes: tuple[str, ...] = ("float32",),
    window: int | None = None,
    sink_tokens: int = 0,
    bits: int | None = None,
    max_len: int = 24,
    max_examples: int = 100,
    seed: int | None = None,
    on_example: Callable[[Outcome], None] | None = None,
) -> Report:
    """Search for a decoding history on which a cache breaks attention; shrink it.

    Parameters
    ----------
    factory : ``factory(batch=, kv_heads=, head_dim=, max_len=, dtype=, device=, xp=)``
        returns an empty cache whose ``update(k_new, v_new)`` takes (B, Hkv, T, D)
        arrays and returns ``(k, v)`` or ``(k, v, k_pos)``; it may raise
        ``Unsupported``
    window, sink_tokens : the window the cache keeps (a sliding-window cache):
        the queries attend with it, and the oracle is windowed with sinks
    bits : the cache quantizes to this many bits: allow
        :func:`~refattn.testing.tolerance.quantized_error_bound` on top
    max_len : the longest history drawn

    Examples
    --------
    >>> import refattn
    >>> from refattn.testing import check_cache
    >>> def ring(*, max_len, **common):
    ...     return refattn.SlidingWindowCache(window=4, sink_tokens=1, **common)
    >>> check_cache(ring, window=4, sink_tokens=1, max_examples=10, seed=0).passed
    True
    """
    case = resolve_case(backend, device, dtypes[0] if dtypes else "float32")
    for dtype in dtypes:
        resolve_case(backend, case.device, dtype)
    report = Report(name=qualified_name(factory), backend=backend, device=case.device,
                    dtypes=tuple(dtypes), features=frozenset())  # fmt: skip
    strategy = cache_specs(window=window, sink_tokens=sink_tokens, bits=bits, max_len=max_len)
    for dtype in dtypes:

        def one(spec: CacheSpec, dtype: str = dtype) -> tuple[Outcome, frozenset[str]]:
            outcome = check_schedule(factory, spec, backend=backend, dtype=dtype,
                                     device=case.device)  # fmt: skip
            return outcome, cache_features_of(spec)

        search(report, one, strategy, dtype, max_examples, seed, on_example)
    return report
