"""The search behind ``check_attention`` and ``check_cache``: Hypothesis, counted and shrunk.

Hypothesis draws problems until one fails, then shrinks it: it tries smaller
and simpler problems and keeps the smallest that still fails, replaying it
last. The problems drawn before the first failure are counted per feature in
the report (the shrinking runs are counted only as shrink steps), and the
replayed one becomes the report's :class:`~refattn.testing.report.Failure`.
No example database is kept: a check is a fresh search each time, and a
``seed`` makes it repeatable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from refattn.testing.report import Failure, Outcome, Report


def search(
    report: Report,
    one: Callable[[Any], tuple[Outcome, frozenset[str]]],
    strategy: Any,
    dtype: str,
    max_examples: int,
    seed: int | None,
    on_example: Callable[[Outcome], None] | None,
) -> None:
    """Run ``one`` on draws of ``strategy`` until one fails; record the shrunk failure."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as seed_with
    from hypothesis.errors import Flaky

    state = {"done": False, "shrunk": 0}
    first: list[Outcome] = []
    last: list[Outcome] = []

    @settings(
        max_examples=max_examples,
        database=None,
        deadline=None,
        derandomize=False,
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        print_blob=False,
    )
    @given(strategy)
    def run(drawn: Any) -> None:
        outcome, tags = one(drawn)
        if state["done"]:
            state["shrunk"] += 1
        else:
            report.count(dtype, tags, outcome)
            if on_example is not None:
                on_example(outcome)
        if outcome.failed:
            first[:] = first or [outcome]
            state["done"] = True
            last[:] = [outcome]
            raise _Failed(outcome)

    if seed is not None:
        run = seed_with(seed)(run)
    try:
        run()
        return
    except _Failed as failed:
        outcome = failed.outcome
    except Flaky:
        outcome = last[0].but(message="fails only sometimes (nondeterministic)")
    report.failures.append(
        Failure(outcome, report.tried(dtype), state["shrunk"], report.name, found=first[0].spec)
    )


class _Failed(AssertionError):
    """Carries a failing outcome out of the Hypothesis test."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(str(outcome))
        self.outcome = outcome
