"""Attention problems: a small description that rebuilds its arrays from a seed.

A :class:`ProblemSpec` names the shapes and options of one attention call and
a seed; :func:`build_problem` turns it into float64 NumPy arrays. Specs are
drawn by :func:`refattn.testing.drawing.draw_spec`, through Hypothesis (so
failures shrink to small shapes and few options) or a NumPy generator
(``refattn verify``), and the same spec always rebuilds the same data.

The corners drawn are the ones where implementations break: queries at the
end of a longer cache (bottom-right), top-left alignment, per-row positions
under left padding, empty slots (``k_pos = -1``) in any order as in a ring
buffer, fully masked rows, window edges, logits large enough to overflow a
softmax without max subtraction, NaN planted in slots no query can see, and
NaN in slots only some queries see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from refattn.backends.base import round_to
from refattn.caches.quantized import FORMATS, SCALES
from refattn.options import check_integer, check_real

#: How key and query positions are laid out.
#:
#: ``bottom_right``: the defaults, queries at the end of the keys.
#: ``top_left``: queries numbered from 0 (PyTorch's ``is_causal``).
#: ``staggered``: every row holds keys 0..Sk-1 but its queries sit ``lag[b]``
#: positions earlier (rows at different decode steps, no empty slots).
#: ``holes``: default positions with random empty slots (a key padding mask).
#: ``ragged``: row b holds ``L[b]`` keys then empty slots, its queries end at
#: ``L[b] - 1`` (a static cache with per-row lengths, ``cache_seqlens``).
#: ``left_padded``: row b starts with ``pad[b]`` empty slots.
#: ``scattered``: positions in any slot order, some empty (a ring or a paged row).
LAYOUTS = ("bottom_right", "top_left", "staggered", "holes", "ragged", "left_padded", "scattered")
#: What ``unseen_nan`` plants in the slots no query may see: NaN, +inf, -inf, or each
#: element one of the three. An infinity is the harder test: ``0 * inf`` is NaN where
#: ``0 * NaN`` already was, and a kernel that guards NaN with ``isnan`` lets it through.
UNSEEN_VALUES = ("nan", "inf", "-inf", "mixed")
#: The boolean masks a problem may carry (``mask=True``), as real systems build them.
#:
#: ``random``: each entry kept with probability 3/4, per head, per row or shared.
#: ``tree``: speculative decoding's tree of draft tokens. The last
#: ``n = min(Sq, Sk)`` queries are the tree's nodes and the last n key slots
#: their keys; each node has a random parent among the nodes before it (or the
#: committed prefix) and sees the prefix, its ancestors and itself. With the
#: default layout, a node's position is the prefix length plus its depth, as
#: tree decoding numbers them.
#: ``document``: packed rows, several documents one after another in each row
#: (as with ``cu_seqlens``); a query sees only keys of its own document (the
#: queries sit on the last Sq key slots). With the default layout, positions
#: restart at 0 in each document.
#: ``prefix_lm``: the first P keys of each row (the prefix) are seen by every
#: query; the others only from queries at or after their position.
MASK_KINDS = ("random", "tree", "document", "prefix_lm")


@dataclass(frozen=True)
class ProblemSpec:
    """Shapes, options and a seed; :func:`build_problem` makes the arrays."""

    batch: int = 1
    q_heads: int = 1
    kv_heads: int = 1
    q_len: int = 1
    k_len: int = 1
    head_dim: int = 8
    value_dim: int = 8
    causal: bool = False
    layout: str = "bottom_right"
    window: int | None = None
    sink_tokens: int = 0
    softcap: float | None = None
    alibi: bool = False
    sink_logits: bool = False  #: one sink logit per head
    mask: bool = False
    bias: bool = False
    scale: float | None = None
    logit_size: float = 1.0
    unseen_nan: bool = False  #: NaN (or infinities) in every key and value slot no query may see
    seen_nan: bool = False  #: NaN in some held slots, seen by some queries and not others
    return_lse: bool = False
    seed: int = 0
    unseen_values: str = "nan"  #: what ``unseen_nan`` plants (:data:`UNSEEN_VALUES`)
    value_offset: float = 0.0  #: added to every value: a mean that low-precision sums lose
    window_right: int | None = None  #: a key is visible when k_pos - q_pos <= window_right
    mask_kind: str = "random"  #: which mask ``mask`` builds (:data:`MASK_KINDS`)
    sink_offset: float = 0.0  #: added to the sink logits: large ones dominate their row
    min_row_len: int = 0  #: ragged and left-padded rows hold at least this many keys
    no_empty_rows: bool = False  #: the mask keeps a key in every row that positions leave one
    new_keys: int | None = None  #: an in-op cache's new keys per row (default min(Sq, keys held))

    def __post_init__(self) -> None:
        """A spec that describes no valid attention call is refused here, naming the field,
        so that a mistake in it is never blamed on the candidate it is handed to."""
        _check_counts(self, {"q_len": 0, "k_len": 0, "value_dim": 1})
        if self.window is not None:
            check_integer("ProblemSpec.window", self.window, minimum=1)
        for name in ("window_right", "new_keys"):
            if getattr(self, name) is not None:
                check_integer(f"ProblemSpec.{name}", getattr(self, name), minimum=0)
        check_integer("ProblemSpec.min_row_len", self.min_row_len, minimum=0)
        check_real("ProblemSpec.sink_offset", self.sink_offset, positive=False)
        _check_choice("ProblemSpec.mask_kind", self.mask_kind, MASK_KINDS)
        check_real("ProblemSpec.softcap", self.softcap, positive=True)
        check_real("ProblemSpec.scale", self.scale, positive=False)
        check_real("ProblemSpec.logit_size", self.logit_size, positive=True)
        check_real("ProblemSpec.value_offset", self.value_offset, positive=False)
        _check_choice("ProblemSpec.layout", self.layout, LAYOUTS)
        _check_choice("ProblemSpec.unseen_values", self.unseen_values, UNSEEN_VALUES)
        for name in ("causal", "alibi", "sink_logits", "mask", "bias", "unseen_nan", "seen_nan",
                     "return_lse", "no_empty_rows"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"ProblemSpec.{name} must be True or False; got {value!r}")


def _check_counts(spec: ProblemSpec | CacheSpec, own: dict[str, int]) -> None:
    """The integer fields every spec has (and ``own``, each with its least value), and the
    query heads a multiple of the KV heads."""
    kind = type(spec).__name__
    least = {"batch": 1, "q_heads": 1, "kv_heads": 1, "head_dim": 1, "sink_tokens": 0, "seed": 0}
    for name, minimum in (least | own).items():
        check_integer(f"{kind}.{name}", getattr(spec, name), minimum=minimum)
    if spec.q_heads % spec.kv_heads:
        raise ValueError(
            f"{kind}.q_heads must be a multiple of kv_heads ({spec.kv_heads}); got {spec.q_heads}"
        )


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")


@dataclass
class Problem:
    """The arrays of one attention call, float64 NumPy (positions int64)."""

    spec: ProblemSpec
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    q_pos: np.ndarray
    k_pos: np.ndarray
    mask: np.ndarray | None
    bias: np.ndarray | None
    alibi_slopes: np.ndarray | None
    sink_logits: np.ndarray | None

    def arrays(self) -> dict[str, np.ndarray]:
        """The array arguments of ``attention`` (None ones left out)."""
        names = ("q", "k", "v", "q_pos", "k_pos", "mask", "bias", "alibi_slopes", "sink_logits")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def rounded(self, dtype: str) -> dict[str, Any]:
        """:meth:`arrays` with the floating ones rounded to ``dtype`` and held as float64:
        what a candidate in ``dtype`` and the oracle both see."""
        return {
            name: round_to(x, dtype).astype(np.float64) if x.dtype.kind == "f" else x
            for name, x in self.arrays().items()
        }

    def scalars(self) -> dict[str, Any]:
        """The scalar keyword arguments of ``attention``."""
        s = self.spec
        return {
            "causal": s.causal,
            "window": s.window,
            "window_right": s.window_right,
            "sink_tokens": s.sink_tokens,
            "softcap": s.softcap,
            "scale": s.scale,
        }


def build_problem(spec: ProblemSpec) -> Problem:
    """Make the arrays of ``spec`` from its seed."""
    rng = np.random.default_rng(spec.seed)
    B, Hq, Hkv = spec.batch, spec.q_heads, spec.kv_heads
    Sq, Sk, D, Dv = spec.q_len, spec.k_len, spec.head_dim, spec.value_dim
    # Scores of size ~logit_size: q.k sums D products of two N(0, a^2) draws.
    a = math.sqrt(spec.logit_size) if spec.logit_size > 1 else 1.0
    q = rng.standard_normal((B, Hq, Sq, D)) * a
    k = rng.standard_normal((B, Hkv, Sk, D)) * a
    # Values around a mean: over thousands of keys a float16 running sum of them stops
    # growing once each term falls below half its ulp.
    v = rng.standard_normal((B, Hkv, Sk, Dv)) + spec.value_offset
    q_pos, k_pos = _positions(rng, spec)
    mask = bias = slopes = sinks = None
    if spec.mask:
        mask, q_pos, k_pos = _mask(rng, spec, q_pos, k_pos)
        if spec.no_empty_rows:
            mask = _keep_a_key(rng, spec, mask, q_pos, k_pos)
    if spec.bias:
        bias = rng.standard_normal((1, Hq, Sq, Sk) if rng.integers(2) else (B, 1, Sq, Sk))
    if spec.alibi:
        slopes = 2.0 ** (-8.0 * np.arange(1, Hq + 1) / Hq)
        if rng.integers(2):
            slopes = slopes * rng.uniform(0.5, 2.0, size=(B, 1))
    if spec.sink_logits:
        sinks = rng.standard_normal(Hq) + spec.sink_offset
    problem = Problem(spec, q, k, v, q_pos, k_pos, mask, bias, slopes, sinks)
    if spec.unseen_nan:
        _poison_unseen_slots(problem, rng)
    if spec.seen_nan:
        # NaN in some held slots, seen by some queries and not others: only the
        # queries that see one may turn NaN.
        hit = (rng.random((B, Sk)) < 0.2)[:, None, :, None]
        problem.k = np.where(hit & (rng.random((1, 1, 1, D)) < 0.5), np.nan, problem.k)
        problem.v = np.where(hit & (rng.random((1, 1, 1, Dv)) < 0.5), np.nan, problem.v)
    return problem


def _positions(rng: np.random.Generator, spec: ProblemSpec) -> tuple[np.ndarray, np.ndarray]:
    B, Sq, Sk = spec.batch, spec.q_len, spec.k_len
    rows = np.arange(Sq)
    if spec.layout == "bottom_right":
        return np.tile(Sk - Sq + rows, (B, 1)), np.tile(np.arange(Sk), (B, 1))
    if spec.layout == "top_left":
        return np.tile(rows, (B, 1)), np.tile(np.arange(Sk), (B, 1))
    if spec.layout == "staggered":
        lag = rng.integers(0, Sk + 1, size=(B, 1))
        return Sk - Sq + rows[None, :] - lag, np.tile(np.arange(Sk), (B, 1))
    if spec.layout == "holes":
        k_pos = np.where(rng.random((B, Sk)) < 0.3, -1, np.arange(Sk)[None, :])
        return np.tile(Sk - Sq + rows, (B, 1)), k_pos
    least = min(spec.min_row_len, Sk)
    if spec.layout == "ragged":
        length = rng.integers(least, Sk + 1, size=(B, 1))
        k_pos = np.where(np.arange(Sk)[None, :] < length, np.arange(Sk)[None, :], -1)
        return length - Sq + rows[None, :], k_pos
    if spec.layout == "left_padded":
        # Row b starts with pad[b] empty slots; its tokens are numbered from 0.
        pad = rng.integers(0, Sk + 1 - least, size=B)
        k_pos = np.arange(Sk)[None, :] - pad[:, None]
        k_pos = np.where(k_pos < 0, -1, k_pos)
        q_pos = (Sk - pad)[:, None] - Sq + rows[None, :]
        return q_pos, k_pos
    if spec.layout == "scattered":
        # Slots hold positions in any order, some empty: a ring buffer or a paged row.
        k_pos = np.stack([rng.permutation(Sk) for _ in range(B)])
        k_pos = np.where(rng.random((B, Sk)) < 0.25, -1, k_pos)
        start = rng.integers(-1, Sk + 2, size=(B, 1)) - Sq
        return start + rows[None, :], k_pos
    raise AssertionError(f"unreachable: layout {spec.layout!r} was checked")


def _mask(
    rng: np.random.Generator, spec: ProblemSpec, q_pos: np.ndarray, k_pos: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The boolean mask of :data:`MASK_KINDS` ``spec.mask_kind``, and the positions (a tree
    and packed documents number their tokens themselves in the default layout)."""
    B, Hq, Sq, Sk = spec.batch, spec.q_heads, spec.q_len, spec.k_len
    if spec.mask_kind == "random":
        keep = rng.random((B, Hq, Sq, Sk)) < 0.75
        form = rng.integers(3)  # full, shared across heads, shared across the batch
        mask = keep if form == 0 else keep[:, :1] if form == 1 else keep[0, :, :, :]
        return mask, q_pos, k_pos
    mask = np.ones((B, 1, Sq, Sk), dtype=bool)
    renumber = spec.layout == "bottom_right"
    q_pos, k_pos = q_pos.copy(), k_pos.copy()
    if spec.mask_kind == "tree":
        n = min(Sq, Sk)  # nodes: the last n queries and the last n key slots
        for b in range(B):
            parent = [int(rng.integers(-1, t)) if t else -1 for t in range(n)]  # -1: prefix
            depth = [0] * n
            for t in range(n):
                depth[t] = 0 if parent[t] < 0 else depth[parent[t]] + 1
                mask[b, 0, Sq - n + t, Sk - n :] = False
                u = t
                while u >= 0:  # itself and its ancestors
                    mask[b, 0, Sq - n + t, Sk - n + u] = True
                    u = parent[u]
            if renumber:
                prefix = Sk - n
                k_pos[b, Sk - n :] = prefix + np.array(depth, dtype=np.int64)
                q_pos[b, Sq - n :] = prefix + np.array(depth, dtype=np.int64)
        return mask, q_pos, k_pos
    if spec.mask_kind == "document":
        for b in range(B):
            cuts = np.sort(
                rng.choice(
                    np.arange(1, Sk),
                    size=min(int(rng.integers(0, 4)), max(Sk - 1, 0)),
                    replace=False,
                )
            )
            doc_k = np.searchsorted(cuts, np.arange(Sk), side="right")  # (Sk,)
            slot_q = Sk - Sq + np.arange(Sq)  # the key slot each query sits on
            doc_q = np.searchsorted(cuts, np.maximum(slot_q, 0), side="right")  # (Sq,)
            mask[b, 0] = doc_q[:, None] == doc_k[None, :]
            if renumber:
                starts = np.concatenate([[0], cuts]).astype(np.int64)
                k_pos[b] = np.arange(Sk) - starts[doc_k]
                q_pos[b] = slot_q - starts[doc_q]
        return mask, q_pos, k_pos
    # prefix_lm: the prefix's keys are seen by all; the rest only from their own position on.
    prefix_len = rng.integers(0, Sk + 1, size=(B, 1, 1, 1))
    k, q = k_pos[:, None, None, :], q_pos[:, None, :, None]
    return (k < prefix_len) | (k <= q), q_pos, k_pos


