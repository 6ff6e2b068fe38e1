"""The one generator of attention problems, and the features a draw can switch on.

:func:`draw_spec` writes down, once, which attention problems are drawn: shapes,
options and a seed, as a :class:`~refattn.testing.problems.ProblemSpec`. Where
the randomness comes from is a separate question, answered by a
:class:`Draws`: :class:`~refattn.testing.strategies.HypothesisDraws` (so that
``check_attention`` and the test suite can shrink a failure) or
:class:`NumpyDraws` (so that ``refattn verify`` is a seeded, repeatable loop).

``features`` narrows what is drawn. A feature left out is never drawn; every
feature named may be:

======================  =============================================================
feature                 what it draws
======================  =============================================================
``causal``              causal masking (otherwise every problem is non-causal)
``gqa``                 several query heads per KV head (1 to 4 groups)
``positions``           positions other than the defaults: top-left alignment, rows
                        whose queries sit at different positions
``empty_slots``         key slots with ``k_pos = -1`` (padding, holes, empty ring
                        slots), so also fully masked rows and Sk = 0
``ragged``              per-row lengths: row b holds its own number of keys, then
                        empty slots (``cache_seqlens``) or after left padding
``window``              a sliding window, including its edges ``q - k = W - 1, W``
``softcap``             tanh soft-capping of the scores, caps from 0.5 to 50
``alibi``               ALiBi slopes, per head or per (batch, head)
``lse``                 the log-sum-exp is asked for as well
``long``                rows of 64 to 4096 keys (half of them 2048 or more), where
                        low-precision sums drift, mostly with values around a mean
                        of 2 (a float16 accumulator loses such terms past a few
                        thousand keys)
``tiles``               Sk, and often Sq, at the tile sizes kernels use (16, 32, 64,
                        128, 256) and one either side, where a kernel that drops its
                        last partial tile fails
``large_logits``        scores near 1e4, which overflow a softmax without max
                        subtraction; with D >= 8 the unscaled q.k passes float16's
                        65504 while the scaled score does not
``unseen_nan``          NaN, +inf or -inf (:data:`~refattn.testing.problems.UNSEEN_VALUES`)
                        in every slot no query may see (off by default: only kernels
                        that never read such slots, as flash-attn's ``cache_seqlens``
                        or a paged kernel, can promise this)
``mask``                a random boolean mask (True keeps), per head, per row or shared
``tree_mask``           speculative decoding's tree mask: each draft token sees the
                        prefix, its ancestors and itself, at positions numbered by depth
``document_mask``       packed rows of several documents, each query seeing only its
                        own document, positions restarting in each
``prefix_lm``           a prefix every query sees, causal after it (as a mask)
``bias``                an additive float bias, per head or per row
``sink_logits``         one sink logit per head in the softmax denominator, some large
                        enough (8, 30) to dominate the row
``sink_tokens``         the first 1 to 3 positions kept visible through a window
``two_sided_window``    a window's right reach :math:`R` (``window_right``), keys
                        up to R positions after the query visible, with or without a
                        left window (with ``window``)
``latent``              latent attention's shapes: D = 576, Dv = 512, one KV head
``mqa``                 one KV head shared by 5 to 16 query heads
``in_op_cache``         the split of the keys into an in-op cache's past and new ones
                        (``problem.new_keys``) anywhere in the row, not just at the
                        queries
======================  =============================================================

Every feature above but ``unseen_nan`` and those after it (the options a
kernel must have asked for: masks, bias, sinks, two-sided windows, latent
shapes, in-op splits) is drawn by default (:data:`DEFAULT_FEATURES`). The
spec itself also takes NaN in slots some queries see (``seen_nan``) and
problems without queries (``no_queries``, :data:`SPEC_ONLY_FEATURES`); the
test suite and ``refattn verify`` draw those too.

A candidate's :class:`~refattn.testing.constraints.Constraints` narrow every
draw further: head dims, value dims, lengths and layouts are chosen inside
them (:func:`draw_spec`).

Always drawn: batch 1 to 3, Sq < Sk, Sq = Sk and Sq > Sk, head dims that are
not powers of two, a value dim different from the key dim, and explicit
scales.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any, Protocol, TypeVar

import numpy as np

from refattn.testing.constraints import ANY, Constraints
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
    "mask",
    "tree_mask",
    "document_mask",
    "prefix_lm",
    "bias",
    "sink_logits",
    "sink_tokens",
    "two_sided_window",
    "latent",
    "mqa",
    "in_op_cache",
)
#: The masks a problem may carry, by feature, and the kind of mask each draws.
MASK_FEATURES = {"mask": "random", "tree_mask": "tree", "document_mask": "document",
                 "prefix_lm": "prefix_lm"}  # fmt: skip
#: What the spec takes but a candidate cannot yet be handed.
SPEC_ONLY_FEATURES = ("seen_nan", "no_queries")
#: Everything the spec takes.
ALL_FEATURES = frozenset(FEATURES) | frozenset(SPEC_ONLY_FEATURES)
#: What ``check_attention`` draws when ``features`` is None: the features a kernel is
#: expected to have without asking (the ones a candidate reads from the problem's
#: original fields), not ``unseen_nan`` nor the options added later to the problem.
DEFAULT_FEATURES = frozenset(FEATURES[: FEATURES.index("unseen_nan")])
#: Sink logits of these sizes are drawn (besides N(0, 1)): 30 dominates a row of scores near 1.
SINK_OFFSETS = (0.0, 0.0, 8.0, 30.0)
#: Latent attention's head dims (DeepSeek's absorbed MLA: 512 latent + 64 rotary).
LATENT_DIMS = (576, 512)

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
    >>> resolve_features({"seen_nan"})
    Traceback (most recent call last):
    ...
    ValueError: features must be drawn from ('causal', 'gqa', 'positions', 'empty_slots', 'ragged', 'window', 'softcap', 'alibi', 'lse', 'long', 'tiles', 'large_logits', 'unseen_nan', 'mask', 'tree_mask', 'document_mask', 'prefix_lm', 'bias', 'sink_logits', 'sink_tokens', 'two_sided_window', 'latent', 'mqa', 'in_op_cache'); got unknown ['seen_nan'] (the spec takes it, but a candidate cannot yet be handed it)
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
    mqa = spec.kv_heads == 1 and spec.q_heads > 4
    tags = {
        "causal": spec.causal,
        "gqa": spec.q_heads > spec.kv_heads and not mqa,
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
        **{
            feature: spec.mask and spec.mask_kind == kind for feature, kind in MASK_FEATURES.items()
        },
        "bias": spec.bias,
        "sink_logits": spec.sink_logits,
        "sink_tokens": spec.sink_tokens > 0,
        "two_sided_window": spec.window_right is not None,
        "latent": max(spec.head_dim, spec.value_dim) > 256,
        "mqa": mqa,
        "in_op_cache": spec.new_keys is not None,
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


def draw_spec(
    draws: Draws, features: frozenset[str], *, max_len: int = 16,
    constraints: Constraints = ANY,
) -> ProblemSpec:  # fmt: skip
    """An attention problem with only ``features`` switched on (each maybe, by the draw).

    Short rows have up to ``max_len`` queries and keys. With ``long``, one
    problem in eight has 64 to 4096 keys (half of them 2048 or more) and at
    most 4 queries; with
    ``tiles``, one in eight has a tile length of keys (16 to 256, or one
    either side) and, half the time, of queries too. Those have one row and
    at most two KV heads of two query heads each. ``constraints`` (what the
    candidate's kernel requires) narrow the draw (:func:`_constrained`).

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
    masks = [kind for feature, kind in MASK_FEATURES.items() if feature in on]
    spec = ProblemSpec(
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
        mask=bool(masks) and draws.flag(),
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
    return _constrained(_added_options(draws, spec, on, masks), constraints)


def _added_options(
    draws: Draws, spec: ProblemSpec, on: frozenset[str], masks: list[str]
) -> ProblemSpec:
    """The options added to the problem after the first features, drawn after those (so a
    draw of the first features alone makes the same problems as before they came)."""
    changes: dict[str, Any] = {}
    if spec.mask and len(masks) > 1:
        changes["mask_kind"] = draws.choice(masks)
    elif spec.mask:
        changes["mask_kind"] = masks[0]
    if spec.sink_logits:
        changes["sink_offset"] = draws.choice(SINK_OFFSETS)
    if "two_sided_window" in on and draws.flag():
        changes["window_right"] = draws.integer(0, spec.k_len + 1)
    small = spec.k_len <= 256
    if "latent" in on and small and draws.integer(0, 7) == 0:
        groups = spec.q_heads // spec.kv_heads
        changes |= {"head_dim": LATENT_DIMS[0], "value_dim": LATENT_DIMS[1], "kv_heads": 1,
                    "q_heads": groups, "batch": 1, "q_len": min(spec.q_len, 4),
                    "k_len": min(spec.k_len, 64)}  # fmt: skip
    elif "mqa" in on and small and draws.integer(0, 5) == 0:
        changes |= {"kv_heads": 1, "q_heads": draws.integer(5, 16)}
    if "in_op_cache" in on and draws.flag():
        changes["new_keys"] = draws.integer(0, changes.get("k_len", spec.k_len))
    return replace(spec, **changes) if changes else spec


def _constrained(spec: ProblemSpec, constraints: Constraints) -> ProblemSpec:
    """``spec`` moved inside ``constraints``: each requirement met by the nearest problem
    that meets it (a head dim rounded to an allowed one, Sq cut to Sk, a layout whose rows
    hold their queries' keys), so no draw is wasted on a refusal."""
    c = constraints
    if c == ANY:
        return spec
    changes: dict[str, Any] = {}
    latent = max(spec.head_dim, spec.value_dim) > max(HEAD_DIMS)
    dims = sorted(c.head_dims(HEAD_DIMS + (LATENT_DIMS if latent else ())))
    fit = {name: min((d for d in dims if d >= getattr(spec, name)), default=dims[-1])
           for name in ("head_dim", "value_dim")}  # fmt: skip
    changes |= fit
    if c.same_value_dim:
        changes["value_dim"] = fit["head_dim"]
    causal = spec.causal or c.causal_only
    changes["causal"] = causal
    q_len, k_len = spec.q_len, spec.k_len
    if c.keys_cover_queries or c.no_empty_rows:
        # Rows that hold every query's own key: no holes, no queries before the keys.
        k_len = max(k_len, 1) if c.no_empty_rows else k_len
        q_len = min(q_len, k_len)
        keep = ["bottom_right", "top_left", "ragged", "left_padded"]
        if not c.no_empty_rows:
            keep.append("staggered")  # every key held, queries earlier: some see none
        changes["layout"] = spec.layout if spec.layout in keep else "bottom_right"
        changes["min_row_len"] = max(q_len, 1 if c.no_empty_rows else 0)
        changes["no_empty_rows"] = c.no_empty_rows
    if c.square_unless_causal and not causal:
        q_len = k_len
    changes |= {"q_len": q_len, "k_len": k_len}
    if spec.window is not None and spec.window > k_len + 2:
        changes["window"] = k_len + 2
    if spec.new_keys is not None:
        changes["new_keys"] = min(spec.new_keys, k_len)
    return replace(spec, **changes)


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
