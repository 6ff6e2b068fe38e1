"""What a check found: the outcome of one problem, each class of failure shrunk, the report."""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from refattn.testing.precision import SPEC, Precision
from refattn.testing.problems import CacheSpec, ProblemSpec, build_problem


@dataclass(frozen=True)
class Outcome:
    """The verdict on one problem: errors against what the tolerance rule allows.

    ``unsupported`` is the candidate's reason when it raised ``Unsupported``
    (``unavailable`` too when that was ``Unavailable``: its library cannot
    run here at all); ``message`` says what went wrong when the candidate
    crashed or returned something unusable, and ``raised`` names the
    exception type when it crashed. Without an lse, ``lse_error`` is 0.
    ``finding`` names a failure that is neither a wrong value nor a crash (a
    cache that returns the caller's own arrays, an in-op cache whose present
    K/V differ from what it was given): it is the failure's symptom, and
    ``message`` says more.
    """

    spec: ProblemSpec | CacheSpec
    dtype: str
    backend: str
    device: str
    error: float = 0.0
    allowed: float = math.inf
    lse_error: float = 0.0
    lse_allowed: float = math.inf
    message: str = ""
    unsupported: str = ""
    raised: str = ""
    unavailable: bool = False
    finding: str = ""
    ignored_rows: int = 0  #: query rows the candidate declared "don't care": not compared
    #: A backward check's verdicts, one ``(name, error, allowed)`` per gradient compared.
    gradients: tuple[tuple[str, float, float], ...] = ()

    @property
    def symptom(self) -> str:
        """How it failed, in a word or two: what a class of failures has in common."""
        if self.finding:
            return self.finding
        if self.raised:
            return f"raised {self.raised}"
        if self.message:
            return "unusable result"
        if self.error > self.allowed:
            return "non-finite out" if math.isinf(self.error) else "wrong out"
        if self.lse_error > self.lse_allowed:
            return "non-finite lse" if math.isinf(self.lse_error) else "wrong lse"
        for name, error, allowed in self.gradients:
            if error > allowed:
                return f"non-finite {name}" if math.isinf(error) else f"wrong {name}"
        return ""

    @property
    def passed(self) -> bool:
        return (
            not self.unsupported
            and not self.message
            and not self.finding
            and self.error <= self.allowed
            and self.lse_error <= self.lse_allowed
            and all(error <= allowed for _, error, allowed in self.gradients)
        )

    @property
    def failed(self) -> bool:
        return not self.unsupported and not self.passed

    def but(self, **changes: Any) -> Outcome:
        return replace(self, **changes)

    def __str__(self) -> str:
        where = f"{self.dtype} on {self.backend} ({self.device})"
        if self.unsupported:
            return f"unsupported {where}: {self.unsupported}"
        if self.message or self.finding:
            return f"FAIL {where}: {self.message or self.finding}"
        verdict = "pass" if self.passed else "FAIL"
        if self.gradients:
            if any(math.isinf(error) for _, error, _ in self.gradients):
                verdict += (
                    " (a NaN or infinity where the oracle has a finite value, or the reverse)"
                )
            return f"{verdict} {where}: " + "; ".join(
                f"max|{name} - oracle| = {error:.3e}, allowed {allowed:.3e}"
                for name, error, allowed in self.gradients
            )
        if math.isinf(self.error) or math.isinf(self.lse_error):
            verdict += " (a NaN or infinity where the oracle has a finite value, or the reverse)"
        text = (
            f"{verdict} {where}: max|out - oracle| = {self.error:.3e}, allowed {self.allowed:.3e}"
        )
        if self.lse_allowed != math.inf:
            text += f"; max|lse - oracle| = {self.lse_error:.3e}, allowed {self.lse_allowed:.3e}"
        return text


def _clipped(reason: str, most: int = 160) -> str:
    """A refusal's reason for the notes: whole when short, its start and end when long."""
    return reason if len(reason) <= most else f"{reason[: most - 40]} ... {reason[-30:]}"


