r"""The gradient of JAX's ``jax.nn.dot_product_attention`` as a candidate for
:func:`~refattn.testing.check_attention_backward`.

The problem is said to JAX exactly as the forward adapter says it
(:mod:`refattn.testing.adapters.jax_attention`: JAX's own ``is_causal``,
``local_window_size`` and ``key_value_seq_lengths`` where the positions are
JAX's, a boolean mask otherwise), and ``jax.vjp`` of that call is pulled
back along the problem's ``dout``:

.. math::

    (dQ, dK, dV, d\sigma, d\text{bias}) = \text{vjp}(f)(dO), \qquad
    f(q, k, v, \sigma, \text{bias}) = \mathrm{dot\_product\_attention}(q, k, v,
        \text{bias} = -m_h |q^{pos} - k^{pos}| + \text{bias} \,\Vert\, \sigma_h)

The differentiated :math:`f` takes the problem's own arrays, in refattn's
(B, H, S, D) layout, and builds everything else inside: the transposes, the
additive term (the ALiBi ramp is a constant; the problem's bias is added to
it there, so the gradient JAX gives it is :math:`d\text{bias}`, summed over
whatever axes the bias broadcasts on), and the sink key (a slot of zeros
appended to ``k`` and ``v``, scored by a column of :math:`\sigma_h`, so that
:math:`d\sigma_h` is the gradient of that column, summed over its rows).

A row that sees no key gets the mean of its values in JAX (its logits are a
large negative number, not :math:`-\infty`); refattn's convention is 0. The
forward adapter maps it by zeroing those rows, and so does :math:`f`: its
gradient is then 0, as refattn's is.

float64 is computed under ``jax.enable_x64`` (a context manager, so no other
JAX code in the process sees it): without it JAX computes float64 as
float32, and the forward adapter refuses it for that reason.

Precision: JAX's gradient is autodiff of the forward's own rounding, and is
declared as :data:`JAX_XLA_BACKWARD` (float32, float16, bfloat16) and
:data:`JAX_X64_BACKWARD` (float64); each says what it rounds and what was
measured.

Findings (JAX 0.10.2 on the CPU). ``_dot_product_attention_core`` names a dot
algorithm for float16 and bfloat16 inputs and wraps that einsum in a ``try``
whose ``except`` falls back to the default precision "on platforms that
don't support it". Op by op that works: the einsum is compiled inside the
``try``. Under ``jax.jit`` the program is compiled after the trace has left
the ``try``, and two of the CPU's refusals escape it:

- float16, any shape: ``ValueError: The precision 'F16_F16_F32' is not
  supported by dot_general on CPU`` (raised by JAX's lowering; keras-hub
  PR #2354 works around it by computing float16 in float32 on JAX's CPU);
- bfloat16 with one query and one key (:math:`T = S = 1`):
  ``JaxRuntimeError: INVALID_ARGUMENT: Algorithm not supported by the
  ElementalIrEmitter: ALG_DOT_BF16_BF16_F32`` (XLA emits the 1 x 1 product
  elementally; a 1 x 2 one compiles).

Reproducer::

    import jax, jax.numpy as jnp
    q = jnp.ones((1, 1, 1, 8), jnp.bfloat16)  # (B, T, N, H)
    jax.nn.dot_product_attention(q, q, q)  # runs: the fallback
    jax.jit(jax.nn.dot_product_attention)(q, q, q)  # JaxRuntimeError
    h = q.astype(jnp.float16)
    jax.jit(jax.nn.dot_product_attention)(h, h, h)  # ValueError

For those the adapter computes the gradient op by op, as a user of the
op-by-op call gets it, through JAX's own fallback (:data:`CPU_REFUSALS`):
each op is compiled for the problem's shapes, some 5 s a problem on two
cores where the compiled program takes 0.6 s.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from refattn.testing.adapters.jax_attention import JAX_FEATURES, _jax, _native
from refattn.testing.adapters.numpy_masks import additive, host, visible
from refattn.testing.backward_check import BACKWARD_FEATURES
from refattn.testing.candidate import AttentionProblem, Unavailable, Unsupported
from refattn.testing.constraints import Constraints
from refattn.testing.precision import Precision

JAX_XLA_BACKWARD = Precision(scores="float32", softmax="input", accumulator="float32")
r"""JAX's XLA gradient for float16 and bfloat16 inputs (for float32 it is the spec's own
contract).

