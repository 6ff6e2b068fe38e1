r"""onnxruntime's contrib attention operators (domain ``com.microsoft``),
``GroupQueryAttention`` and ``MultiHeadAttention``, as candidates, run by the CPU provider.

Each call builds (and keeps, per signature) a one-node model with
``onnx.helper``; the arrays are fed as NumPy. What the operators take is read
from their schemas in onnxruntime 1.32
(``onnxruntime.capi.onnxruntime_pybind11_state.get_all_operator_schema()``)
and measured by calling them (``_probe_gqa`` and ``_probe_mha``).

``GroupQueryAttention`` (:func:`onnxruntime_group_query_attention`):

- Layout: ``query`` (B, S, Hq * D), ``key`` and ``value`` (B, S, Hkv * D),
  the cache ``past_key``/``past_value`` and ``present_key``/``present_value``
  in BNSH (B, Hkv, C, D). Query head :math:`h` reads KV head
  :math:`h // (H_q/H_{kv})`, refattn's grouping (GQA and MQA). The CPU
  kernel wants ``head_size`` a multiple of 8 and the values' head dim equal to
  the keys' (one ``kv_hidden_size``), which the adapter's
  :class:`~refattn.testing.constraints.Constraints` declare.
- Rows: row b of the operator holds :math:`T_b` = ``seqlens_k[b] + 1`` keys
  in slots :math:`0 .. T_b - 1`, the last S of them the new tokens of
  ``key`` and ``value`` (it takes as many new tokens as queries: "query and
  key must have the same sequence length when past_key is provided"), the
  ones before them from ``past_key``; query :math:`i` sits at
  :math:`p = T_b - S + i`. The adapter takes :math:`T_b` as one past the
  row's last held slot (at least S), so that the problem's in-op split
  (:func:`~refattn.testing.layouts.in_op_cache`) must give each row's last
  ``new_keys`` held slots exactly the held slots among
  :math:`T_b - S .. T_b - 1`: a problem whose new tokens are not so (fewer of
  them than queries among more keys, holes between them) is Unsupported.
  ``past_key`` is the problem's keys with the new tokens' slots (and any after)
  holding NaN, so that the cache the operator writes is what is checked: it is
  returned as the :attr:`~refattn.testing.Result.present`, whose first Sk slots
  the verifier compares with the problem's keys.
  ``total_sequence_length`` is the batch's largest :math:`T_b`, and
  ``past_key`` has at least that many slots (a static cache). The CPU kernel
  refuses S > 1 tokens with a past in more than one row unless
  ``query_seqlens`` is given ("batch_size must be 1 when sequence_length > 1
  and past context is given"); the adapter then passes ``query_seqlens = S``
  for every row (no padding), and elsewhere passes it or not by the problem's
  seed. That input "requires causal=1" and "requires the present_key and
  present_value outputs": without them such a batch is Unsupported.
- Masking: ``causal`` (default 1) keeps slot :math:`j \le p`;
  ``local_window_size = w`` keeps :math:`p - j < w`, measured: ``w`` keys,
  the query's own among them, so refattn's ``window=W`` is
  ``local_window_size = W`` (a window needs ``causal``: "Must be -1 when
  causal is 0"). Each is passed where it keeps every key the problem keeps
  (for queries at the end of their rows, exactly those), so that what it
  hides is the operator's own masking to get right; whatever the operator's
  arguments leave visible that the problem hides is :math:`-\infty` in
  ``attention_bias``, and nothing more. A problem whose queries see a key
  after the operator's position for them (one that is not causal, or
  queries before their keys) goes with ``causal = 0`` and every visibility
  in ``attention_bias``.
- ``attention_bias`` (B, 1 or Hq, S, ``total_sequence_length``), in the input
  dtype, added after the softcap (measured): ALiBi's
  :math:`-m_h |q^{pos} - k^{pos}|`, the problem's bias, and :math:`-\infty`
  where hidden. Row b reads its first :math:`T_b` columns.
- Sink logits are ``head_sink`` (Hq,): "a smooth factor adding to the
  denominator of softmax", measured to be :math:`e^{\sigma_h}` there, not
  softcapped, as refattn's sink logit.
- ``scale`` and ``softcap`` are attributes (float32); the default scale,
  :math:`1/\sqrt{D}`, is left to the operator.
- A row that sees no key (every key :math:`-\infty` in ``attention_bias``):
  measured to be NaN, a softmax over nothing, but for ``causal = 1`` without
  softcap and a total above 1, where it is 0; mapped to refattn's 0.
- No log-sum-exp is returned: ``return_lse`` is Unsupported. Rotary
  embeddings (``do_rotary``, ``cos_cache``, ``sin_cache``), the quantized and
  window-sized caches and ``q_norm_weight`` are left off.

``MultiHeadAttention`` (:func:`onnxruntime_multi_head_attention` and, with the
in-op cache, :func:`onnxruntime_multi_head_attention_in_op`):

- Layout: ``query`` (B, Sq, H * D), ``key`` (B, Sk, H * D) and ``value``
  (B, Sk, H * Dv), or, for every other problem (by its seed) with
  Dv = D, the BNSH form (B, H, Sk, D) of key and value ("or past_key with
  shape (batch_size, num_heads, kv_sequence_length, head_size)"). One KV
  head per query head (``num_heads`` for all three): GQA is Unsupported.
- In-op: ``past_key``/``past_value`` (B, H, P, D) hold each row's slots
  before the problem's last ``new_keys`` slots, ``key``/``value`` the new
  tokens, and ``present_key``/``present_value`` (B, H, P + n, D) are returned
  as the present. One past length for every row: a row whose new tokens do
  not end its slots is Unsupported; the past needs Dv = D ("Input
  'past_value' dimension 3 should be same as head_size").
- Masking: ``unidirectional = 1`` hides slot :math:`j > P + i` from query
  :math:`i` (measured: the past's length :math:`P`, 0 without one, is the
  offset), passed where that keeps every key the problem keeps. The rest
  is a ``key_padding_mask`` (int32, 1 keeps) where one says it: the (B,)
  lengths of right-padded rows, a (B, P + Sk) mask of slots, or a (B, Sq,
  P + Sk) mask per query; chosen by the problem's seed among the forms that
  can, or :math:`-\infty` in ``attention_bias`` (B, 1 or H, Sq, P + Sk),
  where ALiBi and the bias go too. With ``unidirectional`` or a
  ``key_padding_mask``, ``mask_filter_value`` is set to
  :math:`-\infty`: the default, -10000, is a finite fill, under which a
  hidden key still counts where the scores are large (a convention, the
  probe's ``empty_row``: a row with every key hidden gets the mean of the
  values). With it a row that sees no key is NaN, and is mapped to
  refattn's 0.
- A sink logit is one more key of zeros, seen by every query, scored
  :math:`\sigma_h` by ``attention_bias`` (the operator has no sinks of its
  own); with sinks every visibility goes by the mask. Not with the in-op
  cache, whose present would hold that key.
- No softcap and no log-sum-exp: Unsupported.

Precision (declared as :data:`ORT_CPU`, measured): for float16 inputs both
CPU kernels compute in float32 and round the output to float16, the spec's
own policy (q.k does not overflow past 65504: the probes' ``scores``). Over
150 drawn float16 problems each, 99.96% (GroupQueryAttention) and 99.86%
(MultiHeadAttention) of the output elements equal bit for bit
:func:`~refattn.testing.precision.evaluate` under that policy, against at
most 92% under any profile rounding the scores or the weights to float16.
``attention_bias`` and ``head_sink`` are fed in float16, the problem's dtype.
bfloat16 has no CPU kernel ("Could not find an implementation"), and the
schemas take no float64.

Defects (``DEFECTS``; reproducers in ``docs/defects/``): with a past and
no ``present_key``/``present_value`` output asked for, both CPU kernels misread
the past (NaN, wrong values, or values that vary from call to call, where the
same call asking for the present is right):
:func:`onnxruntime_group_query_attention_output_only` is that call.
``MultiHeadAttention``'s ``unidirectional`` leaves its last query unmasked
when ``key`` has more tokens than ``query``: that query sees every key.

onnx and onnxruntime are imported inside the functions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from refattn.testing.adapters.libraries import require
from refattn.testing.adapters.numpy_masks import additive, host, visible, with_sink_key
from refattn.testing.candidate import AttentionProblem, Result, Unsupported
from refattn.testing.conformance import probes
from refattn.testing.conformance.implementations import Defect, Implementation
from refattn.testing.constraints import Constraints
from refattn.testing.layouts import in_op_cache, trailing_new_tokens
from refattn.testing.precision import Precision
from refattn.testing.report import Failure

#: Both CPU kernels, measured: float16 inputs computed in float32 throughout, the output
#: rounded to float16 (the spec's own policy).
ORT_CPU = Precision()
#: ``GroupQueryAttention``'s inputs, in order: a missing optional one is "" in a node's inputs.
GQA_INPUTS = ("query", "key", "value", "past_key", "past_value", "seqlens_k",
              "total_sequence_length", "cos_cache", "sin_cache", "position_ids",
              "attention_bias", "head_sink", "k_scale", "v_scale", "q_norm_weight",
              "k_norm_weight", "query_seqlens")  # fmt: skip
#: ``MultiHeadAttention``'s inputs, in order.
MHA_INPUTS = ("query", "key", "value", "bias", "key_padding_mask", "attention_bias",
              "past_key", "past_value", "past_sequence_length", "cache_indirection")  # fmt: skip
#: The int32 inputs of either operator; every other input is in the problem's dtype.
INT32_INPUTS = ("seqlens_k", "total_sequence_length", "query_seqlens", "key_padding_mask",
                "past_sequence_length", "cache_indirection")  # fmt: skip
#: The dtypes the CPU provider has kernels for (float64 is in neither schema).
CPU_DTYPES = ("float32", "float16")
#: What ``GroupQueryAttention``'s CPU kernel requires of a problem.
GQA_CONSTRAINTS = Constraints(head_dim_multiple=8, same_value_dim=True)
#: What ``MultiHeadAttention``'s in-op cache requires: the past's head dim is the values' too.
MHA_IN_OP_CONSTRAINTS = Constraints(same_value_dim=True)


def onnxruntime_group_query_attention(problem: AttentionProblem) -> Result:
    """``GroupQueryAttention`` on the problem: its output and the present cache it wrote.

    Raises
    ------
    Unsupported
        For the lse, a float64 or bfloat16 problem, a head dim not a multiple of 8,
        Dv != D, rows whose new tokens are not the held slots among their last Sq, and a
        batch of chunks the CPU kernel cannot take.
    """
    out, present = _group_query_attention(problem, present=True)
    return Result(out, present=present)


def onnxruntime_group_query_attention_output_only(problem: AttentionProblem) -> Any:
    """:func:`onnxruntime_group_query_attention` with only ``output`` asked for, not the
    present cache (a graph that does not read it): the past is still ``past_key``.

    Raises
    ------
    Unsupported
        As :func:`onnxruntime_group_query_attention`.
    """
    out, _ = _group_query_attention(problem, present=False)
    return out


def onnxruntime_multi_head_attention(problem: AttentionProblem) -> Any:
    """``MultiHeadAttention`` on the problem, every key as ``key`` and ``value``.

    Raises
    ------
    Unsupported
        For the lse, softcap, GQA (one KV head per query head), a float64 or bfloat16
        problem.
    """
    return _multi_head_attention(problem, in_op=False)


def onnxruntime_multi_head_attention_in_op(problem: AttentionProblem) -> Result:
    """``MultiHeadAttention`` with ``past_key``/``past_value`` in and ``present_*`` out.

    Raises
    ------
    Unsupported
        As :func:`onnxruntime_multi_head_attention`, and for sink logits, Dv != D and
        rows whose new tokens do not end their slots.
    """
    result = _multi_head_attention(problem, in_op=True)
    assert isinstance(result, Result)
    return result


_GQA_ADAPTERS: tuple[Any, ...] = (onnxruntime_group_query_attention,
                                   onnxruntime_group_query_attention_output_only)  # fmt: skip
_MHA_ADAPTERS: tuple[Any, ...] = (onnxruntime_multi_head_attention,
                                   onnxruntime_multi_head_attention_in_op)  # fmt: skip
for _adapter in _GQA_ADAPTERS + _MHA_ADAPTERS:
    _adapter.precision = ORT_CPU
for _adapter in _GQA_ADAPTERS:
    _adapter.constraints = GQA_CONSTRAINTS
onnxruntime_multi_head_attention_in_op.constraints = MHA_IN_OP_CONSTRAINTS  # type: ignore[attr-defined]


# -- GroupQueryAttention -------------------------------------------------------------------


def _group_query_attention(
    problem: AttentionProblem, *, present: bool
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """The operator's output (B, Hq, Sq, D) and, when asked for, its present cache."""
    op = "GroupQueryAttention"
    _refuse(problem, op)
    q, k, v = (host(x) for x in (problem.q, problem.k, problem.v))
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if D % 8:  # "head_size must be a multiple of 8"
        raise Unsupported(f"onnxruntime's {op} needs a head size that is a multiple of 8; got {D}")
    if v.shape[-1] != D:  # key and value share kv_hidden_size
        raise Unsupported(f"onnxruntime's {op} takes values of the keys' head size")
    if Sq == 0:
        raise Unsupported(f"onnxruntime's {op} takes no query of zero tokens")
    totals = _gqa_totals(problem)  # (B,) T_b
    total = int(totals.max())
    width = max(Sk, total)  # the past buffer's slots, and so the present's
    pad = ((0, 0), (0, 0), (0, width - Sk), (0, 0))
    k_all, v_all = np.pad(k, pad), np.pad(v, pad)  # (B, Hkv, width, D)
    starts = totals - Sq  # (B,) each row's past length
    slots = np.arange(width)
    new = starts[:, None] + np.arange(Sq)  # (B, Sq) the new tokens' slots
    k_new, v_new = (np.take_along_axis(x, new[:, None, :, None], axis=2) for x in (k_all, v_all))
    after = slots[None, None, :, None] >= starts[:, None, None, None]
    k_past, v_past = (np.where(after, np.nan, x).astype(x.dtype) for x in (k_all, v_all))

    keep = visible(problem)  # (B, 1 or Hq, Sq, Sk)
    keep = np.pad(keep, ((0, 0), (0, 0), (0, 0), (0, width - Sk)))  # the padding is hidden
    terms = additive(problem)  # (B, Hq, Sq, Sk) float64, or None
    attributes: dict[str, Any] = {"num_heads": Hq, "kv_num_heads": Hkv}
    native = _gqa_native(problem, keep, totals, attributes)  # (B, 1, Sq, width)
    mask_keeps = (keep | ~native)[..., :total]
    feeds: dict[str, np.ndarray] = {}
    if terms is not None or not bool(mask_keeps.all()):
        base = np.zeros(mask_keeps.shape) if terms is None else np.pad(
            terms, ((0, 0), (0, 0), (0, 0), (0, width - Sk)))[..., :total]  # fmt: skip
        feeds["attention_bias"] = np.where(mask_keeps, base, -np.inf).astype(q.dtype)
    if problem.sink_logits is not None:
        feeds["head_sink"] = host(problem.sink_logits).reshape(Hq).astype(q.dtype)
    if problem.scale != 1 / math.sqrt(D):
        attributes["scale"] = problem.scale
    if problem.softcap is not None:
        attributes["softcap"] = problem.softcap
    # query_seqlens (every row's S queries valid) "requires causal=1" and "requires the
    # present_key and present_value outputs"; without it the CPU kernel wants one row.
    takes_seqlens = attributes.get("causal", 1) == 1 and present
    if B > 1 and Sq > 1 and bool((starts > 0).any()):
        if not takes_seqlens:
            raise Unsupported(f"onnxruntime's {op} on the CPU: batch_size must be 1 when "
                              "sequence_length > 1 and past context is given, unless "
                              "query_seqlens is, which requires causal=1 and the present "
                              "outputs")  # fmt: skip
        feeds["query_seqlens"] = np.full(B, Sq, dtype=np.int32)
    elif takes_seqlens and problem.spec.seed % 2 == 1:
        feeds["query_seqlens"] = np.full(B, Sq, dtype=np.int32)
    feeds |= {
        "query": _three_d(q), "key": _three_d(k_new), "value": _three_d(v_new),
        "past_key": k_past, "past_value": v_past,
        "seqlens_k": (totals - 1).astype(np.int32),
        "total_sequence_length": np.array(total, dtype=np.int32),
    }  # fmt: skip
    outputs = ("output", "present_key", "present_value") if present else ("output",)
    results = _run(op, GQA_INPUTS, feeds, attributes, outputs)
    out = np.swapaxes(results[0].reshape(B, Sq, Hq, D), 1, 2)  # (B, Hq, Sq, D)
    seen = np.asarray(keep[..., :Sk].any(axis=-1))  # (B, 1 or Hq, Sq)
    # A row every key of which attention_bias hides is NaN (0 on one path): refattn's is 0.
    out = np.where(seen[..., None], out, 0).astype(out.dtype)
    return out, ((results[1], results[2]) if present else None)


