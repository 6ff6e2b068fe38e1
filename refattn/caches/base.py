r"""What every KV cache shares: the update contract, input checks and bookkeeping.

A cache holds one layer's keys and values for a batch of rows and hands back,
after each update, the keys, values and key positions that the new tokens'
queries attend to:

.. code-block:: python

    k, v, k_pos = cache.update(k_new, v_new, n_new)   # k_new: (B, Hkv, T, D)
    q_pos = lengths_before[:, None] + arange(T)        # where the new queries sit
    out = attention(q, k, v, causal=True, q_pos=q_pos, k_pos=k_pos, **cache.attention_options)

``n_new[b]`` of the T new tokens are real in row b (the rest is right
padding); each row appends its real tokens at its own end. Slots that hold no
token report ``k_pos = -1`` and are invisible to attention, which is the whole
interface between caches and attention: a cache knows positions, never
attention.

A cache that keeps only some of a row's keys says how its queries must look
at the rest: :attr:`KVCache.attention_options` are the keyword arguments of
:func:`refattn.attention` that the cache implies (``window`` and
``sink_tokens`` for the ring of :class:`~refattn.caches.SlidingWindowCache`,
nothing for the caches that keep every key). They are plain values, so the
cache still imports no attention code, and code above the caches never needs
to ask which kind it holds.

The arrays that hold keys and values are named by the class attribute
:attr:`KVCache.STORAGE` (``keys`` and ``values`` unless a kind stores them
otherwise); :attr:`KVCache.nbytes` and anything else that needs a cache's
storage finds it there.

Every update is checked completely before anything is written, so a failed
update (overflow, wrong shape, dtype, device or array library, a count in
``n_new`` that is not an integer) raises a clear error and leaves the cache
exactly as it was.

What a cache keeps and what it hands out are separate: it copies the new
keys and values into its own storage (a caller may reuse its buffers), and
the ``k_pos``, ``lengths`` and ``attention_options`` it returns are the
caller's own, so writing into them changes nothing in the cache. The ``k``
and ``v`` it returns may be views of its storage (attention then reads no
copy): read them, do not write into them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from numbers import Integral
from typing import Any, ClassVar

import array_api_extra as xpx
from array_api_compat import array_namespace, device

from refattn.namespace import Array, Namespace, index_dtype, is_floating


class KVCache(ABC):
    """One layer's keys and values for ``batch`` rows; see the module docstring.

    Every cache kind takes these keywords (its own come on top): ``batch``,
    ``kv_heads``, ``head_dim``, ``value_dim`` (default ``head_dim``), ``dtype``
    (default float32), ``device`` (default the library's) and ``xp`` (default
    NumPy).

    Examples
    --------
    >>> import numpy as np
    >>> from refattn.caches import SlidingWindowCache, StaticCache
    >>> StaticCache(batch=1, kv_heads=1, head_dim=2, max_len=4).attention_options
    {}
    >>> ring = SlidingWindowCache(batch=1, kv_heads=1, head_dim=2, window=3, sink_tokens=1)
    >>> ring.attention_options
    {'window': 3, 'sink_tokens': 1}
    >>> StaticCache.STORAGE, StaticCache(batch=1, kv_heads=1, head_dim=2, max_len=4).nbytes
    (('keys', 'values'), 64)
    """

    #: Names of the attributes that hold the keys and values (what :attr:`nbytes`
    #: counts); a kind that stores them otherwise names its own.
    STORAGE: ClassVar[tuple[str, ...]] = ("keys", "values")

    def __init__(
        self,
        *,
        batch: int,
        kv_heads: int,
        head_dim: int,
        value_dim: int | None = None,
        dtype: Any = None,
        device: Any = None,
        xp: Namespace | None = None,
    ) -> None:
        batch = _check_count("batch", batch, minimum=1)
        kv_heads = _check_count("kv_heads", kv_heads, minimum=1)
        head_dim = _check_count("head_dim", head_dim, minimum=1)
        if value_dim is not None:
            value_dim = _check_count("value_dim", value_dim, minimum=1)
        if xp is None:
            import array_api_compat.numpy

            xp = array_api_compat.numpy  # NumPy, the readable default
        self.xp: Namespace = xp
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        self.value_dim = head_dim if value_dim is None else value_dim
        self.dtype = xp.float32 if dtype is None else dtype
        if not is_floating(xp, self.dtype):
            raise TypeError(f"dtype must be a floating dtype; got {self.dtype}")
        # The library's default device unless one is named: every array is created there.
        self.device = device if device is not None else _default_device(xp, self.dtype)
        self._lengths = [0] * batch
        self.keys: Array = None
        self.values: Array = None
        self.positions: Array = None

    # -- the contract -------------------------------------------------------

    def update(
        self, k_new: Array, v_new: Array, n_new: Array | Sequence[int] | None = None
    ) -> tuple[Array, Array, Array]:
        """Append the new tokens; return (k, v, k_pos) for their queries to attend to."""
        self.append(k_new, v_new, n_new)
        return self.view()

    def append(
        self, k_new: Array, v_new: Array, n_new: Array | Sequence[int] | None = None
    ) -> None:
        """Store the new tokens without reading anything back (what the benchmark times)."""
        self._append(k_new, v_new, self._check_new(k_new, v_new, n_new))

    @abstractmethod
    def view(self) -> tuple[Array, Array, Array]:
        """(k, v, k_pos) as the cache holds them now, without appending."""

    @property
    def lengths(self) -> Array:
        """(B,) int64: tokens seen per row (not capped by any window)."""
        return self.xp.asarray(self._lengths, dtype=index_dtype(self.xp), device=self.device)

    @property
    def attention_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`refattn.attention` that attending to this cache needs.

        Empty for a cache that keeps every key; a cache that drops keys names
        the window through which its queries must look, so that a chunk's
        early queries do not see keys the cache keeps only for its later ones.
        A new dict each time: changing it changes nothing in the cache.
        """
        return {}

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values held (positions and tables not counted):
        the arrays named by :attr:`STORAGE`."""
        return sum(_nbytes(self.xp, getattr(self, name)) for name in self.STORAGE)

    def reset(self) -> None:
        """Empty every row (what :meth:`release` does to each)."""
        self.release(range(self.batch))

    def release(self, rows: int | Iterable[int]) -> None:
        """Empty the given rows, so the batch slot can serve a new sequence.

        Every row is checked before any is emptied. A kind that preallocates
        its storage (static, sliding, paged, quantized) keeps it for the next
        tokens; a kind that grows it (dynamic) frees what no row holds.
        """
        chosen = list(rows) if isinstance(rows, Iterable) else [rows]
        chosen = [_check_row("rows", b, self.batch) for b in chosen]  # all, before any is emptied
        for b in chosen:
            self._release_row(b)
            self._lengths[b] = 0

    # -- what each cache kind supplies --------------------------------------

    @abstractmethod
    def _append(self, k_new: Array, v_new: Array, n: list[int]) -> None:
        """Write n[b] real tokens of each row; inputs are already checked."""

    def _release_row(self, b: int) -> None:
        """Forget row b's tokens (its length is reset by the caller): with slot
        positions in ``positions``, marking every slot empty is enough."""
        self.positions = self._write(self.positions, (b, slice(None)), -1)

    # -- shared helpers -----------------------------------------------------

    def _check_new(
        self, k_new: Array, v_new: Array, n_new: Array | Sequence[int] | None
    ) -> list[int]:
        """Check an update's inputs against the cache; return n_new as ints per row."""
        xp = self.xp
        for name, x, dim in (("k_new", k_new, self.head_dim), ("v_new", v_new, self.value_dim)):
            try:
                other = array_namespace(x)
            except TypeError:
                raise TypeError(
                    f"{name} must be an array of the cache's library {xp.__name__}; "
                    f"got {type(x).__name__}"
                ) from None
            if other is not xp:
                raise TypeError(
                    f"{name} is a {other.__name__} array but the cache holds {xp.__name__} arrays"
                )
            if (
                x.ndim != 4
                or tuple(x.shape[:2]) != (self.batch, self.kv_heads)
                or x.shape[3] != dim
            ):
                raise ValueError(
                    f"{name} must have shape (B, Hkv, T, {dim}) = "
                    f"({self.batch}, {self.kv_heads}, T, {dim}); got {tuple(x.shape)}"
                )
            if x.dtype != self.dtype:
                raise TypeError(f"{name} has dtype {x.dtype} but the cache holds {self.dtype}")
            if device(x) != self.device:
                raise ValueError(
                    f"{name} is on device {device(x)} but the cache is on {self.device}"
                )
        T = k_new.shape[2]
        if v_new.shape[2] != T:
            raise ValueError(f"k_new has {T} tokens but v_new has {v_new.shape[2]}")
        return _counts(n_new, self.batch, T)

    def _check_room(self, n: list[int], max_len: int) -> None:
        """Refuse, before any write, an update that would take a row past ``max_len``."""
        for b, (length, m) in enumerate(zip(self._lengths, n, strict=True)):
            if length + m > max_len:
                raise ValueError(
                    f"{type(self).__name__} overflow: row {b} holds {length} tokens and "
                    f"{m} more would exceed max_len={max_len}"
                )

    def _write(self, store: Array, index: tuple[Any, ...], values: Array) -> Array:
        """``store[index] = values`` through array-api-extra, so immutable arrays work too."""
        return xpx.at(store, index).set(values)

    def _new_positions(self, n: list[int], T: int) -> Array:
        """(B, T) int64: position lengths[b] + i for real tokens, -1 for padding."""
        xp, index = self.xp, index_dtype(self.xp)
        i = xp.arange(T, dtype=index, device=self.device)[None, :]  # (1, T)
        start = xp.asarray(self._lengths, dtype=index, device=self.device)[:, None]  # (B, 1)
        real = i < xp.asarray(n, dtype=index, device=self.device)[:, None]  # (B, T)
        return xp.where(real, start + i, xp.asarray(-1, dtype=index, device=self.device))


