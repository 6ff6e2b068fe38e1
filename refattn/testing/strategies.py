"""Hypothesis strategies for other projects' test suites: attention problems and cache schedules.

A drawn attention problem is a :class:`~refattn.testing.ProblemSpec`: shapes,
options and a seed. Hypothesis shrinks the spec (fewer heads, shorter rows,
options switched off, seed 0), and :func:`~refattn.testing.build_problem`
rebuilds the same float64 arrays from it, so a failure is a line of code.

``features`` narrows what is drawn to what a kernel can express. A feature
left out is never drawn; every feature named may be:

===============  =============================================================
feature          what it draws
===============  =============================================================
``causal``       causal masking (otherwise every problem is non-causal)
``gqa``          several query heads per KV head (1 to 4 groups)
``positions``    positions other than the defaults: top-left alignment, rows
                 whose queries sit at different positions
``empty_slots``  key slots with ``k_pos = -1`` (padding, holes, empty ring
                 slots, per-row lengths), so also fully masked rows and Sk = 0
``window``       a sliding window, including its edges ``q - k = W - 1, W``
``softcap``      tanh soft-capping of the scores, caps from 0.5 to 50
``alibi``        ALiBi slopes, per head or per (batch, head)
``lse``          the log-sum-exp is asked for as well
``long``         rows of 64 to 1024 keys, where low-precision sums drift
``large_logits`` scores near 1e4, which overflow a softmax without max subtraction
``nan_slots``    NaN in every slot no query may see (off by default: only kernels
                 that never read such slots, as flash-attn's ``cache_seqlens``
                 or a paged kernel, can promise this)
===============  =============================================================

Always drawn: batch 1 to 3, Sq < Sk, Sq = Sk and Sq > Sk, head dims that are
not powers of two, a value dim different from the key dim, and explicit
scales.

>>> from hypothesis import given
>>> from refattn.testing.strategies import attention_specs
>>> @given(attention_specs(features={"causal", "gqa"}))
... def test_my_kernel(spec):
...     assert spec.window is None and spec.layout == "bottom_right"
>>> test_my_kernel()
"""

from __future__ import annotations

from collections.abc import Iterable

from hypothesis import strategies as st

from refattn.testing.problems import CacheSpec, Problem, ProblemSpec, build_problem

#: Every feature :func:`attention_specs` can draw.
FEATURES = (
    "causal",
    "gqa",
    "positions",
    "empty_slots",
    "window",
    "softcap",
    "alibi",
    "lse",
    "long",
    "large_logits",
    "nan_slots",
)
#: What is drawn when ``features`` is None: everything but ``nan_slots``.
DEFAULT_FEATURES = frozenset(FEATURES) - {"nan_slots"}

_HEAD_DIMS = (8, 1, 3, 13, 16, 24, 40, 64, 80, 128)  # shrinks towards 8
_SOFTCAPS = (1.0, 5.0, 20.0, 50.0)


def resolve_features(features: Iterable[str] | None) -> frozenset[str]:
    """``features`` as a set, checked; None means :data:`DEFAULT_FEATURES`."""
    if features is None:
        return DEFAULT_FEATURES
    if isinstance(features, str):
        raise TypeError(f"features must be a collection of names, not the string {features!r}")
    chosen = frozenset(features)
    unknown = sorted(chosen - set(FEATURES))
    if unknown:
        raise ValueError(f"features must be drawn from {FEATURES}; got unknown {unknown}")
    return chosen


def features_of(spec: ProblemSpec) -> frozenset[str]:
    """The features a spec exercises (the per-feature counts of a report)."""
    tags = {
        "causal": spec.causal,
        "gqa": spec.q_heads > spec.kv_heads,
        "positions": spec.layout in ("top_left", "staggered", "ragged", "left_padded", "scattered"),
        "empty_slots": spec.layout in ("holes", "ragged", "left_padded", "scattered")
        or spec.k_len == 0,
        "window": spec.window is not None,
        "softcap": spec.softcap is not None,
        "alibi": spec.alibi,
        "lse": spec.return_lse,
        "long": spec.k_len >= 64,
        "large_logits": spec.logit_size >= 1e3,
        "nan_slots": spec.poison,
    }
    return frozenset(name for name, on in tags.items() if on)


def _layouts(chosen: frozenset[str]) -> list[str]:
    layouts = ["bottom_right"]
    if "positions" in chosen:
        layouts += ["top_left", "staggered"]
    if "empty_slots" in chosen:
        layouts += ["holes"]
    if {"positions", "empty_slots"} <= chosen:
        layouts += ["ragged", "left_padded", "scattered"]
    return layouts


