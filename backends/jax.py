"""JAX: the spec on immutable arrays, on the CPU (and on a GPU where jaxlib has one).

``jax.numpy`` is an array API namespace of its own. Its arrays cannot be
written in place, so every write in refattn goes through
``array_api_extra.at(x, index).set(v)``, which JAX turns into a new array;
passing here shows that nothing in the spec, its blockwise forms, merges or
caches mutates an array behind the library's back.

JAX keeps 64-bit floats off unless ``jax_enable_x64`` is set, a process-wide
switch that changes what every other JAX user in the process computes, so the
backend does not flip it: float64 is one of its dtypes only where the user has
set it (``JAX_ENABLE_X64=1``); float32, float16 and bfloat16 always are.

JAX compiles each operation for each shape it meets, a few tens of
milliseconds apiece, so a one-pass attention on a new shape costs a second
of compiling op by op. :meth:`JaxBackend.compiled` hands the whole function
to ``jax.jit`` instead (one program per shape and options, several times
cheaper); the spec's short cuts that look at values (every key finite, a
block no query sees) are not taken on traced arrays, where the general path
gives the same numbers (:func:`refattn.namespace.surely`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import lru_cache, partial
from typing import Any

import numpy as np

from refattn.backends.base import Backend


class JaxBackend(Backend):
    name = "jax"
    module = "jax"
    verify_share = 0.2

    def namespace(self) -> Any:
        import jax.numpy

        return jax.numpy

    def devices(self) -> list[str]:
        import jax

        return [_name(d) for d in jax.devices()]

    def dtypes(self, device: str) -> tuple[str, ...]:
        import jax

        wide = ("float64",) if jax.config.read("jax_enable_x64") else ()
        return (*wide, "float32", "float16", "bfloat16")

    def asarray(self, x: np.ndarray, *, dtype: str, device: str) -> Any:
        import jax

        xp = self.namespace()
        x = np.asarray(x)
        on = _device(device)
        if x.dtype.kind in "iu":  # positions and indices, as the index dtype holds them
            index = np.dtype(str(xp.__array_namespace_info__().default_dtypes()["integral"]))
            if x.size and (x.min() < np.iinfo(index).min or x.max() > np.iinfo(index).max):
                raise ValueError(f"integers beyond {index} need jax_enable_x64; got {x.dtype}")
            return jax.device_put(xp.asarray(x.astype(index)), on)
        if x.dtype.kind == "b":
            return jax.device_put(xp.asarray(x), on)
        if dtype not in self.dtypes(device):
            raise ValueError(f"dtype must be one of {self.dtypes(device)} on JAX here; got {dtype}"
                             " (float64 needs jax_enable_x64)")  # fmt: skip
        rounded = xp.asarray(self._rounded(x, dtype))
        return jax.device_put(rounded.astype(getattr(xp, dtype)), on)

    def to_numpy(self, x: Any) -> np.ndarray:
        x = np.asarray(x)
        return x.astype(np.float32) if "bfloat16" in str(x.dtype) else x

    def synchronize(self, device: str) -> None:
        import jax

        jax.effects_barrier()

    def compiled(self, fn: Callable[..., Any], **options: Any) -> Callable[..., Any]:
        """``jax.jit`` of :func:`refattn.attention` and of its blockwise and split-KV forms
        (given as they are or as a ``functools.partial`` of keywords), with ``options`` bound
        as constants of the program: the same options get the same jitted function, whose
        programs JAX keeps per shape. A form's Python loop over blocks is unrolled by the
        trace, so a call with more than :data:`UNROLLED_STEPS` block steps (a long row in
        small blocks) runs eagerly, where each block shape's operations compile once. Any
        other function, or options that cannot be constants (an array), run as they are.
        """
        from refattn.attention import attention
        from refattn.blockwise import attention_blockwise, attention_split_kv

        if isinstance(fn, partial) and not fn.args:
            bound: partial[Any] = fn
            fn, options = bound.func, {**bound.keywords, **options}
        if fn not in (attention, attention_blockwise, attention_split_kv):
            return super().compiled(fn, **options)
        try:
            jitted = _jitted(fn, tuple(sorted(options.items())))
        except TypeError:  # an option that cannot be a key (an array): eager
            return super().compiled(fn, **options)
        if fn is attention:
            return jitted
        eager = super().compiled(fn, **options)

        def run(*arrays: Any, **named: Any) -> Any:
            q, k = arrays[:2] if len(arrays) >= 2 else (named["q"], named["k"])
            steps = _block_steps(fn is attention_split_kv, q.shape[-2], k.shape[-2], options)
            return (jitted if steps <= UNROLLED_STEPS else eager)(*arrays, **named)

        return run


#: The most block steps a jitted blockwise or split-KV call may unroll; past it, the call
#: runs eagerly (a trace of hundreds of steps compiles for longer than it saves).
UNROLLED_STEPS = 64


def _block_steps(split: bool, q_len: int, k_len: int, options: dict[str, Any]) -> int:
    """How many block steps a blockwise (or split-KV) call's loop takes (block sizes not
    given are the form's own defaults, read from its signature)."""
    if split:
        return int(options.get("num_splits", 1))  # missing: the form itself says so
    from refattn.blockwise import attention_blockwise

    defaults = inspect.signature(attention_blockwise).parameters
    block_q = options.get("block_q", defaults["block_q"].default)
    block_k = options.get("block_k", defaults["block_k"].default)
    return (-(-q_len // block_q)) * (-(-k_len // block_k))


@lru_cache(maxsize=256)
def _jitted(fn: Callable[..., Any], options: tuple[tuple[str, Any], ...]) -> Callable[..., Any]:
    import jax

    return jax.jit(partial(fn, **dict(options)))


def _name(device: Any) -> str:
    """``cpu`` for the first CPU (as the other backends name it), ``gpu:1`` and so on else."""
    if device.platform == "cpu" and device.id == 0:
        return "cpu"
    return f"{device.platform}:{device.id}"


def _device(name: str) -> Any:
    import jax

    platform, _, index = name.partition(":")
    return next(d for d in jax.devices(platform) if d.id == int(index or 0))
