r"""ONNX's standard ``Attention`` operator (opsets 23, 24 and 25) as candidates, run by
onnxruntime's CPU provider and by ``onnx.reference.ReferenceEvaluator``.

Each call builds (and keeps, per signature) a one-node model with
``onnx.helper``; the arrays are fed as NumPy. How refattn's problem is said
in the operator's terms (the ``Attention`` schema of ``onnx.defs``):

- Layout: 4D (B, H, S, D) inputs, or, for every other problem (by its seed),
  the 3D (B, S, H * D) form with ``q_num_heads`` and ``kv_num_heads``.
  Query head :math:`h` reads KV head :math:`h // (H_q/H_{kv})`, the
  operator's grouping (GQA and MQA).
- Positions: the operator's own masking numbers keys by slot and queries by
  an **offset**: query :math:`i` attends slot :math:`j` iff
  :math:`j \le i + \text{offset}` under ``is_causal``, where offset is the
  past cache's length (``past_key``), :math:`L_b - S_q` with
  ``nonpad_kv_seqlen`` (opset 24 on; that input also hides slots from
  :math:`L_b`), and 0 otherwise. Opset 25's ``left_window_size`` and
  ``right_window_size`` bound :math:`p - \text{left} \le j \le p +
  \text{right}` about :math:`p = \text{offset} + i`. The adapter passes each
  of these only where it says exactly what the problem's positions say
  (refattn's window :math:`W` is ``left = W - 1``, its right reach
  :math:`R` is ``right = R``), so that the operator's own masking is what is
  checked; whatever they leave visible that the problem hides goes in
  ``attn_mask``, and nothing more.
- ``attn_mask``: boolean (True keeps) or float (added to the scores:
  :math:`-\infty` hides), chosen by the problem's seed; a float mask always
  where there is an ALiBi term, a bias or a sink. Trailing columns hidden for
  every query are left off: the operator pads a short mask with
  :math:`-\infty` (False).
- A sink logit is one more key of zeros, seen by every query, scored
  :math:`\sigma_h` by the float mask (the operator has no sinks of its own);
  with sinks every visibility goes by the mask.
- ``scale`` and ``softcap`` are attributes, which ONNX stores as float32: the
  default scale is left to the operator (:math:`1/\sqrt{D}`); a float64
  problem whose scale or softcap is no float32 is Unsupported.
- The in-op cache (``*_in_op``): ``past_key`` and ``past_value`` hold each
  row's keys before the problem's last ``new_keys`` slots, ``K`` and ``V``
  the new tokens, and the operator concatenates them into ``present_key``
  and ``present_value``, returned as the :attr:`~refattn.testing.Result.present`
  the verifier compares with the problem's keys. The operator appends after
  the whole past (its past "do[es] not contain padded tokens"), so a row whose
  new tokens do not end the slots is Unsupported.
- A row with no visible key: the operator's own text says a fully masked row
  is a zero row, refattn's convention; nothing is mapped.
- No log-sum-exp is returned: ``return_lse`` is Unsupported.

Precision (declared as :data:`ONNX_ATTENTION`): the operator's function body
scales ``Q`` and ``K`` by :math:`\sqrt{\text{scale}}` in the input type,
multiplies them in it, takes the softmax in it ("If softmax precision is not
provided, the same precision as the input of softmax (Q and K) is used") and
casts the weights to it before the second ``MatMul``: float16 scores and
weights, as an eager layer rounds.

onnx and onnxruntime are imported inside the functions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from refattn.testing.adapters.libraries import require
from refattn.testing.adapters.numpy_masks import additive, host, visible, with_sink_key
from refattn.testing.candidate import AttentionProblem, Result, Unavailable, Unsupported
from refattn.testing.conformance import probes
from refattn.testing.conformance.implementations import Defect, Implementation
from refattn.testing.drawing import DEFAULT_FEATURES
from refattn.testing.layouts import trailing_new_tokens
from refattn.testing.precision import Precision
from refattn.testing.report import Failure

#: The operator's own contract: scores and softmax weights in the input type, the
#: products accumulated as a GEMM with a float32 accumulator would.
ONNX_ATTENTION = Precision(scores="input", softmax="input", accumulator="float32", prescale="root")
#: The operator's inputs, in order: a missing optional one is "" in a node's inputs.
INPUTS = ("Q", "K", "V", "attn_mask", "past_key", "past_value", "nonpad_kv_seqlen")
#: Who runs a model: onnxruntime's CPU provider, or onnx's reference evaluator.
RUNNERS = ("onnxruntime", "reference")


def onnx_attention_23(problem: AttentionProblem) -> Any:
    """The ``Attention`` operator of opset 23, run by onnxruntime."""
    return _attention(problem, runner="onnxruntime", opset=23)


def onnx_attention_24(problem: AttentionProblem) -> Any:
    """The ``Attention`` operator of opset 24 (``nonpad_kv_seqlen``), run by onnxruntime."""
    return _attention(problem, runner="onnxruntime", opset=24)


def onnx_attention_25(problem: AttentionProblem) -> Any:
    """The ``Attention`` operator of opset 25 (window sizes), run by onnxruntime."""
    return _attention(problem, runner="onnxruntime", opset=25)


def onnx_attention_23_in_op(problem: AttentionProblem) -> Any:
    """Opset 23's ``Attention`` with ``past_key``/``past_value`` in and ``present_*`` out,
    run by onnxruntime."""
    return _attention(problem, runner="onnxruntime", opset=23, in_op=True)


def onnx_attention_24_in_op(problem: AttentionProblem) -> Any:
    """Opset 24's ``Attention`` with its in-op cache, run by onnxruntime."""
    return _attention(problem, runner="onnxruntime", opset=24, in_op=True)


