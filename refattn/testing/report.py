"""What a check found: the outcome of one problem, the shrunk failure, the whole report."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from refattn.testing.problems import CacheSpec, ProblemSpec, build_problem


@dataclass(frozen=True)
class Outcome:
    """The verdict on one problem: errors against what the tolerance rule allows.

    ``unsupported`` is the candidate's reason when it raised ``Unsupported``;
    ``message`` says what went wrong when the candidate crashed or returned
    something unusable. Without an lse, ``lse_error`` is 0.
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

    @property
    def passed(self) -> bool:
        return (
            not self.unsupported
            and not self.message
            and self.error <= self.allowed
            and self.lse_error <= self.lse_allowed
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
        if self.message:
            return f"FAIL {where}: {self.message}"
        verdict = "pass" if self.passed else "FAIL"
        if math.isinf(self.error) or math.isinf(self.lse_error):
            verdict += " (a NaN or infinity where the oracle has a finite value, or the reverse)"
        text = (
            f"{verdict} {where}: max|out - oracle| = {self.error:.3e}, allowed {self.allowed:.3e}"
        )
        if self.lse_allowed != math.inf:
            text += f"; max|lse - oracle| = {self.lse_error:.3e}, allowed {self.lse_allowed:.3e}"
        return text


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
    options = [
        f"{name}={getattr(s, name)!r}"
        for name in ("causal", "window", "softcap", "alibi", "scale", "return_lse", "layout")
        if getattr(s, name) not in (None, False)
    ]
    if s.logit_size != 1.0:
        options.append(f"logits ~{s.logit_size:g}")
    lines.append("options: " + (", ".join(options) if options else "none"))
    if s.batch * (s.q_len + s.k_len) <= 64:
        problem = build_problem(s)
        lines.append(f"q_pos = {problem.q_pos.tolist()}")
        lines.append(f"k_pos = {problem.k_pos.tolist()}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Failure:
    """The smallest failing problem Hypothesis found for one dtype."""

    outcome: Outcome
    examples: int  #: problems tried up to and including the first failure
    shrink_steps: int  #: problems run while shrinking
    candidate: str  #: "module:qualname" of the checked function
    found: ProblemSpec | CacheSpec | None = None  #: the failing problem as first drawn

    def to_code(self) -> str:
        """A runnable reproducer: rebuilds the problem and asserts that it passes."""
        module, _, name = self.candidate.partition(":")
        importable = module != "__main__" and "<locals>" not in name and "." not in name
        if importable:
            source = f"from {module} import {name}"
        else:
            name = name.split(".")[-1].replace("<", "").replace(">", "") or "candidate"
            source = f"from your_module import {name}  # the function that was checked"
        o = self.outcome
        cache = isinstance(o.spec, CacheSpec)
        check, spec_type = (
            ("check_schedule", "CacheSpec") if cache else ("check_problem", "ProblemSpec")
        )
        return "\n".join(
            [
                f"# Shrunk by refattn.testing.{'check_cache' if cache else 'check_attention'}: {o}",
                f"from refattn.testing import {spec_type}, {check}",
                source,
                "",
                f"spec = {spec_code(o.spec)}",
                f"outcome = {check}({name}, spec, backend={o.backend!r}, "
                f"dtype={o.dtype!r}, device={o.device!r})",
                "print(outcome)",
                "assert outcome.passed, outcome",
            ]
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

    ``passed`` is true when no problem failed and, for every dtype, at least
    one problem was supported (a candidate that supports nothing has shown
    nothing). ``print(report)`` gives the counts and each shrunk failure.
    """

    name: str
    backend: str
    device: str
    dtypes: tuple[str, ...]
    features: frozenset[str]
    counts: dict[str, dict[str, FeatureCount]] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)

    def count(self, dtype: str, tags: frozenset[str], outcome: Outcome) -> None:
        per_dtype = self.counts.setdefault(dtype, {})
        for tag in ("all", *sorted(tags)):
            per_dtype.setdefault(tag, FeatureCount()).add(outcome)

    def tried(self, dtype: str) -> int:
        return self.counts.get(dtype, {}).get("all", FeatureCount()).tried

    def supported(self, dtype: str) -> int:
        total = self.counts.get(dtype, {}).get("all", FeatureCount())
        return total.tried - total.unsupported

    @property
    def passed(self) -> bool:
        return not self.failures and all(self.supported(d) > 0 for d in self.dtypes)

    def to_code(self) -> str:
        """The reproducer of the first failure ("" when nothing failed)."""
        return self.failures[0].to_code() if self.failures else ""

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: counts, and each failure with its spec and reproducer."""
        return {
            "name": self.name,
            "backend": self.backend,
            "device": self.device,
            "passed": self.passed,
            "features": sorted(self.features),
            "counts": {
                dtype: {tag: asdict(c) for tag, c in per.items()}
                for dtype, per in self.counts.items()
            },
            "failures": [
                {
                    "dtype": f.outcome.dtype,
                    "spec": asdict(f.outcome.spec),
                    "error": f.outcome.error,
                    "allowed": f.outcome.allowed,
                    "lse_error": f.outcome.lse_error,
                    "lse_allowed": f.outcome.lse_allowed,
                    "message": f.outcome.message,
                    "examples": f.examples,
                    "shrink_steps": f.shrink_steps,
                    "code": f.to_code(),
                }
                for f in self.failures
            ],
        }

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        lines = [f"{self.name} on {self.backend} ({self.device}): {verdict}"]
        header = ("dtype", "feature", "tried", "passed", "failed", "unsupported")
        rows: list[tuple[str, ...]] = [header]
        for dtype, per in self.counts.items():
            for tag, c in sorted(per.items(), key=lambda item: (item[0] != "all", item[0])):
                rows.append((dtype, tag, *map(str, (c.tried, c.passed, c.failed, c.unsupported))))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                  for row in rows]  # fmt: skip
        for dtype in self.dtypes:
            tried, supported = self.tried(dtype), self.supported(dtype)
            if supported == 0 and dtype in self.counts:
                lines.append(f"{dtype}: every problem was unsupported, so nothing was shown")
            elif supported < tried / 4:
                lines.append(
                    f"{dtype}: only {supported} of {tried} problems were supported; "
                    "features= narrows the draws to what the kernel expresses"
                )
        for failure in self.failures:
            lines += ["", str(failure)]
        return "\n".join(lines)
