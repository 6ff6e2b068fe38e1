"""onnxruntime's contrib operators GroupQueryAttention and MultiHeadAttention agree with the
spec through their adapters but for their written-up defects; the adapters use the
operators' own masking where it keeps what the problem keeps; wrong wrappers fail; the
probes measure the operators' conventions; the reproducers fail while the defects are there.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from refattn.testing import ProblemSpec, Unsupported, check_attention, check_problem, make_problem

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

from refattn.testing.adapters import onnxruntime_contrib as contrib  # noqa: E402
from refattn.testing.adapters.numpy_masks import visible  # noqa: E402
from refattn.testing.conformance.implementations import Implementation  # noqa: E402
from refattn.testing.report import Failure  # noqa: E402

DEFECTS_DIR = Path(__file__).resolve().parents[1] / "docs" / "defects"
CASES = [(i, dtype) for i in contrib.IMPLEMENTATIONS for dtype in i.dtypes]
GQA, GQA_OUTPUT_ONLY, MHA, MHA_IN_OP = contrib.IMPLEMENTATIONS


@pytest.mark.parametrize("implementation, dtype", CASES,
                         ids=[f"{i.name}-{d}" for i, d in CASES])  # fmt: skip
def test_each_operator_row_agrees_with_the_spec_but_for_its_defects(
    implementation: Implementation, dtype: str
) -> None:
    report = check_attention(implementation.target, features=implementation.features,
                             dtypes=[dtype], seed=1, max_examples=60, max_failures=2)  # fmt: skip
    name = implementation.name
    unexplained = [f for f in report.failures
                   if not any(d.explains(name, f) for d in contrib.DEFECTS)]  # fmt: skip
    assert not unexplained, str(report)
    # GroupQueryAttention refuses rows whose new tokens are not its last Sq slots, and
    # batched chunks it cannot take; MultiHeadAttention's in-op cache, rows of their own past.
    assert report.supported(dtype) >= 0.6 * report.tried(dtype), str(report)
    if implementation in (GQA, MHA_IN_OP):
        assert report.passed, str(report)


def test_group_query_attention_masks_natively_where_that_keeps_what_the_problem_keeps() -> None:
    """Queries at the end of each row: ``causal`` and ``local_window_size = W`` (the window's
    W keys) say them, ``seqlens_k`` the rows' lengths. Top-left queries see fewer keys than
    ``causal`` keeps at the operator's positions (the mask hides the rest) but not within
    its window; a problem that is not causal sees keys after them: ``causal = 0``."""

    def native(problem: Any) -> dict[str, Any]:
        attributes: dict[str, Any] = {}
        totals = contrib._gqa_totals(problem)
        contrib._gqa_native(problem, visible(problem), totals, attributes)  # width: Sk here
        return attributes

    bottom = make_problem(ProblemSpec(q_len=2, k_len=5, causal=True, window=3))
    assert native(bottom) == {"local_window_size": 3}
    top = make_problem(ProblemSpec(q_len=2, k_len=5, causal=True, layout="top_left", window=2))
    assert native(top) == {}
    assert native(make_problem(ProblemSpec(q_len=2, k_len=5))) == {"causal": 0}
    ragged = make_problem(ProblemSpec(batch=2, q_len=1, k_len=4, causal=True, layout="ragged",
                                      seed=0))  # fmt: skip
    assert contrib._gqa_totals(ragged).tolist() == [2, 4] and native(ragged) == {}


@contextmanager
def _feeds_changed(change: Any) -> Iterator[None]:
    """Every model the adapters run gets ``change(feeds, attributes)`` first."""
    run = contrib._run

    def changed(op: str, order: Any, feeds: Any, attributes: Any, outputs: Any) -> Any:
        feeds, attributes = dict(feeds), dict(attributes)
        change(feeds, attributes)
        return run(op, order, feeds, attributes, outputs)

    contrib._run = changed
    try:
        yield
    finally:
        contrib._run = run


def _window_one_short(problem: Any) -> Any:
    """A wrong wrapper: ``local_window_size = W - 1`` for refattn's window W (the reach a
    kernel that keeps ``w + 1`` keys would want)."""

    def shorter(feeds: dict[str, Any], attributes: dict[str, Any]) -> None:
        if "local_window_size" in attributes:
            attributes["local_window_size"] -= 1

    with _feeds_changed(shorter):
        return contrib.onnxruntime_group_query_attention(problem)


def _seqlens_as_lengths(problem: Any) -> Any:
    """A wrong wrapper: ``seqlens_k`` one short of the rows' totals less one."""

    def lengths(feeds: dict[str, Any], attributes: dict[str, Any]) -> None:
        if "seqlens_k" in feeds:
            feeds["seqlens_k"] = np.maximum(feeds["seqlens_k"] - 1, 0).astype(np.int32)

    with _feeds_changed(lengths):
        return contrib.onnxruntime_group_query_attention(problem)


