"""Shrinking a failing problem: the simplest spec that still fails the same way.

A failing :class:`~refattn.testing.problems.ProblemSpec` (or
:class:`~refattn.testing.problems.CacheSpec`) is made simpler one field at a
time, keeping a change only while the problem still fails: options are
switched off, positions go back to the defaults, heads, rows and lengths
get fewer and shorter (lengths by bisection, so a kernel that drops the keys
past its last full tile of 64 shrinks from 700 keys to 65 in about ten
tries), dims go back to 8, the seed to 0. It repeats until no change helps or
the budget of tries is spent. The shrinking works on the spec, not on the
random choices behind it, so any failing spec shrinks: one drawn by
Hypothesis, by a NumPy generator or written by hand.

Shrinking never leaves what the check may draw (``allowed``): a check that
does not draw empty rows never shrinks to one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from refattn.testing.problems import CacheSpec, ProblemSpec

Spec = TypeVar("Spec", bound=ProblemSpec | CacheSpec)

#: Fields switched back to their default first, in this order: each is one try.
_OPTIONS = ("mask", "bias", "sink_logits", "seen_nan", "unseen_nan", "alibi", "softcap",
            "window", "sink_tokens", "causal", "return_lse", "scale", "layout", "logit_size",
            "unseen_values", "value_offset", "window_right", "mask_kind", "sink_offset",
            "new_keys", "no_empty_rows", "min_row_len")  # fmt: skip
#: Integer fields shrunk by bisection towards their least value.
_LENGTHS = {"batch": 1, "q_len": 0, "k_len": 0, "window": 1, "sink_tokens": 0,
            "window_right": 0, "new_keys": 0}  # fmt: skip
#: Dims tried in this order (the first is where shrinking goes).
_DIMS = (8, 1, 2, 4, 16, 32, 64)
#: Round caps a drawn softcap is tried at.
_SOFTCAPS = (1.0, 5.0, 20.0, 50.0)


def shrink(
    spec: Spec, fails: Callable[[Spec], bool], *, allowed: Callable[[Spec], bool], budget: int
) -> tuple[Spec, int]:
    """The simplest spec reached from ``spec`` on which ``fails`` holds, and the tries spent.

    ``fails(spec)`` must hold for the spec given. Each try calls ``fails``
    once; no more than ``budget`` are made.
    """
    tries = 0

    def better(candidate: Spec | None) -> bool:
        nonlocal tries
        if candidate is None or candidate == spec or tries >= budget or not allowed(candidate):
            return False
        tries += 1
        return fails(candidate)

    changed = True
    while changed and tries < budget:
        changed = False
        for candidate in _simpler(spec):
            if better(candidate):
                spec, changed = candidate, True
                break
        else:
            for name, least in _integer_fields(spec):
                smallest = _bisect(spec, name, least, better)
                if smallest != spec:
                    spec, changed = smallest, True
    return spec, tries


def _simpler(spec: Any) -> Iterator[Any]:
    """Specs one step simpler than ``spec`` in a field other than a length, best first."""
    default = type(spec)()
    if isinstance(spec, ProblemSpec):
        for name in _OPTIONS:
            if getattr(spec, name) != getattr(default, name):
                yield _with(spec, **{name: getattr(default, name)})
        if spec.softcap not in (None, *_SOFTCAPS):
            yield from (_with(spec, softcap=c) for c in _SOFTCAPS)
        if spec.scale not in (None, 1.0):
            yield _with(spec, scale=1.0)
        yield from _fewer_heads(spec)
        yield _with(spec, value_dim=spec.head_dim)
        for dim in _simpler_dims(spec.head_dim):
            yield _with(spec, head_dim=dim, value_dim=dim if spec.value_dim == spec.head_dim
                        else spec.value_dim)  # fmt: skip
        for dim in _simpler_dims(spec.value_dim):
            yield _with(spec, value_dim=dim)
    else:
        if spec.logit_size != default.logit_size:
            yield _with(spec, logit_size=default.logit_size)
        yield from _fewer_heads(spec)
        for dim in _simpler_dims(spec.head_dim):
            yield _with(spec, head_dim=dim)
        steps = spec.steps
        for i in reversed(range(len(steps))):  # one step fewer
            yield _with(spec, steps=steps[:i] + steps[i + 1 :])
        for i, n in enumerate(steps):  # one step shorter
            yield _with(spec, steps=(*steps[:i], max(1, n // 2), *steps[i + 1 :]))
            yield _with(spec, steps=(*steps[:i], n - 1, *steps[i + 1 :]))
    if spec.seed != 0:
        yield _with(spec, seed=0)


def _fewer_heads(spec: Any) -> Iterator[Any]:
    """One KV head with the same group size; no grouping; groups of two, or half as large."""
    groups = spec.q_heads // spec.kv_heads
    yield _with(spec, q_heads=groups, kv_heads=1)
    yield _with(spec, q_heads=spec.kv_heads)
    for fewer in sorted({2, groups // 2}):
        if 1 < fewer < groups:
            yield _with(spec, q_heads=spec.kv_heads * fewer)


def _simpler_dims(dim: int) -> list[int]:
    """The dims of :data:`_DIMS` before ``dim`` in its order (any of them, for a dim not in
    it): each try moves strictly towards 8, so shrinking cannot go round in a circle."""
    return list(_DIMS[: _DIMS.index(dim)] if dim in _DIMS else _DIMS)


def _integer_fields(spec: Any) -> Iterator[tuple[str, int]]:
    for name, least in _LENGTHS.items():
        value = getattr(spec, name, None)
        if isinstance(value, int) and value > least:
            yield name, least


def _bisect(spec: Any, name: str, least: int, fails: Callable[[Any], bool]) -> Any:
    """``spec`` with the field ``name`` as small as bisection finds it still failing.

    ``fails`` is known to hold at the current value; the least value is tried
    first, then the interval between the largest value seen passing and the
    smallest seen failing is halved.
    """
    current = getattr(spec, name)
    lowest = _with(spec, **{name: least})
    if fails(lowest):
        return lowest
    passing, failing, best = least, current, spec
    while failing - passing > 1:
        middle = (passing + failing) // 2
        candidate = _with(spec, **{name: middle})
        if fails(candidate):
            failing, best = middle, candidate
        else:
            passing = middle
    return best


def _with(spec: Any, **changes: Any) -> Any:
    """``spec`` with ``changes``, or None where they make an invalid spec."""
    try:
        return dataclasses.replace(spec, **changes)
    except (ValueError, TypeError):
        return None