def spec_code(spec: ProblemSpec | CacheSpec) -> str:
    """``ProblemSpec(...)`` or ``CacheSpec(...)`` with only the fields that differ from the
    defaults."""
    default = type(spec)()
    changed = [
        f"{f.name}={getattr(spec, f.name)!r}"
        for f in fields(spec)
        if getattr(spec, f.name) != getattr(default, f.name) or f.name == "seed"
    ]
    return f"{type(spec).__name__}({', '.join(changed)})"


def size(spec: ProblemSpec | CacheSpec) -> int:
    """How big a problem is (what shrinking reduces): its number of score entries."""
    if isinstance(spec, CacheSpec):
        return spec.batch * spec.q_heads * spec.length * len(spec.steps)
    return spec.batch * spec.q_heads * max(spec.q_len, 1) * max(spec.k_len, 1)


def describe(spec: ProblemSpec | CacheSpec) -> str:
    """The shapes, options and (for small problems) positions of a spec, for a human."""
    if isinstance(spec, CacheSpec):
        return (
            f"B={spec.batch}, Hq={spec.q_heads}, Hkv={spec.kv_heads}, D={spec.head_dim}; "
            f"appends of {list(spec.steps)} tokens ({spec.length} in all)"
            + (f"; window {spec.window}, {spec.sink_tokens} sink tokens" if spec.window else "")
            + (f"; {spec.bits}-bit" if spec.bits else "")
        )
    s = spec
    lines = [
        f"q (B={s.batch}, Hq={s.q_heads}, Sq={s.q_len}, D={s.head_dim}), "
        f"k (Hkv={s.kv_heads}, Sk={s.k_len}), v (Dv={s.value_dim})",
    ]
    names = ("causal", "window", "window_right", "sink_tokens", "softcap", "alibi", "bias",
             "sink_logits", "scale", "return_lse", "layout", "new_keys")  # fmt: skip
    options = [f"{n}={getattr(s, n)!r}" for n in names if getattr(s, n) not in (None, False)]
    if s.mask:
        options.append(f"mask={s.mask_kind!r}")
    if s.sink_logits and s.sink_offset:
        options.append(f"sink logits ~{s.sink_offset:g}")
    if s.logit_size != 1.0:
        options.append(f"logits ~{s.logit_size:g}")
    lines.append("options: " + (", ".join(options) if options else "none"))
    if s.batch * (s.q_len + s.k_len) <= 64:
        problem = build_problem(s)
        lines.append(f"q_pos = {problem.q_pos.tolist()}")
        lines.append(f"k_pos = {problem.k_pos.tolist()}")
        if problem.mask is not None and s.q_len * s.k_len <= 64:
            first = np.broadcast_to(problem.mask, (s.batch, s.q_heads, s.q_len, s.k_len))[0, 0]
            lines.append(f"mask[0, 0] = {first.astype(int).tolist()}")
    return "\n".join(lines)


