"""``refattn verify`` prints its table and fails loudly when the spec disagrees with the oracle."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from refattn.cli import main
from refattn.testing import oracle


def test_verify_prints_a_passing_table(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["verify", "--problems", "6", "--sequences", "3", "--histories", "2", "--backends", "numpy"]
    )
    printed = capsys.readouterr().out
    assert code == 0
    for dtype in ("float64", "float32", "float16"):
        assert re.search(rf"numpy\s*│\s*cpu\s*│\s*{dtype}\s*│", printed), printed
    assert "= oracle" in printed and "decode = full" in printed
    assert "blockwise = oracle" in printed and "split-KV = oracle" in printed
    for kind in ("static", "dynamic", "sliding", "paged", "quantized"):
        assert f"cache: {kind}" in printed
    assert "torch: skipped (not selected)" in printed
    assert printed.rstrip().endswith("0 failed")


def test_verify_exits_non_zero_when_a_case_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    honest = oracle.oracle_attention

    def off_by_a_little(*args: Any, **kwargs: Any) -> tuple[np.ndarray, ...]:
        out, *rest = honest(*args, **kwargs)
        return (out + 1e-3, *rest)

    monkeypatch.setattr(oracle, "oracle_attention", off_by_a_little)
    code = main(
        ["verify", "--problems", "4", "--sequences", "2", "--histories", "2", "--backends", "numpy"]
    )
    printed = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in printed and "first failure of numpy-cpu-float64 = oracle" in printed


def test_verify_narrows_dtypes_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "verify.json"
    argv = ["verify", "--examples", "3", "--sequences", "1", "--histories", "1",
            "--backends", "numpy", "--dtypes", "float16", "--json", str(path)]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(path.read_text())["spec"]
    assert {row["dtype"] for row in rows} == {"float16"}
    assert all(row["passed"] for row in rows)
    assert {row["cases"] for row in rows if row["property"] == "= oracle"} == {3}


def test_verify_candidate_passes_a_correct_kernel(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "candidate.json"
    argv = ["verify", "--candidate", "refattn.testing.known_bugs.attention:blockwise",
            "--examples", "40", "--dtypes", "float32,float64", "--json", str(path)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "refattn.testing.known_bugs.attention:blockwise: passed" in printed
    (report,) = json.loads(path.read_text())["reports"]
    assert report["passed"] and set(report["counts"]) == {"float32", "float64"}
    assert report["counts"]["float64"]["all"]["passed"] == 40


def test_verify_candidate_fails_a_wrong_kernel_and_prints_its_reproducer(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [
        "verify",
        "--candidate",
        "refattn.testing.known_bugs.attention:causal_excludes_diagonal",
    ]
    assert main(argv) == 1
    printed = capsys.readouterr().out
    assert "from refattn.testing.known_bugs.attention import causal_excludes_diagonal" in printed
    assert "spec = ProblemSpec(" in printed and "causal=True" in printed
    assert printed.rstrip().endswith("causal_excludes_diagonal: FAILED")


def test_verify_candidate_that_does_not_exist_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["verify", "--candidate", "refattn.testing.known_bugs.attention:no_such_kernel"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "AttributeError" in error and "'no_such_kernel'" in error, error


def test_a_backend_with_a_share_checks_the_first_part_of_the_same_problems() -> None:
    from refattn.backends import Case, get
    from refattn.testing.selfcheck.run import run

    case = Case(get("numpy"), "cpu", "float32")
    whole = run([case], oracle.oracle_attention, problems=8, sequences=4, histories=1, seed=3)
    part = run([case], oracle.oracle_attention, problems=8, sequences=4, histories=1, seed=3,
               shares={"numpy": 0.25})  # fmt: skip
    cases = {row.check: row.cases for row in part}
    assert cases["= oracle"] == cases["blockwise = oracle"] == 2
    assert cases["decode = full"] == 1 and cases["cache: static"] == 1  # at least one
    assert {row.check: row.cases for row in whole}["= oracle"] == 8
    first = next(r for r in whole if r.check == "= oracle")
    again = next(r for r in part if r.check == "= oracle")
    assert again.worst_out is not None and first.worst_out is not None
    assert again.worst_out.error <= first.worst_out.error  # a subset of the same problems
