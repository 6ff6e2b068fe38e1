"""The grid of ``refattn bench``: the shapes to time, and how each is timed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

#: ``backward`` times the gradients of a prefill: the prefill's shapes, causal.
MODES = ("decode", "prefill", "backward")


ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Shape:
    """One attention problem of the grid.

    ``seq_len`` is S, the number of keys (the cache length); a decode step has
    one query per head, a prefill S, and a backward is a prefill's gradients.

    Examples
    --------
    >>> shape = Shape("decode", batch=1, q_heads=32, kv_heads=8, head_dim=128,
    ...               seq_len=4096, dtype="float32")
    >>> shape.q_len, shape.kv_bytes, shape.label
    (1, 33554432, '1x32/8x4096x128')
    """

    mode: str
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    seq_len: int
    dtype: str

    @property
    def q_len(self) -> int:
        """Queries per head: one for a decode step, S for a prefill and its backward."""
        return 1 if self.mode == "decode" else self.seq_len

    @property
    def causal(self) -> bool:
        """Prefill and its backward are causal; a decode step's one query sees every key
        anyway."""
        return self.mode != "decode"

    @property
    def kv_bytes(self) -> int:
        """Bytes of K plus V: what a decode step must read."""
        return 2 * self.batch * self.kv_heads * self.seq_len * self.head_dim * ITEMSIZE[self.dtype]

    @property
    def flops(self) -> int:
        """FLOPs of the products, for each visible query-key pair of each query head.

        The forward's two, q.k and p.v: 2 (D + Dv). The backward's five, as
        FlashAttention-2 counts them: the scores again (q.k), dV (P^T dO), dP
        (dO V^T), dQ (dS K) and dK (dS^T Q): 2 (3 D + 2 Dv), 2.5 times the
        forward's.

        >>> shape = Shape("backward", batch=1, q_heads=1, kv_heads=1, head_dim=4,
        ...               seq_len=2, dtype="float32")
        >>> shape.flops  # 3 visible pairs, 2 (3 * 4 + 2 * 4) each
        120
        """
        S, D = self.seq_len, self.head_dim
        pairs = S if self.mode == "decode" else S * (S + 1) // 2
        per_pair = 2 * (3 * D + 2 * D) if self.mode == "backward" else 2 * (D + D)
        return self.batch * self.q_heads * pairs * per_pair

    @property
    def label(self) -> str:
        """``BxHq/HkvxSxD``."""
        return f"{self.batch}x{self.q_heads}/{self.kv_heads}x{self.seq_len}x{self.head_dim}"


@dataclass(frozen=True)
class Grid:
    """The shapes to time: every combination of the listed values, per mode and dtype.

    Decode combines ``batch``, ``q_heads``, ``kv_heads``, ``head_dims`` and
    ``seq_lens``; prefill combines ``batch``, ``prefill_heads`` (Hq = Hkv),
    ``prefill_head_dims`` and ``prefill_seq_lens``, and backward times the
    gradients of those same prefills.

    Examples
    --------
    >>> grid = Grid(modes=("decode", "prefill", "backward"), seq_lens=(16, 32),
    ...             prefill_seq_lens=(8,))
    >>> [(s.mode, s.seq_len) for s in grid.shapes()]
    [('decode', 16), ('decode', 32), ('prefill', 8), ('backward', 8)]
    """

    modes: Sequence[str] = ("decode", "prefill")
    batch: Sequence[int] = (1,)
    q_heads: Sequence[int] = (32,)
    kv_heads: Sequence[int] = (8,)
    head_dims: Sequence[int] = (128,)
    seq_lens: Sequence[int] = (1024, 4096, 16384)
    prefill_heads: Sequence[int] = (16,)
    prefill_head_dims: Sequence[int] = (64,)
    prefill_seq_lens: Sequence[int] = (2048,)
    dtypes: Sequence[str] = ("float32",)

    def shapes(self) -> list[Shape]:
        """Every shape, decode first, S growing fastest.

        Raises
        ------
        ValueError
            For an empty list, an unknown mode or dtype, a size below 1, or q
            heads that are not a multiple of KV heads.
        """
        for mode in self.modes:
            if mode not in MODES:
                raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        for dtype in self.dtypes:
            if dtype not in ITEMSIZE:
                raise ValueError(f"dtype must be one of {tuple(ITEMSIZE)}; got {dtype!r}")
        for name, values in asdict(self).items():
            if not values:
                raise ValueError(f"{name} must name at least one value; got none")
        for name, sizes in asdict(self).items():
            if name not in ("modes", "dtypes") and any(n < 1 for n in sizes):
                raise ValueError(f"{name} must be positive integers; got {list(sizes)}")
        shapes = []
        for mode in self.modes:
            if mode == "decode":
                heads = [(hq, hkv) for hq in self.q_heads for hkv in self.kv_heads]
                dims, lens = self.head_dims, self.seq_lens
            else:  # a prefill, or a prefill's backward
                heads = [(h, h) for h in self.prefill_heads]
                dims, lens = self.prefill_head_dims, self.prefill_seq_lens
            for hq, hkv in heads:
                if hq % hkv:
                    raise ValueError(
                        f"q heads ({hq}) must be a multiple of kv heads ({hkv}) for GQA"
                    )
            shapes += [
                Shape(mode, b, hq, hkv, d, s, dtype)
                for dtype in self.dtypes
                for b in self.batch
                for hq, hkv in heads
                for d in dims
                for s in lens
            ]
        return shapes


@dataclass(frozen=True)
class Settings:
    """How each row is timed, and with what block sizes and data.

    ``block_q`` of None means ``block_k``; ``bandwidth_mib`` of None means
    :func:`bandwidth_bytes` of the grid.

    Examples
    --------
    >>> Settings(block_k=256).blocks
    (256, 256)
    >>> Settings(repeats=0)
    Traceback (most recent call last):
    ...
    ValueError: repeats must be at least 1; got 0
    """

    block_q: int | None = None
    block_k: int = 512
    repeats: int = 5
    warmup: int = 1
    seed: int = 0
    bandwidth_mib: int | None = None

    def __post_init__(self) -> None:
        least = {"block_q": 1, "block_k": 1, "repeats": 1, "warmup": 0, "bandwidth_mib": 1}
        for name, minimum in least.items():
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise ValueError(f"{name} must be at least {minimum}; got {value}")

    @property
    def blocks(self) -> tuple[int, int]:
        """``(block_q, block_k)`` for :func:`refattn.attention_blockwise`."""
        return (self.block_k if self.block_q is None else self.block_q), self.block_k