def onnx_reference_attention_23(problem: AttentionProblem) -> Any:
    """The ``Attention`` operator of opset 23, run by ``onnx.reference.ReferenceEvaluator``."""
    return _attention(problem, runner="reference", opset=23)


def onnx_reference_attention_24(problem: AttentionProblem) -> Any:
    """The ``Attention`` operator of opset 24, run by the reference evaluator."""
    return _attention(problem, runner="reference", opset=24)


def onnx_reference_attention_25(problem: AttentionProblem) -> Any:
    """The ``Attention`` operator of opset 25, run by the reference evaluator."""
    return _attention(problem, runner="reference", opset=25)


def onnx_reference_attention_23_in_op(problem: AttentionProblem) -> Any:
    """Opset 23's ``Attention`` with its in-op cache, run by the reference evaluator."""
    return _attention(problem, runner="reference", opset=23, in_op=True)


def onnx_reference_attention_24_in_op(problem: AttentionProblem) -> Any:
    """Opset 24's ``Attention`` with its in-op cache, run by the reference evaluator."""
    return _attention(problem, runner="reference", opset=24, in_op=True)


_ADAPTERS = (onnx_attention_23, onnx_attention_24, onnx_attention_25, onnx_attention_23_in_op,
             onnx_attention_24_in_op, onnx_reference_attention_23, onnx_reference_attention_24,
             onnx_reference_attention_25, onnx_reference_attention_23_in_op,
             onnx_reference_attention_24_in_op)  # fmt: skip
for _adapter in _ADAPTERS:
    _adapter.precision = ONNX_ATTENTION  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Native:
    """What the operator's own arguments say of a problem's positions.

    Attributes
    ----------
    attributes : ``is_causal``, ``left_window_size``, ``right_window_size`` as passed
    nonpad : (B,) int64 ``nonpad_kv_seqlen``, or None
    keeps : (B, 1, Sq, Sk) booleans: the slots those arguments leave visible
    """

    attributes: Mapping[str, int]
    nonpad: np.ndarray | None
    keeps: np.ndarray


