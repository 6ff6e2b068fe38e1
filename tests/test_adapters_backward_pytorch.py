"""PyTorch's attention backwards on the CPU against the spec's gradients: SDPA with the
backend PyTorch picks and with each CPU backend forced, and FlexAttention's own backward;
a wrong wrapper around the same calls fails, and FlexAttention's compiled backward, which
torch 2.13 has no CPU kernel for, is unavailable rather than passed.

The long runs (200 problems a dtype) are the catch-rate and conformance commands'; these
draw a few dozen, with a seed.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest

from refattn.testing import ProblemSpec, check_attention_backward, check_backward_problem

torch = pytest.importorskip("torch")

from refattn.testing.adapters import pytorch, pytorch_backward  # noqa: E402

DTYPES = ("float64", "float32", "float16", "bfloat16")
SDPA = {
    "default": pytorch_backward.torch_sdpa_backward,
    "math": pytorch_backward.torch_sdpa_math_backward,
    "flash": pytorch_backward.torch_sdpa_flash_backward,
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", sorted(SDPA))
def test_sdpa_backward_agrees_with_the_spec(backend: str, dtype: str) -> None:
    report = check_attention_backward(SDPA[backend], dtypes=[dtype], seed=0, max_examples=25,
                                      features=pytorch_backward.SDPA_BACKWARD_FEATURES)  # fmt: skip
    assert report.passed, str(report)
    assert report.supported(dtype) > 0, str(report)  # something was checked


@pytest.mark.parametrize("dtype", DTYPES)
def test_flex_attentions_backward_agrees_with_the_spec(dtype: str) -> None:
    report = check_attention_backward(pytorch_backward.torch_flex_attention_backward,
                                      dtypes=[dtype], seed=0, max_examples=12,
                                      features=pytorch_backward.FLEX_BACKWARD_FEATURES)  # fmt: skip
    assert report.passed, str(report)
    assert report.supported(dtype) > 0, str(report)


def test_flex_attentions_backward_takes_the_bias_and_sink_gradients_through_its_operator() -> None:
    """The forward adapter's direct path takes no gradient to what the ``score_mod``
    captures (the bias, the sink logits): torch 2.13 says its debug switch "doesn't work
    with the backwards pass". The backward adapter goes through FlexAttention's operator,
    and its dbias and dsink_logits agree with the spec."""
    spec = ProblemSpec(q_len=3, k_len=5, bias=True, sink_logits=True, seed=3)
    outcome = check_backward_problem(pytorch_backward.torch_flex_attention_backward, spec)
    assert outcome.passed, str(outcome)
    assert {name for name, _, _ in outcome.gradients} >= {"dbias", "dsink_logits"}

    def direct(problem: Any) -> Any:
        with pytorch_backward._cpu_backward_allowed(problem), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's own, from inside dynamo
            return pytorch_backward.autograd_of(pytorch.torch_flex_attention, problem)

    wrong = check_backward_problem(direct, spec)
    over = {name for name, error, allowed in wrong.gradients if not error <= allowed}
    assert over == {"dbias", "dsink_logits"}, str(wrong)


def test_flex_attentions_compiled_backward_is_unavailable_on_the_cpu() -> None:
    report = check_attention_backward(pytorch_backward.torch_flex_attention_compiled_backward,
                                      seed=0, max_examples=5)  # fmt: skip
    assert not report.passed
    assert "no compiled backward on the CPU" in report.unavailable


def _sink_gradient_negated(problem: Any) -> Any:
    """A wrong wrapper: the right gradients of q, k and v, and the sink logits' negated (the
    sign a hand-derived sink gradient gets wrong)."""
    grads = pytorch_backward.torch_sdpa_math_backward(problem)
    if "dsink_logits" in grads:
        grads["dsink_logits"] = -grads["dsink_logits"]
    return grads


def _mean_not_sum_over_the_loss(problem: Any) -> Any:
    """A wrong wrapper: the gradients of the mean of out * dout, not of its sum."""
    grads = pytorch_backward.torch_sdpa_math_backward(problem)
    n = problem.dout.size
    return {name: None if g is None else g / n for name, g in grads.items()}


@pytest.mark.parametrize(
    ("wrong", "features", "symptom"),
    [
        (_sink_gradient_negated, ("sink_logits",), "dsink_logits"),
        (_mean_not_sum_over_the_loss, None, "wrong d"),
    ],
)
def test_a_wrong_wrapper_around_pytorchs_backward_fails(
    wrong: Any, features: Any, symptom: str
) -> None:
    report = check_attention_backward(wrong, seed=0, max_examples=40,
                                      features=features)  # fmt: skip
    assert not report.passed and report.failures, str(report)
    assert symptom in report.failures[0].outcome.symptom, str(report)
