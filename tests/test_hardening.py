"""Hardening: what no query sees stays out of the results, bad arguments are named, caches
keep their own state to themselves, and ``python -m refattn`` runs the command line.

Each test states one property the library holds and would fail if it did not.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import pytest

from refattn import attention, attention_blockwise, attention_split_kv

FORMS: dict[str, Callable[..., Any]] = {
    "attention": attention,
    "blockwise": partial(attention_blockwise, block_q=2, block_k=3),
    "split_kv": partial(attention_split_kv, num_splits=3),
}
NOT_FINITE = {"+inf": np.inf, "-inf": -np.inf, "nan": np.nan}


def seen_by(q_pos: np.ndarray, k_pos: np.ndarray, *, causal: bool, window: int | None) -> Any:
    """(B, Sq, Sk): which key each query sees, written out from the definition."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    seen = (k >= 0) & (~causal | (k <= q))
    return seen & (q - k < window) if window is not None else seen


# -- 1. inf and NaN in slots no query sees: no warning, no effect ------------------------------

#: (B, Sq) query positions and (B, Sk) key positions per layout; each hides some slots from
#: every query of its row in its own way, and the hidden slots sit between seen ones.
HIDDEN: dict[str, dict[str, Any]] = {
    "empty slots": dict(
        k_pos=[[0, -1, 1, 2, 3, -1, 4, 5, 6], [0, 1, -1, 2, -1, 3, 4, -1, 5]],
        q_pos=[[4, 5, 6], [3, 4, 5]], causal=False, window=None,
    ),
    "after every causal query": dict(
        k_pos=[[0, 8, 1, 2, 3, 7, 4, 5, 6], [6, 0, 7, 1, 2, 8, 3, 4, 5]],
        q_pos=[[4, 5, 6], [3, 4, 5]], causal=True, window=None,
    ),
    "outside every window": dict(
        k_pos=[[0, 3, 1, 4, 2, 5, 6, 7, 8], [8, 0, 3, 1, 4, 2, 5, 6, 7]],
        q_pos=[[6, 7, 8], [5, 6, 7]], causal=True, window=2,
    ),
}  # fmt: skip