def _gqa_totals(problem: AttentionProblem) -> np.ndarray:
    """(B,) int64 :math:`T_b`: one past each row's last held slot, and at least Sq; the
    held slots among the last Sq of them must be the row's new tokens (Unsupported if not)."""
    k_pos = host(problem.k_pos)
    B, Sk = k_pos.shape
    Sq = problem.q.shape[2]
    held = k_pos >= 0
    ends = (held * np.arange(1, Sk + 1)).max(axis=1, initial=0)  # one past the last held
    totals = np.maximum(ends, Sq).astype(np.int64)
    split = in_op_cache(problem)
    for b in range(B):
        start = int(totals[b]) - Sq
        ours = start + np.flatnonzero(held[b, start : int(totals[b])])
        if not np.array_equal(ours, split.new_slots[b]):
            raise Unsupported(
                "onnxruntime's GroupQueryAttention appends as many new tokens as there are "
                "queries, after the past: each row's new tokens must be the held slots among "
                "its last Sq slots"
            )
    return totals


def _gqa_native(
    problem: AttentionProblem, keep: np.ndarray, totals: np.ndarray, attributes: dict[str, Any]
) -> np.ndarray:
    """(B, 1, Sq, width) booleans: what ``seqlens_k``, ``causal`` and ``local_window_size``
    leave visible, the last two set in ``attributes`` only where they keep every key the
    problem's ``keep`` (B, 1 or Hq, Sq, width) keeps: what they hide is theirs to get right."""
    B, _, Sq, width = keep.shape
    j = np.arange(width)[None, None, :]
    p = (totals[:, None] - Sq + np.arange(Sq))[:, :, None]  # (B, Sq, 1) the op's positions
    keeps = np.broadcast_to(j < totals[:, None, None], (B, Sq, width))
    seen = keep.any(axis=1)  # (B, Sq, width)
    if not bool((seen <= (j <= p)).all()):
        attributes["causal"] = 0
        return np.asarray(keeps)[:, None]
    keeps = keeps & (j <= p)
    if problem.window is not None and bool((seen <= (p - j < problem.window)).all()):
        attributes["local_window_size"] = problem.window
        keeps = keeps & (p - j < problem.window)
    return np.asarray(keeps)[:, None]


