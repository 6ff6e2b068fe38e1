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
a quantizing cache gets, on top, the error its format allows each stored key
and value (:func:`~refattn.testing.tolerance.storage_error`) carried through
attention (:func:`~refattn.testing.tolerance.quantized_output_bound`),
element by element. The decoding itself is the driver of
:mod:`refattn.testing.decoding`.

**Layers.** With ``layers``, every step goes through several layers, as in
a model: each layer draws its own queries, keys and values, a sliding layer
attends through the window, and every layer's output is judged; a failure
names its layer. The caches are made the way shipped ones are:

- a factory that declares ``layer_idx`` (or ``layer``) is called once per
  layer with its index: one cache per layer;
- otherwise one cache is made, and if its ``update`` declares ``layer_idx``
  (or ``layer``), like transformers' ``DynamicCache.update(k, v,
  layer_idx)``, that one cache serves every layer;
- otherwise the factory is called once per layer (refattn's caches hold one
  layer each).

``config`` is handed to a factory that declares it, and ``cache_kwargs``
pass through to the factory untouched.

**Aliasing.** The driver plays a demanding caller: it reuses its input
buffers, and fills them with NaN as soon as ``update`` returns, so a cache
that keeps a view of its inputs instead of a copy shows NaN. A cache that
returns arrays sharing memory with ``k_new`` or ``v_new`` fails with the
finding "aliases the caller's input", unless ``may_alias=True``: then the
caller leaves those buffers to the cache. The default is ``False``, since a
caller that reuses its buffers (a CUDA graph's static inputs, a
preallocated decode batch) is what makes an aliasing cache wrong, and the
contract of refattn's caches is that they copy.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from refattn.attention import attention
from refattn.caches.quantized import FORMATS, SCALES
from refattn.testing.candidate import check_budget, new_report, resolve_case, run_candidate
from refattn.testing.decoding import Layer, Unusable, decode_layers, uniform_steps
from refattn.testing.problems import LAYER_KINDS, CacheSpec, cache_history
from refattn.testing.report import Outcome, Report
from refattn.testing.search import search
from refattn.testing.strategies import cache_features_of, cache_specs
from refattn.testing.tolerance import (
    max_abs_error,
    quantized_output_bound,
    storage_error,
    worst_element,
)
from refattn.testing.verdict import allowance

CacheFactory = Callable[..., Any]

#: The names by which a factory, or a cache's ``update``, takes a layer index.
LAYER_PARAMETERS = ("layer_idx", "layer")
#: What the check hands a factory itself: never through ``cache_kwargs``.
_SUPPLIED = ("batch", "kv_heads", "head_dim", "max_len", "dtype", "device", "xp", "window",
             "sink_tokens", "bits", "format", "scales", "config", *LAYER_PARAMETERS)  # fmt: skip


def check_schedule(
    factory: CacheFactory,
    spec: CacheSpec,
    *,
    backend: str = "numpy",
    dtype: str = "float32",
    device: str | None = None,
    config: Any = None,
    cache_kwargs: Mapping[str, Any] | None = None,
) -> Outcome:
    """Decode one history through new caches from ``factory``; judge it by the tolerance rule.

    ``factory(batch=, kv_heads=, head_dim=, max_len=, dtype=, device=, xp=)``
    makes an empty cache (refattn's ``StaticCache`` takes exactly these); it is
    handed only the keywords it names, and the history's window, sink tokens,
    bits, code format and scales when it names those (refattn's cache classes
    are factories as they stand), a layer index and ``config`` when it names
    them, and ``cache_kwargs`` as they are.

    >>> import refattn
    >>> from refattn.testing.problems import CacheSpec
    >>> check_schedule(refattn.StaticCache, CacheSpec(steps=(3, 1, 2))).passed
    True
    >>> spec = CacheSpec(steps=(3, 1, 2), format="e4m3", scales="head", outlier_size=16.0)
    >>> check_schedule(refattn.QuantizedCache, spec).passed
    True
    """
    case = resolve_case(backend, device, dtype)
    start = Outcome(spec=spec, dtype=dtype, backend=backend, device=case.device)
    extra = _checked_kwargs(factory, cache_kwargs, config)
    kinds = spec.layer_kinds
    histories = []
    for layer in range(len(kinds)):
        arrays = cache_history(spec, layer).rounded(dtype)
        histories.append({name: arrays[name] for name in ("q", "k", "v")})
    windows = [_window(spec, layer) for layer in range(len(kinds))]
    sample = case.backend.asarray(histories[0]["q"][:0], dtype=dtype, device=case.device)

    def decoded() -> list[np.ndarray] | Unusable:
        common = {"batch": spec.batch, "kv_heads": spec.kv_heads, "head_dim": spec.head_dim,
                  "max_len": spec.length, "dtype": sample.dtype, "device": case.device,
                  "xp": case.backend.namespace()}  # fmt: skip
        quantized: dict[str, Any] = {"bits": spec.bits}
        if spec.format is not None:
            quantized |= {"format": spec.format, "scales": spec.scales}
        shared = {"config": config, **quantized}
        updates = _layer_updates(factory, common, shared, extra, spec)
        layers = [Layer(update, history, {**implied, **window})
                  for (update, implied), history, window
                  in zip(updates, histories, windows, strict=True)]  # fmt: skip
        steps = uniform_steps(spec.steps, spec.batch)
        return decode_layers(layers, case, steps, may_alias=spec.may_alias)

    result, failed = run_candidate(start, decoded)
    if failed is not None:
        return failed
    if isinstance(result, Unusable):
        return start.but(message=result.message, finding=result.finding)
    judged = [_judge(spec, dtype, history, window, out)
              for history, window, out in zip(histories, windows, result, strict=True)]  # fmt: skip
    layer = max(range(len(judged)), key=lambda at: judged[at][0] - judged[at][1])
    error, allowed = judged[layer]
    outcome = start.but(error=error, allowed=allowed)
    if len(kinds) > 1 and not outcome.passed:
        symptom = "non-finite out" if np.isinf(error) else "wrong out"
        return outcome.but(
            finding=f"{symptom} in layer {layer} ({kinds[layer]})",
            message=f"layer {layer} ({kinds[layer]}) of {len(kinds)}: max|out - oracle| = "
            f"{error:.3e}, allowed {allowed:.3e}",
        )
    return outcome


