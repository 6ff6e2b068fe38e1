r"""Check someone else's KV cache against the spec: ``check_cache``.

A cache passes when decoding through it equals full causal attention. For a
drawn history (:class:`~refattn.testing.problems.CacheSpec`: rows, heads, a
prefill, then decode steps and chunks), every step appends the next tokens'
keys and values with ``cache.update(k_new, v_new)``, which returns ``(k, v)``
or ``(k, v, k_pos)``; the step's queries, at positions ``t0 .. t0+T-1``, then
attend causally to what came back (with ``k_pos``, or ``0 .. n-1`` when the
cache returns none). Stacked, the steps' outputs must equal the oracle's
causal attention over the whole history (windowed, with sinks, for a cache
that keeps a window) by the tolerance rule of :mod:`refattn.testing.tolerance`;
a quantizing cache gets :func:`~refattn.testing.tolerance.quantized_error_bound`
on top. The decoding itself is the driver of :mod:`refattn.testing.decoding`.

The driver plays a demanding caller: it reuses its input buffers, and fills
them with NaN as soon as ``update`` returns, so a cache that keeps a view of
its inputs instead of a copy shows NaN.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

from refattn.testing.candidate import check_budget, new_report, resolve_case, run_candidate
from refattn.testing.decoding import decode, uniform_steps
from refattn.testing.problems import CacheSpec, cache_history
from refattn.testing.report import Outcome, Report
from refattn.testing.search import search
from refattn.testing.strategies import cache_features_of, cache_specs
from refattn.testing.tolerance import max_abs_error, quantized_error_bound
from refattn.testing.verdict import allowance

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
    makes an empty cache (refattn's ``StaticCache`` takes exactly these); it is
    handed only the keywords it names, and the history's window, sink tokens
    and bits when it names those (refattn's cache classes are factories as
    they stand).

    >>> import refattn
    >>> from refattn.testing.problems import CacheSpec
    >>> check_schedule(refattn.StaticCache, CacheSpec(steps=(3, 1, 2))).passed
    True
    """
    case = resolve_case(backend, device, dtype)
    start = Outcome(spec=spec, dtype=dtype, backend=backend, device=case.device)
    arrays = cache_history(spec).rounded(dtype)
    history = {name: arrays[name] for name in ("q", "k", "v")}
    window: dict[str, Any] = {"window": spec.window, "sink_tokens": spec.sink_tokens}
    # The oracle: causal attention over the whole history, in float64.
    ref_out, _, allowed = allowance(history, {"causal": True, **window}, dtype)
    sample = case.backend.asarray(arrays["q"][:0], dtype=dtype, device=case.device)

    def decoded() -> Any:
        common = {"batch": spec.batch, "kv_heads": spec.kv_heads, "head_dim": spec.head_dim,
                  "max_len": spec.length, "dtype": sample.dtype, "device": case.device,
                  "xp": case.backend.namespace()}  # fmt: skip
        own = {"window": spec.window, "sink_tokens": spec.sink_tokens, "bits": spec.bits}
        cache = factory(**_accepted(factory, common, own))
        return decode(cache, case, history, uniform_steps(spec.steps, spec.batch), **window)

    result, failed = run_candidate(start, decoded)
    if failed is not None:
        return failed
    if isinstance(result, str):
        return start.but(message=result)
    out_allowed = allowed.out
    if spec.bits is not None:
        q, k, v = history["q"], history["k"], history["v"]
        out_allowed += quantized_error_bound(q, k, v, bits=spec.bits, dtype=dtype)
    return start.but(error=max_abs_error(result, ref_out), allowed=out_allowed)


def _accepted(factory: CacheFactory, common: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """The keywords ``factory`` takes: of ``common``, those it names (all of them if it takes
    any keyword); of the cache's ``own`` (window, sink tokens, bits), those it names. So
    ``refattn.DynamicCache``, which has no ``max_len``, and ``refattn.SlidingWindowCache``,
    whose ``window`` the check is given, are factories as they stand."""
    named, takes_any = _parameters(factory)
    chosen = {n: x for n, x in common.items() if takes_any or n in named}
    return chosen | {n: x for n, x in own.items() if n in named and x is not None}


def _parameters(factory: CacheFactory) -> tuple[set[str], bool]:
    """The keyword names ``factory`` declares, and whether it also takes any other.

    A class whose ``__init__`` passes ``**kwargs`` on to its base is read down
    its bases to the first ``__init__`` that takes no ``**kwargs``.
    """
    functions = [factory]
    if inspect.isclass(factory):
        functions = [c.__dict__["__init__"] for c in factory.__mro__ if "__init__" in c.__dict__]
    named: set[str] = set()
    for function in functions:
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):  # no signature to read: it may take anything
            return named, True
        named |= {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return named, False
    return named, True


def check_cache(
    factory: CacheFactory,
    *,
    backend: str = "numpy",
    device: str | None = None,
    dtypes: Iterable[str] = ("float32",),
    window: int | None = None,
    sink_tokens: int = 0,
    bits: int | None = None,
    max_len: int = 24,
    max_examples: int = 100,
    seed: int | None = None,
    on_example: Callable[[Outcome], None] | None = None,
    max_failures: int = 5,
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
    max_failures : how many classes of failure to find and shrink per dtype

    Examples
    --------
    >>> import refattn
    >>> from refattn.testing import check_cache
    >>> def ring(*, max_len, **common):
    ...     return refattn.SlidingWindowCache(window=4, sink_tokens=1, **common)
    >>> check_cache(ring, window=4, sink_tokens=1, max_examples=10, seed=0).passed
    True
    """
    max_examples = check_budget("max_examples", max_examples)
    max_failures = check_budget("max_failures", max_failures)
    max_len = check_budget("max_len", max_len)
    report = new_report(factory, backend, device, dtypes, frozenset())
    strategy = cache_specs(window=window, sink_tokens=sink_tokens, bits=bits, max_len=max_len)
    for dtype in report.dtypes:

        def one(spec: CacheSpec, dtype: str = dtype) -> tuple[Outcome, frozenset[str]]:
            outcome = check_schedule(factory, spec, backend=backend, dtype=dtype,
                                     device=report.device)  # fmt: skip
            return outcome, cache_features_of(spec)

        search(report, one, strategy, dtype, max_examples=max_examples, seed=seed,
               on_example=on_example, allowed=lambda spec: spec.length <= max_len,
               corners=lambda spec: frozenset(), max_failures=max_failures)  # fmt: skip
        if report.unavailable:
            break
    return report