@st.composite
def attention_specs(
    draw: st.DrawFn, features: Iterable[str] | None = None, *, max_len: int = 16
) -> ProblemSpec:
    """An attention problem as ``check_attention`` draws it, narrowed to ``features``.

    Short rows have up to ``max_len`` queries and keys; with ``long``, about
    one problem in six has 64 to 1024 keys and at most 4 queries.
    """
    chosen = resolve_features(features)
    flag = st.booleans()
    kv_heads = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 4)) if "gqa" in chosen else 1
    long = "long" in chosen and draw(st.integers(0, 5)) == 5
    shortest = 0 if "empty_slots" in chosen else 1
    if long:
        k_len, q_len, batch = draw(st.integers(64, 1024)), draw(st.integers(1, 4)), 1
    else:
        k_len, q_len = draw(st.integers(shortest, max_len)), draw(st.integers(1, max_len))
        batch = draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from(_HEAD_DIMS))
    value_dim = draw(st.just(head_dim) | st.sampled_from(_HEAD_DIMS[:4]))
    logit_sizes = [1.0, 30.0] + ([1e4] if "large_logits" in chosen else [])
    return ProblemSpec(
        batch=batch,
        q_heads=kv_heads * groups,
        kv_heads=kv_heads,
        q_len=q_len,
        k_len=k_len,
        head_dim=head_dim,
        value_dim=value_dim,
        causal="causal" in chosen and draw(flag),
        layout=draw(st.sampled_from(_layouts(chosen))),
        window=draw(st.none() | st.integers(1, k_len + 2)) if "window" in chosen else None,
        softcap=draw(st.none() | st.sampled_from(_SOFTCAPS) | st.floats(0.5, 50.0))
        if "softcap" in chosen
        else None,
        alibi="alibi" in chosen and draw(flag),
        scale=draw(st.none() | st.floats(0.05, 2.0)),
        logit_size=draw(st.sampled_from(logit_sizes)),
        poison="nan_slots" in chosen and draw(flag),
        return_lse="lse" in chosen and draw(flag),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def attention_problems(
    features: Iterable[str] | None = None, *, max_len: int = 16
) -> st.SearchStrategy[Problem]:
    """:func:`attention_specs` built into float64 NumPy arrays (a :class:`Problem`).

    >>> from hypothesis import given
    >>> @given(attention_problems(features={"gqa"}))
    ... def test_shapes(problem):
    ...     assert problem.q.shape[1] % problem.k.shape[1] == 0
    >>> test_shapes()
    """
    return attention_specs(features, max_len=max_len).map(build_problem)


@st.composite
def append_schedules(draw: st.DrawFn, *, max_len: int = 24, max_chunk: int = 6) -> list[int]:
    """How many tokens each ``update`` appends: a prefill of any length, then chunks.

    The sizes add up to at most ``max_len``; the first may be as long as
    ``max_len`` (a prompt), the rest at most ``max_chunk`` (decode steps and
    speculative chunks).

    >>> from hypothesis import given
    >>> @given(append_schedules(max_len=10))
    ... def test_total(steps):
    ...     assert 1 <= sum(steps) <= 10 and all(t >= 1 for t in steps)
    >>> test_total()
    """
    total = draw(st.integers(1, max_len))
    steps = [draw(st.integers(1, total))]
    while sum(steps) < total:
        steps.append(draw(st.integers(1, min(max_chunk, total - sum(steps)))))
    return steps


@st.composite
def ragged_schedules(
    draw: st.DrawFn, batch: int, *, max_len: int = 24, max_chunk: int = 6
) -> list[tuple[int, list[int]]]:
    """Per-row appends: steps ``(T, n_new)``, row b taking ``n_new[b] <= T`` real tokens.

    Each row gets its own total of at most ``max_len`` tokens; a row may take
    none at a step (it is waiting), or finish early.
    """
    left = [draw(st.integers(0, max_len)) for _ in range(batch)]
    steps: list[tuple[int, list[int]]] = []
    while any(left):
        T = draw(st.integers(1, max_len if not steps else max_chunk))
        n = [draw(st.integers(0, min(T, r))) if r else 0 for r in left]
        if not any(n):
            b = max(range(batch), key=lambda i: left[i])
            n[b] = min(T, left[b])
        steps.append((T, n))
        left = [r - m for r, m in zip(left, n, strict=True)]
    return steps


@st.composite
def cache_specs(
    draw: st.DrawFn,
    *,
    window: int | None = None,
    sink_tokens: int = 0,
    bits: int | None = None,
    max_len: int = 24,
    max_chunk: int = 6,
) -> CacheSpec:
    """A decoding history for ``check_cache``: a prefill, then decode steps and chunks.

    ``window`` and ``sink_tokens`` are the cache's own (a sliding-window cache
    keeps only those keys); histories are drawn to run past the window.
    """
    kv_heads = draw(st.integers(1, 3))
    return CacheSpec(
        batch=draw(st.integers(1, 3)),
        q_heads=kv_heads * draw(st.integers(1, 3)),
        kv_heads=kv_heads,
        head_dim=draw(st.sampled_from(_HEAD_DIMS[:6])),
        steps=tuple(draw(append_schedules(max_len=max_len, max_chunk=max_chunk))),
        window=window,
        sink_tokens=sink_tokens,
        bits=bits,
        logit_size=draw(st.sampled_from([1.0, 30.0])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def cache_features_of(spec: CacheSpec) -> frozenset[str]:
    """The features a history exercises: prefill, decode steps, chunks, GQA, past the window."""
    tags = {
        "prefill": spec.steps[0] > 1,
        "decode": any(t == 1 for t in spec.steps[1:]),
        "chunks": any(t > 1 for t in spec.steps[1:]),
        "gqa": spec.q_heads > spec.kv_heads,
        "beyond_window": spec.window is not None and spec.length > spec.window + spec.sink_tokens,
    }
    return frozenset(name for name, on in tags.items() if on)