def _window(spec: CacheSpec, layer: int) -> dict[str, Any]:
    """The attention options of layer ``layer``: a sliding layer's window and sink tokens."""
    window = spec.layer_window(layer)
    return {} if window is None else {"window": window, "sink_tokens": spec.sink_tokens}


def _judge(
    spec: CacheSpec, dtype: str, history: dict[str, np.ndarray], window: dict[str, Any],
    out: np.ndarray,
) -> tuple[float, float]:  # fmt: skip
    """One layer's error and what is allowed, at the output element nearest to failing."""
    ref_out, _, allowed = allowance(history, {"causal": True, **window}, dtype)
    if spec.quantized is None:
        return max_abs_error(out, ref_out), allowed.out
    format, scales, bits = spec.quantized
    q, k, v = history["q"], history["k"], history["v"]
    stored: dict[str, Any] = {"format": format, "scales": scales, "bits": bits, "dtype": dtype}
    B, H, S, _ = k.shape
    identity = np.broadcast_to(np.eye(S), (B, H, S, S))  # attention to it gives the weights
    weights = np.asarray(attention(q, k, identity, causal=True, **window))  # (B, Hq, S, S)
    bound = quantized_output_bound(q, v, storage_error(k, **stored), storage_error(v, **stored),
                                   weights, ref_out)  # fmt: skip
    error, extra = worst_element(out, ref_out, bound)
    return error, allowed.out + extra


def _layer_updates(
    factory: CacheFactory, common: dict[str, Any], shared: dict[str, Any],
    extra: dict[str, Any], spec: CacheSpec,
) -> list[tuple[Callable[..., Any], dict[str, Any]]]:  # fmt: skip
    """Each layer's ``update`` and the attention options its cache implies (see the module
    docstring for how the caches are made)."""
    kinds = spec.layer_kinds
    named, _ = _parameters(factory)

    def make(layer: int | None, window: dict[str, Any]) -> Any:
        own = {**shared, **window}
        if layer is not None:
            own[next(n for n in LAYER_PARAMETERS if n in named)] = layer
        return factory(**_accepted(factory, common, own), **extra)

    def implied(cache: Any) -> dict[str, Any]:
        return dict(getattr(cache, "attention_options", {}))

    if any(n in named for n in LAYER_PARAMETERS):
        caches = [make(at, _window(spec, at)) for at in range(len(kinds))]
        return [(cache.update, implied(cache)) for cache in caches]
    any_window = {"window": spec.window, "sink_tokens": spec.sink_tokens}
    first = make(None, _window(spec, 0) if len(kinds) == 1 else any_window)
    takes_layer = _update_layer_parameter(first)
    if takes_layer is None:
        caches = [first] + [make(None, _window(spec, at)) for at in range(1, len(kinds))]
        return [(cache.update, implied(cache)) for cache in caches]

    def layer_update(at: int) -> Callable[..., Any]:
        def update(k_new: Any, v_new: Any, *n_new: Any) -> Any:
            return first.update(k_new, v_new, *n_new, **{takes_layer: at})

        return update

    return [(layer_update(at), {}) for at in range(len(kinds))]


