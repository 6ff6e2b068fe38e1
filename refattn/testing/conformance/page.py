"""The conformance docs page, built from a committed ``refattn conformance --json`` run.

``docs/conformance.md`` is prose with generated sections between markers,
``<!-- conformance:NAME -->`` and ``<!-- /conformance:NAME -->``; :func:`update`
rewrites each section from the JSON and leaves the prose alone, so the
tables on the page are what the run measured, never typed by hand. A test
rebuilds the page from the committed JSON and requires it unchanged::

    refattn conformance --json docs/conformance.json
    python -m refattn.testing.conformance.page docs/conformance.json docs/conformance.md
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import Any

from refattn.testing.conformance.implementations import CONVENTIONS

#: How a feature's verdict is shown in the grid.
MARKS = {"passed": "✓", "failed": "✗", "unsupported": "-", "not drawn": "·"}


def cell(text: Any) -> str:
    """Text safe inside a Markdown table cell: pipes escaped, lines joined.

    >>> cell("a | b\\nc")
    'a \\\\| b; c'
    """
    return str(text).replace("|", "\\|").replace("\n", "; ")


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def run_section(data: dict[str, Any]) -> str:
    """Which refattn, machine, budget and libraries the run was."""
    m = data["machine"]
    versions = sorted({(r["library"], r["version"]) for r in data["results"] if r["version"]})
    return "\n".join([
        f"refattn {data['refattn']}, {data['examples']} problems (or cache histories) per "
        f"implementation and dtype, seed {data['seed']}, in {data['seconds']:.0f} s on "
        f"{m['cpus']} CPUs ({m['processor']}, Python {m['python']}); "
        + (f"GPU: {m['gpu']}." if m.get("gpu") else "no GPU."),
        "",
        "Libraries: " + ", ".join(f"{name} {version}" for name, version in versions) + ".",
    ])  # fmt: skip


def matrix_section(data: dict[str, Any]) -> str:
    """One row per implementation and dtype: verdict, problems checked, notes."""
    rows = []
    for r in data["results"]:
        verdict = r["verdict"]
        if verdict == "failed" and all(f["known"] for f in r["failures"]):
            verdict = "failed (known defect)"
        checked = f"{r['supported']}/{r['tried']}" if r["tried"] else ""
        notes = r["unavailable"] or "; ".join(r["reasons"])
        rows.append([r["implementation"], r["version"], r["dtype"], f"**{verdict}**", checked,
                     notes])  # fmt: skip
    header = ["implementation", "version", "dtype", "verdict", "checked", "refused, or why not"]
    return table(header, rows)


def features_section(data: dict[str, Any]) -> str:
    """Per implementation and feature, across its dtypes: ✓ passed in each dtype that drew
    it, ✗ failed in one, - refused, · never drawn; blank where the adapter does not declare it."""
    per: dict[str, dict[str, set[str]]] = {}
    for r in data["results"]:
        marks = per.setdefault(r["implementation"], {})
        for feature, verdict in r.get("feature_verdicts", {}).items():
            marks.setdefault(feature, set()).add(verdict)
    features = sorted({f for marks in per.values() for f in marks})
    rows = []
    for name, marks in per.items():
        if not marks:
            continue
        row: list[Any] = [name]
        for feature in features:
            seen = marks.get(feature, set())
            order = ("failed", "passed", "unsupported", "not drawn")
            row.append(next((MARKS[v] for v in order if v in seen), ""))
        rows.append(row)
    return table(["implementation", *features], rows)


def conventions_section(data: dict[str, Any]) -> str:
    """Each library's conventions as its probe measured them."""
    rows = []
    for name, measured in data["conventions"].items():
        if "unmeasured" in measured:
            blank = ["" for _ in CONVENTIONS[1:]]
            rows.append([name, f"not measured: {measured['unmeasured']}", *blank])
            continue
        rows.append([name, *(measured.get(c, "") for c in CONVENTIONS)])
    return table(["implementation", "causal alignment", "row with no key", "window", "lse",
                  "q·k in (float16 inputs)"], rows)  # fmt: skip


def failures_section(data: dict[str, Any]) -> str:
    """Every failure class of the run and its classification."""
    lines = []
    for r in data["results"]:
        for f in r["failures"]:
            why = f"known defect: {f['known']}" if f["known"] else "**unexplained**"
            lines.append(f"- {r['implementation']}, {cell(f['summary'])}. {why}.")
    return "\n".join(lines) or "No failure."


def defects_section(data: dict[str, Any]) -> str:
    """Each defect once, with every implementation it shows in: what the library says, the
    hand computation, the reproducer."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for d in data["defects"]:
        grouped.setdefault((d["title"], d["reproducer"]), []).append(d)
    parts = []
    for (title, reproducer), rows in grouped.items():
        where = ", ".join(f"**{d['implementation']}**"
                          + (f" ({', '.join(d['dtypes'])})" if d["dtypes"] else "")
                          for d in rows)  # fmt: skip
        first = rows[0]
        parts += [
            f"### {title}",
            "",
            f"In {where}.",
            "",
            f"What the library says: {first['reference']}.",
            "",
            f"In float64 by hand: {first['expected']}.",
            "",
            f"Reproducer (`docs/defects/{reproducer}`; needs only the library and NumPy, "
            "exits 1 while the defect is there):",
            "",
            f"```{{literalinclude}} defects/{reproducer}",
            ":language: python",
            "```",
            "",
        ]  # fmt: skip
    return "\n".join(parts).rstrip() or "No defect."


def unsaid_section(data: dict[str, Any]) -> str:
    """What refattn cannot yet express about each implementation."""
    lines = []
    for name, about in data.get("implementations", {}).items():
        if about.get("cannot_express"):
            lines.append(f"- **{name}**: " + "; ".join(about["cannot_express"]) + ".")
    return "\n".join(lines)


#: Each generated section of the page and what builds it.
SECTIONS: dict[str, Callable[[dict[str, Any]], str]] = {
    "run": run_section,
    "matrix": matrix_section,
    "features": features_section,
    "conventions": conventions_section,
    "failures": failures_section,
    "defects": defects_section,
    "unsaid": unsaid_section,
}


def update(page: str, data: dict[str, Any]) -> str:
    """``page`` with every generated section rebuilt from ``data``; a section the page lacks
    is an error, so that a page cannot silently stop showing part of the run."""
    for name, build in SECTIONS.items():
        start, end = f"<!-- conformance:{name} -->", f"<!-- /conformance:{name} -->"
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
        if not pattern.search(page):
            raise ValueError(f"the page has no {start} ... {end} section")
        section = f"{start}\n\n{build(data)}\n\n{end}"
        page = pattern.sub(section.replace("\\", "\\\\"), page)
    return page


def main(argv: list[str] | None = None) -> int:
    """``python -m refattn.testing.conformance.page RESULTS.json PAGE.md``: rebuild the page."""
    import json

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m refattn.testing.conformance.page RESULTS.json PAGE.md")
        return 2
    with open(args[0], encoding="utf-8") as f:
        data = json.load(f)
    with open(args[1], encoding="utf-8") as f:
        page = f.read()
    with open(args[1], "w", encoding="utf-8") as f:
        f.write(update(page, data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
