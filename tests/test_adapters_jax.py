"""JAX's ``dot_product_attention`` agrees with the spec through its adapter; a wrong wrapper
around it fails; its probe measures JAX's own conventions."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from refattn.testing import check_attention

jax = pytest.importorskip("jax")

from refattn.testing.adapters import jax_attention  # noqa: E402


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_jax_dot_product_attention_agrees_with_the_spec(dtype: str) -> None:
    report = check_attention(jax_attention.jax_dot_product_attention, dtypes=[dtype], seed=0,
                             features=jax_attention.JAX_FEATURES, max_examples=60)  # fmt: skip
    assert report.passed, str(report)
    assert report.supported(dtype) >= 0.9 * report.tried(dtype), str(report)


def _window_one_wider(problem: Any) -> Any:
    """A wrong wrapper: ``local_window_size=(W, 0)`` for refattn's ``window=W``, one key
    more than the W it keeps (JAX's left reach counts keys before the query)."""
    if problem.window is None:
        return jax_attention.jax_dot_product_attention(problem)
    wider = dataclasses.replace(problem, window=problem.window + 1)
    return jax_attention.jax_dot_product_attention(wider)


def test_a_wrong_wrapper_around_jax_fails() -> None:
    report = check_attention(_window_one_wider, features=("causal", "window"), seed=0,
                             max_examples=60)  # fmt: skip
    assert not report.passed and report.failures, str(report)
    assert "window" in report.failures[0].features


def test_the_probe_measures_jax_conventions() -> None:
    """Called directly: ``is_causal`` is top-left (``tril(ones(T, S))``), a row with no key
    gets the mean of the values (hidden logits are a large negative number, not -inf),
    ``local_window_size=(2, 0)`` keeps the query and 2 keys before it, and q·k is formed
    with a float32 result."""
    measured = jax_attention.IMPLEMENTATIONS[0].probe()  # type: ignore[misc]
    assert measured == {
        "alignment": "top-left",
        "empty_row": "mean of V",
        "window": "local_window_size=(2, 0) keeps q-2 .. q (3 keys)",
        "lse": "natural log, float32",
        "scores": "float32 or wider",
    }


def test_the_cudnn_adapter_is_unavailable_without_a_gpu() -> None:
    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("a GPU is here")
    report = check_attention(jax_attention.jax_dot_product_attention_cudnn,
                             dtypes=["float16"], max_examples=5, seed=0)  # fmt: skip
    assert report.unavailable == "JAX's cudnn attention needs a CUDA GPU"
