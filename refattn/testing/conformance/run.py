"""Running the conformance check: each implementation in each of its dtypes, one row each.

A row's verdict is

- ``unavailable`` where it cannot run here (its library is not installed,
  it needs a GPU), with why;
- ``unsupported`` where every problem drawn was refused, with the main
  reasons (nothing was checked, so it is not a pass);
- ``failed`` where some class of problems failed; each failure names the
  :class:`~refattn.testing.conformance.Defect` that explains it, if one does;
- ``passed`` otherwise.

Per feature the row says the same for the problems that had it (``"not
drawn"`` where none did). A run *fails* when some failure is explained by no
known defect.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import refattn
from refattn.testing.adapters.libraries import version_of
from refattn.testing.conformance.implementations import Defect, Implementation
from refattn.testing.report import Outcome, Report

#: The most refusal reasons a row keeps, most frequent first.
MOST_REASONS = 3


@dataclass
class FailureRow:
    """One class of failures of a row: what it was, and the defect that explains it."""

    summary: str
    features: list[str]
    reproducer: str
    known: str = ""  #: the title of the defect that explains it; "" for none
    message: str = ""  #: what the candidate raised, if it raised


@dataclass
class Row:
    """One implementation in one dtype: the verdict and what it rests on."""

    implementation: str
    library: str
    version: str
    kind: str
    dtype: str
    verdict: str
    tried: int = 0
    supported: int = 0
    features: dict[str, str] = field(default_factory=dict)  #: feature -> its verdict
    reasons: list[str] = field(default_factory=list)  #: why problems were refused, with counts
    unavailable: str = ""
    failures: list[FailureRow] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def unexplained(self) -> list[FailureRow]:
        """The failures no known defect explains: each fails the run."""
        return [f for f in self.failures if not f.known]

    def to_dict(self) -> dict[str, Any]:
        """The row as the JSON of ``refattn conformance --json`` writes it."""
        data = asdict(self)
        data["features"] = sorted(self.features)
        data["feature_verdicts"] = dict(sorted(self.features.items()))
        return data


def unavailable_reason(implementation: Implementation) -> str:
    """Why ``implementation`` cannot run here, or "" where it can (as far as can be told
    without running it: the adapter itself still raises Unavailable for what it finds)."""
    if not version_of(implementation.library):
        return f"{implementation.library} is not installed"
    for module in implementation.requires:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    if implementation.gpu and not gpu_name():
        return "needs a CUDA GPU"
    return ""


def gpu_name() -> str:
    """The first CUDA GPU's name, where torch is installed and sees one, else ""."""
    if importlib.util.find_spec("torch") is None:
        return ""
    import torch

    return str(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else ""


def machine() -> dict[str, Any]:
    """What the run ran on: the platform, Python, CPU count and GPU."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.machine(),
        "cpus": os.cpu_count(),
        "gpu": gpu_name() or None,
    }


def check_row(
    implementation: Implementation,
    dtype: str,
    *,
    examples: int,
    seed: int,
    known: Sequence[Defect] = (),
    on_example: Callable[[Outcome], None] | None = None,
) -> Row:
    """Check ``implementation`` in ``dtype`` on ``examples`` problems; classify what failed."""
    row = Row(implementation.name, implementation.library, version_of(implementation.library),
              implementation.kind, dtype, "unavailable")  # fmt: skip
    why = unavailable_reason(implementation)
    if why:
        row.unavailable = why
        return row
    start = time.perf_counter()
    if implementation.examples is not None:
        examples = min(examples, implementation.examples)
    report = _report(implementation, dtype, examples=examples, seed=seed, on_example=on_example)
    row.seconds = time.perf_counter() - start
    return classified(row, report, known)


def _report(
    implementation: Implementation,
    dtype: str,
    *,
    examples: int,
    seed: int,
    on_example: Callable[[Outcome], None] | None,
) -> Report:
    from refattn.testing import check_attention, check_cache

    common = {"backend": implementation.backend, "dtypes": (dtype,), "max_examples": examples,
              "seed": seed, "on_example": on_example, **implementation.options}  # fmt: skip
    if implementation.kind == "cache":
        return check_cache(implementation.target, **common)
    return check_attention(implementation.target, features=implementation.features, **common)


def classified(row: Row, report: Report, known: Sequence[Defect]) -> Row:
    """``row`` filled from ``report``: counts, per-feature verdicts, refusals and failures,
    each failure with the defect among ``known`` that explains it."""
    dtype = row.dtype
    row.tried, row.supported = report.tried(dtype), report.supported(dtype)
    if report.unavailable:
        row.verdict, row.unavailable = "unavailable", report.unavailable
        return row
    counts = report.counts.get(dtype, {})
    declared = sorted(report.features) if report.features else sorted(set(counts) - {"all"})
    for feature in declared:
        count = counts.get(feature)
        if count is None or count.tried == 0:
            row.features[feature] = "not drawn"
        elif count.failed:
            row.features[feature] = "failed"
        elif count.passed:
            row.features[feature] = "passed"
        else:
            row.features[feature] = "unsupported"
    reasons = report.unsupported_reasons.get(dtype)
    if reasons:
        row.reasons = [f"{n}: {reason}" for reason, n in reasons.most_common(MOST_REASONS)]
    for failure in report.failures:
        explained = next((d for d in known if d.explains(row.implementation, failure)), None)
        row.failures.append(FailureRow(
            summary=failure.summary(), features=sorted(failure.features),
            reproducer=failure.to_code(), known=explained.title if explained else "",
            message=failure.outcome.message[:300],
        ))  # fmt: skip
    if report.failures:
        row.verdict = "failed"
    elif row.supported == 0:
        row.verdict = "unsupported"
    else:
        row.verdict = "passed"
    return row


def probe_conventions(implementation: Implementation) -> dict[str, str]:
    """What the implementation's probe measured, or why it could not run."""
    if implementation.probe is None:
        return {}
    why = unavailable_reason(implementation)
    if why:
        return {"unmeasured": why}
    try:
        return dict(implementation.probe())
    except Exception as exc:  # a probe that fails says so in the table, not as a crash
        return {"unmeasured": f"the probe raised {type(exc).__name__}: {str(exc)[:200]}"}


def results(
    rows: Iterable[Row],
    conventions: dict[str, dict[str, str]],
    defects: Iterable[Defect],
    *,
    examples: int,
    seed: int,
    seconds: float,
    implementations: Iterable[Implementation] = (),
) -> dict[str, Any]:
    """The whole run as ``refattn conformance --json`` writes it."""
    return {
        "refattn": refattn.__version__,
        "machine": machine(),
        "examples": examples,
        "seed": seed,
        "seconds": round(seconds, 1),
        "argv": sys.argv[1:],
        "results": [row.to_dict() for row in rows],
        "conventions": conventions,
        "implementations": {i.name: _about(i) for i in implementations},
        "defects": [_defect(d) for d in defects],
    }


def _defect(defect: Defect) -> dict[str, Any]:
    return {"implementation": defect.implementation, "title": defect.title,
            "reproducer": defect.reproducer, "reference": defect.reference,
            "expected": defect.expected, "dtypes": list(defect.dtypes)}  # fmt: skip


def _about(implementation: Implementation) -> dict[str, Any]:
    i = implementation
    return {"library": i.library, "kind": i.kind, "dtypes": list(i.dtypes),
            "features": list(i.features), "gpu": i.gpu,
            "cannot_express": list(i.cannot_express)}  # fmt: skip
