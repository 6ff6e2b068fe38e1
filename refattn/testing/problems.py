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

    def __post_init__(self) -> None:
        """A spec that describes no valid attention call is refused here, naming the field,
        so that a mistake in it is never blamed on the candidate it is handed to."""
        _check_counts(self, {"q_len": 0, "k_len": 0, "value_dim": 1})
        if self.window is not None:
            check_integer("ProblemSpec.window", self.window, minimum=1)
        check_real("ProblemSpec.softcap", self.softcap, positive=True)
        check_real("ProblemSpec.scale", self.scale, positive=False)
        check_real("ProblemSpec.logit_size", self.logit_size, positive=True)
        check_real("ProblemSpec.value_offset", self.value_offset, positive=False)
        _check_choice("ProblemSpec.layout", self.layout, LAYOUTS)
        _check_choice("ProblemSpec.unseen_values", self.unseen_values, UNSEEN_VALUES)
        for name in ("causal", "alibi", "sink_logits", "mask", "bias", "unseen_nan", "seen_nan",
                     "return_lse"):  # fmt: skip
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
        keep = rng.random((B, Hq, Sq, Sk)) < 0.75
        form = rng.integers(3)  # full, shared across heads, shared across the batch
        mask = keep if form == 0 else keep[:, :1] if form == 1 else keep[0, :, :, :]
    if spec.bias:
        bias = rng.standard_normal((1, Hq, Sq, Sk) if rng.integers(2) else (B, 1, Sq, Sk))
    if spec.alibi:
        slopes = 2.0 ** (-8.0 * np.arange(1, Hq + 1) / Hq)
        if rng.integers(2):
            slopes = slopes * rng.uniform(0.5, 2.0, size=(B, 1))
    if spec.sink_logits:
        sinks = rng.standard_normal(Hq)
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
    if spec.layout == "ragged":
        length = rng.integers(0, Sk + 1, size=(B, 1))
        k_pos = np.where(np.arange(Sk)[None, :] < length, np.arange(Sk)[None, :], -1)
        return length - Sq + rows[None, :], k_pos
    if spec.layout == "left_padded":
        # Row b starts with pad[b] empty slots; its tokens are numbered from 0.
        pad = rng.integers(0, Sk + 1, size=B)
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


def seen_slots(problem: Problem) -> np.ndarray:
    """(B, Sk) booleans: which key slots at least one query of the row may see."""
    s = problem.spec
    q = problem.q_pos[:, :, None]
    k = problem.k_pos[:, None, :]
    visible = np.broadcast_to(k >= 0, (s.batch, s.q_len, s.k_len))
    if s.causal:
        visible = visible & (k <= q)
    if s.window is not None:
        visible = visible & ((q - k < s.window) | (k < s.sink_tokens))
    visible = np.broadcast_to(visible[:, None], (s.batch, s.q_heads, s.q_len, s.k_len))
    if problem.mask is not None:
        visible = visible & problem.mask
    return np.asarray(visible.any(axis=(1, 2)))


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
    makes the queries, keys and values of all of them.
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

    @property
    def length(self) -> int:
        return sum(self.steps)


def cache_history(spec: CacheSpec) -> Problem:
    """The whole history of ``spec`` as one causal self-attention problem (float64 NumPy)."""
    return build_problem(
        ProblemSpec(
            batch=spec.batch, q_heads=spec.q_heads, kv_heads=spec.kv_heads,
            q_len=spec.length, k_len=spec.length, head_dim=spec.head_dim,
            value_dim=spec.head_dim, causal=True, window=spec.window,
            sink_tokens=spec.sink_tokens, logit_size=spec.logit_size, seed=spec.seed,
        )
    )  # fmt: skip
