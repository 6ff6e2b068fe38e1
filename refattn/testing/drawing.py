"""The one generator of attention problems, and the features a draw can switch on.

:func:`draw_spec` writes down, once, which attention problems are drawn: shapes,
options and a seed, as a :class:`~refattn.testing.problems.ProblemSpec`. Where
the randomness comes from is a separate question, answered by a
:class:`Draws`: :class:`~refattn.testing.strategies.HypothesisDraws` (so that
``check_attention`` and the test suite can shrink a failure) or
:class:`NumpyDraws` (so that ``refattn verify`` is a seeded, repeatable loop).

``features`` narrows what is drawn. A feature left out is never drawn; every
feature named may be:

================  =============================================================
feature           what it draws
================  =============================================================
``causal``        causal masking (otherwise every problem is non-causal)
``gqa``           several query heads per KV head (1 to 4 groups)
``positions``     positions other than the defaults: top-left alignment, rows
                  whose queries sit at different positions
``empty_slots``   key slots with ``k_pos = -1`` (padding, holes, empty ring
                  slots), so also fully masked rows and Sk = 0
``ragged``        per-row lengths: row b holds its own number of keys, then
                  empty slots (``cache_seqlens``) or after left padding
``window``        a sliding window, including its edges ``q - k = W - 1, W``
``softcap``       tanh soft-capping of the scores, caps from 0.5 to 50
``alibi``         ALiBi slopes, per head or per (batch, head)
``lse``           the log-sum-exp is asked for as well
``long``          rows of 64 to 4096 keys (half of them 2048 or more), where
                  low-precision sums drift, mostly with values around a mean
                  of 2 (a float16 accumulator loses such terms past a few
                  thousand keys)
``tiles``         Sk, and often Sq, at the tile sizes kernels use (16, 32, 64,
                  128, 256) and one either side, where a kernel that drops its
                  last partial tile fails
``large_logits``  scores near 1e4, which overflow a softmax without max
                  subtraction; with D >= 8 the unscaled q.k passes float16's
                  65504 while the scaled score does not
``unseen_nan``    NaN, +inf or -inf (:data:`~refattn.testing.problems.UNSEEN_VALUES`)
                  in every slot no query may see (off by default: only kernels
                  that never read such slots, as flash-attn's ``cache_seqlens``
                  or a paged kernel, can promise this)
================  =============================================================

The spec itself takes more than a candidate can be handed today
(:data:`SPEC_ONLY_FEATURES`): a boolean ``mask``, an additive ``bias``,
``sink_logits``, ``sink_tokens`` beside a window, NaN in slots some queries
see (``seen_nan``) and problems without queries (``no_queries``). The test
suite and ``refattn verify`` draw those too.

Always drawn: batch 1 to 3, Sq < Sk, Sq = Sk and Sq > Sk, head dims that are
not powers of two, a value dim different from the key dim, and explicit
scales.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar

import numpy as np

from refattn.testing.problems import UNSEEN_VALUES, ProblemSpec

#: Every feature ``check_attention`` can draw and hand to a candidate.
FEATURES = (
    "causal",
    "gqa",
    "positions",
    "empty_slots",
    "ragged",
    "window",
    "softcap",
    "alibi",
    "lse",
    "long",
    "tiles",
    "large_logits",
    "unseen_nan",
)
#: What the spec takes but a candidate cannot yet be handed.
SPEC_ONLY_FEATURES = ("mask", "bias", "sink_logits", "sink_tokens", "seen_nan", "no_queries")
#: Everything the spec takes.
ALL_FEATURES = frozenset(FEATURES) | frozenset(SPEC_ONLY_FEATURES)
#: What ``check_attention`` draws when ``features`` is None: everything but ``unseen_nan``.
DEFAULT_FEATURES = frozenset(FEATURES) - {"unseen_nan"}

HEAD_DIMS = (8, 1, 3, 13, 16, 24, 40, 64, 80, 128)  # the first is where shrinking goes
SOFTCAPS = (1.0, 5.0, 20.0, 50.0)
#: The tile sizes kernels use; ``tiles`` draws lengths at each and one either side.
TILES = (16, 32, 64, 128, 256)

Choice = TypeVar("Choice")


class Draws(Protocol):
    """A source of random choices; the first option and the low end shrink best."""

    def integer(self, low: int, high: int) -> int:
        """An integer in [low, high]."""
        ...

    def choice(self, options: Sequence[Choice]) -> Choice:
        """One of ``options``."""
        ...

    def flag(self) -> bool:
        """True or False."""
        ...

    def real(self, low: float, high: float) -> float:
        """A float in [low, high]."""
        ...


class NumpyDraws:
    """Draws from a NumPy generator: repeatable from its seed, no shrinking."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def integer(self, low: int, high: int) -> int:
        return int(self.rng.integers(low, high + 1))

    def choice(self, options: Sequence[Choice]) -> Choice:
        return options[int(self.rng.integers(len(options)))]

    def flag(self) -> bool:
        return bool(self.rng.integers(2))

    def real(self, low: float, high: float) -> float:
        return float(self.rng.uniform(low, high))