def _update_layer_parameter(cache: Any) -> str | None:
    """The name by which ``cache.update`` takes a layer index, if it takes one."""
    try:
        parameters = inspect.signature(cache.update).parameters
    except (AttributeError, TypeError, ValueError):
        return None
    return next((n for n in LAYER_PARAMETERS if n in parameters), None)


def _accepted(factory: CacheFactory, common: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """The keywords ``factory`` takes: of ``common``, those it names (all of them if it takes
    any keyword); of the cache's ``own`` (window, sink tokens, bits, format, scales, config,
    layer index), those it names. So ``refattn.DynamicCache``, which has no ``max_len``, and
    ``refattn.SlidingWindowCache``, whose ``window`` the check is given, are factories as
    they stand."""
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


def _checked_kwargs(
    factory: CacheFactory, cache_kwargs: Mapping[str, Any] | None, config: Any
) -> dict[str, Any]:
    """``cache_kwargs`` as a dict, refused (naming the key) when the check supplies that
    keyword itself or the factory does not take it; ``config`` refused when the factory
    declares none."""
    if cache_kwargs is None:
        cache_kwargs = {}
    if not isinstance(cache_kwargs, Mapping):
        raise TypeError(f"cache_kwargs must be a mapping of keyword names; got {cache_kwargs!r}")
    named, takes_any = _parameters(factory)
    for name in cache_kwargs:
        if not isinstance(name, str):
            raise TypeError(f"cache_kwargs must have keyword names for keys; got {name!r}")
        if name in _SUPPLIED:
            raise ValueError(
                f"cache_kwargs[{name!r}] is a keyword the check hands the factory itself; "
                f"give it to check_cache (window=, sink_tokens=, bits=, format=, scales=, "
                f"config=, layers=) or leave it out"
            )
        if not takes_any and name not in named:
            raise TypeError(
                f"cache_kwargs[{name!r}] is not a keyword of the factory, which takes "
                f"{sorted(named)}"
            )
    if config is not None and not takes_any and "config" not in named:
        raise TypeError(
            f"config is given but the factory takes no config; it takes {sorted(named)}"
        )
    return dict(cache_kwargs)


def _layer_kinds(layers: int | Sequence[str] | None, window: int | None) -> tuple[str, ...] | None:
    """``layers`` as a tuple of :data:`~refattn.testing.problems.LAYER_KINDS` (None for the
    one layer of a plain check): a number of layers of the default kind (sliding with a
    window, else full), or the kinds themselves."""
    if layers is None:
        return None
    default = "full" if window is None else "sliding"
    if (
        isinstance(layers, bool)
        or not isinstance(layers, int | Sequence)
        or isinstance(layers, str)
    ):
        raise TypeError(
            f"layers must be a number of layers or a sequence of kinds from {LAYER_KINDS}; "
            f"got {layers!r}"
        )
    if isinstance(layers, int):
        if layers < 1:
            raise ValueError(f"layers must be at least 1; got {layers}")
        return (default,) * layers
    kinds = tuple(layers)
    if not kinds or any(kind not in LAYER_KINDS for kind in kinds):
        raise ValueError(f"layers must name at least one kind from {LAYER_KINDS}; got {layers!r}")
    if "sliding" in kinds and window is None:
        raise ValueError(f"layers {kinds} has a sliding layer, which needs window=; got none")
    return kinds


def _codes(
    factory: CacheFactory, format: str | Sequence[str] | None, scales: str | Sequence[str] | None,
    bits: int | None,
) -> list[tuple[str, str]] | None:  # fmt: skip
    """The (format, scales) pairs to draw: those given, or, for a factory that declares
    ``format`` (and ``scales``), every one it takes (those its ``FORMATS`` and ``SCALES``
    attributes list, when it has them); None for a cache that stores what it is given (or
    quantizes to ``bits`` alone)."""
    named, _ = _parameters(factory)
    if format is None and "format" not in named:
        if scales is not None:
            raise ValueError(f"scales={scales!r} is given without format=: which codes share them?")
        return None
    every_format = getattr(factory, "FORMATS", FORMATS) if bits is None else ("int8",)
    formats = _choices("format", format, every_format)
    if bits is not None and formats != ("int8",):
        raise ValueError(f"bits={bits} is for format='int8'; got format={format!r}")
    every_scale = getattr(factory, "SCALES", SCALES) if "scales" in named else ("token",)
    granularities = _choices("scales", scales, every_scale)
    pairs = [(f, s) for f in formats for s in granularities if f != "int8" or s == "token"]
    if not pairs:
        raise ValueError(
            f"format={format!r} with scales={scales!r} leaves nothing to draw: int8 codes "
            f"keep one scale per token and head"
        )
    return pairs


def _choices(name: str, given: str | Sequence[str] | None, every: Sequence[str]) -> tuple[str, ...]:
    """``given`` (one name or several) checked against ``every``; ``every`` when not given."""
    if given is None:
        return tuple(every)
    chosen = (given,) if isinstance(given, str) else tuple(given)
    allowed = FORMATS if name == "format" else SCALES
    if not chosen or any(c not in allowed for c in chosen):
        raise ValueError(f"{name} must be one or more of {allowed}; got {given!r}")
    return chosen


def check_cache(
    factory: CacheFactory,
    *,
    backend: str = "numpy",
    device: str | None = None,
    dtypes: Iterable[str] = ("float32",),
    window: int | None = None,
    sink_tokens: int = 0,
    bits: int | None = None,
    format: str | Sequence[str] | None = None,
    scales: str | Sequence[str] | None = None,
    layers: int | Sequence[str] | None = None,
    config: Any = None,
    cache_kwargs: Mapping[str, Any] | None = None,
    may_alias: bool = False,
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
    bits : the cache quantizes to this many bits (int8 codes, a scale per
        token and head)
    format, scales : the cache's codes (``"int8"``, ``"e4m3"``, ``"e5m2"``)
        and which values share a scale (``"token"``, ``"head"``, ``"tensor"``),
        one or several to draw from: the error the format allows each stored
        key and value is allowed on top
        (:func:`~refattn.testing.tolerance.storage_error`). A factory that
        declares ``format`` (and ``scales``) is handed each drawn one: every
        valid pair (int8 codes take ``"token"`` only), or those its ``FORMATS``
        and ``SCALES`` attributes list, unless these narrow them.
    layers : how many layers each step goes through, or each layer's kind,
        ``"full"`` or ``"sliding"`` (through ``window``); a number means
        layers of one kind, sliding when there is a window. See the module
        docstring for how the caches of several layers are made.
    config : handed to a factory that declares ``config`` (a model's configuration)
    cache_kwargs : more keywords for the factory, passed through untouched; a
        keyword the factory does not take, or one the check supplies itself,
        is refused before anything runs
    may_alias : whether the cache may return arrays that share memory with
        the caller's inputs (see the module docstring; default False)
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

    Three layers, the middle one sliding, one refattn cache of the matching
    kind per layer:

    >>> def layer_cache(*, layer_idx, max_len, window=None, **common):
    ...     if layer_idx == 1:
    ...         return refattn.SlidingWindowCache(window=window, **common)
    ...     return refattn.DynamicCache(**common)
    >>> report = check_cache(layer_cache, window=4, layers=("full", "sliding", "full"),
    ...                      max_examples=10, seed=0)
    >>> report.passed
    True
    """
    max_examples = check_budget("max_examples", max_examples)
    max_failures = check_budget("max_failures", max_failures)
    max_len = check_budget("max_len", max_len)
    if not isinstance(may_alias, bool):
        raise TypeError(f"may_alias must be True or False; got {may_alias!r}")
    kinds = _layer_kinds(layers, window)
    codes = _codes(factory, format, scales, bits)
    _checked_kwargs(factory, cache_kwargs, config)
    report = new_report(factory, backend, device, dtypes, frozenset())
    strategy = cache_specs(window=window, sink_tokens=sink_tokens, bits=bits, max_len=max_len,
                           quantized=codes, layers=kinds, may_alias=may_alias)  # fmt: skip
    for dtype in report.dtypes:

        def one(spec: CacheSpec, dtype: str = dtype) -> tuple[Outcome, frozenset[str]]:
            outcome = check_schedule(factory, spec, backend=backend, dtype=dtype,
                                     device=report.device, config=config,
                                     cache_kwargs=cache_kwargs)  # fmt: skip
            return outcome, cache_features_of(spec)

        search(report, one, strategy, dtype, max_examples=max_examples, seed=seed,
               on_example=on_example, allowed=lambda spec: spec.length <= max_len,
               corners=lambda spec: frozenset(), max_failures=max_failures)  # fmt: skip
        if report.unavailable:
            break
    arguments = {"config": _code(config), "cache_kwargs": _code(cache_kwargs)}
    for failure in report.failures:
        failure.arguments = {
            name: code for name, code in arguments.items()
            if (config if name == "config" else cache_kwargs) is not None
        }  # fmt: skip
    return report


def _code(value: Any) -> str:
    """``repr(value)`` where it reads back as the same value (plain data), else ""."""
    import ast

    text = repr(value)
    try:
        return text if ast.literal_eval(text) == value else ""
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return ""