# -- MultiHeadAttention --------------------------------------------------------------------


def _multi_head_attention(problem: AttentionProblem, *, in_op: bool) -> Any:
    """The operator's output (B, H, Sq, Dv), and in-op a Result with its present cache."""
    op = "MultiHeadAttention"
    _refuse(problem, op)
    if problem.softcap is not None:
        raise Unsupported(f"onnxruntime's {op} has no softcap")
    q, k, v = (host(x) for x in (problem.q, problem.k, problem.v))
    B, H, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if Hkv != H:
        raise Unsupported(f"onnxruntime's {op} takes one KV head per query head (num_heads for "
                          f"query, key and value); got {H} query heads over {Hkv}")  # fmt: skip
    past = 0
    if in_op:
        if problem.sink_logits is not None:
            raise Unsupported(f"onnxruntime's {op} has no sink logits, and a sink key would "
                              "join its present cache")  # fmt: skip
        if Dv != D:  # "Input 'past_value' dimension 3 should be same as head_size"
            raise Unsupported(f"onnxruntime's {op} takes a past_value of the keys' head size")
        past = Sk - _new_tokens(problem)
    keep = visible(problem)  # (B, 1 or H, Sq, Sk)
    terms = additive(problem)  # (B, H, Sq, Sk) float64, or None
    sink = problem.sink_logits is not None
    if sink:
        k, v, keep, terms = with_sink_key(problem, k, v, keep, terms)
    visible_keys = keep
    attributes: dict[str, Any] = {"num_heads": H}
    native = _mha_native(keep, past)  # (1, 1, Sq, Sk') or None
    if native is not None:
        attributes["unidirectional"] = 1
        keep = keep | ~native  # what it hides is its own to get right
    feeds = _mha_masks(problem, keep, terms, q.dtype)  # keep: (B, 1 or H, Sq, Sk')
    if "key_padding_mask" in feeds or "unidirectional" in attributes:
        attributes["mask_filter_value"] = -math.inf
    if problem.scale != 1 / math.sqrt(D):
        attributes["scale"] = problem.scale
    bnsh = not in_op and Dv == D and problem.spec.seed % 4 >= 2
    if in_op:
        feeds |= {"past_key": k[:, :, :past], "past_value": v[:, :, :past]}
        k, v = k[:, :, past:], v[:, :, past:]
    new_k, new_v = (np.ascontiguousarray(x) if bnsh else _three_d(x) for x in (k, v))
    feeds |= {"query": _three_d(q), "key": new_k, "value": new_v}
    outputs = ("output", "present_key", "present_value") if in_op else ("output",)
    results = _run(op, MHA_INPUTS, feeds, attributes, outputs)
    out = np.swapaxes(results[0].reshape(B, Sq, H, Dv), 1, 2)  # (B, H, Sq, Dv)
    seen = np.asarray(visible_keys.any(axis=-1))  # (B, 1 or H, Sq)
    # With mask_filter_value = -inf a row that sees no key is NaN: refattn's is 0.
    out = np.where(seen[..., None], out, 0).astype(out.dtype)
    if not in_op:
        return out
    return Result(out, present=(results[1], results[2]))


