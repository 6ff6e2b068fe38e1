"""JAX's gradient of ``dot_product_attention`` agrees with the spec's through its adapter, in
every dtype; a wrong translation around it fails.

Each search draws a few problems with a fixed seed, so a run is repeatable
and the file stays near a minute on two cores: every problem is a new shape,
and XLA compiles the gradient program for each (about 0.6 s). float16 draws
fewer: on the CPU JAX refuses to compile it (the findings in
:mod:`refattn.testing.adapters.jax_backward`), so it runs op by op, some
5 s a problem.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from refattn.testing import (
    ProblemSpec,
    Unsupported,
    check_attention_backward,
    check_backward_problem,
    make_backward_problem,
)

jax = pytest.importorskip("jax")

from refattn.testing.adapters import jax_backward  # noqa: E402

SEED = 0


@pytest.mark.parametrize(
    ("dtype", "examples"),
    [("float64", 12), ("float32", 12), ("bfloat16", 12), ("float16", 3)],
)
def test_jax_gradient_agrees_with_the_spec(dtype: str, examples: int) -> None:
    adapter = (jax_backward.jax_dot_product_attention_backward_x64 if dtype == "float64"
               else jax_backward.jax_dot_product_attention_backward)  # fmt: skip
    report = check_attention_backward(adapter, dtypes=[dtype], seed=SEED, max_examples=examples,
                                      features=jax_backward.JAX_BACKWARD_FEATURES)  # fmt: skip
    assert report.passed, str(report)
    assert report.supported(dtype) == report.tried(dtype) == examples, str(report)


def _softcap_dropped(problem: Any) -> Any:
    """A wrong translation: the softcap left out (JAX has none), the rest said as the
    adapter says it."""
    return jax_backward.jax_dot_product_attention_backward(
        dataclasses.replace(problem, softcap=None)
    )


def test_a_translation_that_drops_the_softcap_fails() -> None:
    report = check_attention_backward(_softcap_dropped, features=("softcap",), seed=SEED,
                                      max_examples=10, max_failures=1)  # fmt: skip
    assert not report.passed and report.failures, str(report)
    assert "softcap" in report.failures[0].features


@pytest.mark.parametrize(
    ("adapter", "spec", "dtype", "reason"),
    [
        (jax_backward.jax_dot_product_attention_backward, ProblemSpec(softcap=5.0), "float32",
         "no softcap"),
        (jax_backward.jax_dot_product_attention_backward, ProblemSpec(), "float64", "x64"),
        (jax_backward.jax_dot_product_attention_backward_x64, ProblemSpec(), "float32",
         "float64 only"),
    ],
    ids=["softcap", "float64-without-x64", "x64-with-float32"],
)  # fmt: skip
def test_the_adapters_refuse_what_they_cannot_say(
    adapter: Any, spec: ProblemSpec, dtype: str, reason: str
) -> None:
    with pytest.raises(Unsupported, match=reason):
        adapter(make_backward_problem(spec, dtype=dtype))


@pytest.mark.parametrize(
    ("dtype", "length", "refusal"),
    [("float16", 2, "not supported by dot_general on CPU"),
     ("bfloat16", 1, "Algorithm not supported by the ElementalIrEmitter")],
    ids=["float16", "bfloat16-one-key"],
)  # fmt: skip
def test_jax_jit_still_refuses_the_dot_algorithm_on_the_cpu(
    dtype: str, length: int, refusal: str
) -> None:
    """The findings the adapter works around: ``jax.jit(jax.nn.dot_product_attention)``
    fails on the CPU for float16, and for bfloat16 with one query and one key, where the
    op-by-op call falls back to the default precision and runs. Once this fails, JAX
    compiles them, and the adapter's op-by-op path (``CPU_REFUSALS``) can go."""
    if any(d.platform != "cpu" for d in jax.devices()):
        pytest.skip("the refusals are the CPU's")
    q = jax.numpy.ones((1, length, 1, 8), dtype=dtype)  # (B, T, N, H)
    assert jax.nn.dot_product_attention(q, q, q).dtype == q.dtype
    with pytest.raises(Exception, match=refusal):
        jax.jit(jax.nn.dot_product_attention)(q, q, q)
    assert any(refusal in known for known in jax_backward.CPU_REFUSALS)


def test_a_problem_jax_jit_refuses_is_computed_op_by_op() -> None:
    """bfloat16 with one query and one key (the search may not draw it): the adapter falls
    back to the op-by-op call, and its gradients are the spec's."""
    spec = ProblemSpec(q_len=1, k_len=1)
    outcome = check_backward_problem(jax_backward.jax_dot_product_attention_backward, spec,
                                     dtype="bfloat16")  # fmt: skip
    assert outcome.passed, outcome


def test_the_cudnn_adapter_is_unavailable_without_a_gpu() -> None:
    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("a GPU is here")
    report = check_attention_backward(jax_backward.jax_dot_product_attention_cudnn_backward,
                                      dtypes=["float16"], max_examples=5, seed=SEED)  # fmt: skip
    assert report.unavailable == "JAX's cudnn attention needs a CUDA GPU"
