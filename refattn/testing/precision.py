r"""Precision contracts: the dtype each stage of attention rounds to, and the spec under one.

The spec computes float16 and bfloat16 inputs in float32 and casts the output
back (:func:`refattn.namespace.compute_dtype_name`). Correct kernels round
elsewhere, on purpose and as their documentation says: an eager layer forms
the scores :math:`q k^T` in the input dtype, flash-attn rounds the softmax
weights to the input dtype before the :math:`P V` product, some kernels
return the lse in the input dtype. A :class:`Precision` names that rounding,
stage by stage, and :func:`evaluate` runs the spec's formula on NumPy under
exactly that rounding, so that a verdict can allow a candidate what its own
contract costs (``k`` times this evaluation's error against the float64
oracle, plus ``atol``: the rule of :mod:`refattn.testing.tolerance`).

With :math:`r_x` rounding to the dtype of stage :math:`x` and :math:`r_t` to
the input dtype, for one query over its visible keys :math:`V`:

.. math::

    s_j &= r_s(r_s(q \cdot k_j) \cdot \text{scale})
        \quad \text{then softcap, ALiBi and bias, each rounded by } r_s \\
    e_j &= e^{s_j - m}, \quad Z = \textstyle\sum_{j \in V} e_j + e^{\sigma - m},
        \quad p_j = r_p(e_j / Z)
        \quad \text{(in float32, or wider if } r_p \text{ is)} \\
    o &= r_t\Big(\textstyle\sum_{j \in V} p_j v_j\Big)
        \quad \text{accumulated in the accumulator dtype} \\
    \text{lse} &= r_{lse}(m + \log Z)

The product :math:`q \cdot k_j` is accumulated in float32 (or float64 if
the scores are) and rounded once, as a GEMM with a float32 accumulator
writing float16 does. A float16 or bfloat16 accumulator is emulated key by
key, in order, rounding after every add (a fused multiply-add: the product
:math:`p_j v_j` itself is exact).

The default contract, every stage ``"compute"``, is the spec's own policy
(:data:`SPEC`); the profiles :data:`FLASH_ATTN`, :data:`EAGER` and
:data:`SDPA_MATH` are what three peers document or were measured to do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import array_api_compat.numpy as xp_numpy
import numpy as np

from refattn.backends.base import numpy_dtype, round_to
from refattn.namespace import compute_dtype_name
from refattn.positions import as_rows, default_key_positions, default_query_positions, visibility
from refattn.scores import group_heads

#: Every dtype refattn computes in, widest first: the concrete dtypes a stage may round to,
#: and the names ``refattn verify --dtypes`` accepts.
DTYPES = ("float64", "float32", "float16", "bfloat16")
#: What each field of a :class:`Precision` accepts: the spec's compute dtype, the
#: input dtype under test, or a dtype by name.
ACCEPTED = ("compute", "input", *DTYPES)
#: The stages of a contract, in the order attention runs them: the fields of :class:`Precision`.
STAGES = ("scores", "softmax", "accumulator", "lse")
#: Where a contract may put the scale before the product (:attr:`Precision.prescale`).
PRESCALES = ("none", "root", "query")
#: Significand bits of each dtype, which says which of two is coarser.
_BITS = {"float64": 53, "float32": 24, "float16": 11, "bfloat16": 8}


@dataclass(frozen=True)
class Precision:
    """A kernel's precision contract: the dtype each stage of attention is rounded to.

    Each field is ``"compute"`` (the spec's compute dtype: float32 for float16
    and bfloat16 inputs, the input dtype for float32 and float64), ``"input"``
    (the input dtype under test) or a dtype name among :data:`DTYPES`.

    Attributes
    ----------
    scores : str
        The dtype the product :math:`q k^T` is produced in, then scaled in, and
        every score modifier (softcap, ALiBi, bias, the sink logit) applied in.
        A float16 product overflows above 65504 even where the scaled score
        would not.
    softmax : str
        The dtype the softmax weights are held in when they multiply the values.
    accumulator : str
        The dtype the weighted sum :math:`\\sum_j p_j v_j` is accumulated in.
    lse : str
        The dtype the returned lse is rounded to.
    prescale : str
        Where the scale goes before the product, among :data:`PRESCALES`:
        ``"none"`` (the product is scaled, the default); ``"root"``, ``q`` and
        ``k`` each scaled by the square root of the scale (itself rounded to the
        input dtype) and rounded to the input dtype, as ONNX's ``Attention``
        function body does ("To prevent numerical overflow, scale Q, K by
        sqrt(scale) before matmul"); ``"query"``, ``q`` times the scale and
        :math:`\\log_2 e` (for a base-2 softmax), or times the scale over the
        softcap where there is one, rounded to the input dtype, as FlashInfer's
        FlashAttention-2 prefill kernels do (``q_smem_inplace_transform``). Each
        element rounds, so the error grows with :math:`\\sum_d |q_d k_d|` rather
        than with :math:`|q \\cdot k|`. Shown in the repr only when set.

    Examples
    --------
    >>> EAGER.resolve("float16")
    Precision(scores='float16', softmax='float16', accumulator='float32', lse='float32')
    >>> Precision(scores="input").is_default("float32"), Precision(scores="input").is_default("float16")
    (True, False)
    >>> Precision(softmax="half")
    Traceback (most recent call last):
    ...
    ValueError: Precision.softmax must be one of ('compute', 'input', 'float64', 'float32', 'float16', 'bfloat16'); got 'half'
    """  # noqa: E501

    scores: str = "compute"
    softmax: str = "compute"
    accumulator: str = "compute"
    lse: str = "compute"
    prescale: str = "none"

    def __repr__(self) -> str:
        stages = ", ".join(f"{stage}={getattr(self, stage)!r}" for stage in STAGES)
        scaled = f", prescale={self.prescale!r}" if self.prescale != "none" else ""
        return f"Precision({stages}{scaled})"

    def __post_init__(self) -> None:
        for stage in STAGES:
            value = getattr(self, stage)
            if not isinstance(value, str) or value not in ACCEPTED:
                raise ValueError(f"Precision.{stage} must be one of {ACCEPTED}; got {value!r}")
        if self.prescale not in PRESCALES:
            raise ValueError(f"Precision.prescale must be one of {PRESCALES}; got "
                             f"{self.prescale!r}")  # fmt: skip

    def resolve(self, dtype: str) -> Precision:
        """The contract for inputs in ``dtype``, with every stage a concrete dtype name.

        >>> FLASH_ATTN.resolve("bfloat16").softmax, SPEC.resolve("float64").scores
        ('bfloat16', 'float64')
        """
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}; got {dtype!r}")
        named = {"compute": compute_dtype_name(dtype), "input": dtype}
        chosen = {stage: getattr(self, stage) for stage in STAGES}
        concrete = {stage: named.get(value, value) for stage, value in chosen.items()}
        return Precision(**concrete, prescale=self.prescale)

    def is_default(self, dtype: str) -> bool:
        """True when, for inputs in ``dtype``, this contract rounds as the spec does.

        >>> Precision(lse="float32", accumulator="input").is_default("float32")
        True
        """
        return self.resolve(dtype) == SPEC.resolve(dtype)


SPEC = Precision()
"""The spec's own policy: float16 and bfloat16 inputs computed in float32 throughout,
float32 and float64 in their own dtype; the lse in the compute dtype."""

FLASH_ATTN = Precision(scores="float32", softmax="input", accumulator="float32", lse="float32")
"""flash-attn (Dao-AILab/flash-attention, ``csrc/flash_attn/src/flash_fwd_kernel.h``).

The scores come out of the tensor-core MMA in its float32 accumulator
(``acc_s``, ``ElementAccum = float``) and the online softmax runs on them in
float32; then "Convert acc_s from fp32 to fp16/bf16":
``rP = flash::convert_type<Element>(acc_s)``, and ``gemm_rs(acc_o, tOrP, ...)``
multiplies that rounded P by V into the float32 accumulator ``acc_o``. The
lse is allocated float32 (``softmax_lse``, ``opts.dtype(at::kFloat)`` in
``csrc/flash_attn/flash_api.cpp``); the output is rounded to the input dtype.

flash-attn rounds the unnormalized :math:`e^{s_j - m}` and divides by the
float32 sum at the end, where :func:`evaluate` rounds the normalized weight
:math:`e_j / Z`: either way each weight carries one rounding to the input
dtype, a relative error of at most its unit roundoff.
"""

EAGER = Precision(scores="input", softmax="input", accumulator="float32", lse="compute")
"""The eager attention layer as Hugging Face transformers writes it
(``eager_attention_forward`` in ``modeling_llama.py`` and its copies)::

    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    attn_weights = attn_weights + causal_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_output = torch.matmul(attn_weights, value_states)

The scores, their scaling and any softcap (Gemma 2 divides, takes tanh and
multiplies in the input dtype) are in the input dtype; the softmax runs in
float32 and its weights are cast to the input dtype; the GEMM with the values
accumulates in float32 (cuBLAS and the CPU GEMMs alike) and writes the input
dtype. The layer returns no lse; ``lse`` is float32, what its softmax holds.
Checked against such a layer on torch's CPU in ``tests/test_precision.py``.
"""

SDPA_MATH = Precision()
"""PyTorch SDPA's math backend (``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``).

``_scaled_dot_product_attention_math`` in PyTorch's
``aten/src/ATen/native/transformers/attention.cpp`` is the one composite
path for CPU and CUDA (MPS has its own): "Keep query, key, value in high
precision for accuracy", it converts float16 and bfloat16 q, k and v to
float32 unless ``torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)``
was set, scales q and k each by :math:`\\sqrt{\\text{scale}}` ("Scale q, k
before matmul for stability"), runs matmul, ``_safe_softmax`` and matmul in
float32 and casts the output back: the spec's own policy, with the scale
placed differently.

Measured with torch 2.13 on the CPU (AVX512, MKL), default flags, 400 drawn
float16 and 400 bfloat16 problems (causal or not, GQA, windows, empty slots,
rows of up to thousands of keys; 706160 output elements each), the share of
output elements equal bit for bit to :func:`evaluate`:

==============================  ========  ========
profile                         float16   bfloat16
==============================  ========  ========
this one (the spec's policy)    99.94%    99.99%
``FLASH_ATTN``                  89.8%     90.4%
``Precision(scores="input")``   88.3%     88.2%
``EAGER``                       85.2%     85.5%
==============================  ========  ========

76% (float16) and 93% (bfloat16) of the problems are equal in every element;
moving the scale onto q and k as SDPA does raises that only to 81% and 93%,
so what remains is mostly the float32 GEMMs summing in another order. With
``allow_fp16_bf16_reduction_math_sdp(True)`` the backend rounds
:math:`q \\sqrt{\\text{scale}}` and :math:`k \\sqrt{\\text{scale}}` to the input
dtype before the product, a rounding of the inputs that no contract here
names: no profile then matches more than 86% (``EAGER``). On CUDA the same
function runs, with cuBLAS's float32 GEMMs; that is read from the source, not
measured here. ``tests/test_precision.py`` checks the first row of the table
on 100 problems.
"""


def evaluate(
    arrays: dict[str, Any],
    scalars: dict[str, Any],
    dtype: str,
    precision: Precision = SPEC,
    *,
    fused: bool = False,
    sequential: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The spec's attention on NumPy, rounded as ``precision`` says, for inputs in ``dtype``.

    Parameters
    ----------
    arrays : dict
        float64 NumPy arrays already rounded to ``dtype``: ``q`` (B, Hq, Sq, D),
        ``k`` (B, Hkv, Sk, D), ``v`` (B, Hkv, Sk, Dv), and any of ``q_pos``
        (B, Sq), ``k_pos`` (B, Sk), ``mask``, ``bias``, ``alibi_slopes``,
        ``sink_logits``, with the meaning they have in :func:`refattn.attention`
    scalars : dict
        Any of ``causal``, ``window``, ``window_right``, ``sink_tokens``, ``softcap``,
        ``scale``
    dtype : the input dtype: float64, float32, float16 or bfloat16
    precision : the contract (default: the spec's own)
    fused : each score step computed in working precision and rounded once, as a fused
        kernel storing its score tile in the scores' dtype does (the product scaled
        before it is rounded, the softcap rounded once), rather than every operation
        rounded as an eager layer's ``matmul(q, k.T) * scale`` does
        (:func:`scaled_products`, :func:`softcapped`)
    sequential : each dot product :math:`q \\cdot k` summed one dim at a time, in order,
        as a plain loop (or a matmul that is not a BLAS call) does, rather than as a
        blocked GEMM

    Returns
    -------
    out : (B, Hq, Sq, Dv) float64 array, rounded to ``dtype``
    lse : (B, Hq, Sq) float64 array, rounded to the contract's lse dtype

    Examples
    --------
    The product 64 * 40 * 40 overflows float16 although the scaled score,
    12800, would not:

    >>> q = np.full((1, 1, 1, 64), 40.0); v = np.ones((1, 1, 1, 1))
    >>> out, lse = evaluate({"q": q, "k": q, "v": v}, {}, "float16")
    >>> float(out[0, 0, 0, 0]), float(lse[0, 0, 0])
    (1.0, 12800.0)
    >>> out, _ = evaluate({"q": q, "k": q, "v": v}, {}, "float16", Precision(scores="input"))
    >>> float(out[0, 0, 0, 0])
    nan
    """
    stages = precision.resolve(dtype)
    v = np.asarray(arrays["v"], dtype=np.float64)
    B, Hq, Sq, _ = np.shape(arrays["q"])
    Dv = v.shape[3]
    with np.errstate(all="ignore"):  # overflow to inf is what a contract may do
        s, _, visible, sink = contract_scores(arrays, scalars, dtype, precision, fused=fused,
                                              sequential=sequential)  # fmt: skip
        p, lse = softmax_weights(s, visible, sink, stages.softmax)  # (..., Sk), (B, Hkv, G, Sq)
        out = weighted_sum(p, v, visible, stages.accumulator)  # (B, Hkv, G, Sq, Dv)
        out = rounded(np.reshape(out, (B, Hq, Sq, Dv)), dtype)  # (B, Hq, Sq, Dv)
        lse = rounded(np.reshape(lse, (B, Hq, Sq)), stages.lse)  # (B, Hq, Sq)
    return out, lse


def contract_scores(
    arrays: dict[str, Any],
    scalars: dict[str, Any],
    dtype: str,
    precision: Precision,
    *,
    fused: bool = False,
    sequential: bool = False,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]:
    """The scores of :func:`evaluate`, rounded as ``precision`` says: (B, Hkv, G, Sq, Sk).

    Returns the scores after every modifier, the softcapped scores before ALiBi
    and the bias (None without a softcap: the backward reads its softcap factor
    from them), which keys each query sees (B, Hkv or 1, G or 1, Sq, Sk), and
    the sink logits (1, Hkv, G, 1, 1) or None. Call it under
    ``np.errstate(all="ignore")``: overflow to inf is what a contract may do.
    """
    stages = precision.resolve(dtype)
    q, k = (np.asarray(arrays[name], dtype=np.float64) for name in ("q", "k"))
    _, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = scalars.get("scale")
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D else 0.0
    q_pos, k_pos = _positions(arrays, Sq, Sk)  # (B or 1, Sq), (B or 1, Sk)
    visible = _visible(arrays, scalars, q_pos, k_pos, Hkv)  # (B, Hkv or 1, G or 1, Sq, Sk)
    score_dtype = stages.scores
    # The scale's operands are held in the input dtype, whatever the scores' dtype.
    if precision.prescale == "root":  # q and k by the rounded root of the scale, rounded
        root = rounded(math.sqrt(scale), dtype)
        q, k, scale = rounded(q * root, dtype), rounded(k * root, dtype), 1.0
    elif precision.prescale == "query":  # q by the scale, rounded in base 2's terms
        cap = scalars.get("softcap")
        factor = scale / cap if cap is not None else scale * math.log2(math.e)
        q, scale = rounded(q * factor, dtype) * (scale / factor), 1.0
    s = scaled_products(q, k, scale, score_dtype, fused=fused, sequential=sequential)
    capped = None
    if scalars.get("softcap") is not None:
        s = capped = softcapped(s, scalars["softcap"], score_dtype, fused=fused)
    if arrays.get("alibi_slopes") is not None:
        slopes = rounded(np.reshape(arrays["alibi_slopes"], (-1, Hkv, G)), score_dtype)
        distance = np.abs(q_pos[:, :, None] - k_pos[:, None, :])  # (B, Sq, Sk)
        ramp = slopes[:, :, :, None, None] * rounded(distance, score_dtype)[:, None, None]
        s = rounded(s - rounded(ramp, score_dtype), score_dtype)  # (B, Hkv, G, Sq, Sk)
    if arrays.get("bias") is not None:
        bias = rounded(group_heads(xp_numpy, arrays["bias"], Hkv), score_dtype)
        s = rounded(s + bias, score_dtype)  # (B, Hkv, G, Sq, Sk)
    sink = None
    if arrays.get("sink_logits") is not None:
        sink = rounded(np.reshape(arrays["sink_logits"], (1, Hkv, G, 1, 1)), score_dtype)
    return s, capped, visible, sink


def rounded(x: Any, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` and held as float64 (bfloat16 through ml_dtypes).

    An add, multiply or divide done in float64 on operands of a narrower
    dtype and then rounded gives exactly that dtype's own result: float64
    has more than twice their significand bits, so the double rounding is
    harmless.

    >>> float(rounded(1 + 2.0**-11, "float16")[()]), float(rounded(65520.0, "float16")[()])
    (1.0, inf)
    """
    if dtype == "float64":
        return np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore"):  # beyond the dtype's range is inf, as the hardware rounds
        return round_to(x, dtype).astype(np.float64)


def coarser(a: str, b: str) -> bool:
    """True when dtype ``a`` has fewer significand bits than ``b``.

    >>> coarser("bfloat16", "float32"), coarser("float32", "float32")
    (True, False)
    """
    return _BITS[a] < _BITS[b]


def working(dtype: str) -> str:
    """Where a stage rounded to ``dtype`` does its arithmetic: float32, or wider if it is.

    GEMMs accumulate and softmaxes exponentiate in at least float32 before
    rounding to a narrower dtype.
    """
    return "float32" if coarser(dtype, "float32") else dtype


def scaled_products(
    q: np.ndarray,
    k: np.ndarray,
    scale: float,
    dtype: str,
    *,
    fused: bool = False,
    sequential: bool = False,
) -> np.ndarray:
    """:math:`r(r(q \\cdot k) \\cdot \\text{scale})`, grouped by KV head: (B, Hkv, G, Sq, Sk).

    The product is one GEMM per KV head accumulated in :func:`working`
    precision, rounded to ``dtype`` once; then it is scaled and rounded again.
    With ``fused``, the product is scaled in working precision and rounded
    once, :math:`r(q \\cdot k \\cdot \\text{scale})`, as a fused kernel that
    stores its score tile in ``dtype`` does: that form never overflows before
    the scale. With ``sequential``, each dot product is summed one dim at a
    time in working precision, rounding after every add.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    wide = numpy_dtype(working(dtype))
    q_rows = np.reshape(q, (B, Hkv, G * Sq, D)).astype(wide)  # (B, Hkv, G*Sq, D)
    if sequential:
        keys = k.astype(wide)
        product = np.zeros((B, Hkv, G * Sq, Sk), dtype=wide)  # (B, Hkv, G*Sq, Sk)
        for d in range(D):
            product = product + q_rows[:, :, :, d, None] * keys[:, :, None, :, d]
    else:
        product = np.matmul(q_rows, np.swapaxes(k.astype(wide), -1, -2))  # (B, Hkv, G*Sq, Sk)
    product = np.reshape(product, (B, Hkv, G, Sq, Sk))  # (B, Hkv, G, Sq, Sk)
    if not fused:
        product = rounded(product, dtype)
    return rounded(product * rounded(scale, working(dtype)), dtype)


def softcapped(s: np.ndarray, softcap: float, dtype: str, *, fused: bool = False) -> np.ndarray:
    """:math:`r(c \\cdot r(\\tanh(r(s / c))))`: the softcap, each operation rounded to ``dtype``
    (``fused``: computed in working precision and rounded once, :math:`r(c \\tanh(s / c))`)."""
    c = rounded(softcap, working(dtype))
    if fused:
        return rounded(c * np.tanh(s / c), dtype)
    return rounded(c * rounded(np.tanh(rounded(s / c, dtype)), dtype), dtype)


def _through_the_max(
    ds: np.ndarray,
    s: np.ndarray,
    visible: np.ndarray,
    sink: np.ndarray | None,
    p: np.ndarray,
    delta: np.ndarray,
    shift: np.ndarray,
    work: str,
) -> np.ndarray:
    """``ds`` with :math:`-\\sum_j dS_{ij}` (the sink's term, :math:`-p_{sink} D_i`, with
    them) added at each row's largest visible score, in ``work``: (B, Hkv, G, Sq, Sk)."""
    terms = ds
    if sink is not None:
        weight = rounded(np.exp(rounded(sink - shift, work)), work)  # (B, Hkv, G, Sq, 1)
        terms = np.concatenate([ds, rounded(-weight * delta, work)], axis=-1)
    residue = np.zeros((*ds.shape[:-1], 1))
    if terms.shape[-1]:
        residue = -np.sum(terms.astype(work), axis=-1, keepdims=True, dtype=work)
    masked = np.where(visible, s, -np.inf)
    largest = np.zeros(masked.shape, dtype=bool)
    if masked.shape[-1]:
        top = np.argmax(masked, axis=-1)[..., None]  # the first of the row's largest
        np.put_along_axis(largest, top, True, axis=-1)
    largest &= np.broadcast_to(visible, masked.shape)
    return rounded(np.where(largest, ds + residue.astype(np.float64), ds), work)


def softmax_weights(
    s: np.ndarray, visible: np.ndarray, sink: np.ndarray | None, dtype: str
) -> tuple[np.ndarray, np.ndarray]:
    """The weights :math:`p_j = r(e^{s_j - m} / Z)` in ``dtype``, and :math:`m + \\log Z`.

    The exponentials, their sum and the division are done in :func:`working`
    precision; only the weights are rounded to ``dtype``. Invisible scores
    become :math:`-\\infty` through ``where`` (a NaN there is dropped), the sink
    joins the max and the denominator, and a row with nothing visible and no
    sink gets weights 0 and an lse of :math:`-\\infty`, as in
    :func:`refattn.softmax.masked_softmax`.

    Returns (..., Sk) weights in ``dtype`` and the (...,) lse in ``working(dtype)``.
    """
    work = working(dtype)
    s = np.where(visible, s, -np.inf)  # (..., Sk)
    m = np.max(s, axis=-1, keepdims=True, initial=-np.inf)  # (..., 1)
    if sink is not None:
        m = np.maximum(m, sink)
    m = np.where(m == -np.inf, 0.0, m)  # an empty row shifts by 0: its e are all 0
    e = rounded(np.exp(rounded(s - m, work)), work)  # (..., Sk)
    z = np.sum(e.astype(numpy_dtype(work)), axis=-1, keepdims=True).astype(np.float64)
    if sink is not None:
        z = rounded(z + rounded(np.exp(rounded(sink - m, work)), work), work)  # (..., 1)
    empty = z == 0  # (..., 1)
    z_safe = np.where(empty, 1.0, z)
    p = rounded(rounded(e / z_safe, work), dtype)  # (..., Sk)
    lse = np.where(empty, -np.inf, rounded(m + rounded(np.log(z_safe), work), work))  # (..., 1)
    return p, lse[..., 0]


def weighted_sum(p: np.ndarray, v: np.ndarray, visible: np.ndarray, dtype: str) -> np.ndarray:
    """:math:`\\sum_{j \\in V} p_j v_j` accumulated in ``dtype``: (B, Hkv, G, Sq, Dv).

    One GEMM per KV head when the accumulator is float32 or wider and every
    value is finite; otherwise the plain sum of :func:`weighted_sum_key_by_key`,
    which also keeps a NaN or inf in a slot a query cannot see out of its row
    (in the GEMM, a weight of 0 times NaN is NaN).
    """
    if coarser(dtype, "float32") or not np.isfinite(v).all():
        return weighted_sum_key_by_key(p, v, visible, dtype)
    B, Hkv, G, Sq, Sk = p.shape
    Dv = v.shape[-1]
    wide = numpy_dtype(dtype)
    p_rows = np.reshape(p, (B, Hkv, G * Sq, Sk)).astype(wide)  # (B, Hkv, G*Sq, Sk)
    out = np.matmul(p_rows, v.astype(wide))  # (B, Hkv, G*Sq, Dv)
    return np.reshape(out, (B, Hkv, G, Sq, Dv)).astype(np.float64)


def weighted_sum_key_by_key(
    p: np.ndarray, v: np.ndarray, visible: np.ndarray, dtype: str
) -> np.ndarray:
    """:math:`o \\leftarrow r(o + p_j v_j)` for each visible key j in order: (B, Hkv, G, Sq, Dv).

    A low-precision accumulator as a kernel keeps one: rounded to ``dtype``
    after every add, the product itself exact (a fused multiply-add). Keys a
    query cannot see are skipped with ``where``, before the product reaches
    the sum.
    """
    B, Hkv, G, Sq, Sk = p.shape
    seen = np.broadcast_to(visible, p.shape)  # (B, Hkv, G, Sq, Sk)
    out = np.zeros((B, Hkv, G, Sq, v.shape[-1]))  # (B, Hkv, G, Sq, Dv)
    for j in range(Sk):
        term = p[..., j, None] * v[:, :, None, None, j, :]  # (B, Hkv, G, Sq, Dv)
        out = rounded(out + np.where(seen[..., j, None], term, 0.0), dtype)
    return out


def _positions(arrays: dict[str, Any], Sq: int, Sk: int) -> tuple[np.ndarray, np.ndarray]:
    """``q_pos`` and ``k_pos`` as (B or 1, S) int64, or the spec's defaults."""
    q_pos, k_pos = arrays.get("q_pos"), arrays.get("k_pos")
    if q_pos is None:
        q_pos = default_query_positions(xp_numpy, Sq, Sk, device="cpu")
    if k_pos is None:
        k_pos = default_key_positions(xp_numpy, Sk, device="cpu")
    q_pos = as_rows(xp_numpy, np.asarray(q_pos)).astype(np.int64)
    k_pos = as_rows(xp_numpy, np.asarray(k_pos)).astype(np.int64)
    return q_pos, k_pos


def _visible(
    arrays: dict[str, Any], scalars: dict[str, Any], q_pos: np.ndarray, k_pos: np.ndarray, Hkv: int
) -> np.ndarray:
    """Which keys each query may see, from positions and the mask: (B, Hkv or 1, G or 1, Sq, Sk)."""
    visible = visibility(
        xp_numpy,
        q_pos,
        k_pos,
        causal=bool(scalars.get("causal", False)),
        window=scalars.get("window"),
        sink_tokens=scalars.get("sink_tokens") or 0,
        window_right=scalars.get("window_right"),
    )[:, None, None, :, :]  # (B, 1, 1, Sq, Sk)
    if arrays.get("mask") is not None:
        visible = visible & group_heads(xp_numpy, np.asarray(arrays["mask"], dtype=bool), Hkv)
    return np.asarray(visible)


def evaluate_backward(
    arrays: dict[str, Any],
    scalars: dict[str, Any],
    dout: np.ndarray,
    dtype: str,
    precision: Precision = SPEC,
    *,
    delta_from: str = "output",
    through_max: bool = False,
) -> dict[str, np.ndarray | None]:
    """The spec's backward on NumPy, rounded as ``precision`` says, for inputs in ``dtype``.

    The forward of :func:`evaluate` is run and its output rounded to ``dtype``
    (what a kernel saves); the lse is kept in working precision (a kernel
    saves it in float32). Then, as a FlashAttention-2 backward rounds: the
    recomputed weights :math:`P` are rounded to the softmax stage's dtype
    before :math:`dV = P^T dO`; :math:`D`, :math:`dP = dO\\, V^T` and
    :math:`dS = P (dP - D)` (times the softcap factor) are formed in
    working precision and :math:`dS` is rounded to the softmax stage's dtype
    before the :math:`dQ` and :math:`dK` products, which accumulate in the
    accumulator's dtype; every gradient is rounded to ``dtype`` at the end.

    Parameters
    ----------
    arrays, scalars, dtype, precision : as for :func:`evaluate`
    dout : (B, Hq, Sq, Dv) float64, already rounded to ``dtype``
    delta_from : how :math:`D_i` is formed: ``"output"``, :math:`dO_i \\cdot o_i` from the saved
        output (FlashAttention-2); ``"weights"``, :math:`\\sum_j P_{ij} dP_{ij}` summed
        over the keys one at a time in working precision, as the softmax's own backward
        (autograd through a plain softmax) forms it: its rounding grows with the row;
        ``"sequence"``, :math:`dO_i \\cdot o_i` summed over the value dims one at a time, so
        it rounds otherwise than :math:`dP_{ij} = dO_i \\cdot v_j`, which a one-hot row's
        :math:`dP_{ij} - D_i` feels in full.
    through_max : the gradient that autograd through a forward that subtracts each row's
        largest score sends back through that maximum, :math:`-\\sum_j dS_{ij}` (and the
        sink's share), added to the largest visible key's :math:`dS`: 0 in exact arithmetic,
        the rounding of a sum of terms of both signs in working precision.

    Returns
    -------
    dict
        ``dq``, ``dk``, ``dv``, ``dsink_logits`` and ``dbias`` (None where the
        problem has no sink logits or no bias), float64 arrays rounded to ``dtype``.
    """
    stages = precision.resolve(dtype)
    work, accumulator = working(stages.softmax), working(stages.accumulator)
    q, k, v = (np.asarray(arrays[name], dtype=np.float64) for name in ("q", "k", "v"))
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = v.shape[1], v.shape[2], v.shape[3]
    G = Hq // Hkv
    scale = scalars.get("scale")
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D else 0.0
    # Slots no query sees may hold NaN or inf; they meet only weights of 0 below.
    k, v = np.where(np.isfinite(k), k, 0.0), np.where(np.isfinite(v), v, 0.0)
    with np.errstate(all="ignore"):
        s, capped, visible, sink = contract_scores(arrays, scalars, dtype, precision)
        p, lse = softmax_weights(s, visible, sink, stages.softmax)  # (B, Hkv, G, Sq, Sk)
        out = rounded(weighted_sum(p, v, visible, stages.accumulator), dtype)  # saved O
        lse = lse[..., None]  # (B, Hkv, G, Sq, 1), working precision
        shift = np.where(lse == -np.inf, 0.0, lse)
        p = rounded(np.exp(rounded(np.where(visible, s, -np.inf) - shift, work)), stages.softmax)
        dout_g = np.reshape(dout, (B, Hkv, G, Sq, Dv))  # (B, Hkv, G, Sq, Dv)
        dp = rounded(dout_g @ np.swapaxes(v, -1, -2)[:, :, None], work)  # dO V^T
        if delta_from == "weights":  # D = sum_j P_ij dP_ij, a running sum over the keys
            terms = rounded(np.where(visible, p * dp, 0.0), work).astype(work)
            delta = np.zeros((*terms.shape[:-1], 1))
            if Sk:
                delta = np.cumsum(terms, axis=-1, dtype=work)[..., -1:].astype(np.float64)
        elif delta_from == "sequence":  # D = dO_i . o_i, a running sum over the value dims
            terms = rounded(dout_g * out, work).astype(work)
            delta = np.zeros((*terms.shape[:-1], 1))
            if Dv:
                delta = np.cumsum(terms, axis=-1, dtype=work)[..., -1:].astype(np.float64)
        else:
            delta = rounded(np.sum(dout_g * out, axis=-1, keepdims=True), work)  # D
        ds = rounded(np.where(visible, p * (dp - delta), 0.0), work)  # (B, Hkv, G, Sq, Sk)
        if through_max:
            ds = _through_the_max(ds, s, visible, sink, p, delta, shift, work)
        dt = ds
        if capped is not None:
            dt = rounded(ds * (1 - (capped / scalars["softcap"]) ** 2), work)
        dt_low = rounded(dt, stages.softmax)
        dq = rounded(scale * (dt_low @ k[:, :, None]), accumulator)  # (B, Hkv, G, Sq, D)

        def key_sums(w: np.ndarray, x: np.ndarray) -> np.ndarray:  # sum over the group's rows
            return np.einsum("bhgij,bhgid->bhjd", w, x)

        dk = rounded(scale * key_sums(dt_low, np.reshape(q, (B, Hkv, G, Sq, D))), accumulator)
        dv = rounded(key_sums(p, dout_g), accumulator)  # (B, Hkv, Sk, Dv)
        grads: dict[str, np.ndarray | None] = {
            "dq": rounded(np.reshape(dq, (B, Hq, Sq, D)), dtype),
            "dk": rounded(dk, dtype),
            "dv": rounded(dv, dtype),
            "dsink_logits": None,
            "dbias": None,
        }
        if sink is not None:
            # The sink's weight rounds as a key's does, and so does its term of the sum.
            weight = rounded(np.exp(rounded(sink - shift, work)), stages.softmax)
            dsink = -np.sum(rounded(weight * delta, work), axis=(0, 3, 4))  # (Hkv, G)
            grads["dsink_logits"] = rounded(np.reshape(dsink, (Hq,)), dtype)
        if arrays.get("bias") is not None:
            shape = np.shape(arrays["bias"])
            full = (1,) * (4 - len(shape)) + tuple(shape)
            ds_full = np.reshape(ds, (B, Hq, Sq, Sk))
            axes = tuple(a for a in range(4) if full[a] == 1 and ds_full.shape[a] != 1)
            summed = np.sum(ds_full, axis=axes, keepdims=True) if axes else ds_full
            grads["dbias"] = rounded(np.reshape(summed, shape), dtype)
    return grads
