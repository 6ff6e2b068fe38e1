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
    ``softcap(scale * q.k) - slope * |q_pos - k_pos|`` and the weighted sum of
    the values (see ``refattn.attention``).
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


#: What a spec may set for its problem to be handed to a candidate today.
UNCHECKABLE = ("mask", "bias", "sink_logits", "seen_nan", "sink_tokens")


def on_backend(
    spec: ProblemSpec, arrays: dict[str, np.ndarray], case: Case, precision: Precision = SPEC
) -> AttentionProblem:
    """The problem of ``spec`` with its (rounded, float64) ``arrays`` moved to ``case``."""
    used = [name for name in UNCHECKABLE if getattr(spec, name)]
    if used:
        raise ValueError(
            f"a checked problem has no mask, bias, sink logits, NaN in seen slots or sink "
            f"tokens; spec sets {used}"
        )
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
    )


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
