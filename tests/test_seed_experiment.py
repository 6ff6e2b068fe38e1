"""The seed experiment's claims as properties: a KV cache changes the rounding, never the answer.

The experiment lives in ``examples/``, outside the package, so it is loaded from
its file; the installed package has no ``examples/`` and skips this module.

Tolerance: the cached run is a second correct implementation of the layer, so
the project's cross-implementation rule applies (``refattn.testing.tolerance``):
against a float64 reference on the same rounded weights and inputs, the cached
run's error may be at most ``k`` times the full pass's own error plus ``atol``
at the scale of the outputs. In float64 the reference is the full pass itself
and the rule reduces to ``atol``.
"""

from __future__ import annotations

import doctest
import importlib.util
import sys
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from refattn.testing.tolerance import TOLERANCES, UNIT_ROUNDOFF, finite_max_abs, max_abs_error

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "seed_experiment.py"
if not EXAMPLE.is_file():
    pytest.skip("the examples are not installed with the package", allow_module_level=True)


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("seed_experiment", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


experiment = _load(EXAMPLE)
Layer = Any  # experiment.CausalSelfAttention, a class of a module loaded at run time


@st.composite
def layers(draw: st.DrawFn) -> Layer:
    """A small layer: 1 to 4 heads of width 1 to 8, float32 or float64."""
    n_head = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([1, 3, 8]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return experiment.CausalSelfAttention.random(rng, n_head * head_dim, n_head, dtype)


@st.composite
def sequences(draw: st.DrawFn, layer: Layer, max_len: int = 10) -> np.ndarray:
    """(B, T, C) inputs, 1 <= T <= max_len, at a scale from small to large scores."""
    B, T = draw(st.integers(1, 2)), draw(st.integers(1, max_len))
    scale = draw(st.sampled_from([0.1, 1.0, 4.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return (scale * rng.standard_normal((B, T, layer.d_model))).astype(layer.dtype)


def allowed_difference(layer: Layer, x: np.ndarray) -> tuple[np.ndarray, float]:
    """The float64 reference of the layer on x, and how far a correct run may be from it
    (the outputs' scale standing in for the rule's max|v|: c_proj mixes the values)."""
    reference = experiment.attention_layer_full(layer.astype(np.float64), x.astype(np.float64))
    full_error = max_abs_error(experiment.attention_layer_full(layer, x), reference)
    rule = TOLERANCES[np.dtype(layer.dtype).name]
    return reference, rule.allowed(full_error, finite_max_abs(reference))


@given(layer=layers(), data=st.data())
def test_decoding_through_a_static_cache_equals_full_causal_attention(
    layer: Layer, data: st.DataObject
) -> None:
    """Any prefill length 0..T, then a token per step, gives the full pass's outputs."""
    x = data.draw(sequences(layer), label="x")
    prefill = data.draw(st.integers(0, x.shape[1]), label="prefill")
    cached = experiment.decode_with_cache(layer, x, prefill)
    reference, allowed = allowed_difference(layer, x)
    assert cached.shape == x.shape and cached.dtype == layer.dtype
    assert max_abs_error(cached, reference) <= allowed


@given(layer=layers(), data=st.data())
def test_decoding_more_tokens_never_changes_earlier_outputs_or_cached_keys(
    layer: Layer, data: st.DataObject
) -> None:
    """Bitwise: what a cached run emitted for token t, and the k and v it cached for it,
    stay exactly as they were however many tokens come after."""
    x = data.draw(sequences(layer, max_len=12), label="x")
    tokens = data.draw(st.integers(1, x.shape[1]), label="tokens")
    prefill = data.draw(st.integers(0, tokens), label="prefill")
    outputs_kept, cache_kept = experiment.earlier_outputs_kept(layer, x, tokens, prefill)
    assert outputs_kept
    assert cache_kept


@given(layer=layers(), data=st.data())
def test_full_pass_over_a_prefix_equals_its_first_rows_to_rounding(
    layer: Layer, data: st.DataObject
) -> None:
    """Causality without a cache: later tokens do not move earlier rows, beyond rounding
    (not bitwise: a shorter product's rows may be rounded differently)."""
    x = data.draw(sequences(layer), label="x")
    t = data.draw(st.integers(1, x.shape[1]), label="t")
    prefix = experiment.attention_layer_full(layer, x[:, :t])
    reference, allowed = allowed_difference(layer, x)
    assert max_abs_error(prefix, reference[:, :t]) <= allowed


@given(
    a=st.sampled_from([np.float32, np.float64]).flatmap(
        lambda dtype: arrays(dtype, st.integers(0, 300), elements=st.floats(-1e6, 1e6, width=32))
    )
)
def test_pairwise_sum_reproduces_numpy_sum_bitwise(a: np.ndarray) -> None:
    """The order the experiment credits np.sum with is np.sum's order, to the last bit."""
    assert experiment.pairwise_sum(a) == np.sum(a)


@given(
    order=st.sampled_from(sorted(experiment.ORDERS)),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 40),
)
def test_every_order_tried_is_the_dot_product_to_rounding(
    order: str, dtype: type, seed: int, n: int
) -> None:
    """Each candidate order is a dot product: within n units of roundoff of the exact one,
    relative to sum |a_d b_d|, the bound for summing n terms in any order (Higham, 3.1)."""
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((2, n)).astype(dtype)
    exact = sum(Fraction(float(a_d)) * Fraction(float(b_d)) for a_d, b_d in zip(a, b, strict=True))
    error = abs(Fraction(float(experiment.dot_in_order(a, b, order))) - exact)
    bound = n * UNIT_ROUNDOFF[np.dtype(dtype).name] * float(np.abs(a) @ np.abs(b))
    assert float(error) <= bound * (1 + 1e-6)


@given(s=st.integers(1, 10_000), d_model=st.integers(1, 4096))
def test_a_full_pass_over_s_tokens_costs_s_decode_steps(s: int, d_model: int) -> None:
    assert experiment.flops_full_pass(s, d_model) == s * experiment.flops_cached_step(s, d_model)


def test_docstring_examples_run() -> None:
    failed, attempted = doctest.testmod(experiment, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert attempted > 0 and failed == 0


SMALL = ["--d-model", "8", "--heads", "2", "--max-len", "16", "--repeats", "1"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--tokens", "6", *SMALL],
        ["--tokens", "1", *SMALL, "--dtype", "float64"],
    ],
    ids=["float32-T6", "float64-T1"],
)
def test_main_runs_and_prints_the_four_parts_and_the_cost_table(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    experiment.main(argv)
    out = capsys.readouterr().out
    for part in ("(a)", "(b)", "(c)", "(d)"):
        assert part in out
    assert "np.allclose(cached, full" in out and "): True" in out
    table = out[out.index("(d)") :].splitlines()[2:]
    max_len = int(argv[argv.index("--max-len") + 1])
    assert [int(row.split()[0]) for row in table] == experiment.sweep_positions(max_len)


def test_plot_is_written_or_skipped_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cost.png"
    experiment.main(["--tokens", "4", *SMALL, "--plot", str(path)])
    out = capsys.readouterr().out
    assert path.is_file() or "matplotlib is not installed" in out