@dataclass
class Failure:
    """One class of failures: the simplest failing problem found for it, and what its draws share.

    A class is a symptom (:attr:`Outcome.symptom`) and the features its shrunk
    problem needs; it explains every failing draw with that symptom and at
    least those features.
    """

    outcome: Outcome  #: the verdict on the shrunk problem
    examples: int  #: problems drawn up to and including the class's first failing draw
    shrink_steps: int  #: problems tried while shrinking
    candidate: str  #: "module:qualname" of the checked function
    found: ProblemSpec | CacheSpec | None = None  #: the failing problem as first drawn
    source: str = ""  #: "file:line" where the candidate is defined
    features: frozenset[str] = frozenset()  #: the shrunk problem's features: what the class needs
    corners: frozenset[str] = frozenset()  #: the shrunk problem's shape corners
    draws: int = 1  #: failing draws of the search this class explains
    common_features: frozenset[str] = frozenset()  #: features every one of those draws had
    common_corners: frozenset[str] = frozenset()  #: shape corners every one of them had
    precision: Precision = SPEC  #: the precision contract the candidate was judged by
    #: More keyword arguments the reproducer's check needs (``check_cache``'s ``config`` and
    #: ``cache_kwargs``): name to its code, or to "" where it cannot be written as code.
    arguments: dict[str, str] = field(default_factory=dict)
    #: The one-problem check the reproducer calls ("" for the one of the spec's kind:
    #: ``check_problem`` or ``check_schedule``), and the search it names.
    check: str = ""
    search: str = ""

    @property
    def symptom(self) -> str:
        return self.outcome.symptom

    def explains(self, symptom: str, features: frozenset[str]) -> bool:
        """Whether a failing draw with ``symptom`` and ``features`` belongs to this class."""
        return symptom == self.symptom and self.features <= features

    def to_code(self) -> str:
        """A runnable reproducer: rebuilds the problem and asserts that it passes."""
        o = self.outcome
        cache = isinstance(o.spec, CacheSpec)
        check, spec_type = (
            ("check_schedule", "CacheSpec") if cache else ("check_problem", "ProblemSpec")
        )
        check = self.check or check
        searched = self.search or ("check_cache" if cache else "check_attention")
        name, source = _import_line(self.candidate, self.source)
        contract = [] if self.precision == SPEC else [f"precision={self.precision!r}"]
        imports = ["from refattn.testing.precision import Precision"] if contract else []
        given = []
        for argument, code in self.arguments.items():
            contract.append(f"{argument}={argument}")
            unprintable = f"{argument} = ...  # the {argument} given to the check: not printable"
            given.append(f"{argument} = {code}" if code else unprintable)
        return "\n".join(
            [
                f"# Shrunk by refattn.testing.{searched}: {o}",
                f"from refattn.testing import {spec_type}, {check}",
                *imports,
                *source,
                "",
                *given,
                f"spec = {spec_code(o.spec)}",
                f"outcome = {check}({name}, spec, backend={o.backend!r}, "
                f"dtype={o.dtype!r}, device={o.device!r}{''.join(', ' + c for c in contract)})",
                "print(outcome)",
                "assert outcome.passed, outcome",
            ]
        )

    def summary(self) -> str:
        """One line: the symptom, how many draws, and what they have in common."""
        common = sorted(self.common_features) + sorted(self.common_corners)
        return (
            f"{self.outcome.dtype}, {self.symptom}: {self.draws} failing "
            f"draw{'s' if self.draws != 1 else ''}, first at problem {self.examples}; "
            f"the shrunk one needs {_listed(self.features)}; "
            f"every one had {_listed(frozenset(common))}"
        )

    def __str__(self) -> str:
        return "\n".join(
            [
                f"{self.outcome}",
                f"found after {self.examples} problems, shrunk in {self.shrink_steps} steps"
                + (f" from {spec_code(self.found)}" if self.found is not None else "")
                + ":",
                describe(self.outcome.spec),
                "reproducer:",
                self.to_code(),
            ]
        )


def _listed(tags: frozenset[str]) -> str:
    return ", ".join(sorted(tags)) if tags else "no feature"


def _import_line(candidate: str, source: str) -> tuple[str, list[str]]:
    """The name a reproducer calls the candidate by, and the lines that bring it in.

    An importable candidate is imported; one defined at the top of a script
    (module ``__main__``) is taken from running that file with ``runpy``
    (which does not run its ``if __name__ == "__main__":`` block); one defined
    inside a function cannot be reached, and the line says where it is.
    """
    module, _, qualname = candidate.partition(":")
    name = qualname.split(".")[-1].replace("<", "").replace(">", "") or "candidate"
    nested = "<locals>" in qualname or "." in qualname
    path, _, line = source.rpartition(":")
    if module != "__main__" and not nested:
        return name, [f"from {module} import {name}"]
    if module == "__main__" and not nested and path and os.path.exists(path):
        return name, ["import runpy", "", f"{name} = runpy.run_path({path!r})[{name!r}]"]
    where = f"{path}, line {line}" if path else f"module {module}"
    return name, [
        f"# {qualname} is defined inside a function ({where}): move it to the top level of its",
        "# module (or paste it here) to run this reproducer",
        f"from {module if module != '__main__' else 'your_module'} import {name}",
    ]


