"""What a candidate kernel is handed, and the one way a candidate is run.

A candidate is someone else's attention function or cache. It receives an
:class:`AttentionProblem` (arrays on the backend and in the dtype checked,
positions always concrete) and may raise :class:`Unsupported` for a problem
its kernel cannot express. :func:`run_candidate` calls it and turns that, or
a crash, into an :class:`~refattn.testing.report.Outcome`, for
``check_attention`` and ``check_cache`` alike.
"""

from __future__ import annotations

import inspect
import math
import os
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from refattn.backends import Case, get
from refattn.options import check_integer
from refattn.testing.precision import SPEC, Precision
from refattn.testing.problems import ProblemSpec
from refattn.testing.report import Outcome, Report


class Unsupported(Exception):
    """Raised by a candidate for a problem its kernel cannot express; counted, not failed."""


class Unavailable(Unsupported):
    """Raised by a candidate that cannot run here at all (its library is not installed, or
    needs a GPU): the check stops and says so, ``unavailable: <reason>``, instead of
    counting every problem as refused or blaming the kernel."""


@dataclass(frozen=True)
class AttentionProblem:
    """One attention call, as a candidate receives it.

    The arrays are on the checked backend and device, in the checked dtype;
    ``q_pos`` and ``k_pos`` are int64 and always given (``k_pos = -1`` marks
    an empty slot). The candidate computes, for query head ``h`` and KV head
    ``h // (Hq // Hkv)``, softmax over the visible keys of
    ``softcap(scale * q.k) - slope * |q_pos - k_pos| + bias`` (the sink logit
    of head ``h``, if any, joining the denominator) and the weighted sum of
    the values: exactly ``refattn.attention`` with the problem's options,
    :meth:`options`.

    A key is visible when its slot is held (``k_pos >= 0``), the mask keeps
    it, it is not after the query (``causal``), within the window back
    (``q_pos - k_pos < window``, unless ``k_pos < sink_tokens``) and forward
    (``k_pos - q_pos <= window_right``).

    The fields after ``precision`` came later: ``check_attention`` sets them
    only when the features that draw them are asked for, so a candidate
    written before them is never handed a problem it would get wrong by not
    reading them. ``new_keys`` says where an in-op cache's past ends: the
    last ``new_keys`` held slots of each row are the new tokens' keys and
    values (:func:`refattn.testing.layouts.in_op_cache`).
    """

    q: Any  #: (B, Hq, Sq, D)
    k: Any  #: (B, Hkv, Sk, D)
    v: Any  #: (B, Hkv, Sk, Dv)
    causal: bool
    q_pos: Any  #: (B, Sq) int64
    k_pos: Any  #: (B, Sk) int64, -1 for an empty slot
    scale: float  #: always concrete: 1/sqrt(D) unless the problem sets one
    window: int | None  #: a key is visible when q_pos - k_pos < window
    softcap: float | None  #: scores become softcap * tanh(scores / softcap)
    alibi_slopes: Any | None  #: (Hq,) or (B, Hq), in the checked dtype
    return_lse: bool  #: return (out, lse), lse (B, Hq, Sq), natural log
    xp: Any  #: the array namespace of the arrays
    dtype: str  #: "float32", "float16", ...
    device: str
    backend: str
    spec: ProblemSpec  #: rebuilds this problem with ``make_problem``
    precision: Precision = SPEC  #: the precision contract the candidate is judged by
    mask: Any | None = None  #: boolean, broadcastable to (B, Hq, Sq, Sk); True keeps a key
    bias: Any | None = None  #: broadcastable to (B, Hq, Sq, Sk), in the checked dtype
    sink_logits: Any | None = None  #: (Hq,), in the checked dtype
    sink_tokens: int = 0  #: with a window, keys at positions below this stay visible
    window_right: int | None = None  #: a key is visible when k_pos - q_pos <= window_right
    new_keys: int = 0  #: an in-op cache's new keys: the last ``new_keys`` held slots per row
    #: (B, Hq, Sq, Dv) in the checked dtype: the output's gradient, which
    #: ``check_attention_backward`` hands its candidate (None in a forward check)
    dout: Any | None = None

    def options(self) -> dict[str, Any]:
        """The problem as keyword options of :func:`refattn.attention`: ``attention(p.q, p.k,
        p.v, **p.options())`` is the spec's answer on the problem's backend.

        >>> import refattn
        >>> from refattn.testing import ProblemSpec, make_problem
        >>> p = make_problem(ProblemSpec(q_len=2, k_len=4, causal=True, window_right=0))
        >>> refattn.attention(p.q, p.k, p.v, **p.options()).shape
        (1, 1, 2, 8)
        """
        names = (
            "causal",
            "q_pos",
            "k_pos",
            "scale",
            "window",
            "softcap",
            "alibi_slopes",
            "return_lse",
            "mask",
            "bias",
            "sink_logits",
            "sink_tokens",
            "window_right",
        )
        return {name: getattr(self, name) for name in names}  # fmt: skip