def _finite_mask_fill(problem: Any) -> Any:
    """A wrong wrapper: MultiHeadAttention's default ``mask_filter_value``, -10000, a finite
    fill under which a hidden key still counts where the scores are large."""

    def default(feeds: dict[str, Any], attributes: dict[str, Any]) -> None:
        attributes.pop("mask_filter_value", None)

    with _feeds_changed(default):
        return contrib.onnxruntime_multi_head_attention(problem)


def test_a_window_one_key_short_around_group_query_attention_fails() -> None:
    report = check_attention(_window_one_short, features=("causal", "window"), seed=0,
                             max_examples=40, max_failures=1)  # fmt: skip
    assert not report.passed and report.failures, str(report)
    assert "window" in report.failures[0].features


def test_seqlens_k_off_by_one_around_group_query_attention_fails() -> None:
    """The operator then writes the new tokens a slot early: the present is checked too."""
    report = check_attention(_seqlens_as_lengths, features=("causal", "ragged"), seed=0,
                             max_examples=40, max_failures=1)  # fmt: skip
    assert not report.passed and report.failures, str(report)
    assert report.failures[0].symptom in ("wrong present K/V", "wrong out"), str(report)


def test_the_default_mask_fill_around_multi_head_attention_fails_on_large_logits() -> None:
    report = check_attention(_finite_mask_fill, features=("empty_slots", "large_logits"),
                             seed=0, max_examples=60, max_failures=1)  # fmt: skip
    assert not report.passed and report.failures, str(report)
    assert {"empty_slots", "large_logits"} <= report.failures[0].features
    spec = report.failures[0].outcome.spec
    assert isinstance(spec, ProblemSpec)
    assert check_problem(contrib.onnxruntime_multi_head_attention, spec).passed


@pytest.mark.parametrize("adapter", [contrib.onnxruntime_group_query_attention,
                                     contrib.onnxruntime_multi_head_attention_in_op],
                         ids=["GroupQueryAttention", "MultiHeadAttention"])  # fmt: skip
def test_a_present_cache_that_drops_a_token_fails(adapter: Any) -> None:
    """The verifier compares the present the operator wrote with the problem's keys."""

    def dropped(problem: Any) -> Any:
        result = adapter(problem)
        k, v = result.present
        return dataclasses.replace(result, present=(k[:, :, :-1], v[:, :, :-1]))

    spec = ProblemSpec(q_len=2, k_len=6, causal=True, seed=1)
    assert check_problem(adapter, spec).passed
    assert not check_problem(dropped, spec).passed