def native_masking(
    problem: AttentionProblem, opset: int, past: int | None = None, *, sink: bool = False
) -> Native:
    """The operator's own arguments for the problem's positions, each used only where it
    keeps exactly what the problem's rule keeps on every held slot.

    ``past`` is the in-op cache's past length (the causal offset); ``sink``
    says a sink key will be appended, which no slot rule keeps, so every
    visibility then goes by the mask.

    >>> from refattn.testing import ProblemSpec, make_problem
    >>> p = make_problem(ProblemSpec(q_len=2, k_len=5, causal=True))  # queries at 3, 4
    >>> native = native_masking(p, 24)
    >>> dict(native.attributes), native.nonpad.tolist()
    ({'is_causal': 1}, [5])
    >>> native_masking(p, 23).attributes  # offset 0: top-left, not these positions
    {}
    """
    q_pos, k_pos = host(problem.q_pos), host(problem.k_pos)
    B, Sq = q_pos.shape
    Sk = k_pos.shape[1]
    held = k_pos >= 0  # (B, Sk)
    everything = np.ones((B, 1, Sq, Sk), dtype=bool)
    if sink:
        return Native({}, None, everything)
    lengths = held.sum(axis=1)  # (B,)
    leading = bool(np.all(held == (np.arange(Sk) < lengths[:, None])))
    nonpad = None
    if past is not None:
        offset = np.full(B, past)
    elif opset >= 24 and leading and Sk:
        nonpad, offset = lengths.astype(np.int64), lengths - Sq
    else:
        offset = np.zeros(B, dtype=np.int64)
    i = np.arange(Sq)[None, :, None]
    j = np.arange(Sk)[None, None, :]
    p = offset[:, None, None] + i  # (B, Sq, 1): the operator's position of query i
    query, key = q_pos[:, :, None], k_pos[:, None, :]  # (B, Sq, 1), (B, 1, Sk)
    held3 = np.broadcast_to(held[:, None, :], (B, Sq, Sk))

    def says(ours: np.ndarray, theirs: np.ndarray) -> bool:
        return bool(np.array_equal(np.broadcast_to(ours, (B, Sq, Sk))[held3],
                                   np.broadcast_to(theirs, (B, Sq, Sk))[held3]))  # fmt: skip

    attributes: dict[str, int] = {}
    keeps = np.ones((B, Sq, Sk), dtype=bool) if nonpad is None else np.broadcast_to(
        j < nonpad[:, None, None], (B, Sq, Sk))  # fmt: skip
    if problem.causal and says(key <= query, j <= p):
        attributes["is_causal"] = 1
        keeps = keeps & (j <= p)
    if opset >= 25 and problem.window is not None:
        ours = (query - key < problem.window) | (key < problem.sink_tokens)
        if says(ours, j >= p - (problem.window - 1)):
            attributes["left_window_size"] = problem.window - 1
            keeps = keeps & (j >= p - (problem.window - 1))
    if opset >= 25 and problem.window_right is not None and "is_causal" not in attributes:
        if says(key - query <= problem.window_right, j <= p + problem.window_right):
            attributes["right_window_size"] = problem.window_right
            keeps = keeps & (j <= p + problem.window_right)
    return Native(attributes, nonpad, np.asarray(keeps)[:, None])