def resolve_features(
    features: Iterable[str] | None, *, allowed: Iterable[str] = FEATURES
) -> frozenset[str]:
    """``features`` as a set, checked against ``allowed``; None means :data:`DEFAULT_FEATURES`.

    >>> sorted(resolve_features({"causal", "gqa"}))
    ['causal', 'gqa']
    >>> resolve_features({"mask"})
    Traceback (most recent call last):
    ...
    ValueError: features must be drawn from ('causal', 'gqa', 'positions', 'empty_slots', 'ragged', 'window', 'softcap', 'alibi', 'lse', 'long', 'tiles', 'large_logits', 'unseen_nan'); got unknown ['mask'] (the spec takes it, but a candidate cannot yet be handed it)
    """  # noqa: E501
    if features is None:
        return DEFAULT_FEATURES
    if isinstance(features, str):
        raise TypeError(f"features must be a collection of names, not the string {features!r}")
    chosen, allowed = frozenset(features), tuple(allowed)
    unknown = sorted(chosen - set(allowed))
    if unknown:
        spec_only = set(unknown) <= set(SPEC_ONLY_FEATURES)
        why = " (the spec takes it, but a candidate cannot yet be handed it)" if spec_only else ""
        raise ValueError(f"features must be drawn from {allowed}; got unknown {unknown}{why}")
    return chosen


def features_of(spec: ProblemSpec) -> frozenset[str]:
    """The features a spec exercises (the per-feature counts of a report)."""
    tags = {
        "causal": spec.causal,
        "gqa": spec.q_heads > spec.kv_heads,
        "positions": spec.layout in ("top_left", "staggered", "scattered"),
        "empty_slots": spec.layout in ("holes", "scattered") or spec.k_len == 0,
        "ragged": spec.layout in ("ragged", "left_padded"),
        "window": spec.window is not None,
        "softcap": spec.softcap is not None,
        "alibi": spec.alibi,
        "lse": spec.return_lse,
        "long": spec.k_len >= 64 and not _at_tile(spec.k_len),
        "tiles": any(_at_tile(n) and n > 16 for n in (spec.k_len, spec.q_len)),
        "large_logits": spec.logit_size >= 1e3,
        "unseen_nan": spec.unseen_nan,
        "mask": spec.mask,
        "bias": spec.bias,
        "sink_logits": spec.sink_logits,
        "sink_tokens": spec.sink_tokens > 0,
        "seen_nan": spec.seen_nan,
        "no_queries": spec.q_len == 0,
    }
    return frozenset(name for name, on in tags.items() if on)


def _at_tile(length: int) -> bool:
    """Whether ``length`` is a tile size or one either side of one (below 17, short rows
    reach these lengths too, so only longer ones are tagged ``tiles``)."""
    return any(abs(length - t) <= 1 for t in TILES)


def corners_of(spec: ProblemSpec) -> frozenset[str]:
    """The shape corners a problem sits on: where a failure class's draws agree on shape.

    >>> sorted(corners_of(ProblemSpec(q_len=1, k_len=65)))
    ['Sk past a multiple of 16', 'Sk past a multiple of 64', 'one KV head', 'one query']
    """
    tags = {
        "one query": spec.q_len == 1,
        "Sq > Sk": spec.q_len > spec.k_len,
        "no keys": spec.k_len == 0,
        "head dim not a multiple of 8": spec.head_dim % 8 != 0,
        "Dv != D": spec.value_dim != spec.head_dim,
        "several rows": spec.batch > 1,
        "one KV head": spec.kv_heads == 1,
        **{f"Sk past a multiple of {t}": spec.k_len > t and spec.k_len % t != 0 for t in (16, 64)},
        **{f"Sq past a multiple of {t}": spec.q_len > t and spec.q_len % t != 0 for t in (16, 64)},
    }
    return frozenset(name for name, on in tags.items() if on)


def layouts(features: frozenset[str]) -> list[str]:
    """The position layouts (:data:`~refattn.testing.problems.LAYOUTS`) the features allow."""
    chosen = ["bottom_right"]
    if "positions" in features:
        chosen += ["top_left", "staggered"]
    if "empty_slots" in features:
        chosen += ["holes"]
    if "ragged" in features:
        chosen += ["ragged", "left_padded"]
    if {"positions", "empty_slots"} <= features:
        chosen += ["scattered"]
    return chosen


