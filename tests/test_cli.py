"""``refattn verify`` prints its table and fails loudly when the spec disagrees with the oracle."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import refattn.tests.oracle
from refattn.cli import main


def test_verify_prints_a_passing_table(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["verify", "--problems", "6", "--sequences", "3", "--histories", "2", "--backends", "numpy"]
    )
    printed = capsys.readouterr().out
    assert code == 0
    for dtype in ("float64", "float32", "float16"):
        assert f"numpy    cpu     {dtype}" in printed
    assert "= oracle" in printed and "decode = full" in printed
    assert "blockwise = oracle" in printed and "split-KV = oracle" in printed
    for kind in ("static", "dynamic", "sliding", "paged", "quantized"):
        assert f"cache: {kind}" in printed
    assert "torch: skipped (not in REFATTN_BACKENDS)" in printed
    assert printed.rstrip().endswith("0 failed")


def test_verify_exits_non_zero_when_a_case_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    honest = refattn.tests.oracle.oracle_attention

    def off_by_a_little(*args: Any, **kwargs: Any) -> tuple[np.ndarray, ...]:
        out, *rest = honest(*args, **kwargs)
        return (out + 1e-3, *rest)

    monkeypatch.setattr(refattn.tests.oracle, "oracle_attention", off_by_a_little)
    code = main(
        ["verify", "--problems", "4", "--sequences", "2", "--histories", "2", "--backends", "numpy"]
    )
    printed = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in printed and "first failure of numpy-cpu-float64 = oracle" in printed