def hidden_problem(layout: str) -> tuple[dict[str, Any], dict[str, Any], np.ndarray]:
    """q, k, v (B=2, Hq=4, Hkv=2, Dv != D), the options, and (B, Sk): slots no query sees."""
    spec = HIDDEN[layout]
    q_pos, k_pos = np.array(spec["q_pos"]), np.array(spec["k_pos"])
    rng = np.random.default_rng(1)
    arrays = {"q": rng.standard_normal((2, 4, 3, 4)), "k": rng.standard_normal((2, 2, 9, 4)),
              "v": rng.standard_normal((2, 2, 9, 3))}  # fmt: skip
    options = dict(q_pos=q_pos, k_pos=k_pos, causal=spec["causal"], window=spec["window"])
    hidden = ~seen_by(q_pos, k_pos, causal=spec["causal"], window=spec["window"]).any(axis=1)
    assert hidden.any() and not hidden.all(axis=1).any()
    return arrays, options, hidden


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bad", NOT_FINITE)
@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("layout", HIDDEN)
def test_inf_and_nan_in_slots_no_query_sees_change_nothing_and_raise_no_warning(
    form: str, bad: str, where: str, layout: str
) -> None:
    arrays, options, hidden = hidden_problem(layout)
    fn = FORMS[form]
    expected_out, expected_lse = fn(**arrays, **options, return_lse=True)
    poisoned = {**arrays, where: arrays[where].copy()}
    poisoned[where][np.nonzero(hidden)[0], :, np.nonzero(hidden)[1], :] = NOT_FINITE[bad]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = fn(**poisoned, **options, return_lse=True)
    np.testing.assert_allclose(out, expected_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("library", ["array_api_strict", "torch"])
def test_slots_no_query_sees_change_nothing_on_the_other_array_libraries(
    form: str, library: str
) -> None:
    """The same, with +inf in the keys and NaN in the values, on a namespace other than NumPy."""
    module = pytest.importorskip(library)
    arrays, options, hidden = hidden_problem("outside every window")
    poisoned = {n: x.copy() for n, x in arrays.items()}
    rows, slots = np.nonzero(hidden)
    poisoned["k"][rows, :, slots, :], poisoned["v"][rows, :, slots, :] = np.inf, np.nan

    def run(given: dict[str, np.ndarray]) -> np.ndarray:
        positions = {n: options[n] for n in ("q_pos", "k_pos")}
        on = {n: module.asarray(x) for n, x in {**given, **positions}.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = FORMS[form](**on, causal=options["causal"], window=options["window"])
        return np.asarray(out)

    np.testing.assert_allclose(run(poisoned), run(arrays), rtol=1e-12, atol=1e-12)


# -- 2. gradients: what a query does not see does not reach its gradient -----------------------

#: Self-attention over 8 tokens, one slot (``bad``) made not finite. ``loss`` are the queries
#: the loss is taken over, none of which sees ``bad``; ``clean`` are the slots whose every
#: viewer is among them (a query that sees ``bad`` has a NaN output, and the backward
#: multiplies its zero output gradient by it: 0 * NaN is NaN at every slot it sees).
#: ``seen``: some query does see ``bad``. A blockwise pass then carries that query's NaN
#: running state back into every key block it read before (the rescale e^(m - m') is NaN),
#: so there its k and v gradients are clean only in the one-pass form; q's are in every form.
UNSEEN: dict[str, dict[str, Any]] = {
    "an empty slot no query sees": dict(k_pos=[0, 1, 2, 3, 4, 5, 6, -1], window=None, bad=7,
                                        loss=range(8), clean=range(8), seen=False),
    "a slot after every causal query": dict(k_pos=[0, 1, 2, 3, 4, 5, 6, 7], q_pos=[2, 3, 4],
                                            window=None, bad=6, loss=range(3), clean=range(8),
                                            seen=False),
    "a slot outside every window": dict(k_pos=[0, 1, 2, 3, 4, 5, 6, 7], q_pos=[5, 6, 7],
                                        window=2, bad=1, loss=range(3), clean=range(8),
                                        seen=False),
    "a slot that later queries see": dict(k_pos=[0, 1, 2, 3, 4, 5, 6, 7], window=3, bad=5,
                                          loss=range(5), clean=range(3), seen=True),
}  # fmt: skip


def _gradients(
    fn: Callable[..., Any], arrays: dict[str, np.ndarray], layout: dict[str, Any]
) -> Any:
    """Gradients of q, k, v (float64 torch) of the sum of the outputs of ``layout["loss"]``."""
    torch = pytest.importorskip("torch")
    tensors = {n: torch.tensor(x, requires_grad=True) for n, x in arrays.items()}
    positions = {n: torch.tensor(layout[n]) for n in ("q_pos", "k_pos") if n in layout}
    out = fn(**tensors, **positions, causal=True, window=layout["window"])  # (1, Hq, Sq, Dv)
    out[:, :, list(layout["loss"]), :].sum().backward()
    return {n: t.grad.numpy() for n, t in tensors.items()}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bad", NOT_FINITE)
@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("name", UNSEEN)
def test_inf_and_nan_a_query_does_not_see_leave_its_gradient_finite_and_unchanged(
    form: str, bad: str, where: str, name: str
) -> None:
    pytest.importorskip("torch")
    layout = UNSEEN[name]
    Sq = len(layout.get("q_pos", layout["k_pos"]))
    rng = np.random.default_rng(2)
    arrays = {"q": rng.standard_normal((1, 2, Sq, 4)), "k": rng.standard_normal((1, 1, 8, 4)),
              "v": rng.standard_normal((1, 1, 8, 3))}  # fmt: skip
    poisoned = {**arrays, where: arrays[where].copy()}
    poisoned[where][:, :, layout["bad"], :] = NOT_FINITE[bad]
    expected = _gradients(FORMS[form], arrays, layout)
    got = _gradients(FORMS[form], poisoned, layout)
    loss = list(layout["loss"])
    clean = list(layout["clean"]) if form == "attention" or not layout["seen"] else []
    assert np.isfinite(got["q"][:, :, loss]).all()
    np.testing.assert_allclose(got["q"][:, :, loss], expected["q"][:, :, loss], atol=1e-12)
    for n in ("k", "v"):
        np.testing.assert_allclose(got[n][:, :, clean], expected[n][:, :, clean], atol=1e-12)