def draw_spec(draws: Draws, features: frozenset[str], *, max_len: int = 16) -> ProblemSpec:
    """An attention problem with only ``features`` switched on (each maybe, by the draw).

    Short rows have up to ``max_len`` queries and keys. With ``long``, one
    problem in eight has 64 to 4096 keys (half of them 2048 or more) and at
    most 4 queries; with
    ``tiles``, one in eight has a tile length of keys (16 to 256, or one
    either side) and, half the time, of queries too. Those have one row and
    at most two KV heads of two query heads each.

    >>> rng = np.random.default_rng(0)
    >>> spec = draw_spec(NumpyDraws(rng), frozenset({"causal"}))
    >>> spec.window is None and spec.layout == "bottom_right" and not spec.alibi
    True
    """
    on = features
    shape = draws.integer(0, 7)
    big = ("long" in on and shape == 6) or ("tiles" in on and shape == 7)
    kv_heads = draws.integer(1, 2 if big else 3)  # long rows: fewer heads, the same corners
    groups = draws.integer(1, 2 if big else 4) if "gqa" in on else 1
    offset = 0.0
    if "long" in on and shape == 6:
        batch, q_len = 1, draws.integer(1, 4)
        k_len = draws.integer(64, 4096) if draws.flag() else draws.integer(2048, 4096)
        while _at_tile(k_len):  # a long row is not also a tile corner
            k_len += 1
        offset = 8.0 if draws.integer(0, 3) else 0.0  # values with a mean: long sums lose it
    elif "tiles" in on and shape == 7:
        batch, k_len = 1, _tile_length(draws)
        q_len = _tile_length(draws) if draws.flag() else draws.integer(1, max_len)
    else:
        batch = draws.integer(1, 3)
        k_len = draws.integer(0 if "empty_slots" in on else 1, max_len)
        q_len = draws.integer(0 if "no_queries" in on else 1, max_len)
    head_dim = draws.choice(HEAD_DIMS)
    window = None
    if "window" in on and draws.flag():
        # A long row keeps at least half its keys in the window: its length is the point.
        window = draws.integer(1 if k_len < 64 else k_len // 2, k_len + 2)
    softcap = None
    if "softcap" in on and draws.flag():
        softcap = draws.choice(SOFTCAPS) if draws.flag() else draws.real(0.5, 50.0)
    unseen = "unseen_nan" in on and draws.flag()
    logit_sizes = (1.0, 30.0, 1e4) if "large_logits" in on else (1.0, 30.0)
    if offset:  # flat scores mostly, where every one of the many terms counts
        logit_sizes = (1.0, 1.0, 30.0)
    return ProblemSpec(
        batch=batch,
        q_heads=kv_heads * groups,
        kv_heads=kv_heads,
        q_len=q_len,
        k_len=k_len,
        head_dim=head_dim,
        value_dim=head_dim if draws.flag() else draws.choice(HEAD_DIMS[:4]),
        causal="causal" in on and draws.flag(),
        layout=draws.choice(layouts(on)),
        window=window,
        sink_tokens=draws.integer(1, 3) if "sink_tokens" in on and draws.flag() else 0,
        softcap=softcap,
        alibi="alibi" in on and draws.flag(),
        sink_logits="sink_logits" in on and draws.flag(),
        mask="mask" in on and draws.flag(),
        bias="bias" in on and draws.flag(),
        scale=draws.real(0.05, 2.0) if draws.flag() else None,
        logit_size=draws.choice(logit_sizes),
        unseen_nan=unseen,
        seen_nan="seen_nan" in on and draws.flag(),
        return_lse="lse" in on and draws.flag(),
        seed=draws.integer(0, 2**32 - 1),
        unseen_values=draws.choice(UNSEEN_VALUES) if unseen else "nan",
        value_offset=offset,
    )


def _tile_length(draws: Draws) -> int:
    """A tile size, or one either side of it."""
    return draws.choice(TILES) + draws.choice((0, -1, 1))


def draw_steps(
    draws: Draws, lengths: Sequence[int], *, max_chunk: int = 6
) -> list[tuple[int, list[int]]]:
    """A ragged decoding schedule: steps ``(T, n_new)`` taking row b through ``lengths[b]`` tokens.

    At each step row b takes ``n_new[b] <= T`` real tokens; the first step may
    be as long as the longest row (a prefill), later ones at most
    ``max_chunk`` (decode steps and chunks); a row may take none at a step.

    >>> steps = draw_steps(NumpyDraws(np.random.default_rng(1)), [5, 3])
    >>> [sum(n[b] for _, n in steps) for b in range(2)]
    [5, 3]
    """
    left = list(lengths)
    steps: list[tuple[int, list[int]]] = []
    while any(left):
        T = draws.integer(1, max(left) if not steps else max_chunk)
        n = [draws.integer(0, min(T, r)) if r else 0 for r in left]
        if not any(n):  # every row waited: the longest takes what it can
            b = max(range(len(left)), key=lambda i: left[i])
            n[b] = min(T, left[b])
        steps.append((T, n))
        left = [r - m for r, m in zip(left, n, strict=True)]
    return steps