The forward (``_dot_product_attention_core`` in ``jax/_src/nn/functions.py``,
JAX 0.10) forms :math:`q k^T` with a float32 result, scales, biases and takes
the softmax in float32, and casts the weights to the input dtype before
:math:`P V` (``softmax(...).astype(key.dtype)``). ``jax.vjp`` of it (read
from its jaxpr): :math:`dV = P^T dO` from the rounded :math:`P`;
:math:`dP = dO\, V^T` comes back in the input dtype (it is the cotangent of
the rounded weights) and is widened to float32, where the softmax's backward
forms :math:`D = \sum_j P_j\, dP_j` and :math:`dS`; :math:`dS` is rounded to
the input dtype as it enters the transposed :math:`q k^T` products, whose
dot algorithm is ``F16_F16_F32`` / ``BF16_BF16_F32`` (float16 or bfloat16
operands, a float32 accumulator). That is the FlashAttention-2 rounding
:func:`~refattn.testing.precision.evaluate_backward` models under this
contract, but for :math:`dP`, which it keeps in float32. The lse is not used
by the gradient (JAX's residual is ``stop_gradient``).

Measured on the CPU (JAX 0.10.2): the gradients pass under this contract and
under the spec's default alike (100 bfloat16 problems of every feature; the
largest error a fifth of either allowance on the shapes tried): at these
sizes the allowance's atol covers the rounding of :math:`P`, :math:`dP` and
:math:`dS`. It is declared because it is what JAX rounds.
"""

JAX_X64_BACKWARD = Precision(scores="float32", softmax="float32", accumulator="input")
r"""JAX's XLA gradient for float64 inputs, under ``jax.enable_x64``.

