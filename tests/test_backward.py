r"""``attention_backward`` and its blockwise form, against the loop oracle's gradients.

The loop oracle's gradients (:mod:`refattn.testing.oracle_backward`) are held
to central differences of the loop oracle's own forward; the spec's are held
to the loop oracle's on every backend and dtype, to ``torch.autograd``
through :func:`refattn.attention`, and to each other (blockwise against
plain, with and without the forward's saved ``out`` and ``lse``).

The allowed error of a gradient :math:`g` (:data:`TOLERANCES`, the one place
it is stated) follows from where its rounding errors come from. Each
gradient is a sum of products (:math:`dq_i = \text{scale} \sum_j P_{ij}
(dP_{ij} - D_i) k_j`, ...), so its rounding error is a few roundoffs of the
compute dtype times the same sum with every term replaced by its absolute
value, :math:`A_g` (:func:`gradient_sizes`), and the scores' own error,
about a roundoff times the largest score, moves every weight by that
relative amount. Then the gradient is rounded to its dtype once:

.. math::

    \max |g - g_{\text{oracle}}| \le \big(c\, u_c (1 + \max|s|) + o\, u_t\big)
        \max A_g + \text{floor}_t

with :math:`c = 8` (the largest error measured over some 850 drawn problems on
NumPy and torch was :math:`0.77\, u_c (1 + \max|s|) \max A_g`, in float64),
:math:`o = 2` (the cast rounds each element by at most :math:`u_t`), and as
the floor the smallest subnormal of the gradient's dtype plus the smallest
normal of the compute dtype: a result that underflows keeps an absolute
accuracy only (a float16 gradient of 1e-11 comes back 0). Taken relative to
:math:`A_g` rather than to :math:`|g|`, the bound allows what cancellation
costs (a row nearly one-hot has :math:`dP_{ij} - D_i \approx 0`) and nothing
more: a gradient without the softmax's :math:`-D_i`, or without the softcap's
factor, fails it (:func:`test_the_tolerance_rejects_a_gradient_that_drops_a_term`).
A saved ``out`` in float16 or bfloat16 is rounded to the dtype, which moves
:math:`D`: where one is given, that is allowed on top (``allowed_errors(...,
saved=True)``).

Long rows (``long``, ``tiles``: 15 to 4096 keys)
are left to the forward's tests: the loop oracle is slow on them. NaN in
slots some queries see (``seen_nan``) is left out: the gradients it reaches
are NaN on both sides, and the ones it does not are what ``unseen_nan``
checks.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

import refattn.backward
from refattn import attention, attention_backward, attention_backward_blockwise
from refattn.backends import Case, cases, get
from refattn.backends.base import round_to
from refattn.namespace import compute_dtype_name
from refattn.testing.drawing import ALL_FEATURES
from refattn.testing.oracle import oracle_attention
from refattn.testing.oracle_backward import (
    OracleGradients,
    central_difference_gradients,
    oracle_attention_backward,
)
from refattn.testing.problems import ProblemSpec, build_problem, seen_slots
from refattn.testing.strategies import attention_specs
from refattn.testing.tolerance import UNIT_ROUNDOFF, finite_max_abs

#: The gradients, in the order of :class:`refattn.Gradients`.
NAMES = ("dq", "dk", "dv", "dsink_logits", "dbias")
#: The input each gradient is taken with respect to.
INPUT_OF = {"dq": "q", "dk": "k", "dv": "v", "dsink_logits": "sink_logits", "dbias": "bias"}
#: Every option of the spec, on rows short enough for the loop oracle (see the module
#: docstring for what is left out and why).
SPEC = ALL_FEATURES - {"long", "tiles", "seen_nan", "no_queries"}
#: Central differences: every option on tiny problems (:func:`tiny_specs`), scores of order
#: 1 to 30 (logits near 1e4 would need a step of their own).
DIFFERENCED = ALL_FEATURES - {"long", "tiles", "seen_nan", "large_logits", "mqa", "latent",
                              "no_queries"}  # fmt: skip
#: The bound on central differences of the loop oracle's forward, with its relative step of
#: 1e-6: |fd - g| <= FD_BOUND * max(1, |g|) per element. Its truncation (h^2 |L'''| / 6) and
#: rounding (eps |L| / h) came to at most 2.8e-9 over 1400 drawn problems: a margin of 35.
FD_BOUND = 1e-7


class GradientTolerance(NamedTuple):
    """``compute * (1 + max|s|) * A + output * A + floor``: the module docstring's bound."""

    compute: float  #: c u_c: the roundoffs of the compute dtype per unit of A and of score
    output: float  #: o u_t: the final cast to the gradient's dtype
    floor: float  #: what underflow may cost, absolutely

    def allowed(self, size: float, score_size: float) -> float:
        return (self.compute * (1.0 + score_size) + self.output) * size + self.floor