def _attention(problem: AttentionProblem, *, runner: str, opset: int, in_op: bool = False) -> Any:
    """The operator on the problem: its output (and, in-op, the present cache)."""
    _refuse(problem)
    q, k, v = (host(x) for x in (problem.q, problem.k, problem.v))
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    past = None
    if in_op:
        past = Sk - _new_tokens(problem)
    keep = visible(problem)  # (B, 1 or Hq, Sq, Sk)
    terms = additive(problem)  # (B, Hq, Sq, Sk) float64, or None
    sink = problem.sink_logits is not None
    native = native_masking(problem, opset, past, sink=sink)
    if sink:
        k, v, keep, terms = with_sink_key(problem, k, v, keep, terms)
        native = Native({}, None, np.ones((keep.shape[0], 1, *keep.shape[2:]), dtype=bool))
    # The mask hides what the operator's own arguments leave visible but the problem
    # hides, and no more: what they hide is theirs to get right.
    mask_keeps = keep | ~native.keeps  # (B, 1 or Hq, Sq, Sk')
    feeds: dict[str, np.ndarray] = {}
    attributes: dict[str, Any] = dict(native.attributes)
    float_mask = terms is not None or problem.spec.seed % 2 == 1
    if not bool(mask_keeps.all()) or terms is not None:
        feeds["attn_mask"] = _mask(mask_keeps, terms, q.dtype, floating=float_mask)
    if native.nonpad is not None:
        feeds["nonpad_kv_seqlen"] = native.nonpad
    if problem.scale != 1 / math.sqrt(D):
        attributes["scale"] = problem.scale
    if problem.softcap is not None:
        attributes["softcap"] = problem.softcap
    if problem.dtype in ("float16", "bfloat16"):
        attributes["softmax_precision"] = 1  # TensorProto.FLOAT
    three_d = problem.spec.seed % 4 >= 2
    if past is not None:
        feeds |= {"past_key": k[:, :, :past], "past_value": v[:, :, :past]}
        k, v = k[:, :, past:], v[:, :, past:]
    if three_d:
        attributes |= {"q_num_heads": Hq, "kv_num_heads": Hkv}
        q, k, v = (_three_d(x) for x in (q, k, v))
    feeds |= {"Q": q, "K": k, "V": v}
    if runner == "onnxruntime" and k.shape[-2] == 0:
        # "KV sequence length must be greater than 0" (attention_parameters.h).
        raise Unsupported("onnxruntime's Attention takes no K of zero tokens")
    outputs = ("Y", "present_key", "present_value") if in_op else ("Y",)
    results = _run(runner, opset, feeds, attributes, outputs)
    out = results[0]
    if three_d:  # (B, Sq, Hq * Dv) -> (B, Hq, Sq, Dv)
        out = np.swapaxes(out.reshape(B, Sq, Hq, -1), 1, 2)
    if not in_op:
        return out
    return Result(out, present=(results[1], results[2]))


def _refuse(problem: AttentionProblem) -> None:
    """Unsupported for what the operator takes of no problem."""
    if problem.return_lse:
        raise Unsupported("the ONNX Attention operator returns no log-sum-exp")
    if problem.dtype == "float16":
        q, k = (host(x).astype(np.float32) for x in (problem.q, problem.k))
        groups = q.shape[1] // max(k.shape[1], 1)
        scores = problem.scale * (q @ np.swapaxes(np.repeat(k, groups, axis=1), -1, -2))
        if scores.size and float(np.abs(scores).max()) >= float(np.finfo(np.float16).max):
            raise Unsupported("the ONNX Attention operator forms the scores in the input type, "
                              "where float16 ends at 65504")  # fmt: skip
    if problem.dtype == "float64":
        default_scale = 1 / math.sqrt(problem.q.shape[-1])
        for name, value in (("scale", problem.scale), ("softcap", problem.softcap)):
            left_to_the_operator = value is None or (name == "scale" and value == default_scale)
            if not left_to_the_operator and float(np.float32(value)) != value:
                raise Unsupported(f"ONNX stores the {name} attribute as a float32; this float64 "
                                  f"problem's {name} is not one")  # fmt: skip


def _new_tokens(problem: AttentionProblem) -> int:
    """The new tokens per row, where every row's are its last slots (Unsupported if not)."""
    try:
        return trailing_new_tokens(problem)
    except ValueError:  # one reason for every such problem, so the report counts them together
        why = ("the ONNX Attention operator appends the new tokens after the whole past: each "
               "row's new tokens must be its last slots")  # fmt: skip
        raise Unsupported(why) from None


def _mask(
    keep: np.ndarray, terms: np.ndarray | None, dtype: np.dtype, *, floating: bool
) -> np.ndarray:
    """``attn_mask``: booleans, or the additive terms with :math:`-\\infty` where hidden, in
    the input type; trailing columns hidden for every query left off."""
    kept_columns = np.flatnonzero(keep.any(axis=(0, 1, 2)))
    width = int(kept_columns[-1]) + 1 if kept_columns.size else keep.shape[-1]
    keep = keep[..., :width]
    if not floating:
        return np.ascontiguousarray(keep)
    base = np.zeros(keep.shape) if terms is None else terms[..., :width]
    return np.where(keep, base, -np.inf).astype(dtype)


