"""ONNX's standard Attention operator, run by onnxruntime and by onnx.reference, agrees with
the spec through its adapters but for its written-up defects; the adapters use the
operator's own masking where it says the problem's positions; wrong wrappers fail; the
probes measure the operator's conventions; the reproducers fail while the defects are there.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from refattn.testing import ProblemSpec, Result, check_attention, check_problem, make_problem
from refattn.testing.report import Failure

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

from refattn.testing.adapters import onnx_attention  # noqa: E402
from refattn.testing.conformance.implementations import Implementation  # noqa: E402

DEFECTS_DIR = Path(__file__).resolve().parents[1] / "docs" / "defects"
CASES = [(i, dtype) for i in onnx_attention.IMPLEMENTATIONS for dtype in i.dtypes]


@pytest.mark.parametrize("implementation, dtype", CASES,
                         ids=[f"{i.name}-{d}" for i, d in CASES])  # fmt: skip
def test_each_operator_row_agrees_with_the_spec_but_for_its_defects(
    implementation: Implementation, dtype: str
) -> None:
    in_op = "in_op_cache" in implementation.features
    report = check_attention(implementation.target, features=implementation.features,
                             dtypes=[dtype], seed=3, max_examples=40 if in_op else 25)  # fmt: skip
    defects = onnx_attention.DEFECTS
    unexplained = [f for f in report.failures
                   if not any(d.explains(implementation.name, f) for d in defects)]  # fmt: skip
    assert not unexplained, str(report)
    # float64 refuses scales that are no float32; the in-op rows, rows whose new tokens do
    # not end the slots and (onnxruntime) no new token: still a part is checked.
    least = (0.1 if in_op else 0.25) if dtype == "float64" else (0.2 if in_op else 0.5)
    assert report.supported(dtype) >= least * report.tried(dtype), str(report)


def test_the_operators_own_masking_is_used_where_it_says_the_positions() -> None:
    """Queries at the end of five keys: opset 24's ``nonpad_kv_seqlen`` offset makes
    ``is_causal`` say them; opset 23's offset is 0 (top-left), so a mask does; opset 25
    says a window with ``left_window_size``; an in-op cache's offset is its past."""
    problem = make_problem(ProblemSpec(q_len=2, k_len=5, causal=True, window=3))
    assert onnx_attention.native_masking(problem, 23).attributes == {}
    assert dict(onnx_attention.native_masking(problem, 24).attributes) == {"is_causal": 1}
    assert dict(onnx_attention.native_masking(problem, 25).attributes) == {
        "is_causal": 1, "left_window_size": 2}  # fmt: skip
    assert dict(onnx_attention.native_masking(problem, 23, past=3).attributes) == {
        "is_causal": 1}  # fmt: skip
    assert onnx_attention.native_masking(problem, 23, past=2).attributes == {}
    ragged = make_problem(ProblemSpec(batch=2, q_len=1, k_len=4, causal=True, layout="ragged",
                                      seed=0))  # fmt: skip
    native = onnx_attention.native_masking(ragged, 24)
    assert native.nonpad is not None and native.nonpad.tolist() == [2, 4]


def _window_one_wider(problem: Any) -> Any:
    """A wrong wrapper: ``left_window_size = W`` for refattn's window W (one key more)."""
    if problem.window is None:
        return onnx_attention.onnx_attention_25(problem)
    return onnx_attention.onnx_attention_25(dataclasses.replace(problem, window=problem.window + 1))


def _is_causal_trusted(problem: Any) -> Any:
    """A wrong wrapper: a causal problem's past and new tokens handed to the operator with
    ``is_causal`` alone, trusting its offset (the past's length) to place the queries; they
    sit there only when the new tokens are as many as the queries."""
    Sk, n = problem.k.shape[2], problem.new_keys
    if not 0 < n < Sk or bool((problem.k_pos < 0).any()):
        return onnx_attention.onnx_reference_attention_24_in_op(problem)
    k, v = problem.k, problem.v
    feeds = {"Q": problem.q, "K": k[:, :, Sk - n :], "V": v[:, :, Sk - n :],
             "past_key": k[:, :, : Sk - n], "past_value": v[:, :, : Sk - n]}  # fmt: skip
    attributes = {"is_causal": int(problem.causal), "scale": problem.scale}
    out, k_present, v_present = onnx_attention._run(
        "reference", 24, feeds, attributes, ("Y", "present_key", "present_value"))  # fmt: skip
    return Result(out, present=(k_present, v_present))