def test_what_the_cpu_kernels_do_not_take_is_refused_with_their_reason() -> None:
    problem = make_problem(ProblemSpec(q_len=2, k_len=4, causal=True), dtype="bfloat16")
    with pytest.raises(Unsupported, match="no GroupQueryAttention kernel for bfloat16"):
        contrib.onnxruntime_group_query_attention(problem)
    odd = make_problem(ProblemSpec(q_len=2, k_len=4, causal=True, head_dim=13))
    with pytest.raises(Unsupported, match="a multiple of 8; got 13"):
        contrib.onnxruntime_group_query_attention(odd)
    grouped = make_problem(ProblemSpec(q_heads=4, kv_heads=2))
    with pytest.raises(Unsupported, match="one KV head per query head"):
        contrib.onnxruntime_multi_head_attention(grouped)


def test_the_probes_measure_the_operators_conventions() -> None:
    """Called directly: GroupQueryAttention's queries sit at the end of each row, a query
    every key of which attention_bias hides is NaN but on its causal path without softcap,
    ``local_window_size=2`` keeps 2 keys; MultiHeadAttention's unidirectional is offset by
    the past, and without one masks all but its last query top-left; its default mask fill
    gives a hidden row the mean of the values. Both form q·k in float32 for float16."""
    assert GQA.probe is not None and MHA.probe is not None
    assert GQA.probe() == {
        "alignment": "bottom-right",
        "empty_row": "NaN (causal=1 without softcap: 0)",
        "window": "local_window_size=2 keeps q-1 .. q (2 keys)",
        "lse": "not returned",
        "scores": "float32 or wider",
    }
    assert MHA.probe() == {
        "alignment": "unidirectional with a past: bottom-right; with none: neither: queries "
        "saw [(0,), (0, 1, 2, 3, 4, 5, 6, 7)]",
        "empty_row": "mean of V",
        "window": "no window argument",
        "lse": "not returned",
        "scores": "float32 or wider",
    }


def test_the_defects_explain_their_failures_and_the_reproducers_show_them() -> None:
    """The output-only call misreads the past; MultiHeadAttention's last query goes unmasked
    (one query at position 0 over two keys sees both). Each defect explains its own row's
    failure and not another's; each reproducer exits 1."""
    past = ProblemSpec(q_len=1, k_len=3, causal=True, seed=0)
    assert check_problem(GQA.target, past).passed
    misread = check_attention(GQA_OUTPUT_ONLY.target, features=("causal",), seed=0,
                              max_examples=10, max_failures=1)  # fmt: skip
    assert misread.failures, str(misread)
    top_left = ProblemSpec(q_len=1, k_len=2, causal=True, layout="top_left", seed=0)
    assert make_problem(top_left).q_pos.tolist() == [[0]]
    unmasked = Failure(check_problem(MHA.target, top_left), examples=1, shrink_steps=0,
                       candidate="onnxruntime_multi_head_attention")  # fmt: skip
    assert unmasked.symptom == "wrong out"
    by_name = {d.implementation: d for d in contrib.DEFECTS}
    assert by_name[GQA_OUTPUT_ONLY.name].explains(GQA_OUTPUT_ONLY.name, misread.failures[0])
    assert by_name[MHA.name].explains(MHA.name, unmasked)
    assert not by_name[MHA.name].explains(MHA.name, misread.failures[0])
    assert not by_name[GQA_OUTPUT_ONLY.name].explains(GQA.name, misread.failures[0])
    # A wrong value on a problem without a past is not the misread past.
    no_past = ProblemSpec(q_len=4, k_len=4, causal=True, window=2, seed=0)
    short = Failure(check_problem(_window_one_short, no_past), examples=1, shrink_steps=0,
                    candidate="_window_one_short")  # fmt: skip
    assert short.symptom == "wrong out"
    assert not by_name[GQA_OUTPUT_ONLY.name].explains(GQA_OUTPUT_ONLY.name, short)
    for script in sorted({d.reproducer for d in contrib.DEFECTS}):
        ran = subprocess.run([sys.executable, str(DEFECTS_DIR / script)], capture_output=True,
                             text=True, timeout=120)  # fmt: skip
        assert ran.returncode == 1, ran.stdout + ran.stderr
        assert "by hand" in ran.stdout