def _default_device(xp: Namespace, dtype: Any) -> Any:
    """The device where ``xp`` creates arrays when none is named."""
    return device(xp.zeros(0, dtype=dtype))


def _counts(n_new: Array | Sequence[int] | None, batch: int, T: int) -> list[int]:
    """n_new as ``batch`` Python ints in [0, T]: a sequence of integers (NumPy's too) or an
    integer array of any library. A float is a TypeError, never truncated."""
    if n_new is None:
        return [T] * batch
    if hasattr(n_new, "dtype"):  # an array (or a NumPy scalar, refused below by its shape)
        counts: Array = n_new
        if not array_namespace(counts).isdtype(counts.dtype, "integral"):
            raise TypeError(
                f"n_new must hold integers (real tokens per row); got an array of dtype "
                f"{counts.dtype}"
            )
        if counts.ndim != 1:
            raise ValueError(
                f"n_new must have shape ({batch},) (real tokens per row); got {tuple(counts.shape)}"
            )
        given: list[Any] = [int(counts[b]) for b in range(counts.shape[0])]
    else:
        try:
            given = list(n_new)
        except TypeError:
            raise TypeError(
                f"n_new must be a sequence of {batch} integers (real tokens per row); got {n_new!r}"
            ) from None
    for b, n in enumerate(given):
        if isinstance(n, bool) or not isinstance(n, Integral):
            raise TypeError(
                f"n_new must hold integers (real tokens per row); got n_new[{b}] = {n!r}"
            )
    values = [int(n) for n in given]
    if len(values) != batch or any(not 0 <= n <= T for n in values):
        raise ValueError(
            f"n_new must hold {batch} integers in [0, {T}] (real tokens per row); got {values}"
        )
    return values


def _check_count(name: str, n: Any, *, minimum: int) -> int:
    """An integer (NumPy's too, never a bool) of at least ``minimum``, returned as a Python
    int: TypeError for the type, ValueError for the value."""
    if isinstance(n, bool) or not isinstance(n, Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}; got {n!r}")
    if int(n) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {n!r}")
    return int(n)


def _check_row(name: str, b: Any, batch: int) -> int:
    """A row index (NumPy's integers too, never a bool) in [0, batch), as a Python int."""
    if isinstance(b, bool) or not isinstance(b, Integral):
        raise TypeError(f"{name} must name rows by integers in [0, {batch}); got {b!r}")
    if not 0 <= int(b) < batch:
        raise ValueError(f"{name} must name rows in [0, {batch}); got {b!r}")
    return int(b)


def _nbytes(xp: Namespace, x: Array) -> int:
    itemsize = getattr(x.dtype, "itemsize", None)
    if itemsize is None:
        info = xp.finfo(x.dtype) if xp.isdtype(x.dtype, "real floating") else xp.iinfo(x.dtype)
        itemsize = info.bits // 8
    size = 1
    for n in x.shape:
        size *= n
    return int(size * itemsize)