def test_a_wrong_window_around_onnxruntime_fails() -> None:
    report = check_attention(_window_one_wider, features=("causal", "window"), seed=0,
                             max_examples=40)  # fmt: skip
    assert not report.passed and report.failures, str(report)
    assert "window" in report.failures[0].features


def test_is_causal_trusted_around_the_reference_evaluator_fails() -> None:
    report = check_attention(_is_causal_trusted, features=("causal", "in_op_cache"), seed=0,
                             max_examples=40)  # fmt: skip
    assert not report.passed and report.failures, str(report)


def test_a_present_cache_that_drops_a_token_fails() -> None:
    """The verifier compares the present the operator wrote with the problem's keys."""

    def dropped(problem: Any) -> Any:
        result = onnx_attention.onnx_attention_24_in_op(problem)
        k, v = result.present
        return dataclasses.replace(result, present=(k[:, :, :-1], v[:, :, :-1]))

    spec = ProblemSpec(q_len=2, k_len=6, causal=True, new_keys=2, seed=1)
    assert check_problem(onnx_attention.onnx_attention_24_in_op, spec).passed
    assert not check_problem(dropped, spec).passed


@pytest.mark.parametrize("implementation", [onnx_attention.IMPLEMENTATIONS[0],
                                            onnx_attention.IMPLEMENTATIONS[5]],
                         ids=lambda i: i.name)  # fmt: skip
def test_the_probes_measure_the_operators_conventions(implementation: Implementation) -> None:
    """Called directly: ``is_causal`` is top-left without a cache and bottom-right with
    ``past_key`` or ``nonpad_kv_seqlen`` (the schema's offset), a fully masked row is 0,
    ``left_window_size=2`` keeps the query and 2 keys before it, and q·k is formed in
    float16 for float16 inputs."""
    assert implementation.probe is not None
    assert implementation.probe() == {
        "alignment": "top-left without a cache; bottom-right with past_key; bottom-right "
        "with nonpad_kv_seqlen",
        "empty_row": "0",
        "window": "left_window_size=2 keeps q-2 .. q (3 keys)",
        "lse": "not returned",
        "scores": "float16: q.k overflows past 65504",
    }


def test_the_defects_explain_the_failures_they_are_listed_for() -> None:
    """The reference evaluator raises on zero keys; onnxruntime refuses a short mask."""
    empty = check_attention(onnx_attention.onnx_reference_attention_24, features=("empty_slots",),
                            seed=0, max_examples=20, max_failures=1)  # fmt: skip
    assert empty.failures, str(empty)
    name = "onnx.reference Attention (opset 24)"
    (zero_keys,) = (d for d in onnx_attention.DEFECTS if d.implementation == name)
    assert zero_keys.explains(name, empty.failures[0])
    assert not zero_keys.explains("onnxruntime Attention (opset 24)", empty.failures[0])
    # Slots 4 and 5 are empty: opset 23 has no nonpad_kv_seqlen, so a mask hides them, and
    # it is left two columns short.
    spec = ProblemSpec(q_len=2, k_len=6, layout="ragged", batch=1, seed=4)
    assert make_problem(spec).k_pos.tolist() == [[0, 1, 2, 3, -1, -1]]
    outcome = check_problem(onnx_attention.onnx_attention_23, spec)
    short = Failure(outcome, examples=1, shrink_steps=0, candidate="onnx_attention_23")
    name = "onnxruntime Attention (opset 23)"
    (mask_defect,) = (d for d in onnx_attention.DEFECTS if d.implementation == name)
    assert not outcome.passed and mask_defect.explains(name, short)


@pytest.mark.parametrize("reproducer", sorted({d.reproducer for d in onnx_attention.DEFECTS}))
def test_each_reproducer_exits_1_while_the_defect_is_there(reproducer: str) -> None:
    done = subprocess.run([sys.executable, str(DEFECTS_DIR / reproducer)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "float64 by hand" in done.stdout


def test_an_onnx_without_the_opset_makes_its_rows_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An onnx whose last opset is 24 has no opset 25 Attention: unavailable, not failed."""
    monkeypatch.setattr(onnx.defs, "onnx_opset_version", lambda: 24)
    onnx_attention._session.cache_clear()
    try:
        report = check_attention(onnx_attention.onnx_attention_25, seed=0, max_examples=5)
    finally:
        onnx_attention._session.cache_clear()
    assert not report.passed and report.unavailable.startswith("onnx "), str(report)
    assert "has no opset 25" in report.unavailable