def _mha_native(keep: np.ndarray, past: int) -> np.ndarray | None:
    """(1, 1, Sq, Sk) booleans, what ``unidirectional`` keeps (query :math:`i` sees slots up
    to :math:`P + i`, ``past`` being :math:`P`), where that keeps every key the problem's
    ``keep`` (B, 1 or H, Sq, Sk) keeps; None where it does not."""
    _, _, Sq, Sk = keep.shape
    native = np.arange(Sk)[None, :] <= past + np.arange(Sq)[:, None]  # (Sq, Sk)
    if not bool((keep <= native).all()):
        return None
    return native[None, None]


def _mha_masks(
    problem: AttentionProblem, keeps: np.ndarray, terms: np.ndarray | None, dtype: np.dtype
) -> dict[str, np.ndarray]:
    """``key_padding_mask`` or ``attention_bias`` hiding what ``keeps`` (B, 1 or H, Sq, T)
    hides, and adding ``terms``; the form chosen by the problem's seed among those that can
    say it. Nothing where nothing is hidden or added."""
    T = keeps.shape[-1]
    if terms is None and bool(keeps.all()):
        return {}
    shared = keeps.shape[1] == 1 or bool((keeps == keeps[:, :1]).all())
    forms: list[str] = ["attention_bias"]
    if terms is None and shared:
        per_query = keeps[:, 0]  # (B, Sq, T)
        forms.append("per_query")
        if bool((per_query == per_query[:, :1]).all()):
            slots = per_query[:, 0]  # (B, T)
            forms.append("slots")
            lengths = slots.sum(axis=1)
            if np.array_equal(slots, np.arange(T)[None, :] < lengths[:, None]):
                forms.append("lengths")
    form = forms[(problem.spec.seed // 4) % len(forms)]
    if form == "lengths":
        return {"key_padding_mask": keeps[:, 0, 0].sum(axis=1).astype(np.int32)}
    if form == "slots":
        return {"key_padding_mask": keeps[:, 0, 0].astype(np.int32)}
    if form == "per_query":
        return {"key_padding_mask": keeps[:, 0].astype(np.int32)}
    base = np.zeros(keeps.shape) if terms is None else terms
    pad = T - base.shape[-1]  # a sink key's column is in terms already
    base = np.pad(base, ((0, 0), (0, 0), (0, 0), (0, pad)))
    return {"attention_bias": np.where(keeps, base, -np.inf).astype(dtype)}


def _new_tokens(problem: AttentionProblem) -> int:
    """The new tokens per row, where every row's are its last slots (Unsupported if not)."""
    try:
        return trailing_new_tokens(problem)
    except ValueError:  # one reason for every such problem, so the report counts them together
        why = ("onnxruntime's MultiHeadAttention takes one past length for every row: each "
               "row's new tokens must be its last slots")  # fmt: skip
        raise Unsupported(why) from None


# -- both ------------------------------------------------------------------------------------


def _refuse(problem: AttentionProblem, op: str) -> None:
    """Unsupported for what neither operator takes of any problem."""
    if problem.return_lse:
        raise Unsupported(f"onnxruntime's {op} returns no log-sum-exp")
    if problem.dtype == "bfloat16":  # NOT_IMPLEMENTED on the CPU provider
        raise Unsupported(f"onnxruntime's CPU provider has no {op} kernel for bfloat16")
    if problem.dtype not in CPU_DTYPES:
        raise Unsupported(f"onnxruntime's {op} takes float32 and float16 on the CPU; got "
                          f"{problem.dtype}")  # fmt: skip


def _three_d(x: np.ndarray) -> np.ndarray:
    """(B, H, S, D) -> (B, S, H * D), the operators' 3D form."""
    B, H, S, D = x.shape
    return np.ascontiguousarray(np.swapaxes(x, 1, 2).reshape(B, S, H * D))


def _run(
    op: str, order: Sequence[str], feeds: Mapping[str, np.ndarray], attributes: Mapping[str, Any],
    outputs: tuple[str, ...],
) -> list[np.ndarray]:  # fmt: skip
    """Run the one-node model of ``op`` these feeds and attributes make; the model and its
    session are kept per signature."""
    dtype = feeds["query"].dtype.name
    inputs = tuple((name, feeds[name].ndim) for name in order if name in feeds)
    signature = (op, tuple(order), dtype, inputs, tuple(sorted(attributes.items())), outputs)
    return list(_session(signature).run(None, dict(feeds)))


@functools.lru_cache(maxsize=512)
def _session(signature: tuple[Any, ...]) -> Any:
    """The onnxruntime CPU session of the one-node model ``signature`` describes."""
    op, order, dtype, inputs, attributes, outputs = signature
    model = contrib_model(op, order, dtype, inputs, dict(attributes), outputs)
    require("onnxruntime")
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # its own errors come back as exceptions
    return onnxruntime.InferenceSession(model.SerializeToString(), options,
                                        providers=["CPUExecutionProvider"])  # fmt: skip


def contrib_model(
    op: str, order: Sequence[str], dtype: str, inputs: tuple[tuple[str, int], ...],
    attributes: Mapping[str, Any], outputs: tuple[str, ...],
) -> Any:  # fmt: skip
    """A model of one ``op`` node of domain ``com.microsoft`` taking ``inputs`` (pairs of a
    name among ``order``, the operator's inputs in order, and its rank) in ``dtype`` (the
    names of :data:`INT32_INPUTS` in int32); sizes left free.

    >>> import pytest; _ = pytest.importorskip("onnx")
    >>> model = contrib_model("GroupQueryAttention", GQA_INPUTS, "float32",
    ...                       (("query", 3), ("key", 3), ("value", 3), ("seqlens_k", 1),
    ...                        ("total_sequence_length", 0)), {"num_heads": 2, "kv_num_heads": 1},
    ...                       ("output",))
    >>> list(model.graph.node[0].input)
    ['query', 'key', 'value', '', '', 'seqlens_k', 'total_sequence_length']
    """
    require("onnx")
    from onnx import TensorProto, helper

    element = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16,
               "bfloat16": TensorProto.BFLOAT16}  # fmt: skip
    ranks = dict(inputs)
    unknown = sorted(set(ranks) - set(order))
    if unknown:
        raise ValueError(f"inputs must be among {op}'s {tuple(order)}; got {unknown}")
    last = max(order.index(name) for name in ranks)
    names = [name if name in ranks else "" for name in order[: last + 1]]
    node = helper.make_node(op, names, list(outputs), domain="com.microsoft", **attributes)

    def typed(name: str, rank: int) -> Any:
        kind = TensorProto.INT32 if name in INT32_INPUTS else element[dtype]
        return helper.make_tensor_value_info(name, kind, [f"{name}_{i}" for i in range(rank)])

    output_ranks = {"output": 3, "present_key": 4, "present_value": 4}
    graph = helper.make_graph([node], op, [typed(name, rank) for name, rank in inputs],
                              [typed(name, output_ranks[name]) for name in outputs])  # fmt: skip
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = min(model.ir_version, 10)  # what this onnxruntime reads
    return model


# -- probes ------------------------------------------------------------------------------------


def _probe_gqa() -> dict[str, str]:
    """``GroupQueryAttention``'s conventions, measured by calling it directly."""

    def run(q: np.ndarray, k: np.ndarray, v: np.ndarray, past: int, **options: Any) -> np.ndarray:
        """One row, one head: the first ``past`` keys as ``past_key``, the rest new."""
        total = k.shape[0]
        feeds = {"query": q[None], "key": k[None, past:], "value": v[None, past:],
                 "past_key": k[None, None, :past], "past_value": v[None, None, :past],
                 "seqlens_k": np.array([total - 1], dtype=np.int32),
                 "total_sequence_length": np.array(total, dtype=np.int32)}  # fmt: skip
        feeds |= {n: options.pop(n) for n in ("attention_bias",) if n in options}
        attributes = {"num_heads": 1, "kv_num_heads": 1, **options}
        outputs = ("output", "present_key", "present_value")
        out = _run("GroupQueryAttention", GQA_INPUTS, feeds, attributes, outputs)[0]
        return np.asarray(out[0], dtype=np.float64)  # (S, D)

    q, k, v = probes.one_hot_inputs(q_len=2, k_len=8)
    causal = run(q, k, v, past=6)
    window = run(*probes.one_hot_inputs(q_len=8, k_len=8), past=0, local_window_size=2)
    hidden = np.zeros((1, 1, 2, 8), dtype=np.float32)
    hidden[..., 0, :] = -np.inf
    empty = run(q, k, v, past=6, causal=0, attention_bias=hidden)
    causal_empty = run(q, k, v, past=6, attention_bias=hidden)
    big_q, big_k, big_v, scale = probes.overflow_inputs()
    scored = run(big_q, big_k, big_v, past=1, scale=scale)
    return {
        "alignment": probes.alignment_of(probes.seen(causal), k_len=8),
        "empty_row": f"{probes.empty_row_of(empty[0], v)} (causal=1 without softcap: "
        f"{probes.empty_row_of(causal_empty[0], v)})",
        "window": "local_window_size=2 keeps " + probes.reach_of(probes.seen(window)[7], 7),
        "lse": "not returned",
        "scores": probes.scores_of(scored[0]),
    }


def _probe_mha() -> dict[str, str]:
    """``MultiHeadAttention``'s conventions, measured by calling it directly."""

    def run(q: np.ndarray, k: np.ndarray, v: np.ndarray, past: int = 0, **options: Any) -> Any:
        """One row, one head: the first ``past`` keys as ``past_key``, the rest new."""
        feeds = {"query": q[None], "key": k[None, past:], "value": v[None, past:]}
        if past:
            feeds |= {"past_key": k[None, None, :past], "past_value": v[None, None, :past]}
        feeds |= {n: options.pop(n) for n in ("key_padding_mask",) if n in options}
        outputs = ("output", "present_key", "present_value") if past else ("output",)
        out = _run("MultiHeadAttention", MHA_INPUTS, feeds, {"num_heads": 1, **options},
                   outputs)[0]  # fmt: skip
        return np.asarray(out[0], dtype=np.float64)

    q, k, v = probes.one_hot_inputs(q_len=2, k_len=8)
    with_past = probes.alignment_of(probes.seen(run(q, k, v, past=6, unidirectional=1)), k_len=8)
    without = probes.alignment_of(probes.seen(run(q, k, v, unidirectional=1)), k_len=8)
    hidden = np.zeros((1, 2, 8), dtype=np.int32)
    hidden[:, 1] = 1
    empty = run(q, k, v, key_padding_mask=hidden)  # the default mask_filter_value, -10000
    big_q, big_k, big_v, scale = probes.overflow_inputs()
    scored = run(big_q, big_k, big_v, scale=scale)
    return {
        "alignment": f"unidirectional with a past: {with_past}; with none: {without}",
        "empty_row": probes.empty_row_of(empty[0], v),
        "window": "no window argument",
        "lse": "not returned",
        "scores": probes.scores_of(scored[0]),
    }


# -- implementations and defects ---------------------------------------------------------------

#: What the GroupQueryAttention adapter expresses: every default feature but the lse, every
#: mask kind, a bias, sink logits, sink tokens, a right reach, large head dims, MQA.
GQA_FEATURES = ("alibi", "bias", "causal", "document_mask", "empty_slots", "gqa",
                "large_logits", "latent", "long", "mask", "mqa", "positions", "prefix_lm",
                "ragged", "sink_logits", "sink_tokens", "softcap", "tiles", "tree_mask",
                "two_sided_window", "window")  # fmt: skip
#: What the MultiHeadAttention adapter expresses: no softcap, no GQA, no lse; a right reach
#: and latent shapes too (everything is a mask).
MHA_FEATURES = ("alibi", "bias", "causal", "document_mask", "empty_slots", "large_logits",
                "latent", "long", "mask", "positions", "prefix_lm", "ragged", "sink_logits",
                "sink_tokens", "tiles", "tree_mask", "two_sided_window", "window")  # fmt: skip
#: The in-op MultiHeadAttention: the same, its splits anywhere, no sink logits.
MHA_IN_OP_FEATURES = tuple(sorted((set(MHA_FEATURES) - {"sink_logits"}) | {"in_op_cache"}))
_GQA_UNSAID = (
    "in-op splits with other than as many new tokens as queries (in_op_cache is not drawn), "
    "and a key of zero tokens (a shared KV)",
    "rotary embeddings (do_rotary, cos_cache, sin_cache, position_ids)",
    "the quantized caches (k_scale, v_scale, kv_cache_bit_width) and the window-sized "
    "cache (sliding_window_cache)",
    "right-padded query chunks (query_seqlens below sequence_length)",
    "shared past and present buffers, packed QKV, q_norm_weight, output_qk",
    "bfloat16 (no CPU kernel) and float64 (not in the schema)",
)
_MHA_UNSAID = (
    "the input projection's bias, packed QKV and KV, cache_indirection (beam search), "
    "past_sequence_length (shared buffers), the qk output",
    "the key_padding_mask form of 3 * batch_size + 2 entries",
    "bfloat16 (no CPU kernel) and float64 (not in the schema)",
)

IMPLEMENTATIONS = (
    Implementation("onnxruntime GroupQueryAttention (com.microsoft)", "onnxruntime",
                   "attention", onnxruntime_group_query_attention, CPU_DTYPES, GQA_FEATURES,
                   requires=("onnxruntime", "onnx"), probe=_probe_gqa,
                   cannot_express=_GQA_UNSAID),
    Implementation("onnxruntime GroupQueryAttention (com.microsoft, output only)",
                   "onnxruntime", "attention", onnxruntime_group_query_attention_output_only,
                   CPU_DTYPES, GQA_FEATURES, requires=("onnxruntime", "onnx"),
                   cannot_express=_GQA_UNSAID),
    Implementation("onnxruntime MultiHeadAttention (com.microsoft)", "onnxruntime",
                   "attention", onnxruntime_multi_head_attention, CPU_DTYPES, MHA_FEATURES,
                   requires=("onnxruntime", "onnx"), probe=_probe_mha,
                   cannot_express=_MHA_UNSAID),
    Implementation("onnxruntime MultiHeadAttention (com.microsoft, in-op cache)",
                   "onnxruntime", "attention", onnxruntime_multi_head_attention_in_op,
                   CPU_DTYPES, MHA_IN_OP_FEATURES, requires=("onnxruntime", "onnx"),
                   cannot_express=_MHA_UNSAID),
)  # fmt: skip


def _wrong_values(failure: Failure) -> bool:
    """A wrong or non-finite output, not a crash or a refusal."""
    return failure.outcome.symptom in ("wrong out", "non-finite out")


def _rebuilt(failure: Failure) -> AttentionProblem | None:
    """The failing problem, rebuilt from its spec (float32 NumPy: its positions are what
    matter), or None for a cache's failure."""
    from refattn.testing.attention_check import make_problem
    from refattn.testing.problems import ProblemSpec

    spec = failure.outcome.spec
    return make_problem(spec) if isinstance(spec, ProblemSpec) else None


def _misread_past(failure: Failure) -> bool:
    """The output-only call's failures: wrong values, or values that change from one call to
    the next (what it reads is not the past it was given), where some row has a past."""
    problem = _rebuilt(failure)
    varying = "nondeterministic" in failure.outcome.message
    if problem is None or not (_wrong_values(failure) or varying):
        return False
    try:
        totals = _gqa_totals(problem)
    except Unsupported:
        return False
    return bool((totals > problem.q.shape[2]).any())


def _last_query_unmasked(failure: Failure, *, in_op: bool) -> bool:
    """Wrong values where ``unidirectional`` is passed and ``key`` has more tokens than
    ``query``."""
    problem = _rebuilt(failure)
    if problem is None or not _wrong_values(failure):
        return False
    Sq, Sk = problem.q.shape[2], problem.k.shape[2]
    try:
        past = Sk - _new_tokens(problem) if in_op else 0
    except Unsupported:
        return False
    keep = visible(problem)
    if problem.sink_logits is not None:
        k, v = host(problem.k), host(problem.v)
        keep = with_sink_key(problem, k, v, keep, additive(problem))[2]
    return _mha_native(keep, past) is not None and keep.shape[-1] - past > Sq


def _unidirectional_defect(implementation: str, *, in_op: bool) -> Defect:
    """MultiHeadAttention's last query left unmasked, as ``implementation`` meets it."""
    return Defect(
        implementation=implementation,
        title="MultiHeadAttention's unidirectional mask on the CPU leaves the last query "
        "unmasked when key has more tokens than query: that query sees every key, where the "
        "others see keys up to past + i",
        matches=functools.partial(_last_query_unmasked, in_op=in_op),
        reproducer="onnxruntime_mha_unidirectional.py",
        reference="MultiHeadAttention's schema: unidirectional, 'Whether every token can only "
        "attend to previous tokens'; no limit stated on kv_sequence_length",
        expected="with 2 queries over 4 keys (no past), query 1 sees keys 0 and 1, as query 0 "
        "sees key 0 (query i up to key past + i): out[1] = mean(v[0], v[1])",
    )


DEFECTS = (
    Defect(
        implementation="onnxruntime GroupQueryAttention (com.microsoft, output only)",
        title="GroupQueryAttention and MultiHeadAttention on the CPU misread past_key and "
        "past_value when present_key and present_value are not asked for: the output is NaN, "
        "wrong, or varies from call to call, where the same call asking for them is right",
        matches=_misread_past,
        reproducer="onnxruntime_past_without_present.py",
        reference="both schemas: present_key and present_value are optional outputs; past_key "
        "and past_value are the past state the attention reads",
        expected="the causal attention of the query over the past keys and the new one, as "
        "the same call asking for present_key and present_value returns it",
    ),
    _unidirectional_defect("onnxruntime MultiHeadAttention (com.microsoft)", in_op=False),
    _unidirectional_defect("onnxruntime MultiHeadAttention (com.microsoft, in-op cache)",
                           in_op=True),
)  # fmt: skip