def _three_d(x: np.ndarray) -> np.ndarray:
    """(B, H, S, D) -> (B, S, H * D), the operator's 3D form."""
    B, H, S, D = x.shape
    return np.ascontiguousarray(np.swapaxes(x, 1, 2).reshape(B, S, H * D))


def _run(
    runner: str, opset: int, feeds: Mapping[str, np.ndarray], attributes: Mapping[str, Any],
    outputs: tuple[str, ...],
) -> list[np.ndarray]:  # fmt: skip
    """Run the one-node model these feeds and attributes make; the model and its session
    are kept per signature."""
    dtype = feeds["Q"].dtype.name
    mask = feeds.get("attn_mask")
    signature = (runner, opset, dtype, tuple((n, feeds[n].ndim) for n in INPUTS if n in feeds),
                 None if mask is None else mask.dtype.name,
                 tuple(sorted(attributes.items())), outputs)  # fmt: skip
    session = _session(signature)
    if runner == "onnxruntime":
        return list(session.run(None, dict(feeds)))
    with np.errstate(all="ignore"):  # the evaluator's own float16 overflow is the operator's
        return list(session.run(None, dict(feeds)))


@functools.lru_cache(maxsize=512)
def _session(signature: tuple[Any, ...]) -> Any:
    runner, opset, dtype, present, mask_dtype, attributes, outputs = signature
    require("onnx")
    import onnx

    if onnx.defs.onnx_opset_version() < opset:
        raise Unavailable(f"onnx {onnx.__version__} has no opset {opset} (its last is "
                          f"{onnx.defs.onnx_opset_version()})")  # fmt: skip
    model = one_node_model(opset, dtype, present, mask_dtype, dict(attributes), outputs)
    if runner == "onnxruntime":
        require("onnxruntime")
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 4  # its own errors come back as exceptions
        try:
            return onnxruntime.InferenceSession(model.SerializeToString(), options,
                                                providers=["CPUExecutionProvider"])  # fmt: skip
        except Exception as exc:  # an onnxruntime older than the opset
            if "opset" not in str(exc).lower():
                raise
            raise Unavailable(f"onnxruntime {onnxruntime.__version__} does not run opset "
                              f"{opset}: {str(exc)[:120]}") from None  # fmt: skip
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model)


def one_node_model(
    opset: int, dtype: str, inputs: tuple[tuple[str, int], ...], mask_dtype: str | None,
    attributes: Mapping[str, Any], outputs: tuple[str, ...] = ("Y",),
) -> Any:  # fmt: skip
    """A model of one ``Attention`` node of ``opset`` taking ``inputs`` (pairs of a name
    among :data:`INPUTS` and its rank) in ``dtype``, the mask in ``mask_dtype``; sizes
    left free.

    >>> import pytest; _ = pytest.importorskip("onnx")
    >>> model = one_node_model(24, "float32", (("Q", 4), ("K", 4), ("V", 4),
    ...                        ("nonpad_kv_seqlen", 1)), None, {"is_causal": 1})
    >>> list(model.graph.node[0].input)
    ['Q', 'K', 'V', '', '', '', 'nonpad_kv_seqlen']
    """
    require("onnx")
    import onnx
    from onnx import TensorProto, helper

    element = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16,
               "float64": TensorProto.DOUBLE, "bfloat16": TensorProto.BFLOAT16}  # fmt: skip
    types = {name: element[dtype] for name in INPUTS}
    types["nonpad_kv_seqlen"] = TensorProto.INT64
    if mask_dtype is not None:
        types["attn_mask"] = TensorProto.BOOL if mask_dtype == "bool" else element[mask_dtype]
    ranks = dict(inputs)
    ranks |= {"Y": ranks["Q"], "present_key": 4, "present_value": 4}
    last = max(INPUTS.index(name) for name in ranks if name in INPUTS)
    names = [name if name in ranks else "" for name in INPUTS[: last + 1]]
    node = helper.make_node("Attention", names, list(outputs), **attributes)

    def typed(name: str, element_type: int) -> Any:
        sizes = [f"{name}_{i}" for i in range(ranks[name])]  # symbolic: any size
        return helper.make_tensor_value_info(name, element_type, sizes)

    graph = helper.make_graph([node], "attention",
                              [typed(name, types[name]) for name, _ in inputs],
                              [typed(name, element[dtype]) for name in outputs])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 10)  # what this onnxruntime reads
    onnx.checker.check_model(model)
    return model