def _keep_a_key(
    rng: np.random.Generator, spec: ProblemSpec, mask: np.ndarray, q_pos: np.ndarray,
    k_pos: np.ndarray,
) -> np.ndarray:  # fmt: skip
    """``mask`` with one key kept in every row that positions leave some key but the mask
    leaves none (``no_empty_rows``): a random one of the keys positions leave it."""
    shape = (spec.batch, spec.q_heads, spec.q_len, spec.k_len)
    by_positions = np.broadcast_to(visible_by_positions(spec, q_pos, k_pos)[:, None], shape)
    kept = np.array(np.broadcast_to(mask, shape))
    empty = by_positions.any(axis=-1) & ~(kept & by_positions).any(axis=-1)  # (B, Hq, Sq)
    for b, h, i in zip(*np.nonzero(empty), strict=True):
        kept[b, h, i, rng.choice(np.flatnonzero(by_positions[b, h, i]))] = True
    return kept if empty.any() else mask


def visible_by_positions(spec: ProblemSpec, q_pos: np.ndarray, k_pos: np.ndarray) -> np.ndarray:
    """(B, Sq, Sk) booleans: which keys each query may see by positions alone (held slots,
    causal, the window both ways, sink tokens), before any mask."""
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    visible = np.broadcast_to(k >= 0, (spec.batch, spec.q_len, spec.k_len))
    if spec.causal:
        visible = visible & (k <= q)
    if spec.window is not None:
        visible = visible & ((q - k < spec.window) | (k < spec.sink_tokens))
    if spec.window_right is not None:
        visible = visible & (k - q <= spec.window_right)
    return np.asarray(visible)


