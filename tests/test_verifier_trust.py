"""A verdict to trust: never a pass without a check, every failure class found, the corners drawn.

Part one: every way of asking for a check that would check nothing (an
unknown dtype, backend or feature, no examples, a dtype the backend lacks, a
JSON path that cannot be written) ends with a message naming the argument,
the accepted values and what was given, in the CLI and in the Python API; a
candidate that exits or cannot import is a failure or a one-line error, never
a silent pass; an adapter whose library is missing is "unavailable". Part
two: a search keeps going after its first failure and sorts what it finds
into classes, each shrunk once. Part four: the corners where kernels break
(tile boundaries, infinities in unseen slots, ragged rows, long rows, float16
overflow before the scale) are reachable, and a tail-tile bug is caught on
every seed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import find, settings

import refattn
import refattn.testing.search
from refattn.cli import main
from refattn.testing import (
    AttentionProblem,
    CacheSpec,
    ProblemSpec,
    Unsupported,
    build_problem,
    check_attention,
    check_cache,
    check_problem,
)
from refattn.testing.drawing import DEFAULT_FEATURES, TILES, features_of
from refattn.testing.known_bugs import WRONG_KERNELS
from refattn.testing.known_bugs.attention import lse_in_base_2, textbook, window_off_by_one
from refattn.testing.precision import EAGER, Precision
from refattn.testing.strategies import attention_specs

KERNEL = "refattn.testing.known_bugs.attention:textbook"

# -- part 1: never a pass without a check ---------------------------------------


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """The error ``refattn verify <argv>`` ends with (exit code 2, nothing run)."""
    with pytest.raises(SystemExit) as exited:
        main(["verify", *argv])
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert "passed" not in captured.out  # nothing ran
    return captured.err


@pytest.mark.parametrize("candidate", [[], ["--candidate", KERNEL]])
@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--dtypes", "fp16"], ["--dtypes", "float16", "fp16"]),
        (["--dtypes", "float8"], ["--dtypes", "bfloat16", "float8"]),
        (["--dtypes", ","], ["--dtypes", "float32", "none"]),
        (["--backends", "tensorflow"], ["--backends", "numpy", "tensorflow"]),
        (["--examples", "0"], ["--examples", "positive integer", "'0'"]),
        (["--examples", "-3"], ["--examples", "positive integer", "'-3'"]),
        (["--problems", "-5"], ["--problems", "positive integer", "'-5'"]),
        (["--histories", "-1"], ["--histories", ">= 0", "'-1'"]),
        (["--backends", "array_api_strict", "--dtypes", "float16"],
         ["--dtypes", "array_api_strict has no float16", "float32"]),
    ],
)  # fmt: skip
def test_the_cli_refuses_what_would_check_nothing(
    capsys: pytest.CaptureFixture[str], candidate: list[str], argv: list[str], named: list[str]
) -> None:
    if "array_api_strict" in argv:
        pytest.importorskip("array_api_strict")
    error = _refused(capsys, candidate + argv)
    for text in named:
        assert text in error, error


def test_unknown_features_are_refused_by_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    error = _refused(capsys, ["--candidate", KERNEL, "--features", "causal,dropout"])
    assert "--features" in error and "'dropout'" in error and "window" in error, error


@pytest.mark.parametrize("where", ["missing", "directory"])
def test_an_unwritable_json_path_is_refused_before_the_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, where: str
) -> None:
    path = tmp_path / "no" / "such.json" if where == "missing" else tmp_path
    error = _refused(capsys, ["--candidate", KERNEL, "--json", str(path)])
    assert "--json" in error and str(path) in error, error


def test_a_candidate_that_cannot_be_imported_is_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    error = _refused(capsys, ["--candidate", "no_such_kernel_module:mine"])
    assert "Traceback" not in error
    assert "cannot import 'no_such_kernel_module:mine': ModuleNotFoundError" in error, error
    error = _refused(capsys, ["--candidate", "refattn.testing.known_bugs.attention:nothing"])
    assert "AttributeError" in error and "nothing" in error, error


def test_a_candidate_is_found_in_the_current_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As ``python -m`` finds modules: the ``refattn`` script alone would not."""
    (tmp_path / "kernel_here.py").write_text(
        "from refattn.testing.known_bugs.attention import textbook as mine\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert main(["verify", "--candidate", "kernel_here:mine", "--examples", "5"]) == 0
    assert "kernel_here:mine: passed" in capsys.readouterr().out


class _Exits(BaseException):
    """Neither Exception nor KeyboardInterrupt."""


@pytest.mark.parametrize("raised", [SystemExit(0), SystemExit(3), _Exits("bye")])
def test_a_candidate_that_exits_is_a_failure(raised: BaseException) -> None:
    def exits(p: AttentionProblem) -> Any:
        raise raised

    outcome = check_problem(exits, ProblemSpec(k_len=3))
    assert outcome.failed and f"raised {type(raised).__name__}" in outcome.message, outcome
    report = check_attention(exits, max_examples=5, seed=0)
    assert not report.passed and report.failures[0].symptom == f"raised {type(raised).__name__}"


def test_a_candidate_that_exits_fails_the_cli(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "exits_here.py").write_text("import sys\ndef mine(p):\n    sys.exit(0)\n")
    monkeypatch.chdir(tmp_path)
    assert main(["verify", "--candidate", "exits_here:mine", "--examples", "5"]) == 1
    out = capsys.readouterr().out
    assert "raised SystemExit(0)" in out and "exits_here:mine: FAILED" in out


def test_keyboard_interrupt_still_stops_a_check() -> None:
    def interrupted(p: AttentionProblem) -> Any:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        check_problem(interrupted, ProblemSpec())


def test_an_adapter_whose_library_is_missing_is_unavailable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from refattn.testing import adapters
    from refattn.testing.adapters import libraries

    real = libraries.importlib.util.find_spec

    def without_torch(name: str, *args: Any) -> Any:
        return None if name == "torch" else real(name, *args)

    monkeypatch.setattr(libraries.importlib.util, "find_spec", without_torch)
    report = check_attention(adapters.torch_sdpa, max_examples=50, seed=0)
    assert report.unavailable == "torch is not installed" and not report.passed
    assert not report.failures and report.tried("float32") == 1  # stopped at once
    assert str(report).endswith("unavailable: torch is not installed")
    code = main(["verify", "--candidate", "refattn.testing.adapters:torch_flex_attention"])
    out = capsys.readouterr().out
    assert code == 1 and "unavailable: torch is not installed" in out and "reproducer" not in out


def test_the_flex_attention_switch_is_shared_safely_by_two_threads() -> None:
    """The switch that runs FlexAttention uncompiled is one module attribute: a thread that
    leaves must not turn it off under another, and the last one out puts it back."""
    from refattn.testing.adapters import pytorch

    switch = pytorch._FLEX_EAGER_SWITCH
    flex = SimpleNamespace(**{switch: False})
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[bool] = []

    def first() -> None:
        with pytorch._uncompiled(flex):
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second() -> None:
        first_in.wait(5)
        with pytorch._uncompiled(flex):
            second_in.set()
            first_out.wait(5)
            seen.append(getattr(flex, switch))  # the first has left; this one is still in

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == [True] and getattr(flex, switch) is False


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"q_heads": 3, "kv_heads": 2}, "ProblemSpec.q_heads must be a multiple of kv_heads"),
        ({"window": 0}, "ProblemSpec.window must be >= 1; got 0"),
        ({"head_dim": 0}, "ProblemSpec.head_dim must be >= 1; got 0"),
        ({"q_len": -1}, "ProblemSpec.q_len must be >= 0"),
        ({"softcap": 0.0}, "ProblemSpec.softcap must be finite and > 0"),
        ({"layout": "diagonal"}, "ProblemSpec.layout must be one of"),
    ],
)
def test_an_invalid_problem_spec_names_its_field(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        ProblemSpec(**fields)


def test_an_invalid_cache_spec_names_its_field() -> None:
    with pytest.raises(ValueError, match=r"CacheSpec\.q_heads must be a multiple"):
        CacheSpec(q_heads=2, kv_heads=3)
    with pytest.raises(ValueError, match=r"CacheSpec\.steps\[i\] must be >= 1"):
        CacheSpec(steps=(3, 0))


@pytest.mark.parametrize("check", [check_attention, check_cache])
@pytest.mark.parametrize(
    ("examples", "error", "message"),
    [
        (0, ValueError, r"max_examples must be >= 1 \(0 would check nothing\); got 0"),
        (-4, ValueError, r"max_examples must be >= 1 \(0 would check nothing\); got -4"),
        (2.5, TypeError, r"max_examples must be an integer >= 1; got 2.5"),
        (True, TypeError, r"max_examples must be an integer >= 1; got True"),
    ],
)
def test_no_examples_is_refused_rather_than_passed(
    check: Any, examples: Any, error: type, message: str
) -> None:
    candidate = textbook if check is check_attention else refattn.StaticCache
    with pytest.raises(error, match=message):
        check(candidate, max_examples=examples)


@pytest.mark.parametrize("check", [check_attention, check_cache])
def test_unknown_dtypes_are_refused(check: Any) -> None:
    candidate = textbook if check is check_attention else refattn.StaticCache
    with pytest.raises(ValueError, match=r"dtype must be one of .*float16.*; got 'fp16'"):
        check(candidate, dtypes=("fp16",))


def test_nothing_supported_is_nothing_checked() -> None:
    def refuses(p: AttentionProblem) -> Any:
        raise Unsupported("not this one")

    report = check_attention(refuses, max_examples=10, seed=0)
    assert not report.passed and report.nothing_checked == ["float32"]
    assert "float32: nothing was checked" in str(report)


@pytest.mark.parametrize(
    ("cache", "options"),
    [
        (refattn.DynamicCache, {}),
        (refattn.StaticCache, {}),
        (refattn.SlidingWindowCache, {"window": 4, "sink_tokens": 1}),
        (refattn.QuantizedCache, {"bits": 8}),
    ],
)
def test_cache_classes_are_checked_as_written(cache: Any, options: dict[str, Any]) -> None:
    report = check_cache(cache, max_examples=15, seed=0, **options)
    assert report.passed, report
    assert report.supported("float32") == 15


# -- part 2: every failure, not the first ----------------------------------------


def _two_bugs(p: AttentionProblem) -> Any:
    """A window one key too wide, and the lse in base 2: two bugs, two classes."""
    if p.return_lse:
        return lse_in_base_2(p)
    return window_off_by_one(p)


def test_a_search_goes_on_and_reports_each_class_once() -> None:
    report = check_attention(_two_bugs, features={"window", "lse", "causal"}, seed=3)
    by_symptom = {f.symptom: f for f in report.failures}
    assert "window" in by_symptom["wrong out"].features, report
    assert by_symptom["wrong lse"].features == {"lse"}, report
    assert report.tried("float32") == 200  # the search went on past the first failure
    assert report.counts["float32"]["all"].failed == sum(f.draws for f in report.failures)
    text = str(report)
    for failure in report.failures:
        assert text.count(failure.to_code()) == 1  # each reproducer printed once
        assert failure.draws >= 1 and failure.common_features >= failure.features
        with pytest.raises(AssertionError):
            exec(failure.to_code(), {})
    assert text.count("assert outcome.passed") == len(report.failures)


def test_refusals_are_tallied_by_reason() -> None:
    def eights(p: AttentionProblem) -> Any:
        if p.q.shape[-1] % 8:
            raise Unsupported("head_dim must be a multiple of 8")
        return textbook(p)

    report = check_attention(eights, max_examples=60, seed=1)
    assert report.passed, report
    refused = report.unsupported_reasons["float32"]["head_dim must be a multiple of 8"]
    assert refused == report.counts["float32"]["all"].unsupported > 0
    share = f"{refused / 60:.0%}"
    assert f"{refused} of 60 problems ({share}) unsupported: {refused} 'head_dim" in str(report)


def test_a_passing_search_calls_the_candidate_once_per_problem() -> None:
    """Going on past the first failure costs a passing run nothing: no replays, no shrinking."""
    calls = []

    def counted(p: AttentionProblem) -> Any:
        calls.append(1)
        return textbook(p)

    report = check_attention(counted, max_examples=40, seed=2)
    assert report.passed and len(calls) == 40 and "float32" not in report.first_failure


def test_one_failure_class_stops_at_the_first_failure() -> None:
    fn, dtypes = WRONG_KERNELS["unscaled"]
    report = check_attention(fn, dtypes=dtypes, seed=0, max_failures=1)
    assert len(report.failures) == 1
    assert report.tried("float32") == report.first_failure["float32"] == report.failures[0].examples


def test_a_reproducer_for_a_script_names_the_script(tmp_path: Path) -> None:
    script = tmp_path / "check_mine.py"
    script.write_text(
        textwrap.dedent(
            """
            from refattn.testing import check_attention
            from refattn.testing.known_bugs.attention import textbook

            def mine(p):
                return textbook(p, scale=1.0)  # forgets the scale

            if __name__ == "__main__":
                report = check_attention(mine, seed=0, max_examples=30)
                print(report.to_code())
            """
        )
    )
    run = subprocess.run([sys.executable, script.name], cwd=tmp_path, capture_output=True,
                         text=True, check=True)  # fmt: skip
    code = run.stdout
    assert "your_module" not in code and "runpy.run_path('check_mine.py')" in code, code
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(AssertionError):
            exec(code, {})
    finally:
        os.chdir(here)


# -- part 3: the kernel's declared precision -------------------------------------


def test_a_declared_precision_is_what_a_kernel_is_judged_by() -> None:
    """Scores stored in float16 fail the spec's own contract and pass the one declared."""
    wrong, _ = WRONG_KERNELS["rounds_scores_to_float16"]
    features = DEFAULT_FEATURES - {"large_logits"}  # scores that fit in float16
    assert not check_attention(wrong, dtypes=("float16",), features=features, seed=0).passed
    report = check_attention(wrong, dtypes=("float16",), features=features, seed=0,
                             precision=Precision(scores="float16"))  # fmt: skip
    assert report.passed, report
    assert report.precision == Precision(scores="float16")


def test_an_overflow_is_not_excused_by_a_contract() -> None:
    """A float16 product that overflows before the scale fails, whatever it declares."""
    fn, _ = WRONG_KERNELS["float16_product_then_scale"]
    spec = ProblemSpec(k_len=4, head_dim=64, value_dim=64, logit_size=1e4, seed=1)
    for contract in (Precision(), Precision(scores="input"), EAGER):
        outcome = check_problem(fn, spec, dtype="float16", precision=contract)
        assert outcome.failed and outcome.symptom == "non-finite out", (contract, outcome)


def test_a_reproducer_carries_the_contract() -> None:
    def mine(p: AttentionProblem) -> Any:
        return textbook(p, scale=1.0)

    report = check_attention(mine, seed=0, max_examples=20, max_failures=1, precision=EAGER)
    code = report.to_code()
    assert "precision=Precision(scores='input', softmax='input'" in code, code


# -- part 4: the corners where kernels break are drawn -----------------------------


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("side", [-1, 0, 1])
def test_tile_boundaries_are_drawn_for_keys_and_queries(tile: int, side: int) -> None:
    many = settings(max_examples=20_000)  # drawing specs is cheap: no arrays are built
    find(attention_specs(), lambda s: s.k_len == tile + side, settings=many)
    if tile + side > 16:
        find(attention_specs(), lambda s: s.q_len == tile + side and "tiles" in features_of(s),
             settings=many)  # fmt: skip


@pytest.mark.parametrize("planted", [np.inf, -np.inf])
@pytest.mark.parametrize("where", ["k", "v"])
def test_infinities_are_planted_in_unseen_slots(planted: float, where: str) -> None:
    def has(spec: ProblemSpec) -> bool:
        return spec.unseen_nan and bool((getattr(build_problem(spec), where) == planted).any())

    find(attention_specs({"unseen_nan", "causal", "empty_slots"}), has)


def test_ragged_rows_are_a_feature_of_their_own() -> None:
    def ragged(spec: ProblemSpec) -> bool:
        lengths = (build_problem(spec).k_pos >= 0).sum(axis=1)
        return spec.batch > 1 and len(set(lengths.tolist())) > 1

    spec = find(attention_specs({"ragged"}), ragged)
    assert features_of(spec) == {"ragged"}


def test_thousands_of_keys_are_drawn() -> None:
    find(attention_specs(), lambda s: s.k_len >= 2048)


def test_float16_overflow_before_the_scale_is_drawn() -> None:
    """q·k past float16's 65504 on some pair, while every scaled score stays below it."""

    def overflows_first(spec: ProblemSpec) -> bool:
        if spec.q_len == 0 or spec.k_len == 0:
            return False
        arrays = build_problem(spec).rounded("float16")
        q, k = arrays["q"], np.repeat(arrays["k"], spec.q_heads // spec.kv_heads, axis=1)
        dot = np.abs(q @ np.swapaxes(k, -1, -2))
        scale = spec.scale if spec.scale is not None else spec.head_dim**-0.5
        return bool(dot.max() > 65504) and bool((dot * scale).max() < 65504)

    find(attention_specs(), overflows_first)


@pytest.mark.parametrize("bug", ["drops_last_partial_tile", "float16_weighted_sum"])
def test_a_tail_tile_or_long_row_bug_is_caught_on_every_seed(
    monkeypatch: pytest.MonkeyPatch, bug: str
) -> None:
    """The keys past the last full tile of 64 dropped, or the weighted sum of thousands of
    values accumulated in float16: caught within the default examples on 20 seeds of 20."""
    monkeypatch.setattr(refattn.testing.search, "SHRINK_BUDGET", 0)  # caught is enough here
    fn, dtypes = WRONG_KERNELS[bug]
    caught = [not check_attention(fn, dtypes=dtypes, seed=s, max_failures=1).passed
              for s in range(20)]  # fmt: skip
    assert sum(caught) == 20


def test_a_failure_that_does_not_repeat_keeps_what_it_first_said() -> None:
    """A draw that raised and then passed when judged again is reported as nondeterministic,
    with the first error's text, so that a known defect can still be told by it."""
    calls: list[int] = []

    def flaky(p: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the first call's own error")
        return textbook(p)

    report = check_attention(flaky, max_examples=5, seed=0)
    (failure,) = report.failures
    assert failure.outcome.message.startswith("fails only sometimes (nondeterministic); first: ")
    assert "the first call's own error" in failure.outcome.message
    assert failure.symptom == "raised RuntimeError"