"Softmax is always computed in float32" (``_dot_product_attention_core``):
the float64 logits are cast to float32 (``padded_logits.astype(np.float32)``),
the softmax runs there, and its weights are cast back to float64 for
:math:`P V`. Autodiff takes the same path back: the cotangent of the weights
is cast to float32, the softmax's Jacobian (:math:`dS`) is applied in float32,
and :math:`dS` is widened to float64 for the :math:`dQ` and :math:`dK`
products. So the scores are held in float32 (the contract rounds the product,
the scaled score and each modifier in float32, where JAX rounds the finished
float64 score once: the contract's error is the larger), the weights and
:math:`dS` are float32, and the products accumulate in float64.

Measured on the CPU (JAX 0.10.2): under the spec's default contract every
float64 gradient is off by about float32's unit roundoff, hundreds of times
float64's allowance; under this one they pass (``tests/test_adapters_backward_jax.py``).
One gap, the allowance's and not JAX's: the sink logits' gradient
:math:`d\sigma_h = -\sum_i P_{i,\sigma}\, D_i` is float32-accurate in JAX
(both factors come from the float32 softmax), while ``evaluate_backward``
forms it from a float64 sink weight, with no rounding of the product, so its
allowance for :math:`d\sigma` is narrower than one float32 rounding of each
term. On a few problems in a hundred drawn with sink logits JAX's
:math:`d\sigma` is past it, by up to some 3x; for example
``check_backward_problem(jax_dot_product_attention_backward_x64,
ProblemSpec(q_len=4, k_len=2, causal=True, sink_logits=True), dtype="float64")``
(error 6.5e-8, allowed 2.0e-8, of a gradient of 1.09).
"""


def jax_dot_product_attention_backward(problem: AttentionProblem) -> dict[str, Any]:
    """``jax.vjp`` of ``jax.nn.dot_product_attention(..., implementation="xla")``: the
    gradients of ``sum(out * problem.dout)``, for float32, float16 and bfloat16.

    Raises
    ------
    Unsupported
        For softcap (JAX has none), ``Dv != D``, and float64 (see
        :func:`jax_dot_product_attention_backward_x64`).
    """
    if problem.dtype == "float64":
        raise Unsupported("float64 is jax_dot_product_attention_backward_x64's, under x64")
    return _backward(problem, "xla")


def jax_dot_product_attention_backward_x64(problem: AttentionProblem) -> dict[str, Any]:
    """:func:`jax_dot_product_attention_backward` for float64, under ``jax.enable_x64``.

    Raises
    ------
    Unsupported
        For dtypes other than float64, and as :func:`jax_dot_product_attention_backward`.
    """
    if problem.dtype != "float64":
        raise Unsupported("jax_dot_product_attention_backward_x64 takes float64 only")
    jax = _jax()
    with jax.enable_x64(True):
        return _backward(problem, "xla")


def jax_dot_product_attention_cudnn_backward(problem: AttentionProblem) -> dict[str, Any]:
    """:func:`jax_dot_product_attention_backward` with ``implementation="cudnn"`` (a CUDA GPU).

    Raises
    ------
    Unavailable
        Without a CUDA GPU in JAX.
    """
    jax = _jax()
    if not any(d.platform == "gpu" for d in jax.devices()):
        raise Unavailable("JAX's cudnn attention needs a CUDA GPU")
    if problem.dtype == "float64":
        raise Unsupported("JAX's cudnn attention takes no float64")
    return _backward(problem, "cudnn")


for _adapter, _precision in (
    (jax_dot_product_attention_backward, JAX_XLA_BACKWARD),
    (jax_dot_product_attention_backward_x64, JAX_X64_BACKWARD),
    (jax_dot_product_attention_cudnn_backward, JAX_XLA_BACKWARD),
):
    _adapter.precision = _precision  # type: ignore[attr-defined]
    _adapter.constraints = Constraints(same_value_dim=True)  # type: ignore[attr-defined]

#: What the gradient adapters express: the forward's features that a backward check draws
#: (all but the lse: a backward returns gradients).
JAX_BACKWARD_FEATURES = tuple(f for f in JAX_FEATURES if f in BACKWARD_FEATURES)
#: What JAX and XLA say when the CPU refuses the dot algorithm ``dot_product_attention``
#: names, under ``jax.jit`` only (the findings in the module docstring): JAX's lowering, for
#: ``F16_F16_F32``; XLA's compiler, for ``BF16_BF16_F32`` in a 1 x 1 product.
CPU_REFUSALS = (
    "is not supported by dot_general on CPU",
    "Algorithm not supported by the ElementalIrEmitter",
)


def _backward(problem: AttentionProblem, implementation: str) -> dict[str, Any]:
    """The gradients, as NumPy arrays in refattn's layout, from ``jax.vjp`` of one call."""
    jax = _jax()
    if problem.softcap is not None:
        raise Unsupported("jax.nn.dot_product_attention has no softcap")
    if problem.dout is None:
        raise ValueError("problem.dout is None: a backward is handed the output's gradient")
    import jax.numpy as jnp

    q, k, v = (host(x) for x in (problem.q, problem.k, problem.v))
    if v.shape[-1] != k.shape[-1]:  # "value array, should have the same shape as the key array"
        raise Unsupported("jax.nn.dot_product_attention needs values the shape of the keys")
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    keep = visible(problem)  # (B, 1 or Hq, Sq, Sk), the problem's mask kept
    seen = np.asarray(keep.any(axis=-1))[..., None]  # (B, 1 or Hq, Sq, 1)
    wide = jnp.promote_types(q.dtype, jnp.float32)  # what JAX adds the bias to
    alibi = additive(replace(problem, bias=None))  # (B, Hq, Sq, Sk) float64, or None
    ramp = None if alibi is None else jnp.asarray(alibi, dtype=wide)
    sink = problem.sink_logits is not None
    if sink:  # the sink key is seen by every query
        keep = np.pad(np.broadcast_to(keep, (B, keep.shape[1], Sq, Sk)),
                      ((0, 0), (0, 0), (0, 0), (0, 1)), constant_values=True)  # fmt: skip
    options = _native(problem, host(problem.q_pos), host(problem.k_pos))
    if options is None or sink:
        options = {"mask": jnp.asarray(keep)}
    elif problem.mask is not None:
        options["mask"] = jnp.asarray(np.asarray(host(problem.mask), dtype=bool))
    primals = {"q": q, "k": k, "v": v}
    if problem.bias is not None:
        primals["bias"] = host(problem.bias)
    if sink:
        primals["sink_logits"] = host(problem.sink_logits)

    def attention(arrays: dict[str, Any]) -> Any:  # (B, Hq, Sq, Dv), as refattn lays it out
        k, v = arrays["k"], arrays["v"]  # (B, Hkv, Sk, D)
        terms = ramp
        if "bias" in arrays:
            bias = arrays["bias"].astype(wide)
            terms = bias if terms is None else terms + bias
        if terms is not None:
            terms = jnp.broadcast_to(terms, (B, Hq, Sq, Sk))  # (B, Hq, Sq, Sk)
        if "sink_logits" in arrays:  # one more key of zeros, scored sigma_h
            pad = ((0, 0), (0, 0), (0, 1), (0, 0))
            k, v = jnp.pad(k, pad), jnp.pad(v, pad)  # (B, Hkv, Sk + 1, D)
            base = jnp.zeros((B, Hq, Sq, Sk), dtype=wide) if terms is None else terms
            column = arrays["sink_logits"].astype(wide).reshape(1, Hq, 1, 1)
            terms = jnp.concatenate([base, jnp.broadcast_to(column, (B, Hq, Sq, 1))], axis=-1)
        out = jax.nn.dot_product_attention(
            *(jnp.swapaxes(x, 1, 2) for x in (arrays["q"], k, v)),  # (B, S, H, D)
            bias=terms, scale=problem.scale, implementation=implementation, **options,
        )  # fmt: skip
        return jnp.where(seen, jnp.swapaxes(out, 1, 2), 0)  # a row seeing no key gives 0

    def gradients(arrays: dict[str, Any], dout: Any) -> dict[str, Any]:
        _, pullback = jax.vjp(attention, arrays)
        return pullback(dout)[0]

    arrays, dout = {n: jnp.asarray(x) for n, x in primals.items()}, jnp.asarray(host(problem.dout))
    try:
        # One compiled program per problem: op by op, JAX compiles each of some fifty ops.
        grads = jax.jit(gradients)(arrays, dout)
    except (ValueError, jax.errors.JaxRuntimeError) as error:
        if not any(refusal in str(error) for refusal in CPU_REFUSALS):
            raise
        grads = gradients(arrays, dout)  # op by op, where JAX's fallback einsum catches it
    return {f"d{name}": np.asarray(g) for name, g in grads.items()}