@dataclass(frozen=True)
class Result:
    """What a candidate may return instead of ``out`` or ``(out, lse)``, to say more.

    Attributes
    ----------
    out : (B, Hq, Sq, Dv) array
    lse : (B, Hq, Sq) array, when ``problem.return_lse``
    present : the in-op cache the candidate updated: ``(k, v)`` arrays of shape
        (B, Hkv, S, D) and (B, Hkv, S, Dv) with ``S >= Sk``, or a cache object
        that holds them (:func:`present_arrays`). Its first Sk slots must equal
        the problem's ``k`` and ``v`` exactly in every held slot (``k_pos >= 0``):
        the past it was given and the new keys it appended.
    dont_care : (B, Sq) booleans, True for query rows whose output the kernel
        leaves undefined (padding queries); they are not compared, and the report
        counts them.
    """

    out: Any
    lse: Any = None
    present: Any = None
    dont_care: Any = None


def present_arrays(present: Any) -> tuple[Any, Any]:
    """The (k, v) arrays an in-op cache holds: a pair itself, or a cache object with
    ``layers[0].keys`` / ``.values`` (transformers' caches), ``key_cache[0]`` /
    ``value_cache[0]`` (their older form), ``keys`` / ``values`` arrays, or ``view()``
    returning ``(k, v, ...)`` (refattn's caches)."""
    if isinstance(present, tuple | list) and len(present) == 2:
        return present[0], present[1]
    layers = getattr(present, "layers", None)
    if layers and hasattr(layers[0], "keys") and not callable(layers[0].keys):
        return layers[0].keys, layers[0].values
    if hasattr(present, "key_cache") and hasattr(present, "value_cache"):
        return present.key_cache[0], present.value_cache[0]
    keys = getattr(present, "keys", None)
    if keys is not None and not callable(keys):
        return keys, present.values
    if callable(getattr(present, "view", None)):
        viewed = present.view()
        return viewed[0], viewed[1]
    raise TypeError(
        "present must be a (k, v) pair or a cache holding them (layers[0].keys, key_cache, "
        f"keys/values, view()); got {type(present).__name__}"
    )


#: What a spec may set for its problem to be handed to a candidate today.
UNCHECKABLE = ("seen_nan",)


def on_backend(
    spec: ProblemSpec, arrays: dict[str, np.ndarray], case: Case, precision: Precision = SPEC
) -> AttentionProblem:
    """The problem of ``spec`` with its (rounded, float64) ``arrays`` moved to ``case``."""
    used = [name for name in UNCHECKABLE if getattr(spec, name)]
    if used:
        raise ValueError(f"a checked problem has no NaN in seen slots; spec sets {used}")
    backend = case.backend
    on = {n: backend.asarray(x, dtype=case.dtype, device=case.device) for n, x in arrays.items()}
    return AttentionProblem(
        q=on["q"],
        k=on["k"],
        v=on["v"],
        causal=spec.causal,
        q_pos=on["q_pos"],
        k_pos=on["k_pos"],
        scale=float(spec.scale) if spec.scale is not None else 1.0 / math.sqrt(spec.head_dim),
        window=spec.window,
        softcap=spec.softcap,
        alibi_slopes=on.get("alibi_slopes"),
        return_lse=spec.return_lse,
        xp=case.backend.namespace(),
        dtype=case.dtype,
        device=case.device,
        backend=case.backend.name,
        spec=spec,
        precision=precision,
        mask=on.get("mask"),
        bias=on.get("bias"),
        sink_logits=on.get("sink_logits"),
        sink_tokens=spec.sink_tokens,
        window_right=spec.window_right,
        new_keys=new_keys(spec, arrays["k_pos"]),
    )


