"""``refattn conformance``: its verdicts are tried on kernels whose answer is known (a correct
one, a wrong one, one that refuses everything, one not installed); a failure fails the run
unless a defect explains it; the JSON has the shape the issue fixes; and the docs page is
built from the committed JSON, unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from refattn.cli import main
from refattn.testing import Unsupported
from refattn.testing.conformance import Defect, Implementation, page, registry
from refattn.testing.conformance.command import conformance
from refattn.testing.conformance.run import check_row
from refattn.testing.drawing import DEFAULT_FEATURES, FEATURES
from refattn.testing.known_bugs.attention import causal_excludes_diagonal, textbook

DOCS = Path(__file__).resolve().parents[1] / "docs"
DEFAULTS = tuple(sorted(DEFAULT_FEATURES))


def _refuses_everything(problem: Any) -> Any:
    raise Unsupported("this kernel takes nothing")


def _implementation(name: str, target: Any, library: str = "numpy") -> Implementation:
    return Implementation(name, library, "attention", target, ("float32",), DEFAULTS)


CORRECT = _implementation("textbook", textbook)
WRONG = _implementation("causal excludes the diagonal", causal_excludes_diagonal)
REFUSING = _implementation("refuses everything", _refuses_everything)
MISSING = _implementation("not installed", textbook, library="no-such-distribution-here")
DIAGONAL = Defect(
    implementation=WRONG.name, title="the diagonal is masked",
    matches=lambda failure: "causal" in failure.features, reproducer="none.py",
    reference="causal means k <= q", expected="each query sees itself",
)  # fmt: skip


def test_a_correct_kernel_passes_and_every_feature_it_drew_passes() -> None:
    row = check_row(CORRECT, "float32", examples=40, seed=0)
    assert row.verdict == "passed" and row.supported == row.tried == 40, row
    assert set(row.features) == set(DEFAULTS)
    assert {v for v in row.features.values()} <= {"passed", "not drawn"}
    assert row.features["causal"] == "passed"


def test_a_wrong_kernel_fails_and_fails_the_run_unless_a_defect_explains_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    row = check_row(WRONG, "float32", examples=40, seed=0)
    assert row.verdict == "failed" and row.features["causal"] == "failed", row
    assert row.unexplained == row.failures and row.failures[0].reproducer
    assert conformance([WRONG], examples=40, seed=0, known=()) == 1
    assert "UNEXPLAINED" in capsys.readouterr().out
    known = check_row(WRONG, "float32", examples=40, seed=0, known=[DIAGONAL])
    assert known.failures and not known.unexplained
    assert known.failures[0].known == "the diagonal is masked"
    assert conformance([WRONG], examples=40, seed=0, known=[DIAGONAL]) == 0
    out = capsys.readouterr().out
    assert "failed (known)" in out and "known defect: the diagonal is masked" in out


def test_a_defect_explains_only_its_own_implementation() -> None:
    row = check_row(_implementation("another", causal_excludes_diagonal), "float32",
                    examples=40, seed=0, known=[DIAGONAL])  # fmt: skip
    assert row.failures and row.unexplained == row.failures


def test_a_kernel_that_refuses_everything_is_unsupported_and_checks_nothing() -> None:
    row = check_row(REFUSING, "float32", examples=10, seed=0)
    assert row.verdict == "unsupported" and row.supported == 0 and row.tried == 10
    assert row.reasons == ["10: this kernel takes nothing"]
    assert conformance([REFUSING], examples=10, seed=0, known=()) == 1  # nothing checked


def test_a_library_not_installed_is_unavailable_and_a_run_of_nothing_fails() -> None:
    row = check_row(MISSING, "float32", examples=10, seed=0)
    assert row.verdict == "unavailable" and row.tried == 0
    assert row.unavailable == "no-such-distribution-here is not installed"
    assert conformance([MISSING], examples=10, seed=0, known=()) == 1


def test_an_implementation_must_say_what_it_checks() -> None:
    with pytest.raises(ValueError, match="dtypes must name at least one dtype"):
        Implementation("x", "numpy", "attention", textbook, (), DEFAULTS)
    with pytest.raises(ValueError, match="must declare its features"):
        Implementation("x", "numpy", "attention", textbook, ("float32",))
    with pytest.raises(ValueError, match=r"unknown features \['windows'\]"):
        Implementation("x", "numpy", "attention", textbook, ("float32",), ("windows",))


def test_every_registered_implementation_is_named_once_and_every_defect_has_its_reproducer() -> (
    None
):
    every = registry.implementations()
    names = [i.name for i in every]
    assert len(names) == len(set(names)) and len(names) >= 10
    for implementation in every:
        assert set(implementation.features) <= set(FEATURES)
    defects = registry.defects()
    assert defects
    for defect in defects:
        script = DOCS / "defects" / defect.reproducer
        assert script.is_file(), f"{defect.title}: no {script.name} in docs/defects"
        assert defect.reference and defect.expected


def test_only_names_an_implementation_or_fails_loudly(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["conformance", "--only", "nonesuch", "--examples", "1"])
    assert exc.value.code == 2
    assert "--only 'nonesuch' names no implementation" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["conformance", "--examples", "0"])


def test_the_json_has_the_shape_the_docs_page_reads(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    path = tmp_path / "out.json"
    code = main(["conformance", "--only", "PyTorch SDPA (math)", "--examples", "5",
                 "--dtypes", "float32", "--json", str(path)])  # fmt: skip
    data = json.loads(path.read_text())
    assert code == 0
    assert set(data) >= {"refattn", "machine", "results", "conventions", "defects"}
    (row,) = data["results"]
    assert row["implementation"] == "PyTorch SDPA (math)" and row["library"] == "torch"
    assert row["kind"] == "attention" and row["dtype"] == "float32"
    assert row["verdict"] == "passed" and row["tried"] == 5 and row["supported"] == 5
    assert row["version"] and isinstance(row["features"], list) and row["failures"] == []
    assert data["conventions"]["PyTorch SDPA (math)"]["alignment"] == "top-left"


def test_the_docs_page_is_built_from_the_committed_json() -> None:
    """Rebuilding every generated section of docs/conformance.md from docs/conformance.json
    changes nothing: the tables were not edited by hand, and the page shows the whole run."""
    data = json.loads((DOCS / "conformance.json").read_text())
    text = (DOCS / "conformance.md").read_text()
    assert page.update(text, data) == text
    with pytest.raises(ValueError, match="the page has no <!-- conformance:run -->"):
        page.update("no sections here", data)


def test_the_committed_run_covers_every_implementation_in_each_of_its_dtypes() -> None:
    data = json.loads((DOCS / "conformance.json").read_text())
    ran = {(r["implementation"], r["dtype"]) for r in data["results"]}
    wanted = {(i.name, d) for i in registry.implementations() for d in i.dtypes}
    assert wanted <= ran, sorted(wanted - ran)
    for r in data["results"]:
        for failure in r["failures"]:
            assert failure["known"], f"{r['implementation']}: {failure['summary']}"