def _probe(runner: str) -> dict[str, str]:
    """The operator's conventions under ``runner``, measured by running one-node models
    directly (opset 24, and opset 25 for the window)."""

    def run(q: np.ndarray, k: np.ndarray, v: np.ndarray, opset: int = 24,
            **extra: Any) -> np.ndarray:  # fmt: skip
        attributes = {name: extra.pop(name) for name in list(extra) if name not in INPUTS}
        feeds = {"Q": q[None, None], "K": k[None, None], "V": v[None, None], **extra}
        outputs = ("Y", "present_key", "present_value") if "past_key" in feeds else ("Y",)
        return _run(runner, opset, feeds, attributes, outputs)[0][0, 0].astype(np.float64)

    q, k, v = probes.one_hot_inputs(q_len=2, k_len=8)
    plain = probes.alignment_of(probes.seen(run(q, k, v, is_causal=1)), k_len=8)
    past = run(q, k[6:], v[6:], is_causal=1, past_key=k[None, None, :6],
               past_value=v[None, None, :6])  # fmt: skip
    nonpad = run(q, k, v, is_causal=1, nonpad_kv_seqlen=np.array([8]))
    with_past, with_nonpad = (probes.alignment_of(probes.seen(x), k_len=8) for x in (past, nonpad))
    alignment = (f"{plain} without a cache; {with_past} with past_key; "
                 f"{with_nonpad} with nonpad_kv_seqlen")  # fmt: skip
    hidden = np.ones((1, 1, 2, 8), dtype=bool)
    hidden[..., 0, :] = False
    empty = run(q, k, v, attn_mask=hidden)
    square_q, square_k, square_v = probes.one_hot_inputs(q_len=8, k_len=8)
    window = run(square_q, square_k, square_v, opset=25, is_causal=1, left_window_size=2)
    big_q, big_k, big_v, _ = probes.overflow_inputs()  # q.k = 131072 at scale 1
    scored = run(big_q, big_k, big_v, scale=1.0)
    scores = ("float16: q.k overflows past 65504" if not np.all(np.isfinite(scored))
              else "float32 or wider: q.k = 131072 is finite")  # fmt: skip
    return {
        "alignment": alignment,
        "empty_row": probes.empty_row_of(empty[0], v),
        "window": "left_window_size=2 keeps " + probes.reach_of(probes.seen(window)[7], 7),
        "lse": "not returned",
        "scores": scores,
    }


def _runtime_probe() -> dict[str, str]:
    """onnxruntime's conventions for the operator."""
    require("onnxruntime")
    return _probe("onnxruntime")


def _reference_probe() -> dict[str, str]:
    """``onnx.reference``'s conventions for the operator."""
    require("onnx")
    return _probe("reference")


#: What the adapters express: the default features but the lse, every mask kind, a bias,
#: sinks both ways, a right reach, the latent and MQA shapes (the in-op rows add the cache).
ONNX_FEATURES = tuple(sorted((DEFAULT_FEATURES - {"lse"}) | {
    "mask", "tree_mask", "document_mask", "prefix_lm", "bias", "sink_logits", "sink_tokens",
    "two_sided_window", "latent", "mqa"}))  # fmt: skip
_UNSAID = (
    "a NaN or infinity in a key no query sees (the operator hides keys by adding -inf to "
    "their scores, so a NaN score stays NaN by its own definition; unseen_nan is not drawn)",
    "the log-sum-exp (not an output)",
    "qk_matmul_output and its four modes",
    "softmax_precision left unset for float16 and bfloat16 (a softmax summed in the input "
    "type, beyond what a precision contract states; the adapter asks for float32)",
    "a float64 scale or softcap that is no float32 (attributes are float32)",
)
_RUNTIME_UNSAID = (
    *_UNSAID,
    "bfloat16 on the CPU provider (no kernel: 'Could not find an implementation for Expand(13)')",
    "providers other than the CPU one",
)