def new_keys(spec: ProblemSpec, k_pos: np.ndarray) -> int:
    """How many of each row's held key slots an in-op cache gets as new: ``spec.new_keys``,
    else as many as there are queries, and never more than the fewest a row holds."""
    held = int((k_pos >= 0).sum(axis=-1).min()) if k_pos.size else 0
    wanted = spec.q_len if spec.new_keys is None else spec.new_keys
    return min(wanted, held)


def resolve_case(backend: str, device: str | None, dtype: str) -> Case:
    """The (backend, device, dtype) to check in, with an error naming what is not available."""
    chosen = get(backend)
    reason = chosen.unavailable_reason()
    if reason:
        raise ValueError(f"backend {backend!r} cannot run here: {reason}")
    devices = chosen.devices()
    device = devices[0] if device is None else device
    if device not in devices:
        raise ValueError(f"device must be one of {devices} for {backend}; got {device!r}")
    dtypes = chosen.dtypes(device)
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {dtypes} for {backend} on {device}; got {dtype!r}")
    return Case(chosen, device, dtype)


def run_candidate(start: Outcome, call: Callable[[], Any]) -> tuple[Any, Outcome | None]:
    """``call()``'s result and None; or, when it raised, None and the outcome that says so.

    :class:`Unsupported` is counted as unsupported (:class:`Unavailable` also
    stops the check). Anything else raised, ``SystemExit`` and other
    ``BaseException`` included, is a failure (shrunk like any other) naming the
    exception and where it was raised; only ``KeyboardInterrupt`` goes through,
    so that a user can still stop a check.
    """
    try:
        return call(), None
    except Unavailable as exc:
        return None, start.but(unsupported=str(exc) or "unavailable", unavailable=True)
    except Unsupported as exc:
        return None, start.but(unsupported=str(exc) or "unsupported")
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
        return None, start.but(message=f"raised {exc!r}{where}", raised=type(exc).__name__)


def checked_dtypes(dtypes: Iterable[str]) -> tuple[str, ...]:
    """The dtypes of a check; none at all is an error, since nothing would be checked."""
    if isinstance(dtypes, str):
        raise TypeError(f"dtypes must be a collection of names, not the string {dtypes!r}")
    chosen = tuple(dtypes)
    if not chosen:
        raise ValueError("dtypes must name at least one dtype; got none: nothing would be checked")
    return chosen


def new_report(
    candidate: Callable[..., Any], backend: str, device: str | None, dtypes: Iterable[str],
    features: frozenset[str],
) -> Report:  # fmt: skip
    """An empty report for a check of ``candidate``, every dtype already known to run there."""
    if not callable(candidate):
        raise TypeError(f"the candidate must be callable; got {candidate!r}")
    chosen = checked_dtypes(dtypes)
    case = resolve_case(backend, device, chosen[0])
    for dtype in chosen:
        resolve_case(backend, case.device, dtype)
    return Report(name=qualified_name(candidate), backend=backend, device=case.device,
                  dtypes=chosen, features=features, source=source_of(candidate))  # fmt: skip


def precision_of(candidate: Any, precision: Precision | None) -> Precision:
    """The precision contract a candidate is judged by: the one given, else the one it
    declares as its ``precision`` attribute, else the spec's own (:data:`SPEC`)."""
    chosen = precision if precision is not None else getattr(candidate, "precision", SPEC)
    if not isinstance(chosen, Precision):
        raise TypeError(f"precision must be a refattn.testing.precision.Precision; got {chosen!r}")
    return chosen


def check_budget(name: str, n: Any) -> int:
    """A number of problems to try, as an int: at least 1, since zero would check nothing."""
    check_integer(name, n, minimum=1, why=" (0 would check nothing)")
    return int(n)


def qualified_name(fn: Callable[..., Any]) -> str:
    """``module:qualname`` of a function or class, as a reproducer imports it."""
    module = getattr(fn, "__module__", None) or "__main__"
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}:{name}"


def source_of(fn: Callable[..., Any]) -> str:
    """``file:line`` where ``fn`` is defined (the file relative to the working directory when
    it lies below it), or "" where that is not known (a builtin, a REPL)."""
    try:
        path = inspect.getsourcefile(fn) or ""
        _, line = inspect.getsourcelines(fn)
    except (TypeError, OSError):
        return ""
    if not path or not os.path.exists(path):
        return ""
    relative = os.path.relpath(path)
    return f"{path if relative.startswith('..') else relative}:{line}"
