"""What every decoder shares: a forward pass with or without a cache, and generation.

A model's forward pass takes token ids (B, T) and, optionally, its
:class:`~refattn.models.cache.LayerCaches`:

* without a cache, the T tokens of each row attend causally to each other
  (``n_new[b]`` of them are real, the rest right padding, invisible as keys);
* with a cache, they are the row's next tokens: their queries sit at
  positions ``lengths[b] .. lengths[b] + T - 1``, their keys and values are
  appended to every layer's cache, and they attend to everything cached.

:meth:`Decoder.generate` drives either form: a prompt per row (of any
length), then one token per step, greedy at temperature 0 and sampled from a
seeded NumPy generator otherwise. Without a cache each step recomputes the
whole sequence, O(s^2) per token; with one it computes the new token alone,
O(s).
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Any

import numpy as np

from refattn.attention import attention
from refattn.backends import to_numpy
from refattn.caches import KVCache
from refattn.models.cache import LayerCaches
from refattn.namespace import Array, Namespace, index_dtype
from refattn.options import check_integer


class Decoder:
    """The shared machinery; :class:`~refattn.models.GPT` and :class:`~refattn.models.Llama`
    supply ``embed``, ``block`` and ``head``."""

    params: dict[str, Array]
    xp: Namespace
    n_layer: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    window: int | None = None
    #: Rows of a learned position table (GPT-2's ``n_positions``): positions must stay below
    #: it. None for a model whose positions have no end (RoPE computed at each position).
    max_positions: int | None = None

    # -- what a model supplies ---------------------------------------------

    def embed(self, ids: Array, positions: Array) -> Array:
        """(B, T) ids at (B, T) positions -> (B, T, d)."""
        raise NotImplementedError

    def block(self, i: int, x: Array, positions: Array, attend: Any) -> Array:
        """Layer ``i`` on (B, T, d); ``attend(q, k, v)`` is its attention."""
        raise NotImplementedError

    def head(self, x: Array) -> Array:
        """(B, T, d) -> (B, T, V) logits."""
        raise NotImplementedError

    # -- the forward pass ---------------------------------------------------

    def __call__(
        self, ids: Any, cache: LayerCaches | None = None, *, n_new: Sequence[int] | None = None
    ) -> Array:
        """Logits (B, T, V) for a prefill or a decode step (with ``cache``), or a full pass.

        ``n_new[b]`` says how many of row b's T tokens are real (default all);
        the rest are right padding, never seen as keys and never cached.

        Token ids must be integers in ``[0, vocab_size)`` and, for a model with
        a learned position table, every position (after what is cached) below
        its length; either is a ValueError naming what was given, never a
        wrapped-around or out-of-range row of a table.
        """
        xp = self.xp
        ids = self._token_ids(ids)  # (B, T) int64
        B, T = ids.shape
        steps = xp.arange(T, dtype=index_dtype(xp), device=self.device)[None, :]  # (1, T)
        if cache is not None:
            positions = cache.lengths[:, None] + steps  # (B, T): after what is cached
            k_pos = None
            self._check_positions(int(xp.max(cache.lengths)) + T, cached=True)
        else:
            self._check_positions(T, cached=False)
            positions = xp.broadcast_to(steps, (B, T))
            k_pos = positions
            if n_new is not None:
                real = xp.asarray(list(n_new), dtype=index_dtype(xp), device=self.device)[:, None]
                k_pos = xp.where(steps < real, positions, -1)  # padding holds no key
        x = self.embed(ids, positions)
        for i in range(self.n_layer):
            layer = None if cache is None else cache[i]

            def attend(q: Array, k: Array, v: Array, layer: KVCache | None = layer) -> Array:
                return self.attend(q, k, v, positions, layer, k_pos, n_new)

            x = self.block(i, x, positions, attend)
        return self.head(x)

    def _token_ids(self, ids: Any) -> Array:
        """``ids`` as a checked (B, T) int64 array: integers in [0, vocab_size)."""
        xp = self.xp
        given = xp.asarray(ids, device=self.device)
        if given.ndim != 2:
            raise ValueError(
                f"ids must be a (B, T) array of token ids; got shape {tuple(given.shape)}"
            )
        if 0 not in given.shape and not xp.isdtype(given.dtype, "integral"):
            raise TypeError(f"ids must hold integer token ids; got dtype {given.dtype}")
        ids = xp.astype(given, index_dtype(xp))
        outside = (ids < 0) | (ids >= self.vocab_size)  # (B, T)
        if bool(xp.any(outside)):
            b, t = (int(i[0]) for i in xp.nonzero(outside))
            raise ValueError(
                f"ids must be token ids in [0, {self.vocab_size}) (vocab_size="
                f"{self.vocab_size}); got {int(ids[b, t])} at ids[{b}, {t}]"
            )
        return ids

    def _check_positions(self, length: int, *, cached: bool) -> None:
        """A row may reach ``length`` tokens: refuse it past the learned position table."""
        if self.max_positions is not None and length > self.max_positions:
            held = "cached and new tokens" if cached else "tokens"
            raise ValueError(
                f"{type(self).__name__}'s learned position table holds {self.max_positions} "
                f"positions (max_positions={self.max_positions}); a row of {length} {held} "
                f"needs positions 0 to {length - 1}"
            )

    def attend(self, q: Array, k: Array, v: Array, positions: Array, layer: KVCache | None,
               k_pos: Array | None, n_new: Sequence[int] | None) -> Array:  # fmt: skip
        """Causal attention of the new queries to the cache (or to each other)."""
        options: dict[str, Any] = {"window": self.window}
        if layer is not None:
            k, v, k_pos = layer.update(k, v, n_new)
            options |= layer.attention_options  # a ring cache narrows what is seen to its own
        return attention(q, k, v, causal=True, q_pos=positions, k_pos=k_pos, **options)

    # -- generation -----------------------------------------------------------

    def new_caches(self, kind: str, *, batch: int, max_len: int, **options: Any) -> LayerCaches:
        """Empty caches of ``kind`` for this model (a sliding one keeps the model's window)."""
        if kind == "sliding" and self.window is not None:
            options = {"window": self.window, **options}
        return LayerCaches(
            kind, layers=self.n_layer, batch=batch, kv_heads=self.kv_heads,
            head_dim=self.head_dim, max_len=max_len, dtype=self.dtype,
            device=self.device, xp=self.xp, **options,
        )  # fmt: skip

    def generate(
        self,
        ids: Any,
        max_new_tokens: int,
        *,
        use_cache: bool = True,
        cache: str = "static",
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int | None = None,
        return_logits: bool = False,
        **cache_options: Any,
    ) -> Any:
        """Continue each prompt by ``max_new_tokens`` tokens.

        Parameters
        ----------
        ids : prompts, a (B, T) array or a list of B token lists of any lengths
        use_cache : decode through caches of kind ``cache`` (O(s) per token), or
            recompute the whole sequence at every step (O(s^2) per token)
        cache : "static", "dynamic", "sliding", "paged" or "quantized";
            ``cache_options`` go to :class:`~refattn.models.LayerCaches`
        temperature, top_k, seed : 0 is greedy (the first of equal logits);
            otherwise softmax(logits / temperature) over the ``top_k`` largest,
            sampled from ``numpy.random.default_rng(seed)``
        return_logits : also return the logits each step chose from, (B, V) each

        Returns
        -------
        list of B token lists (prompt, then the new tokens), and with
        ``return_logits`` the list of per-step logits as float64 NumPy.
        """
        prompts = [_token_list(row, b) for b, row in enumerate(_rows(ids))]
        if not prompts or min(len(p) for p in prompts) < 1:
            raise ValueError("ids must hold at least one prompt, each of at least one token")
        check_integer("max_new_tokens", max_new_tokens, minimum=0)
        if top_k is not None:
            check_integer("top_k", top_k, minimum=1)
        # The last token chosen is never fed back: the longest row fed is one shorter.
        self._check_positions(max(len(p) for p in prompts) + max_new_tokens - 1, cached=False)
        rng = np.random.default_rng(seed)
        tokens = [p[:] for p in prompts]
        chosen_from: list[np.ndarray] = []
        caches = None
        if use_cache:
            max_len = max(len(p) for p in prompts) + max_new_tokens
            caches = self.new_caches(cache, batch=len(prompts), max_len=max_len,
                                     **cache_options)  # fmt: skip
        for step in range(max_new_tokens):
            if caches is None:  # the whole sequence again
                logits = self(_padded(tokens), n_new=[len(t) for t in tokens])
                last = _last(logits, [len(t) for t in tokens])
            elif step == 0:  # prefill: every prompt at once
                logits = self(_padded(tokens), caches, n_new=[len(t) for t in tokens])
                last = _last(logits, [len(t) for t in tokens])
            else:  # decode: the last token of each row
                last = _host(self([[t[-1]] for t in tokens], caches)[:, -1, :])
            chosen_from.append(last)
            for row, token in zip(tokens, _choose(last, temperature, top_k, rng), strict=True):
                row.append(int(token))
        return (tokens, chosen_from) if return_logits else tokens

    @property
    def device(self) -> Any:
        from array_api_compat import device

        return device(next(iter(self.params.values())))

    @property
    def dtype(self) -> Any:
        return next(iter(self.params.values())).dtype


def _rows(ids: Any) -> list[Any]:
    """The prompts: a (B, T) array's rows as lists (its dtype integral), or ``ids`` as given."""
    if hasattr(ids, "shape") and len(ids.shape) == 2:
        from array_api_compat import array_namespace

        if not array_namespace(ids).isdtype(ids.dtype, "integral"):
            raise TypeError(f"ids must hold integer token ids; got dtype {ids.dtype}")
        B, T = ids.shape
        return [[int(ids[b, t]) for t in range(T)] for b in range(B)]
    return list(ids)


def _token_list(row: Any, b: int) -> list[int]:
    """One prompt as Python ints; a float or bool token is refused, never truncated."""
    tokens = list(row)
    for t, token in enumerate(tokens):
        if isinstance(token, bool) or not isinstance(token, Integral):
            raise TypeError(f"ids must hold integer token ids; got {token!r} at ids[{b}][{t}]")
    return [int(token) for token in tokens]


def _padded(rows: list[list[int]]) -> list[list[int]]:
    """Right-pad with token 0 (padding is never a key, and its logits are never read)."""
    width = max(len(r) for r in rows)
    return [r + [0] * (width - len(r)) for r in rows]


def _last(logits: Array, lengths: list[int]) -> np.ndarray:
    """Each row's logits at its last real token, as float64 NumPy (B, V)."""
    host = _host(logits)
    return np.stack([host[b, n - 1] for b, n in enumerate(lengths)])


def _host(x: Array) -> np.ndarray:
    """Any library's array as float64 NumPy (through its backend adapter)."""
    return np.asarray(to_numpy(x), dtype=np.float64)


def _choose(
    logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator
) -> list[int]:
    """Greedy at temperature 0, else a seeded draw from softmax(logits / T) over the top k."""
    if temperature == 0:
        return [int(i) for i in np.argmax(logits, axis=-1)]
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; got {temperature}")
    scaled = logits / temperature
    if top_k is not None:
        kth = np.sort(scaled, axis=-1)[:, -min(top_k, scaled.shape[-1])][:, None]
        scaled = np.where(scaled >= kth, scaled, -np.inf)
    p = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return [int(rng.choice(p.shape[-1], p=row)) for row in p]