@dataclass
class FeatureCount:
    """How the problems that exercised one feature went."""

    tried: int = 0
    passed: int = 0
    failed: int = 0
    unsupported: int = 0

    def add(self, outcome: Outcome) -> None:
        self.tried += 1
        if outcome.unsupported:
            self.unsupported += 1
        elif outcome.passed:
            self.passed += 1
        else:
            self.failed += 1


@dataclass
class Report:
    """What ``check_attention`` or ``check_cache`` found, per dtype and feature.

    ``passed`` is true when no problem failed, the candidate was available
    and, for every dtype, at least one problem was supported (a candidate that
    supports nothing has shown nothing: nothing was checked). ``failures``
    holds one :class:`Failure` per class of failure found, each shrunk.
    ``print(report)`` gives the counts, the reasons problems were refused, and
    each class with its reproducer, once.
    """

    name: str
    backend: str
    device: str
    dtypes: tuple[str, ...]
    features: frozenset[str]
    source: str = ""  #: "file:line" of the candidate
    counts: dict[str, dict[str, FeatureCount]] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    unsupported_reasons: dict[str, Counter[str]] = field(default_factory=dict)
    first_failure: dict[str, int] = field(default_factory=dict)  #: problems to the first failure
    seconds: dict[str, float] = field(default_factory=dict)  #: wall time of each dtype's search
    unexplained: dict[str, int] = field(default_factory=dict)  #: failing draws past the classes
    unavailable: str = ""  #: why the candidate cannot run here at all, if it cannot
    precision: Precision = SPEC  #: the precision contract the candidate was judged by
    ignored_rows: dict[str, int] = field(default_factory=dict)  #: "don't care" rows, per dtype
    check: str = ""  #: the one-problem check of its reproducers ("" for the spec kind's own)
    search: str = ""  #: the check that made it, as its reproducers name it ("" likewise)

    def count(self, dtype: str, tags: frozenset[str], outcome: Outcome) -> None:
        if outcome.ignored_rows:
            self.ignored_rows[dtype] = self.ignored_rows.get(dtype, 0) + outcome.ignored_rows
        per_dtype = self.counts.setdefault(dtype, {})
        for tag in ("all", *sorted(tags)):
            per_dtype.setdefault(tag, FeatureCount()).add(outcome)
        if outcome.unsupported:
            self.unsupported_reasons.setdefault(dtype, Counter())[outcome.unsupported] += 1

    def tried(self, dtype: str) -> int:
        return self.counts.get(dtype, {}).get("all", FeatureCount()).tried

    def supported(self, dtype: str) -> int:
        total = self.counts.get(dtype, {}).get("all", FeatureCount())
        return total.tried - total.unsupported

    @property
    def nothing_checked(self) -> list[str]:
        """The dtypes in which no problem was checked (every one refused, or none drawn)."""
        return [d for d in self.dtypes if self.supported(d) == 0]

    @property
    def passed(self) -> bool:
        return not self.failures and not self.unavailable and not self.nothing_checked

    @property
    def verdict(self) -> str:
        if self.unavailable:
            return f"unavailable: {self.unavailable}"
        return "passed" if self.passed else "FAILED"

    def to_code(self) -> str:
        """The reproducer of the first failure ("" when nothing failed)."""
        return self.failures[0].to_code() if self.failures else ""

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: counts, refusals, and each failure class with its reproducer."""
        return {
            "name": self.name,
            "backend": self.backend,
            "device": self.device,
            "passed": self.passed,
            "verdict": self.verdict,
            "features": sorted(self.features),
            "counts": {
                dtype: {tag: asdict(c) for tag, c in per.items()}
                for dtype, per in self.counts.items()
            },
            "unsupported_reasons": {d: dict(r) for d, r in self.unsupported_reasons.items()},
            "first_failure": self.first_failure,
            "seconds": self.seconds,
            "nothing_checked": self.nothing_checked,
            "ignored_rows": self.ignored_rows,
            "precision": asdict(self.precision),
            "failures": [
                {
                    "dtype": f.outcome.dtype,
                    "symptom": f.symptom,
                    "spec": asdict(f.outcome.spec),
                    "error": f.outcome.error,
                    "allowed": f.outcome.allowed,
                    "lse_error": f.outcome.lse_error,
                    "lse_allowed": f.outcome.lse_allowed,
                    "gradients": [list(g) for g in f.outcome.gradients],
                    "message": f.outcome.message,
                    "examples": f.examples,
                    "shrink_steps": f.shrink_steps,
                    "draws": f.draws,
                    "features": sorted(f.features),
                    "common_features": sorted(f.common_features),
                    "common_corners": sorted(f.common_corners),
                    "code": f.to_code(),
                }
                for f in self.failures
            ],
        }

    def notes(self) -> list[str]:
        """Per dtype: time, first failure, refusals by reason, and anything not checked."""
        lines = []
        for dtype in self.dtypes:
            tried, supported = self.tried(dtype), self.supported(dtype)
            line = f"{dtype}: {tried} problems in {self.seconds.get(dtype, 0.0):.1f} s"
            if dtype in self.first_failure:
                classes = sum(f.outcome.dtype == dtype for f in self.failures)
                line += (f"; first failure at problem {self.first_failure[dtype]}; "
                         f"{classes} failure class{'es' if classes != 1 else ''}")  # fmt: skip
                if self.unexplained.get(dtype):
                    line += f" ({self.unexplained[dtype]} failing draws left unsorted)"
            lines.append(line)
            reasons = self.unsupported_reasons.get(dtype)
            if reasons:
                refused = sum(reasons.values())
                lines.append(
                    f"{dtype}: {refused} of {tried} problems ({refused / max(tried, 1):.0%}) "
                    "unsupported: "
                    + "; ".join(f"{n} {_clipped(reason)!r}" for reason, n in reasons.most_common())
                )
            if self.ignored_rows.get(dtype):
                lines.append(f"{dtype}: {self.ignored_rows[dtype]} query rows the candidate "
                             "declared don't care (padding) were not compared")  # fmt: skip
            if supported == 0 and not self.unavailable:
                lines.append(f"{dtype}: nothing was checked (every problem was unsupported)")
            elif supported < tried / 4:
                lines.append(
                    f"{dtype}: only {supported} of {tried} problems were supported; "
                    "features= narrows the draws to what the kernel expresses"
                )
        return lines

    def __str__(self) -> str:
        lines = [f"{self.name} on {self.backend} ({self.device}): {self.verdict}"]
        if self.unavailable:
            return lines[0]
        header = ("dtype", "feature", "tried", "passed", "failed", "unsupported")
        rows: list[tuple[str, ...]] = [header]
        for dtype, per in self.counts.items():
            for tag, c in sorted(per.items(), key=lambda item: (item[0] != "all", item[0])):
                rows.append((dtype, tag, *map(str, (c.tried, c.passed, c.failed, c.unsupported))))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                  for row in rows]  # fmt: skip
        lines += self.notes()
        for i, failure in enumerate(self.failures, 1):
            lines += ["", f"failure class {i} of {len(self.failures)}: {failure.summary()}",
                      str(failure)]  # fmt: skip
        return "\n".join(lines)
