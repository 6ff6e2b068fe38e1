"""The search behind ``check_attention`` and ``check_cache``: every draw judged, every failure
class found and shrunk.

Hypothesis draws ``max_examples`` problems (its generate phase: no example
database, a ``seed`` makes it repeatable). Each is judged and counted; a
failure is noted, not raised, so the search goes on to the end of its budget
and a passing run costs what it did when the search stopped at the first
failure.

Then the failures are sorted into classes. The first failing draw is shrunk
(:mod:`refattn.testing.shrink`) to the simplest problem that fails the same
way (the same :attr:`~refattn.testing.report.Outcome.symptom`). Its
features are what the class needs: every failing draw with the same symptom
and at least those features belongs to it. The first failing draw that no
class explains is shrunk next, keeping only problems that no earlier class
explains, and so on, up to ``max_failures`` classes. Each class becomes a
:class:`~refattn.testing.report.Failure` of the report: the shrunk problem,
how many draws it explains, and what they all have in common (features and
shape corners).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from refattn.testing.report import Failure, Outcome, Report
from refattn.testing.shrink import shrink

#: How many problems shrinking one class may try.
SHRINK_BUDGET = 200

Judge = Callable[[Any], tuple[Outcome, frozenset[str]]]


@dataclass(frozen=True)
class _Draw:
    """A failing draw: its outcome, its features and shape corners, and when it came."""

    outcome: Outcome
    features: frozenset[str]
    corners: frozenset[str]
    index: int  #: 1 for the first problem drawn


def search(
    report: Report,
    one: Judge,
    strategy: Any,
    dtype: str,
    *,
    max_examples: int,
    seed: int | None,
    on_example: Callable[[Outcome], None] | None,
    allowed: Callable[[Any], bool],
    corners: Callable[[Any], frozenset[str]],
    max_failures: int,
) -> None:
    """Judge ``max_examples`` draws of ``strategy`` with ``one``; add each failure class to
    ``report``, shrunk.

    ``one(spec)`` gives the outcome and the features the spec exercises;
    ``allowed(spec)`` says whether the check may draw it (shrinking stays
    inside); ``corners(spec)`` names its shape corners. With ``max_failures``
    1 the search stops at its first failure.
    """
    started = time.perf_counter()
    failing = _generate(report, one, strategy, dtype, max_examples, seed, on_example,
                        stop_early=max_failures == 1, corners=corners)  # fmt: skip
    classes: list[Failure] = []
    for draw in failing:
        if len(classes) >= max_failures:
            break
        if any(_explains(c, draw) for c in classes):
            continue
        classes.append(_shrunk_class(report, one, draw, classes, allowed, corners))
    for c in classes:
        members = [d for d in failing if _explains(c, d)] or [
            _Draw(c.outcome, c.features, c.corners, c.examples)
        ]
        c.draws = len(members)
        c.common_features = frozenset.intersection(*(d.features for d in members))
        c.common_corners = frozenset.intersection(*(d.corners for d in members))
    report.failures += classes
    report.unexplained[dtype] = sum(not any(_explains(c, d) for c in classes) for d in failing)
    report.seconds[dtype] = time.perf_counter() - started


def _generate(
    report: Report,
    one: Judge,
    strategy: Any,
    dtype: str,
    max_examples: int,
    seed: int | None,
    on_example: Callable[[Outcome], None] | None,
    *,
    stop_early: bool,
    corners: Callable[[Any], frozenset[str]],
) -> list[_Draw]:
    """Run every draw, count it, and return the failing ones in the order drawn."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as seed_with

    failing: list[_Draw] = []
    stopped: list[bool] = []

    @settings(
        max_examples=max_examples,
        database=None,
        deadline=None,
        derandomize=False,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        print_blob=False,
    )
    @given(strategy)
    def run(drawn: Any) -> None:
        if stopped:  # Hypothesis replays the draw it stopped on: counted already
            raise _Stop
        outcome, features = one(drawn)
        report.count(dtype, features, outcome)
        if on_example is not None:
            on_example(outcome)
        if outcome.unavailable:
            report.unavailable = outcome.unsupported
            stopped.append(True)
            raise _Stop
        if outcome.failed:
            index = report.tried(dtype)
            failing.append(_Draw(outcome, features, corners(drawn), index))
            report.first_failure.setdefault(dtype, index)
            if stop_early:
                stopped.append(True)
                raise _Stop

    if seed is not None:
        run = seed_with(seed)(run)
    try:
        run()
    except _Stop:
        pass
    return failing


def _shrunk_class(
    report: Report,
    one: Judge,
    draw: _Draw,
    classes: list[Failure],
    allowed: Callable[[Any], bool],
    corners: Callable[[Any], frozenset[str]],
) -> Failure:
    """The failure class of ``draw``: shrunk, keeping its symptom and staying outside
    ``classes``."""
    symptom = draw.outcome.symptom
    last: list[tuple[Outcome, frozenset[str]]] = []

    def fails(spec: Any) -> bool:
        outcome, features = one(spec)
        if outcome.symptom != symptom or any(c.explains(symptom, features) for c in classes):
            return False
        last[:] = [(outcome, features)]
        return True

    if not fails(draw.outcome.spec):  # the draw judged again: does it fail again?
        first = draw.outcome.message
        outcome = draw.outcome.but(message="fails only sometimes (nondeterministic)"
                                   + (f"; first: {first}" if first else ""))  # fmt: skip
        return Failure(outcome, draw.index, 0, report.name, found=draw.outcome.spec,
                       source=report.source, features=draw.features,
                       corners=draw.corners, precision=report.precision,
                       check=report.check, search=report.search)  # fmt: skip
    spec, tries = shrink(draw.outcome.spec, fails, allowed=allowed, budget=SHRINK_BUDGET)
    fails(spec)  # the shrunk problem judged last, so its outcome is the one reported
    outcome, features = last[0]
    return Failure(outcome, draw.index, tries, report.name, found=draw.outcome.spec,
                   source=report.source, features=features,
                   corners=corners(outcome.spec), precision=report.precision,
                   check=report.check, search=report.search)  # fmt: skip


def _explains(c: Failure, draw: _Draw) -> bool:
    return c.explains(draw.outcome.symptom, draw.features)


class _Stop(Exception):
    """Ends the Hypothesis run early (the first failure, when only one is wanted)."""