def _implementation(name: str, target: Any, runner: str, in_op: bool = False) -> Implementation:
    runtime = runner == "onnxruntime"
    return Implementation(
        name, "onnxruntime" if runtime else "onnx", "attention", target,
        ("float32", "float16", "float64") + (() if runtime else ("bfloat16",)),
        (*ONNX_FEATURES, "in_op_cache") if in_op else ONNX_FEATURES,
        requires=("onnx", "onnxruntime") if runtime else ("onnx",),
        probe=_runtime_probe if runtime else _reference_probe,
        cannot_express=_RUNTIME_UNSAID if runtime else _UNSAID,
    )  # fmt: skip


IMPLEMENTATIONS = (
    _implementation("onnxruntime Attention (opset 23)", onnx_attention_23, "onnxruntime"),
    _implementation("onnxruntime Attention (opset 24)", onnx_attention_24, "onnxruntime"),
    _implementation("onnxruntime Attention (opset 25)", onnx_attention_25, "onnxruntime"),
    _implementation("onnxruntime Attention (opset 23, past/present)", onnx_attention_23_in_op,
                    "onnxruntime", in_op=True),
    _implementation("onnxruntime Attention (opset 24, past/present)", onnx_attention_24_in_op,
                    "onnxruntime", in_op=True),
    _implementation("onnx.reference Attention (opset 23)", onnx_reference_attention_23,
                    "reference"),
    _implementation("onnx.reference Attention (opset 24)", onnx_reference_attention_24,
                    "reference"),
    _implementation("onnx.reference Attention (opset 25)", onnx_reference_attention_25,
                    "reference"),
    _implementation("onnx.reference Attention (opset 23, past/present)",
                    onnx_reference_attention_23_in_op, "reference", in_op=True),
    _implementation("onnx.reference Attention (opset 24, past/present)",
                    onnx_reference_attention_24_in_op, "reference", in_op=True),
)  # fmt: skip


def _short_mask_refused(failure: Failure) -> bool:
    """onnxruntime's check (or, for float64, its function body's Add) refusing a mask
    shorter than the total sequence length."""
    message = failure.outcome.message
    return "inconsistent total_sequence_length (between attn_mask" in message or (
        "Attempting to broadcast an axis by a dimension other than 1" in message
    )


def _zero_keys_raised(failure: Failure) -> bool:
    """The reference evaluator's reduction over an empty key axis."""
    return "zero-size array to reduction operation" in failure.outcome.message


_SHORT_MASK = Defect(
    IMPLEMENTATIONS[0].name,
    title="onnxruntime's CPU Attention rejects an attn_mask shorter than the total sequence "
    "length, which the schema pads with -inf",
    matches=_short_mask_refused,
    reproducer="onnxruntime_attention_short_mask.py",
    reference="ONNX Attention (opsets 23-25), attn_mask: 'The last dimension can also be "
    "shorter than total_sequence_length and will be padded to total_sequence_length with "
    "negative infinity'",
    expected="the softmax over the mask's columns alone: keys past them are hidden",
)
_ZERO_KEYS = Defect(
    IMPLEMENTATIONS[5].name,
    title="onnx.reference's Attention raises on K and V of zero tokens instead of returning "
    "zero rows",
    matches=_zero_keys_raised,
    reproducer="onnx_reference_attention_zero_keys.py",
    reference="ONNX Attention (opsets 23-25): 'A fully-masked query row (no key attended ...) "
    "produces a zero output row, not NaN'",
    expected="zeros: a query with no key to attend gets a zero row",
)
#: Each defect, in every row of its runner (onnxruntime's five, the reference's five).
DEFECTS = tuple(
    dataclasses.replace(_SHORT_MASK if i.library == "onnxruntime" else _ZERO_KEYS,
                        implementation=i.name)
    for i in IMPLEMENTATIONS
)  # fmt: skip