def visible_keys(problem: Problem) -> np.ndarray:
    """(B, Hq, Sq, Sk) booleans: which keys each query may see, the mask included."""
    s = problem.spec
    shape = (s.batch, s.q_heads, s.q_len, s.k_len)
    visible = visible_by_positions(s, problem.q_pos, problem.k_pos)[:, None]
    if problem.mask is not None:
        visible = visible & problem.mask
    return np.broadcast_to(visible, shape)


def seen_slots(problem: Problem) -> np.ndarray:
    """(B, Sk) booleans: which key slots at least one query of the row may see."""
    return np.asarray(visible_keys(problem).any(axis=(1, 2)))


def _poison_unseen_slots(problem: Problem, rng: np.random.Generator) -> None:
    """NaN or infinities in k and v wherever no query of the row can look: they must never
    show."""
    unseen = ~seen_slots(problem)[:, None, :, None]  # (B, 1, Sk, 1)
    kind = problem.spec.unseen_values
    problem.k = np.where(unseen, _poison(rng, kind, problem.k.shape), problem.k)
    problem.v = np.where(unseen, _poison(rng, kind, problem.v.shape), problem.v)


def _poison(rng: np.random.Generator, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """An array of ``shape`` holding what :data:`UNSEEN_VALUES` names."""
    if kind == "mixed":
        return rng.choice(np.array([np.nan, np.inf, -np.inf]), size=shape)
    return np.full(shape, float(kind))


@dataclass(frozen=True)
class CacheSpec:
    """A decoding history for a KV cache: rows, heads, append sizes, the cache's window, a seed.

    Every row appends ``steps[i]`` tokens at step i; :func:`cache_history`
    makes the queries, keys and values of all of them, one history per layer
    of ``layers`` (``"full"`` attends to every key, ``"sliding"`` through
    ``window``). The rest is what the cache under check is held to: its code
    ``format`` and the values that share a scale (``scales``, as
    :class:`~refattn.caches.QuantizedCache` names them) set the error allowed
    on top of the tolerance rule, and ``may_alias`` whether it may return the
    caller's own arrays. ``outlier_size`` makes some tokens' keys and values
    that many times larger than the rest, as the massive activations of real
    models are: a scale fixed on earlier tokens cannot hold them.
    """

    batch: int = 1
    q_heads: int = 1
    kv_heads: int = 1
    head_dim: int = 8
    steps: tuple[int, ...] = (1,)
    window: int | None = None
    sink_tokens: int = 0
    bits: int | None = None  #: the cache quantizes: its error bound is allowed on top
    logit_size: float = 1.0
    seed: int = 0
    format: str | None = None  #: the cache's codes (:data:`~refattn.caches.quantized.FORMATS`)
    scales: str = "token"  #: which values share a scale (:data:`~refattn.caches.quantized.SCALES`)
    outlier_size: float = 1.0  #: how much larger the outlier tokens are (1: none)
    layers: tuple[str, ...] | None = None  #: each layer's :data:`LAYER_KINDS` (None: one, windowed
    #: when there is a window)
    may_alias: bool = False  #: the cache may return arrays that share the caller's memory

    def __post_init__(self) -> None:
        """Refuse a history that describes no valid decoding, naming the field."""
        _check_counts(self, {})
        if not isinstance(self.steps, tuple) or not self.steps:
            raise TypeError(f"CacheSpec.steps must be a non-empty tuple; got {self.steps!r}")
        for n in self.steps:
            check_integer("CacheSpec.steps[i]", n, minimum=1)
        for name, minimum in (("window", 1), ("bits", 2)):
            if getattr(self, name) is not None:
                check_integer(f"CacheSpec.{name}", getattr(self, name), minimum=minimum)
        check_real("CacheSpec.logit_size", self.logit_size, positive=True)
        check_real("CacheSpec.outlier_size", self.outlier_size, positive=True)
        if self.outlier_size < 1:
            raise ValueError(
                f"CacheSpec.outlier_size must be at least 1; got {self.outlier_size!r}"
            )
        if self.format is not None:
            _check_choice("CacheSpec.format", self.format, FORMATS)
        _check_choice("CacheSpec.scales", self.scales, SCALES)
        if self.layers is not None and (not isinstance(self.layers, tuple) or not self.layers):
            raise TypeError(f"CacheSpec.layers must be a non-empty tuple; got {self.layers!r}")
        for kind in self.layers or ():
            _check_choice("CacheSpec.layers[i]", kind, LAYER_KINDS)
        if "sliding" in (self.layers or ()) and self.window is None:
            raise ValueError("CacheSpec.layers has a sliding layer, which needs a window; got none")
        if not isinstance(self.may_alias, bool):
            raise TypeError(f"CacheSpec.may_alias must be True or False; got {self.may_alias!r}")

    @property
    def length(self) -> int:
        return sum(self.steps)

    @property
    def quantized(self) -> tuple[str, str, int] | None:
        """``(format, scales, bits)`` of a quantizing cache (``bits`` alone means int8), or
        None for a cache that stores what it is given."""
        if self.format is None and self.bits is None:
            return None
        return self.format or "int8", self.scales, 8 if self.bits is None else self.bits

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """Each layer's kind: ``layers``, or one layer, sliding when there is a window."""
        if self.layers is not None:
            return self.layers
        return ("full",) if self.window is None else ("sliding",)

    def layer_window(self, layer: int) -> int | None:
        """The window through which layer ``layer``'s queries attend (a sliding layer's)."""
        return self.window if self.layer_kinds[layer] == "sliding" else None


#: How a layer attends: to every key, or through the history's window.
LAYER_KINDS = ("full", "sliding")


def cache_history(spec: CacheSpec, layer: int = 0) -> Problem:
    """The whole history of layer ``layer`` of ``spec`` as one causal self-attention problem
    (float64 NumPy). Each layer draws its own queries, keys and values (layer 0 from the
    seed itself); the outlier keys and values, each of about one token in four after the
    first, are the same in every layer."""
    seed = (
        spec.seed
        if layer == 0
        else int(np.random.SeedSequence([spec.seed, layer]).generate_state(1)[0])
    )
    problem = build_problem(
        ProblemSpec(
            batch=spec.batch, q_heads=spec.q_heads, kv_heads=spec.kv_heads,
            q_len=spec.length, k_len=spec.length, head_dim=spec.head_dim,
            value_dim=spec.head_dim, causal=True, window=spec.layer_window(layer),
            sink_tokens=spec.sink_tokens, logit_size=spec.logit_size, seed=seed,
        )
    )  # fmt: skip
    if spec.outlier_size > 1:
        # Keys and values are outliers independently: a large value under an ordinary key
        # keeps an ordinary weight, so what becomes of it shows in the output.
        rng = np.random.default_rng([spec.seed, 1])
        larger = np.where(rng.random((2, spec.length)) < 0.25, spec.outlier_size, 1.0)  # (2, S)
        larger[:, 0] = 1.0
        problem.k = problem.k * larger[0, :, None]
        problem.v = problem.v * larger[1, :, None]
    return problem