#: Each dtype's smallest subnormal: the absolute error of a result that underflows.
SUBNORMAL = {"float64": 2.0**-1074, "float32": 2.0**-149, "float16": 2.0**-24,
             "bfloat16": 2.0**-133}  # fmt: skip
#: The smallest normal of the compute dtypes: below it a product keeps no relative accuracy.
NORMAL = {"float64": 2.0**-1022, "float32": 2.0**-126}


def _tolerance(dtype: str) -> GradientTolerance:
    compute = compute_dtype_name(dtype)
    return GradientTolerance(compute=8 * UNIT_ROUNDOFF[compute], output=2 * UNIT_ROUNDOFF[dtype],
                             floor=SUBNORMAL[dtype] + NORMAL[compute])  # fmt: skip


#: The allowed error per dtype, by :class:`GradientTolerance`.
TOLERANCES = {dtype: _tolerance(dtype) for dtype in ("float64", "float32", "float16", "bfloat16")}


@st.composite
def tiny_specs(draw: st.DrawFn) -> ProblemSpec:
    """Every option of :data:`DIFFERENCED` on at most 2 rows, 2 KV heads of 2 query heads,
    1 to 3 queries, 2 to 4 key slots and head dims 1 to 3: a few hundred elements to
    difference. At least two slots, since over one key :math:`dS = P (dP - D) = 0` and
    dq and dk would test nothing."""
    spec = draw(attention_specs(DIFFERENCED, max_len=4))
    kv_heads = min(spec.kv_heads, 2)
    groups = min(spec.q_heads // spec.kv_heads, 2)
    return replace(
        spec, batch=min(spec.batch, 2), kv_heads=kv_heads, q_heads=kv_heads * groups,
        head_dim=draw(st.integers(1, 3)), value_dim=draw(st.integers(1, 3)),
        q_len=draw(st.integers(1, 3)), k_len=draw(st.integers(2, 4)),
    )  # fmt: skip


def output_gradient(spec: ProblemSpec) -> np.ndarray:
    """dO of shape (B, Hq, Sq, Dv), standard normal, from the spec's seed."""
    rng = np.random.default_rng([spec.seed, 1])
    return rng.standard_normal((spec.batch, spec.q_heads, spec.q_len, spec.value_dim))


def gradient_sizes(
    arrays: dict[str, Any], scalars: dict[str, Any], dout: np.ndarray,
    saved_in: str | None = None,
) -> tuple[dict[str, float], float]:  # fmt: skip
    """:math:`\\max A_g` for each gradient, and :math:`\\max |s|`: what rounding errors scale with.

    :math:`A_g` is the gradient's sum with every term by its absolute value:
    :math:`|dS|_{ij} = P_{ij} (\\sum_d |dO_{id}| |v_{jd}| + \\sum_d |dO_{id} o_{id}|)`,
    :math:`A_{dq} = \\text{scale} \\sum_j |dS|_{ij} |k_j|`, :math:`A_{dk} =
    \\text{scale} \\sum_{g, i} |dS|_{ij} |q_i|`, :math:`A_{dv} = \\sum_{g, i} P_{ij}
    |dO_i|`, :math:`A_{d\\sigma} = \\sum_{b, i} e^{\\sigma - \\text{lse}_i} |D|_i` and
    :math:`A_{d\\text{bias}} = |dS|` summed over the bias's broadcast axes (the
    softcap's factor, at most 1, is left at 1). :math:`\\max |s|` bounds the scores:
    :math:`\\text{scale} \\max \\sum_d |q_{id}| |k_{jd}|` plus ALiBi's reach, the bias and the
    sink. ``arrays`` are float64; the slots no query sees (which may hold NaN) weigh 0.

    With ``saved_in`` (a dtype), the sizes are instead what rounding the saved out to that
    dtype moves each gradient by: :math:`|D|_i` becomes its error, :math:`\\sum_d |dO_{id}|
    (u_t |o_{id}| + \\text{subnormal}_t)`, and :math:`|dP|` is 0 (dP reads no out).
    """
    out, lse, p = oracle_attention(**arrays, **scalars, return_weights=True)
    q = arrays["q"]
    B, Hq, _, D = q.shape
    Hkv = arrays["k"].shape[1]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scalars.get("scale") is None else abs(scalars["scale"])
    k, v = (np.repeat(np.nan_to_num(arrays[n], posinf=0.0, neginf=0.0), G, axis=1)
            for n in ("k", "v"))  # fmt: skip
    abs_dp = np.abs(dout) @ np.swapaxes(np.abs(v), -1, -2)  # (B, Hq, Sq, Sk)
    abs_delta = np.sum(np.abs(dout * out), axis=-1)  # (B, Hq, Sq)
    if saved_in is not None:
        out_error = UNIT_ROUNDOFF[saved_in] * np.abs(out) + SUBNORMAL[saved_in]
        abs_dp, abs_delta = 0 * abs_dp, np.sum(np.abs(dout) * out_error, axis=-1)
    abs_ds = p * (abs_dp + abs_delta[..., None])  # (B, Hq, Sq, Sk)

    def per_key(w: np.ndarray, x: np.ndarray) -> np.ndarray:  # sum over a group's queries
        keyed = np.swapaxes(w, -1, -2) @ x  # (B, Hq, Sk, Dx)
        return keyed.reshape(B, Hkv, G, *keyed.shape[2:]).sum(axis=2)

    sizes = {
        "dq": scale * abs_ds @ np.abs(k),
        "dk": scale * per_key(abs_ds, np.abs(q)),
        "dv": per_key(p, np.abs(dout)) * (saved_in is None),
    }
    if "sink_logits" in arrays:
        with np.errstate(over="ignore"):  # a row with no key and no sink: lse = -inf, |D| = 0
            sink_weight = np.exp(arrays["sink_logits"][None, :, None] - lse)
        sizes["dsink_logits"] = np.sum(np.nan_to_num(sink_weight * abs_delta), axis=(0, 2))
    if "bias" in arrays:
        shape = arrays["bias"].shape
        padded = (1,) * (4 - len(shape)) + shape
        sizes["dbias"] = np.sum(abs_ds, axis=tuple(a for a in range(4) if padded[a] == 1))
    score_size = scale * float((np.abs(q) @ np.swapaxes(np.abs(k), -1, -2)).max(initial=0.0))
    if "alibi_slopes" in arrays:
        reach = np.abs(arrays["q_pos"][:, :, None] - arrays["k_pos"][:, None, :]).max(initial=0)
        score_size += finite_max_abs(arrays["alibi_slopes"]) * float(reach)
    score_size += sum(finite_max_abs(arrays[n]) for n in ("bias", "sink_logits") if n in arrays)
    return {n: float(a.max(initial=0.0)) for n, a in sizes.items()}, score_size


def allowed_errors(
    arrays: dict[str, Any], scalars: dict[str, Any], dout: np.ndarray, dtype: str,
    saved: bool = False,
) -> dict[str, float]:  # fmt: skip
    """The bound of :data:`TOLERANCES` on each gradient, for inputs rounded to ``dtype``; with
    ``saved``, and twice what rounding a saved out to ``dtype`` may move it (nothing in float32
    and float64, whose saved out is the one the backward would compute)."""
    sizes, score_size = gradient_sizes(arrays, scalars, dout)
    rule = TOLERANCES[dtype]
    allowed = {n: rule.allowed(size, score_size) for n, size in sizes.items()}
    if saved and compute_dtype_name(dtype) != dtype:
        moved, _ = gradient_sizes(arrays, scalars, dout, saved_in=dtype)
        allowed = {n: bound + 2 * moved[n] for n, bound in allowed.items()}
    return allowed


def max_error(a: np.ndarray, b: np.ndarray) -> float:
    """``max |a - b|``; a NaN or inf on either side is an infinite error."""
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.size == 0:
        return 0.0
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.inf
    return float(np.max(np.abs(a - b)))


def assert_close(
    got: dict[str, np.ndarray | None], expected: dict[str, np.ndarray | None],
    allowed: dict[str, float], factor: float = 1.0,
) -> None:  # fmt: skip
    """Each gradient within ``factor`` times its allowed error; None exactly where expected."""
    for name in NAMES:
        a, b = got[name], expected[name]
        assert (a is None) == (b is None), f"{name}: {a is None=} but {b is None=}"
        if a is None or b is None:
            continue
        error, bound = max_error(a, b), factor * allowed[name]
        assert error <= bound, f"{name}: max error {error:.3g} > allowed {bound:.3g}"


def of_oracle(g: OracleGradients) -> dict[str, np.ndarray | None]:
    return {n: getattr(g, n) for n in NAMES}


def on_backend(case: Case, x: np.ndarray) -> Any:
    return case.backend.asarray(x, dtype=case.dtype, device=case.device)


def as_numpy(case: Case, g: Any) -> dict[str, np.ndarray | None]:
    """A :class:`refattn.Gradients` as float64 NumPy (None kept)."""
    return {
        n: None if getattr(g, n) is None else case.backend.to_numpy(getattr(g, n)).astype(float)
        for n in NAMES
    }


def spec_gradients(
    case: Case, arrays: dict[str, Any], scalars: dict[str, Any], dout: np.ndarray,
    fn: Any = attention_backward, **extra: Any,
) -> Any:  # fmt: skip
    """``fn`` (a form of ``attention_backward``) on the case's backend and dtype."""
    on = {n: on_backend(case, x) for n, x in arrays.items()}
    q, k, v = on.pop("q"), on.pop("k"), on.pop("v")
    return fn(q, k, v, on_backend(case, dout), **on, **scalars, **extra)


def rounded_problem(
    spec: ProblemSpec, dtype: str
) -> tuple[dict[str, Any], dict[str, Any], np.ndarray]:
    """The arrays, scalars and dO of ``spec``, rounded to ``dtype`` and held as float64."""
    problem = build_problem(spec)
    dout = round_to(output_gradient(spec), dtype).astype(np.float64)
    return problem.rounded(dtype), problem.scalars(), dout


# -- the loop oracle against its own forward ---------------------------------------------


@settings(max_examples=50)
@given(spec=tiny_specs())
def test_the_oracles_gradients_equal_central_differences_of_its_forward(spec: ProblemSpec) -> None:
    arrays, scalars, dout = rounded_problem(spec, "float64")
    exact = oracle_attention_backward(dout=dout, **arrays, **scalars)
    differenced = central_difference_gradients(dout=dout, **arrays, **scalars)
    for name in NAMES:
        g, fd = getattr(exact, name), getattr(differenced, name)
        assert (g is None) == (fd is None), name
        if g is None or fd is None:
            continue
        assert np.isfinite(g).all(), name  # NaN or inf in unseen slots reaches nothing
        bound = FD_BOUND * np.maximum(1.0, np.abs(g))
        assert np.all(np.abs(fd - g) <= bound), f"{name}: {np.max(np.abs(fd - g)):.3g}"


# -- the spec against the loop oracle, on every backend ---------------------------------


@settings(max_examples=40)
@given(spec=attention_specs(SPEC, max_len=8))
def test_attention_backward_equals_the_oracle_for_every_option(
    case: Case, spec: ProblemSpec
) -> None:
    arrays, scalars, dout = rounded_problem(spec, case.dtype)
    expected = of_oracle(oracle_attention_backward(dout=dout, **arrays, **scalars))
    got = as_numpy(case, spec_gradients(case, arrays, scalars, dout))
    allowed = allowed_errors(arrays, scalars, dout, case.dtype)
    note(f"allowed: {allowed}")
    assert_close(got, expected, allowed)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("dropped", ["the softmax's -D", "the softcap's factor"])
def test_the_tolerance_rejects_a_gradient_that_drops_a_term(
    monkeypatch: pytest.MonkeyPatch, dtype: str, dropped: str
) -> None:
    """The spec passes the comparison above on this problem, and fails it with one term of the
    chain rule taken out."""
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    spec = ProblemSpec(batch=2, q_heads=4, kv_heads=2, q_len=5, k_len=6, head_dim=8,
                       value_dim=8, causal=True, softcap=5.0, seed=3)  # fmt: skip
    arrays, scalars, dout = rounded_problem(spec, dtype)
    case = Case(get("numpy"), "cpu", dtype)
    expected = of_oracle(oracle_attention_backward(dout=dout, **arrays, **scalars))
    allowed = allowed_errors(arrays, scalars, dout, dtype)
    assert_close(as_numpy(case, spec_gradients(case, arrays, scalars, dout)), expected, allowed)
    if dropped == "the softmax's -D":
        monkeypatch.setattr(
            refattn.backward,
            "row_dot",
            lambda xp, dout, out: 0 * xp.sum(dout * out, axis=-1, keepdims=True),
        )
    else:
        score_terms = refattn.backward.score_terms
        monkeypatch.setattr(
            refattn.backward, "score_terms", lambda *args: (*score_terms(*args)[:2], None)
        )
    wrong = as_numpy(case, spec_gradients(case, arrays, scalars, dout))
    with pytest.raises(AssertionError, match="max error"):
        assert_close(wrong, expected, allowed)


@settings(max_examples=60)
@given(spec=attention_specs(SPEC, max_len=8), dtype=st.sampled_from(["float64", "float32"]))
def test_attention_backward_equals_torch_autograd_through_attention(
    spec: ProblemSpec, dtype: str
) -> None:
    torch = pytest.importorskip("torch")
    case = Case(get("torch"), "cpu", dtype)
    arrays, scalars, dout = rounded_problem(spec, dtype)
    on = {n: on_backend(case, x) for n, x in arrays.items()}
    leaves = {n: on[x].requires_grad_() for n, x in INPUT_OF.items() if x in on}
    out = attention(**on, **scalars)
    assert isinstance(out, torch.Tensor)
    (out * on_backend(case, dout)).sum().backward()
    by_autograd: dict[str, np.ndarray | None] = dict.fromkeys(NAMES)
    for name, leaf in leaves.items():
        assert leaf.grad is not None, f"autograd gave {INPUT_OF[name]} no gradient"
        by_autograd[name] = leaf.grad.double().numpy()
    got = as_numpy(case, spec_gradients(case, arrays, scalars, dout))
    # Each is within the allowed error of the truth, so of each other within twice that.
    assert_close(got, by_autograd, allowed_errors(arrays, scalars, dout, dtype), factor=2.0)


# -- the spec against itself --------------------------------------------------------------


def test_blockwise_runs_on_array_api_strict() -> None:
    xp = pytest.importorskip("array_api_strict")
    q = xp.zeros((1, 1, 1, 2))
    g = attention_backward_blockwise(q, q, q, q)
    assert np.all(np.from_dlpack(g.dq) == 0)


@settings(max_examples=30)
@given(spec=attention_specs(SPEC, max_len=8), saved=st.booleans(), data=st.data())
def test_blockwise_equals_plain_for_any_block_sizes_with_or_without_the_saved_forward(
    case: Case, spec: ProblemSpec, saved: bool, data: st.DataObject
) -> None:
    block_q = data.draw(st.integers(1, spec.q_len + 2), label="block_q")
    block_k = data.draw(st.integers(1, spec.k_len + 2), label="block_k")
    arrays, scalars, dout = rounded_problem(spec, case.dtype)
    extra: dict[str, Any] = {}
    if saved:
        on = {n: on_backend(case, x) for n, x in arrays.items()}
        extra["out"], extra["lse"] = attention(**on, **scalars, return_lse=True)
    plain = as_numpy(case, spec_gradients(case, arrays, scalars, dout))
    tiled = as_numpy(case, spec_gradients(case, arrays, scalars, dout, attention_backward_blockwise,
                                          block_q=block_q, block_k=block_k, **extra))  # fmt: skip
    allowed = allowed_errors(arrays, scalars, dout, case.dtype, saved=saved)
    assert_close(tiled, plain, allowed, factor=2.0)


@settings(max_examples=25)
@given(spec=attention_specs(SPEC, max_len=8))
def test_the_saved_out_and_lse_give_the_gradients_the_forward_would(
    case: Case, spec: ProblemSpec
) -> None:
    """Identical in float32 and float64 (the forward inside is ``attention``'s); in float16 and
    bfloat16 the saved out is rounded to the dtype, which moves D by its roundoff."""
    arrays, scalars, dout = rounded_problem(spec, case.dtype)
    on = {n: on_backend(case, x) for n, x in arrays.items()}
    out, lse = attention(**on, **scalars, return_lse=True)
    given_saved = as_numpy(case, spec_gradients(case, arrays, scalars, dout, out=out, lse=lse))
    recomputed = as_numpy(case, spec_gradients(case, arrays, scalars, dout))
    if case.dtype in ("float64", "float32"):
        for name in NAMES:
            a, b = given_saved[name], recomputed[name]
            assert (a is None) == (b is None), name
            if a is not None:
                np.testing.assert_array_equal(a, b, err_msg=name)
    else:
        allowed = allowed_errors(arrays, scalars, dout, case.dtype, saved=True)
        assert_close(given_saved, recomputed, allowed)


@settings(max_examples=25)
@given(spec=attention_specs(SPEC, max_len=8), data=st.data())
def test_rows_with_no_visible_key_give_zero_dq_and_contribute_nothing(
    case: Case, spec: ProblemSpec, data: st.DataObject
) -> None:
    """Queries moved before every key (causal, at position -5): their dq and dbias are 0, and
    dO there may be anything without changing any other gradient, bit for bit."""
    hidden = np.array(data.draw(st.lists(st.booleans(), min_size=spec.q_len,
                                         max_size=spec.q_len), label="hidden"))  # fmt: skip
    arrays, scalars, dout = rounded_problem(spec, case.dtype)
    arrays["q_pos"] = np.where(hidden[None, :], -5, arrays["q_pos"])
    scalars = {**scalars, "causal": True}
    other = np.where(hidden[None, None, :, None], 1e3 * dout[..., ::-1] + 7.0, dout)
    first = as_numpy(case, spec_gradients(case, arrays, scalars, dout))
    other = round_to(other, case.dtype).astype(np.float64)
    second = as_numpy(case, spec_gradients(case, arrays, scalars, other))
    dq, dbias = first["dq"], first["dbias"]
    assert dq is not None and np.all(dq[:, :, hidden] == 0)
    if dbias is not None and dbias.shape[-2] == spec.q_len:
        assert np.all(dbias[..., hidden, :] == 0)
    for name in NAMES:
        a, b = first[name], second[name]
        if a is not None and b is not None:
            assert np.isfinite(a).all(), name
            np.testing.assert_array_equal(a, b, err_msg=name)


def _poisoned(spec: ProblemSpec, values: str, layout: str) -> ProblemSpec:
    """``spec`` with ``values`` planted in every slot no query sees, in ``layout``."""
    return replace(spec, unseen_nan=True, unseen_values=values, layout=layout)


@settings(max_examples=30)
@given(
    spec=st.builds(
        _poisoned,
        attention_specs(SPEC, max_len=8),
        st.sampled_from(("nan", "inf", "-inf", "mixed")),
        st.sampled_from(("top_left", "left_padded", "scattered", "holes")),
    )
)
def test_nan_or_inf_in_slots_no_query_sees_reaches_no_gradient(
    case: Case, spec: ProblemSpec
) -> None:
    problem = build_problem(spec)
    clean = build_problem(replace(spec, unseen_nan=False))
    unseen = ~seen_slots(problem)  # (B, Sk)
    planted = ~np.isfinite(problem.k)
    assert np.array_equal(planted.any(axis=(1, 3)), unseen)  # every unseen slot, nothing else
    np.testing.assert_array_equal(np.where(planted, 0.0, problem.k), np.where(planted, 0, clean.k))
    arrays, scalars, dout = rounded_problem(spec, case.dtype)
    clean_arrays = clean.rounded(case.dtype)
    got = as_numpy(case, spec_gradients(case, arrays, scalars, dout))
    expected = as_numpy(case, spec_gradients(case, clean_arrays, scalars, dout))
    for name in NAMES:
        g = got[name]
        assert g is None or np.isfinite(g).all(), name
    for name in ("dk", "dv"):
        g = got[name]
        assert g is not None and np.all(np.moveaxis(g, 1, 2)[unseen] == 0), name
    assert_close(got, expected, allowed_errors(arrays, scalars, dout, case.dtype), factor=2.0)


LOW_PRECISION_CASES = [
    pytest.param(c, id=c.id) for c in cases() if c.dtype in ("float16", "bfloat16")
]


@pytest.mark.parametrize("low", LOW_PRECISION_CASES)
@settings(max_examples=25)
@given(spec=attention_specs(SPEC, max_len=8))
def test_low_precision_gradients_are_the_float32_ones_cast_back(
    low: Case, spec: ProblemSpec
) -> None:
    arrays, scalars, dout = rounded_problem(spec, low.dtype)
    single = Case(low.backend, low.device, "float32")
    g = spec_gradients(low, arrays, scalars, dout)
    g32 = as_numpy(single, spec_gradients(single, arrays, scalars, dout))
    for name, of in INPUT_OF.items():
        x, x32 = getattr(g, name), g32[name]
        if x is None or x32 is None:
            assert x is None and x32 is None and of not in arrays, name
            continue
        assert x.dtype == on_backend(low, arrays[of]).dtype, f"{name} has dtype {x.dtype}"
        cast_back = round_to(x32, low.dtype).astype(np.float64)
        np.testing.assert_array_equal(low.backend.to_numpy(x).astype(np.float64), cast_back,
                                      err_msg=name)  # fmt: skip


@pytest.mark.parametrize("fn", [attention_backward, attention_backward_blockwise])
def test_no_queries_give_empty_gradients(fn: Any) -> None:
    q, dout = np.zeros((1, 2, 0, 4)), np.zeros((1, 2, 0, 3))
    k, v = np.ones((1, 1, 3, 4)), np.ones((1, 1, 3, 3))
    g = fn(q, k, v, dout, sink_logits=np.zeros(2))
    assert g.dq.shape == (1, 2, 0, 4)
    assert np.all(g.dk == 0) and np.all(g.dv == 0) and np.all(g.dsink_logits == 0)


# -- bad input ---------------------------------------------------------------------------


def _raises(error: type[Exception], *fragments: str) -> Any:
    """pytest.raises whose message must contain every fragment, in order."""
    return pytest.raises(error, match=".*".join(re.escape(f) for f in fragments))


@pytest.fixture
def call() -> dict[str, np.ndarray]:
    """q, k, v, dout of 2 rows, 4 query heads over 2 KV heads, 3 queries, 5 keys, Dv = 6."""
    rng = np.random.default_rng(0)
    return {
        "q": rng.standard_normal((2, 4, 3, 8)),
        "k": rng.standard_normal((2, 2, 5, 8)),
        "v": rng.standard_normal((2, 2, 5, 6)),
        "dout": rng.standard_normal((2, 4, 3, 6)),
    }


FORMS = [attention_backward, attention_backward_blockwise]


@pytest.mark.parametrize("fn", FORMS)
def test_dout_of_the_wrong_shape_is_named(fn: Any, call: dict[str, np.ndarray]) -> None:
    with _raises(ValueError, "dout must have shape (B, Hq, Sq, Dv) = (2, 4, 3, 6)",
                 "got (2, 4, 3, 8)"):  # fmt: skip
        fn(**{**call, "dout": np.zeros((2, 4, 3, 8))})


@pytest.mark.parametrize("fn", FORMS)
def test_dout_that_is_not_floating_is_named(fn: Any, call: dict[str, np.ndarray]) -> None:
    with _raises(TypeError, "dout must have a floating dtype", "int64"):
        fn(**{**call, "dout": np.zeros((2, 4, 3, 6), dtype=np.int64)})


@pytest.mark.parametrize("fn", FORMS)
def test_out_without_lse_or_lse_without_out_is_named(fn: Any, call: dict[str, np.ndarray]) -> None:
    out, lse = attention(call["q"], call["k"], call["v"], return_lse=True)
    with _raises(ValueError, "out was given without lse"):
        fn(**call, out=out)
    with _raises(ValueError, "lse was given without out"):
        fn(**call, lse=lse)


@pytest.mark.parametrize("fn", FORMS)
def test_lse_of_the_wrong_shape_is_named(fn: Any, call: dict[str, np.ndarray]) -> None:
    out, lse = attention(call["q"], call["k"], call["v"], return_lse=True)
    with _raises(ValueError, "lse must have shape (B, Hq, Sq) = (2, 4, 3)", "got (2, 4, 3, 1)"):
        fn(**call, out=out, lse=lse[..., None])


@pytest.mark.parametrize("fn", FORMS)
def test_return_lse_is_refused_by_name(fn: Any, call: dict[str, np.ndarray]) -> None:
    with _raises(ValueError, f"{fn.__name__} returns gradients", "return_lse must be False"):
        fn(**call, return_lse=True)
