"""Input checks: every error names the argument, what was expected and what was given.

The checks run before any arithmetic, so a bad call fails at once with a
message a reader can act on, instead of a broadcasting error deep inside a
matrix product.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from array_api_compat import device

from refattn.namespace import Array, Namespace, is_floating

if TYPE_CHECKING:
    from refattn.options import AttentionOptions


def check_call(xp: Namespace, q: Array, k: Array, v: Array, options: AttentionOptions) -> None:
    """Every array of one attention call, in one pass: q, k, v, their devices, the
    positions and the optional arrays. (The record checked its scalars itself.)"""
    check_qkv(xp, q, k, v)
    arrays = {name: getattr(options, name) for name in ARRAY_OPTIONS}
    check_devices(q=q, k=k, v=v, **arrays)
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    for name, length in (("q_pos", Sq), ("k_pos", Sk)):
        if arrays[name] is not None:
            check_positions(xp, name, arrays[name], B, length)
    check_modifiers(xp, (B, Hq, Sq, Sk), mask=options.mask, bias=options.bias,
                    alibi_slopes=options.alibi_slopes, sink_logits=options.sink_logits)  # fmt: skip


#: The options of attention that are arrays, in the order they are checked.
ARRAY_OPTIONS = ("q_pos", "k_pos", "mask", "bias", "alibi_slopes", "sink_logits")


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
    sink_logits: Array | None,
) -> None:
    """The optional arrays of ``attention``, checked against (B, Hq, Sq, Sk)."""
    B, Hq, _, _ = shape
    if mask is not None:
        check_mask(xp, mask, shape)
    if bias is not None:
        check_bias(xp, bias, shape)
    if alibi_slopes is not None:
        check_per_head(xp, "alibi_slopes", alibi_slopes, ((Hq,), (B, Hq)))
    if sink_logits is not None:
        check_per_head(xp, "sink_logits", sink_logits, ((Hq,),))


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


def check_saved(
    xp: Namespace, q: Array, v: Array, dout: Array, out: Array | None, lse: Array | None
) -> None:
    """The backward's own arrays: dout shaped like the output, and the forward's saved
    ``out`` and ``lse``, given together or not at all, on q's device."""
    if dout is None:
        raise TypeError("dout must be an array (the gradient of the output); got None")
    if (out is None) != (lse is None):
        given, missing = ("out", "lse") if lse is None else ("lse", "out")
        raise ValueError(f"{given} was given without {missing}; give the forward's out and lse "
                         "together, or neither")  # fmt: skip
    B, Hq, Sq, _ = q.shape
    Dv = v.shape[-1]
    for name, x, shape, layout in (
        ("dout", dout, (B, Hq, Sq, Dv), "(B, Hq, Sq, Dv)"),
        ("out", out, (B, Hq, Sq, Dv), "(B, Hq, Sq, Dv)"),
        ("lse", lse, (B, Hq, Sq), "(B, Hq, Sq)"),
    ):
        if x is None:
            continue
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {layout} = {shape}; got {tuple(x.shape)}")
        if not is_floating(xp, x.dtype):
            raise TypeError(f"{name} must have a floating dtype; got {x.dtype}")
    check_devices(q=q, dout=dout, out=out, lse=lse)
