"""Input checks: every error names the argument, what was expected and what was given.

The checks run before any arithmetic, so a bad call fails at once with a
message a reader can act on, instead of a broadcasting error deep inside a
matrix product.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

from array_api_compat import device

from refattn.namespace import Array, Namespace, is_floating


def check_qkv(xp: Namespace, q: Array, k: Array, v: Array) -> None:
    """Check ranks, head counts, lengths, head dims and dtypes of q, k and v."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x is None:
            raise TypeError(f"{name} must be an array; got None")
    for name, x, layout in (
        ("q", q, "(B, Hq, Sq, D)"),
        ("k", k, "(B, Hkv, Sk, D)"),
        ("v", v, "(B, Hkv, Sk, Dv)"),
    ):
        if x.ndim != 4:
            raise ValueError(
                f"{name} must have 4 dimensions {layout}; got shape {tuple(x.shape)} "
                f"with {x.ndim} dimensions"
            )
    B, Hq, _, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(
            f"batch sizes differ: q has {B}, k has {k.shape[0]}, v has {v.shape[0]}; "
            "q, k and v must share the batch dimension"
        )
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k has {k.shape[1]} heads but v has {v.shape[1]}; they must match")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"k has {Hkv} heads but q has {Hq}; q heads must be a multiple of k heads")
    if D == 0:
        raise ValueError(f"q has head dim 0; expected >= 1 (shape {tuple(q.shape)})")
    if k.shape[3] != D:
        raise ValueError(f"k has head dim {k.shape[3]} but q has {D}; they must match")
    if k.shape[2] != v.shape[2]:
        raise ValueError(
            f"k has {k.shape[2]} keys but v has {v.shape[2]} values; "
            "k and v must have the same length Sk"
        )
    if not is_floating(xp, q.dtype):
        raise TypeError(
            f"q has dtype {q.dtype}; expected a floating dtype "
            "(float16, bfloat16, float32 or float64)"
        )
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; they must match")


def check_positions(xp: Namespace, name: str, pos: Array, batch: int, length: int) -> None:
    """Positions are integer arrays of shape (B, S), (1, S) or (S,)."""
    if not xp.isdtype(pos.dtype, "integral"):
        raise TypeError(f"{name} must have an integer dtype; got {pos.dtype}")
    shape = tuple(pos.shape)
    if shape not in ((batch, length), (1, length), (length,)):
        raise ValueError(
            f"{name} must have shape ({batch}, {length}), (1, {length}) or ({length},); got {shape}"
        )


def check_broadcastable(name: str, x: Array, target: tuple[int, ...]) -> None:
    """``x`` must broadcast to ``target`` (B, Hq, Sq, Sk) without being enlarged."""
    shape = tuple(x.shape)
    fits = len(shape) <= len(target) and all(
        given in (1, wanted)
        for given, wanted in zip(reversed(shape), reversed(target), strict=False)
    )
    if not fits:
        raise ValueError(
            f"{name} must be broadcastable to (B, Hq, Sq, Sk) = {target}; got shape {shape}"
        )


def check_modifiers(
    xp: Namespace,
    shape: tuple[int, int, int, int],
    *,
    mask: Array | None,
    bias: Array | None,
    alibi_slopes: Array | None,
    sinks: Array | None,
) -> None:
    """The optional arrays of ``attention``, checked against (B, Hq, Sq, Sk)."""
    B, Hq, _, _ = shape
    if mask is not None:
        check_mask(xp, mask, shape)
    if bias is not None:
        check_bias(xp, bias, shape)
    if alibi_slopes is not None:
        check_per_head(xp, "alibi_slopes", alibi_slopes, ((Hq,), (B, Hq)))
    if sinks is not None:
        check_per_head(xp, "sink_logits", sinks, ((Hq,),))


def check_mask(xp: Namespace, mask: Array, target: tuple[int, ...]) -> None:
    if mask.dtype != xp.bool:
        raise TypeError(f"mask must have dtype bool (True = keep); got {mask.dtype}")
    check_broadcastable("mask", mask, target)


def check_bias(xp: Namespace, bias: Array, target: tuple[int, ...]) -> None:
    if not is_floating(xp, bias.dtype):
        raise TypeError(f"bias must have a floating dtype; got {bias.dtype}")
    check_broadcastable("bias", bias, target)


def check_per_head(xp: Namespace, name: str, x: Array, shapes: tuple[tuple[int, ...], ...]) -> None:
    """ALiBi slopes and sink logits: floating arrays of one of the allowed shapes."""
    if not is_floating(xp, x.dtype):
        raise TypeError(f"{name} must have a floating dtype; got {x.dtype}")
    if tuple(x.shape) not in shapes:
        expected = " or ".join(str(s) for s in shapes)
        raise ValueError(f"{name} must have shape {expected}; got {tuple(x.shape)}")


def check_devices(**arrays: Array | None) -> None:
    """Every array must live on the device of the first (q)."""
    (first, x0), *rest = arrays.items()
    where = device(x0)
    for name, x in rest:
        if x is not None and device(x) != where:
            raise ValueError(
                f"{name} is on device {device(x)} but {first} is on {where}; move it to {first}'s"
            )


def check_flags(**flags: Any) -> None:
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False; got {flag!r}")


def check_scalars(scale: Any, window: Any, softcap: Any, sink_tokens: Any = 0) -> None:
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, Real):
            raise TypeError(f"scale must be a finite real number or None; got {scale!r}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite; got {scale}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, Integral):
            raise TypeError(f"window must be an integer >= 1 or None; got {window!r}")
        if int(window) < 1:
            raise ValueError(f"window must be >= 1 (the query itself counts); got {window}")
    if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, Integral) or sink_tokens < 0:
        raise ValueError(f"sink_tokens must be an integer >= 0; got {sink_tokens!r}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, Real):
            raise TypeError(f"softcap must be a positive real number or None; got {softcap!r}")
        if not (float(softcap) > 0 and math.isfinite(softcap)):
            raise ValueError(f"softcap must be finite and > 0; got {softcap}")
