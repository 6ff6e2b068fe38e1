"""The options of an attention call, written once: a frozen record that checks itself.

:func:`refattn.attention`, :func:`refattn.attention_blockwise`,
:func:`refattn.attention_split_kv` and the fused CuPy decode kernel take the
same keyword options. They are declared here, once, with their defaults; each
of those functions takes them as ``**options`` and shows them in its
signature through :func:`takes_options`. The record checks what it can alone
(flags, scalars, unknown names); the arrays among the options are checked
against q, k and v by :func:`refattn.checks.check_call`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import Any, TypeVar

from refattn.namespace import Array


@dataclass(frozen=True, eq=False)
class AttentionOptions:
    """Every keyword option of :func:`refattn.attention`, with its default.

    Examples
    --------
    >>> AttentionOptions(causal=True, window=4).window
    4
    >>> AttentionOptions(window=0)
    Traceback (most recent call last):
    ...
    ValueError: window must be >= 1 (the query itself counts); got 0
    """

    causal: bool = False  #: hide keys at positions after the query's
    q_pos: Array | None = None  #: (B, Sq) or (Sq,) absolute query positions
    k_pos: Array | None = None  #: (B, Sk) or (Sk,) key positions, negative for an empty slot
    mask: Array | None = None  #: boolean, broadcastable to (B, Hq, Sq, Sk), True keeps
    bias: Array | None = None  #: floating, broadcastable to (B, Hq, Sq, Sk), added to scores
    scale: float | None = None  #: default 1 / sqrt(D)
    window: int | None = None  #: keep keys with q_pos - k_pos < window
    window_right: int | None = None  #: keep keys with k_pos - q_pos <= window_right
    sink_tokens: int = 0  #: with a window, positions below this stay visible
    softcap: float | None = None  #: scores become softcap * tanh(scores / softcap)
    alibi_slopes: Array | None = None  #: (Hq,) or (B, Hq)
    sink_logits: Array | None = None  #: (Hq,), join the softmax denominator, add no value
    return_lse: bool = False  #: also return the log of the softmax denominator

    def __post_init__(self) -> None:
        for name in ("causal", "return_lse"):
            flag = getattr(self, name)
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False; got {flag!r}")
        check_real("scale", self.scale, positive=False)
        check_real("softcap", self.softcap, positive=True)
        if self.window is not None:
            check_integer("window", self.window, minimum=1, why=" (the query itself counts)")
        if self.window_right is not None:
            check_integer("window_right", self.window_right, minimum=0)
        check_integer("sink_tokens", self.sink_tokens, minimum=0)
        # NumPy's scalars (np.int64(3), np.float32(0.5)) are held as Python's, as declared.
        for name, kind in (
            ("scale", float),
            ("softcap", float),
            ("window", int),
            ("window_right", int),
            ("sink_tokens", int),
        ):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, kind(getattr(self, name)))

    @classmethod
    def of(cls, function: str, options: dict[str, Any]) -> AttentionOptions:
        """The record of ``options`` given to ``function``; an unknown name is a TypeError."""
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(
                f"{function}() got unexpected keyword arguments {unknown}; its options are "
                f"{list(OPTION_NAMES)}"
            )
        return cls(**options)


#: The option names, in the order of the signature.
OPTION_NAMES = tuple(f.name for f in fields(AttentionOptions))


def check_real(name: str, x: Any, *, positive: bool) -> None:
    """None, or a finite real number (NumPy's too, not a bool), and > 0 if ``positive``."""
    if x is None:
        return
    kind = "a positive" if positive else "a finite"
    if isinstance(x, bool) or not isinstance(x, Real):
        raise TypeError(f"{name} must be {kind} real number or None; got {x!r}")
    if not math.isfinite(x) or (positive and not float(x) > 0):
        raise ValueError(f"{name} must be finite{' and > 0' if positive else ''}; got {x}")


def check_integer(name: str, n: Any, *, minimum: int, why: str = "") -> None:
    """An integer (NumPy's too, not a bool) of at least ``minimum``: TypeError for the type,
    ValueError for the value."""
    if isinstance(n, bool) or not isinstance(n, Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}; got {n!r}")
    if int(n) < minimum:
        raise ValueError(f"{name} must be >= {minimum}{why}; got {n}")


Function = TypeVar("Function", bound=Callable[..., Any])


def takes_options(function: Function) -> Function:
    """Show the options of :class:`AttentionOptions` in the signature of ``function``.

    ``function`` declares ``**options``; its signature (what ``help()``, IDEs
    and the API docs show) lists each option with its default in their place.
    """
    signature = inspect.signature(function)
    own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    option_parameters = [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type
        )
        for f in fields(AttentionOptions)
    ]
    function.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*own, *option_parameters]
    )
    return function
