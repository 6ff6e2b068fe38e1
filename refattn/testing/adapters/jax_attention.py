r"""JAX's ``jax.nn.dot_product_attention`` as a candidate.

How refattn's problem is said in JAX's terms (``jax/_src/nn/functions.py``,
JAX 0.10):

- Layout: JAX takes (B, T, N, H) queries and (B, S, K, H) keys and values
  (:func:`~refattn.testing.layouts.sequence_first`); query head :math:`n`
  reads KV head :math:`n // (N/K)`, refattn's grouping.
- Positions: JAX's own masks number queries and keys from 0 in slot order
  (``is_causal`` is ``tril(ones(T, S))``, top-left; ``local_window_size`` is
  ``(left, right)`` with ``q - k <= left`` and ``k - q <= right``;
  ``key_value_seq_lengths`` holds row b's first :math:`L_b` slots). Where
  every row's positions are exactly that (queries at ``arange(Sq)``, keys
  at ``arange(L_b)`` in the first slots), the adapter uses those arguments,
  so JAX's own masking is what is checked: refattn's ``window=W`` is
  ``left = W - 1``, its ``window_right=R`` is ``right = R`` (a causal
  window's right reach is 0). Any other layout, sink tokens in a window, or
  a mask of the problem's own, goes as JAX's boolean ``mask`` (True keeps),
  built from positions by the visibility rule.
- ALiBi, a bias and sink logits are JAX's ``bias``, in float32 (JAX adds it
  to float32 logits); a sink logit is one more key of zeros, seen by every
  query, scored :math:`\sigma_h` by the bias.
- A row that sees no key: JAX fills hidden logits with a large negative
  number, so such a row gets the mean of its values and a finite lse. That
  is a convention (refattn: 0 and :math:`-\infty`), mapped here.
- The lse is ``return_residual=True``, natural log, (B, T, N).

Precision (declared as :data:`JAX_XLA`): for float16 and bfloat16 inputs JAX
forms :math:`q k^T` with a float32 result (``preferred_element_type``),
scales, biases and takes the softmax in float32, then casts the
probabilities to the input dtype before the :math:`P V` product, and casts
the lse to the input dtype (``logsumexp(...).astype(key.dtype)``).

float64 is not declared: without the process-wide ``jax_enable_x64`` JAX
computes it in float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refattn.testing.adapters.libraries import require
from refattn.testing.adapters.numpy_masks import additive, host, visible, with_sink_key
from refattn.testing.candidate import AttentionProblem, Unavailable, Unsupported
from refattn.testing.conformance import probes
from refattn.testing.conformance.implementations import Defect, Implementation
from refattn.testing.constraints import Constraints
from refattn.testing.drawing import DEFAULT_FEATURES
from refattn.testing.precision import Precision

#: JAX's XLA path for float16 and bfloat16 inputs: float32 scores and softmax, the
#: probabilities and the lse cast to the input dtype.
JAX_XLA = Precision(scores="float32", softmax="input", accumulator="float32", lse="input")


def jax_dot_product_attention(problem: AttentionProblem) -> Any:
    """``jax.nn.dot_product_attention(..., implementation="xla")`` on the problem.

    Raises
    ------
    Unsupported
        For softcap (JAX has none) and float64 (computed as float32 without
        ``jax_enable_x64``).
    """
    return _dot_product_attention(problem, "xla")


def jax_dot_product_attention_cudnn(problem: AttentionProblem) -> Any:
    """:func:`jax_dot_product_attention` with ``implementation="cudnn"`` (a CUDA GPU only).

    Raises
    ------
    Unavailable
        Without a CUDA GPU in JAX.
    """
    return _dot_product_attention(problem, "cudnn")


for _adapter in (jax_dot_product_attention, jax_dot_product_attention_cudnn):
    _adapter.precision = JAX_XLA  # type: ignore[attr-defined]
    _adapter.constraints = Constraints(same_value_dim=True)  # type: ignore[attr-defined]


def _jax() -> Any:
    require("jax")
    import jax

    return jax


def _dot_product_attention(problem: AttentionProblem, implementation: str) -> Any:
    jax = _jax()
    if implementation == "cudnn" and not any(d.platform == "gpu" for d in jax.devices()):
        raise Unavailable("JAX's cudnn attention needs a CUDA GPU")
    if problem.softcap is not None:
        raise Unsupported("jax.nn.dot_product_attention has no softcap")
    if problem.dtype == "float64":
        raise Unsupported("JAX computes float64 as float32 unless jax_enable_x64 is set")
    import jax.numpy as jnp

    q, k, v = (host(x) for x in (problem.q, problem.k, problem.v))
    if v.shape[-1] != k.shape[-1]:  # "value array, should have the same shape as the key array"
        raise Unsupported("jax.nn.dot_product_attention needs values the shape of the keys")
    q_pos, k_pos = host(problem.q_pos), host(problem.k_pos)
    keep = visible(problem)  # (B, 1 or Hq, Sq, Sk), the problem's mask kept
    terms = additive(problem)  # (B, Hq, Sq, Sk) float64, or None
    if problem.sink_logits is not None:  # one more key of zeros, scored sigma_h
        k, v, keep, terms = with_sink_key(problem, k, v, keep, terms)
    bias = None if terms is None else terms.astype(np.float32)  # JAX adds it to float32 logits
    options = _native(problem, q_pos, k_pos)
    if options is None or problem.sink_logits is not None:
        options = {"mask": jnp.asarray(keep)}
    elif problem.mask is not None:
        options["mask"] = jnp.asarray(np.asarray(problem.mask, dtype=bool))
    if bias is not None:
        options["bias"] = jnp.asarray(bias)
    result = jax.nn.dot_product_attention(
        *(jnp.asarray(np.swapaxes(x, 1, 2)) for x in (q, k, v)),  # (B, S, H, D)
        scale=problem.scale, implementation=implementation,
        return_residual=problem.return_lse, **options,
    )  # fmt: skip
    out, lse = result if problem.return_lse else (result, None)
    seen = np.asarray(keep.any(axis=-1))  # (B, 1 or Hq, Sq)
    out = np.where(seen[..., None], np.swapaxes(np.asarray(out), 1, 2), 0).astype(q.dtype)
    if lse is None:
        return out
    lse = np.swapaxes(np.asarray(lse), 1, 2)  # (B, Hq, Sq): JAX returns (B, T, N)
    if bool((np.isinf(lse) & seen).any()) and problem.dtype == "float16":
        # JAX casts the lse to the input dtype (``logsumexp(...).astype(key.dtype)``): past
        # float16's 65504 it is infinite, a limit of that cast, not a wrong value.
        raise Unsupported("JAX returns the lse in float16, which overflows past 65504")
    return out, np.where(seen, lse, -np.inf).astype(lse.dtype)


def _native(problem: AttentionProblem, q_pos: np.ndarray, k_pos: np.ndarray) -> dict | None:
    """JAX's own arguments for the problem's positions, or None where they cannot say them:
    queries at ``arange(Sq)``, row b's keys at ``arange(L_b)`` in its first slots, and no
    sink tokens in a window."""
    Sq, Sk = q_pos.shape[1], k_pos.shape[1]
    lengths = (k_pos >= 0).sum(axis=1)  # (B,)
    expected = np.where(np.arange(Sk) < lengths[:, None], np.arange(Sk), -1)
    if not (np.array_equal(q_pos, np.broadcast_to(np.arange(Sq), q_pos.shape))
            and np.array_equal(k_pos, expected)):  # fmt: skip
        return None
    if problem.window is not None and problem.sink_tokens:
        return None
    options: dict[str, Any] = {"is_causal": problem.causal}
    if problem.window is not None or (problem.window_right is not None and not problem.causal):
        left = Sk if problem.window is None else problem.window - 1
        right = 0 if problem.causal else (Sk if problem.window_right is None
                                          else problem.window_right)  # fmt: skip
        options["local_window_size"] = (left, right)
    if bool((lengths < Sk).any()):
        options["key_value_seq_lengths"] = np.asarray(lengths, dtype=np.int32)
    return options


def _probe() -> dict[str, str]:
    """JAX's conventions, measured by calling ``jax.nn.dot_product_attention`` directly."""
    jax = _jax()
    import jax.numpy as jnp

    def run(q: np.ndarray, k: np.ndarray, v: np.ndarray, **options: Any) -> Any:
        result = jax.nn.dot_product_attention(
            *(jnp.asarray(x)[None, :, None] for x in (q, k, v)), implementation="xla",
            **options,
        )  # fmt: skip
        if options.get("return_residual"):
            return np.asarray(result[0][0, :, 0], np.float64), np.asarray(result[1][0, :, 0])
        return np.asarray(result[0, :, 0], np.float64)

    q, k, v = probes.one_hot_inputs(q_len=2, k_len=8)
    causal = run(q, k, v, is_causal=True)
    window = run(*probes.one_hot_inputs(q_len=8, k_len=8), local_window_size=(2, 0))
    hidden = np.ones((1, 1, 2, 8), dtype=bool)
    hidden[..., 0, :] = False
    empty = run(q, k, v, mask=jnp.asarray(hidden))
    _, lse = run(q, k, v, is_causal=True, return_residual=True)  # 1 and 2 keys seen
    big_q, big_k, big_v, scale = probes.overflow_inputs()
    scored = run(big_q, big_k, big_v, scale=scale)
    return {
        "alignment": probes.alignment_of(probes.seen(causal), k_len=8),
        "empty_row": probes.empty_row_of(empty[0], v),
        "window": "local_window_size=(2, 0) keeps " + probes.reach_of(probes.seen(window)[7], 7),
        "lse": probes.lse_of(lse, [1, 2]),
        "scores": probes.scores_of(scored[0]),
    }


#: What the adapter expresses: every default feature but softcap, every mask kind, a bias,
#: sinks both ways, a right reach, the latent and MQA shapes.
JAX_FEATURES = tuple(sorted((DEFAULT_FEATURES - {"softcap"}) | {
    "mask", "tree_mask", "document_mask", "prefix_lm", "bias", "sink_logits", "sink_tokens",
    "two_sided_window", "latent", "mqa"}))  # fmt: skip
_UNSAID = (
    "query_seq_lengths (padding queries are not drawn as such)",
    "return_residual's gradient (stop_gradient)",
    "the cudnn implementation's layout and dtype limits",
)

IMPLEMENTATIONS = (
    Implementation("JAX dot_product_attention (xla)", "jax", "attention",
                   jax_dot_product_attention, ("float32", "float16", "bfloat16"), JAX_FEATURES,
                   requires=("jax",), probe=_probe, cannot_express=_UNSAID),
    Implementation("JAX dot_product_attention (cudnn)", "jax", "attention",
                   jax_dot_product_attention_cudnn, ("float16", "bfloat16"), JAX_FEATURES,
                   requires=("jax",), gpu=True, cannot_express=_UNSAID),
)  # fmt: skip
DEFECTS: tuple[Defect, ...] = ()
