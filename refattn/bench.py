r"""``refattn bench``: how fast the spec runs, against PyTorch and against the memory.

What is timed
-------------
Two calls, on the same data on every backend:

* a **decode step**: one new query per head over a cache of S keys and values,
  q (B, Hq, 1, D), k and v (B, Hkv, S, D). The query sits at the end of the
  cache and sees every key, so no mask is passed to anyone.
* a **prefill**: S queries over their own S keys, causal, q (B, H, S, D) and
  k, v (B, H, S, D). For a square problem refattn's bottom-right causal
  alignment and SDPA's top-left ``is_causal`` are the same mask.

Each runs through :func:`refattn.attention` and
:func:`refattn.attention_blockwise` (``--block-q``, ``--block-k``) on every
selected backend, and through two PyTorch peers on the same data:

* **torch SDPA**: ``torch.nn.functional.scaled_dot_product_attention(q, k, v,
  is_causal=..., enable_gqa=Hq != Hkv)``;
* **torch matmul**: ``softmax(q k^T / sqrt(D)) v`` as plain torch calls. GQA
  reshapes q to (B, Hkv, G*Sq, D), so K and V are never repeated; the causal
  mask is built once outside the timing, as a model keeps it in a buffer.

The peers run where the backend's arrays live: torch on the CPU for NumPy and
array-api-strict, torch on the same device for torch, torch on the same GPU
for CuPy (none when torch has no CUDA). Peers shared by two backends are
timed once. array-api-strict is a conformance shim, not a fast path, so it
runs only when named.

How
---
Each row's time is the **median** of ``--repeats`` timed calls after
``--warmup`` untimed ones (the minimum is kept in the JSON too). The device
is synchronized before and after every timed call, so a GPU time is the work
and not the launch, and Python's garbage collector is off while timing, as
:mod:`timeit` does. Before timing, each call's output is checked once
against SDPA's on the same data (SDPA's own row against
``refattn.attention``) with ``np.allclose`` at the tolerances in
:data:`AGREEMENT`; a row that disagrees is marked MISMATCH, because a time for
a wrong answer is worthless, and the command exits 1.

Bandwidth, the floor and the fraction
-------------------------------------
Each device's memory bandwidth is measured in the same run, on a float32
buffer of four times the largest K+V in the grid (at least 64 MiB, so that it
does not sit in a cache):

* **read bandwidth** = bytes / time of a sum over the buffer
  (``np.add.reduce``, ``torch.sum``, ``cupy.sum``);
* **copy bandwidth** = 2 * bytes / time of a copy into a preallocated buffer
  (``np.copyto``, ``Tensor.copy_``, ``cupy.copyto``), counting the read and the
  write.

A decode step must read all of K and V once, and q, the scores and the output
are small beside them, so

.. math::

    t_\text{floor} = \frac{\text{bytes}(K) + \text{bytes}(V)}{\text{read bandwidth}}

is a lower bound on its time: the **floor**. A row's *achieved bandwidth* is
K+V bytes / median time and its *fraction* is achieved / measured **read**
bandwidth (equal to floor / time): read, not copy, because a decode step
reads K and V and writes almost nothing. A prefill is bound by arithmetic,
not memory; its fraction is small by nature and its GFLOP/s counts
2 (D + Dv) FLOPs per visible query-key pair (q.k and p.v; exponentials not
counted; a causal prefill has S (S + 1) / 2 visible pairs per head).

NumPy's own loops (the sum, the copy) use one thread, while the matrix
products inside attention go to BLAS, which may use several: with more than
one BLAS thread a NumPy fraction above 100% is possible, and
``OPENBLAS_NUM_THREADS=1`` makes the comparison like for like. torch's sum
and copy use torch's intra-op threads, as its attention does.

Noise: on a machine where other processes are busy, threads that wait for
each other (OpenBLAS's, torch's OpenMP pool) wait for the scheduler, and
times come in steps of its time slice (about 8 ms on Linux). Times far above
the floor that are multiples of one step, or a ``min_s`` far below
``median_s`` in the JSON, are that; ``OPENBLAS_NUM_THREADS=1`` and
``OMP_NUM_THREADS=1`` remove it at the cost of parallelism.

Ratios
------
``/ SDPA`` (JSON ``vs_sdpa``) is a row's time / SDPA's time on the same data
and peer device; ``/ best torch`` (``vs_fastest_torch``) is the time /
min(SDPA, torch matmul). Above 1 is slower than PyTorch. The table's
``% read BW`` is the fraction (``read_fraction``) and ``floor`` the floor
(``floor_s``), both against the bandwidth of the row's own device.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

import refattn
from refattn.backends import BACKENDS, Backend, get
from refattn.verify import make_console, progress_bar, write_json

MODES = ("decode", "prefill")
#: The spec's two paths, timed on every selected backend.
SPEC_PATHS = ("refattn.attention", "refattn.attention_blockwise")
#: The fused split-KV decode kernel of ``backends/cupy_decode.py``, timed on CuPy decode rows.
FUSED = "cupy fused decode"
#: The PyTorch peers, timed once per peer device.
PEERS = ("torch SDPA", "torch matmul")
#: ``(rtol, atol)`` for ``np.allclose(row output, reference output)``: loose enough
#: for the peers' other summation orders and for a float16 or bfloat16 output that
#: rounds the other way (one unit in its last place), tight enough that a wrong
#: mask, scale or head grouping fails.
AGREEMENT = {
    "float64": (1e-9, 1e-12),
    "float32": (1e-4, 1e-5),
    "float16": (2e-2, 2e-3),
    "bfloat16": (5e-2, 1e-2),
}
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
#: The smallest bandwidth buffer: bigger than any CPU's last-level cache here.
MIN_BANDWIDTH_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Shape:
    """One attention problem of the grid.

    ``seq_len`` is S, the number of keys (the cache length); a decode step has
    one query per head, a prefill S.

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
        return 1 if self.mode == "decode" else self.seq_len

    @property
    def causal(self) -> bool:
        """Prefill is causal; a decode step's one query sees every key anyway."""
        return self.mode == "prefill"

    @property
    def kv_bytes(self) -> int:
        """Bytes of K plus V: what a decode step must read."""
        return 2 * self.batch * self.kv_heads * self.seq_len * self.head_dim * ITEMSIZE[self.dtype]

    @property
    def flops(self) -> int:
        """2 (D + Dv) FLOPs for each visible query-key pair of each query head."""
        S = self.seq_len
        pairs = S if self.mode == "decode" else S * (S + 1) // 2
        return 2 * self.batch * self.q_heads * pairs * 2 * self.head_dim

    @property
    def label(self) -> str:
        """``BxHq/HkvxSxD``."""
        return f"{self.batch}x{self.q_heads}/{self.kv_heads}x{self.seq_len}x{self.head_dim}"


@dataclass(frozen=True)
class Grid:
    """The shapes to time: every combination of the listed values, per mode and dtype.

    Decode combines ``batch``, ``q_heads``, ``kv_heads``, ``head_dims`` and
    ``seq_lens``; prefill combines ``batch``, ``prefill_heads`` (Hq = Hkv),
    ``prefill_head_dims`` and ``prefill_seq_lens``.

    Examples
    --------
    >>> grid = Grid(modes=("decode", "prefill"), seq_lens=(16, 32), prefill_seq_lens=(8,))
    >>> [(s.mode, s.seq_len) for s in grid.shapes()]
    [('decode', 16), ('decode', 32), ('prefill', 8)]
    """

    modes: Sequence[str] = MODES
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
            else:
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


@dataclass(frozen=True)
class Target:
    """A backend on one device: where the spec's paths run."""

    backend: Backend
    device: str

    @property
    def name(self) -> str:
        return f"{self.backend.name} {self.device}"


@dataclass(frozen=True)
class Job:
    """One row to time: a path, on a backend and device, for a shape."""

    shape: Shape
    implementation: str
    backend: str
    device: str
    peer_device: str | None  # where this shape's torch peers run; None without torch


@dataclass
class Bandwidth:
    """A device's measured memory bandwidth, in bytes per second."""

    backend: str
    device: str
    buffer_bytes: int
    read: float  # bytes / time of a sum over the buffer
    copy: float  # 2 * bytes / time of a copy into a preallocated buffer (read + write)
    read_with: str
    copy_with: str


@dataclass
class Row:
    """One timed path on one shape: the table's line and the JSON's record."""

    mode: str
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    seq_len: int
    q_len: int
    dtype: str
    implementation: str
    backend: str
    device: str
    block_q: int | None
    block_k: int | None
    median_s: float
    min_s: float
    repeats: int
    kv_bytes: int
    flops: int
    peer_device: str | None
    kv_bandwidth: float = 0.0  # K+V bytes / median time
    read_bandwidth: float | None = None  # measured on this row's device
    read_fraction: float | None = None  # kv_bandwidth / read_bandwidth = floor / time
    floor_s: float | None = None  # K+V bytes / read_bandwidth
    gflops: float = 0.0
    vs_sdpa: float | None = None
    vs_fastest_torch: float | None = None
    reference: str | None = None  # what the output was compared with
    max_abs_diff: float | None = None
    agrees: bool | None = None  # None when there was nothing to compare with

    @property
    def shape(self) -> Shape:
        return Shape(self.mode, self.batch, self.q_heads, self.kv_heads, self.head_dim,
                     self.seq_len, self.dtype)  # fmt: skip


@dataclass
class Result:
    """Everything one run measured."""

    rows: list[Row]
    bandwidths: list[Bandwidth]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def mismatches(self) -> list[Row]:
        return [row for row in self.rows if row.agrees is False]


def select_targets(names: Iterable[str] | None) -> tuple[list[Target], dict[str, str]]:
    """The backends to time on, each on its default device and its first GPU.

    ``None`` means every available backend but array-api-strict, which is a
    conformance shim and runs only when named. Returns the targets and, for
    each backend left out, why.
    """
    if names is None:
        names = [name for name in BACKENDS if name != "array_api_strict"]
    targets, skipped = [], {}
    for name in names:
        backend = get(name)
        reason = backend.unavailable_reason()
        if reason is not None:
            skipped[name] = reason
            continue
        devices = backend.devices()
        gpus = [d for d in devices[1:] if d.startswith("cuda")]
        targets += [Target(backend, device) for device in devices[:1] + gpus[:1]]
    return targets, skipped


def peer_device(device: str) -> str | None:
    """Where torch runs the peers for arrays on ``device``; None if it cannot there."""
    torch = BACKENDS["torch"]
    if not torch.available():
        return None
    if device.startswith("cuda"):
        return device if device in torch.devices() else None
    return "cpu"


def plan(shapes: Iterable[Shape], targets: Sequence[Target]) -> tuple[list[Job], dict[str, str]]:
    """The rows to time, in order: per shape, each peer device's peers before the spec
    paths that compare with them. Returns the jobs and what was skipped, and why."""
    jobs, skipped = [], {}
    torch = BACKENDS["torch"]
    if not torch.available():
        skipped["torch SDPA, torch matmul"] = f"{torch.unavailable_reason()}: no peers, no ratios"
    for shape in shapes:
        peers_planned = set()
        for target in targets:
            if shape.dtype not in target.backend.dtypes(target.device):
                skipped[f"{target.name} {shape.dtype}"] = (
                    f"{target.backend.name} has no {shape.dtype}"
                )
                continue
            peer = peer_device(target.device)
            if peer is not None and peer not in peers_planned:
                jobs += [Job(shape, name, "torch", peer, peer) for name in PEERS]
                peers_planned.add(peer)
            paths: tuple[str, ...] = SPEC_PATHS
            if target.backend.name == "cupy" and shape.mode == "decode":
                paths = (*SPEC_PATHS, FUSED)
            jobs += [Job(shape, name, target.backend.name, target.device, peer)
                     for name in paths]  # fmt: skip
    return jobs, skipped


def run(
    jobs: Sequence[Job],
    *,
    block_q: int,
    block_k: int,
    repeats: int,
    warmup: int,
    seed: int = 0,
    on_row: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Check, then time, every job; rows come back in the jobs' order.

    The data of a shape is drawn once from ``seed`` in NumPy (see :func:`draw_data`) and
    rounded to the shape's dtype by each backend, so every path sees the same
    values.
    """
    rows: list[Row] = []
    current: Shape | None = None
    data: dict[str, np.ndarray] = {}
    arrays: dict[tuple[str, str], tuple[Any, ...]] = {}
    outputs: dict[tuple[str, str, str], np.ndarray] = {}  # (path, backend, device) -> out
    unchecked_sdpa: dict[str, Row] = {}  # peer device -> SDPA's row, until a spec row checks it
    for job in jobs:
        if job.shape != current:
            current, data = job.shape, draw_data(job.shape, seed)
            arrays, outputs, unchecked_sdpa = {}, {}, {}
        backend = get(job.backend)
        where = (job.backend, job.device)
        if where not in arrays:
            arrays[where] = tuple(
                backend.asarray(data[name], dtype=job.shape.dtype, device=job.device)
                for name in ("q", "k", "v")
            )
        step = make_step(job, *arrays[where], block_q=block_q, block_k=block_k)
        out = backend.to_numpy(step())  # the one checked call, outside the timing
        outputs[job.implementation, job.backend, job.device] = out

        def synchronize(backend: Backend = backend, device: str = job.device) -> None:
            backend.synchronize(device)

        median, minimum = time_calls(step, synchronize, repeats=repeats, warmup=warmup)
        blocks = job.implementation == "refattn.attention_blockwise"
        shape = job.shape
        row = Row(
            mode=shape.mode, batch=shape.batch, q_heads=shape.q_heads, kv_heads=shape.kv_heads,
            head_dim=shape.head_dim, seq_len=shape.seq_len, q_len=shape.q_len, dtype=shape.dtype,
            implementation=job.implementation, backend=job.backend, device=job.device,
            block_q=block_q if blocks else None, block_k=block_k if blocks else None,
            median_s=median, min_s=minimum, repeats=repeats, kv_bytes=shape.kv_bytes,
            flops=shape.flops, peer_device=job.peer_device,
        )  # fmt: skip
        sdpa = outputs.get(("torch SDPA", "torch", job.peer_device or ""))
        if job.implementation != "torch SDPA" and sdpa is not None:
            compare(row, out, sdpa, f"torch SDPA on {job.peer_device}")
        rows.append(row)
        if job.implementation == "torch SDPA":
            unchecked_sdpa[job.device] = row
        sdpa_row = unchecked_sdpa.get(job.peer_device or "")
        if job.implementation == "refattn.attention" and sdpa_row is not None:
            # SDPA's own check: against the first spec row that uses it
            compare(sdpa_row, outputs[sdpa_row.implementation, "torch", sdpa_row.device], out,
                    f"refattn.attention on {job.backend} {job.device}")  # fmt: skip
            del unchecked_sdpa[sdpa_row.device]
        if on_row is not None:
            on_row(row)
    return rows


def draw_data(shape: Shape, seed: int) -> dict[str, np.ndarray]:
    """q (B, Hq, Sq, D), k and v (B, Hkv, S, D): standard normal, from ``seed``.

    Drawn in float32 (float64 for a float64 shape): a GPU grid holds caches of
    several GB, and drawing them in float64 would take longer than timing them.
    """
    rng = np.random.default_rng(seed)
    B, Hq, Hkv, D, S = shape.batch, shape.q_heads, shape.kv_heads, shape.head_dim, shape.seq_len
    dtype = np.float64 if shape.dtype == "float64" else np.float32
    return {
        "q": rng.standard_normal((B, Hq, shape.q_len, D), dtype=dtype),
        "k": rng.standard_normal((B, Hkv, S, D), dtype=dtype),
        "v": rng.standard_normal((B, Hkv, S, D), dtype=dtype),
    }


def make_step(job: Job, q: Any, k: Any, v: Any, *, block_q: int, block_k: int) -> Callable[[], Any]:
    """The call to time, with everything but the call itself done already."""
    causal = job.shape.causal
    if job.implementation == "refattn.attention":
        return lambda: refattn.attention(q, k, v, causal=causal)
    if job.implementation == "refattn.attention_blockwise":
        return lambda: refattn.attention_blockwise(
            q, k, v, causal=causal, block_q=block_q, block_k=block_k
        )
    if job.implementation == FUSED:
        from refattn.backends.cupy_decode import decode_attention

        return lambda: decode_attention(q, k, v, causal=causal)
    if job.implementation == "torch SDPA":
        return torch_sdpa(q, k, v, causal=causal)
    if job.implementation == "torch matmul":
        return torch_matmul(q, k, v, causal=causal)
    raise ValueError(
        f"implementation must be one of {(*SPEC_PATHS, FUSED, *PEERS)}; got {job.implementation!r}"
    )


def torch_sdpa(q: Any, k: Any, v: Any, *, causal: bool) -> Callable[[], Any]:
    """PyTorch's fused attention; ``enable_gqa`` only where the heads differ."""
    from torch.nn.functional import scaled_dot_product_attention

    gqa = q.shape[1] != k.shape[1]
    return lambda: scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)


def torch_matmul(q: Any, k: Any, v: Any, *, causal: bool) -> Callable[[], Any]:
    """Attention as three plain torch calls: q k^T, softmax, times v.

    Grouped-query heads share K and V through a reshape of q, never a copy of
    K or V; the causal mask (bottom-right) is built here, once, outside the
    timed call.
    """
    import torch

    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    scale = 1 / math.sqrt(D)
    hidden = None
    if causal:
        ones = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
        hidden = torch.triu(ones, diagonal=Sk - Sq + 1)  # (Sq, Sk): key after the query

    def step() -> Any:
        grouped = q.reshape(B, Hkv, G * Sq, D)  # query head h = kv * G + g; a view
        s = (grouped * scale) @ k.transpose(-2, -1)  # (B, Hkv, G*Sq, Sk)
        if hidden is not None:
            s.view(B, Hkv, G, Sq, Sk).masked_fill_(hidden, -math.inf)
        p = torch.softmax(s, dim=-1)
        return (p @ v).reshape(B, Hq, Sq, Dv)  # (B, Hq, Sq, Dv)

    return step


def cuda_event_seconds(step: Callable[[], Any], *, repeats: int, warmup: int) -> float:
    """Median GPU seconds of ``repeats`` calls of ``step`` after ``warmup`` untimed ones,
    each between two CUDA events on CuPy's current stream.

    Unlike :func:`time_calls` this leaves out the host's launch time when the
    GPU is busy, and counts it when the GPU waits for the host. The GPU
    profiles in ``benchmarks/`` use it.
    """
    import cupy

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)  # ms -> s
    return statistics.median(times)


def time_calls(
    step: Callable[[], Any], synchronize: Callable[[], None], *, repeats: int, warmup: int
) -> tuple[float, float]:
    """Median and minimum seconds of ``repeats`` calls after ``warmup`` untimed ones.

    The device is synchronized around each timed call, and the garbage
    collector is off while timing.

    Examples
    --------
    >>> median, minimum = time_calls(lambda: sum(range(100)), lambda: None, repeats=3, warmup=1)
    >>> 0 < minimum <= median
    True
    """
    for _ in range(warmup):
        step()
    collecting = gc.isenabled()
    gc.disable()
    try:
        times = []
        for _ in range(repeats):
            synchronize()
            start = time.perf_counter()
            step()
            synchronize()
            times.append(time.perf_counter() - start)
    finally:
        if collecting:
            gc.enable()
    return statistics.median(times), min(times)


def compare(row: Row, out: np.ndarray, reference: np.ndarray, name: str) -> None:
    """Record on ``row`` whether ``out`` equals ``reference`` by ``np.allclose``.

    The tolerance is :data:`AGREEMENT` for the row's dtype.
    """
    rtol, atol = AGREEMENT[row.dtype]
    out, reference = np.asarray(out, np.float64), np.asarray(reference, np.float64)
    row.reference = name
    row.max_abs_diff = float(np.max(np.abs(out - reference), initial=0.0))
    row.agrees = bool(np.allclose(out, reference, rtol=rtol, atol=atol))


def measure_bandwidth(target: Target, nbytes: int, *, repeats: int) -> Bandwidth:
    """Read and copy bandwidth of ``target``'s memory, on float32 buffers of ``nbytes``."""
    n = nbytes // 4
    name, device = target.backend.name, target.device
    src: Any
    dst: Any
    read: Callable[[], Any]
    copy: Callable[[], Any]
    if name == "torch":
        import torch

        src = torch.ones(n, dtype=torch.float32, device=device)
        dst = torch.zeros_like(src)
        read, copy = (lambda: torch.sum(src)), (lambda: dst.copy_(src))
        read_with, copy_with = "torch.sum", "Tensor.copy_"
    elif name == "cupy":
        import cupy

        with cupy.cuda.Device(int(device.partition(":")[2] or 0)):
            src = cupy.ones(n, dtype=cupy.float32)
            dst = cupy.zeros_like(src)
        read, copy = (lambda: cupy.sum(src)), (lambda: cupy.copyto(dst, src))
        read_with, copy_with = "cupy.sum", "cupy.copyto"
    else:  # NumPy, and array-api-strict, which holds NumPy arrays
        src = np.ones(n, dtype=np.float32)
        dst = np.zeros_like(src)  # written once, so its pages exist before the timing
        read, copy = (lambda: np.add.reduce(src)), (lambda: np.copyto(dst, src))
        read_with, copy_with = "np.add.reduce", "np.copyto"

    def synchronize() -> None:
        target.backend.synchronize(device)

    repeats = max(repeats, 3)
    read_s, _ = time_calls(read, synchronize, repeats=repeats, warmup=1)
    copy_s, _ = time_calls(copy, synchronize, repeats=repeats, warmup=1)
    return Bandwidth(name, device, 4 * n, 4 * n / read_s, 2 * 4 * n / copy_s, read_with, copy_with)


def bandwidth_targets(jobs: Iterable[Job]) -> list[Target]:
    """Each (backend, device) that runs a job, once."""
    seen = dict.fromkeys((job.backend, job.device) for job in jobs)
    return [Target(get(name), device) for name, device in seen]


def finish(rows: list[Row], bandwidths: list[Bandwidth]) -> None:
    """Fill in each row's bandwidth, floor, GFLOP/s and its ratios to the torch peers."""
    read = {(b.backend, b.device): b.read for b in bandwidths}
    peer_times: dict[tuple[Shape, str, str | None], float] = {
        (row.shape, row.implementation, row.device): row.median_s
        for row in rows
        if row.implementation in PEERS
    }
    for row in rows:
        row.kv_bandwidth = row.kv_bytes / row.median_s
        row.gflops = row.flops / row.median_s / 1e9
        row.read_bandwidth = read.get((row.backend, row.device))
        if row.read_bandwidth:
            row.floor_s = row.kv_bytes / row.read_bandwidth
            row.read_fraction = row.kv_bandwidth / row.read_bandwidth
        sdpa = peer_times.get((row.shape, "torch SDPA", row.peer_device))
        matmul = peer_times.get((row.shape, "torch matmul", row.peer_device))
        if sdpa is not None:
            row.vs_sdpa = row.median_s / sdpa
        if sdpa is not None and matmul is not None:
            row.vs_fastest_torch = row.median_s / min(sdpa, matmul)


def bandwidth_bytes(shapes: Iterable[Shape]) -> int:
    """Four times the largest K+V of the grid, at least :data:`MIN_BANDWIDTH_BYTES`."""
    return max([MIN_BANDWIDTH_BYTES, *(4 * shape.kv_bytes for shape in shapes)])


def machine_info() -> dict[str, Any]:
    """Versions, CPU count and thread settings: what a reader needs to weigh the times.

    BLAS libraries and their threads come from ``threadpoolctl`` when it is
    installed, and are left out otherwise.
    """
    info: dict[str, Any] = {
        "refattn": refattn.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
    }
    if hasattr(os, "sched_getaffinity"):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    thread_vars = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    info["thread_env"] = {name: os.environ[name] for name in thread_vars if name in os.environ}
    if BACKENDS["torch"].available():
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["torch_cuda_device"] = torch.cuda.get_device_name(0)
    if "cupy" in sys.modules:
        info["cupy"] = sys.modules["cupy"].__version__
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return info
    with warnings.catch_warnings():  # it may warn about two OpenMPs; that is not our run's news
        warnings.simplefilter("ignore")
        pools = threadpool_info()
    keys = ("user_api", "internal_api", "version", "num_threads")
    info["blas"] = [{key: pool.get(key) for key in keys} for pool in pools]
    return info


def format_seconds(t: float) -> str:
    """A duration with three significant digits and a unit.

    Examples
    --------
    >>> format_seconds(0.0123), format_seconds(4.5e-6), format_seconds(2.0), format_seconds(0.25)
    ('12.3 ms', '4.50 us', '2.00 s', '250 ms')
    >>> format_seconds(0.00099996)
    '1.00 ms'
    """
    t = float(f"{t:.3g}")  # round first, so that 999.96 us reads 1.00 ms
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
        if t >= scale or unit == "ns":
            value = t / scale
            return f"{value:.{0 if value >= 100 else 1 if value >= 10 else 2}f} {unit}"
    raise AssertionError("unreachable")


def format_tables(rows: Sequence[Row]) -> list[Table]:
    """The bench tables, one per mode and dtype: a line per shape, path and device."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.mode, row.dtype), []).append(row)
    return [format_table(mode, dtype, group) for (mode, dtype), group in groups.items()]


def format_table(mode: str, dtype: str, rows: Sequence[Row]) -> Table:
    """One mode and dtype: time, bandwidth, floor, arithmetic rate, ratios and check."""
    what = "decode step (Sq = 1)" if mode == "decode" else "causal prefill (Sq = S)"
    table = Table(title=f"{what}, {dtype}: median time per call", title_justify="left")
    for name in ("BxHq/HkvxSxD", "implementation", "on"):
        table.add_column(name)
    for name in ("median", "K+V GB/s", "% read BW", "floor", "GFLOP/s", "/ SDPA",
                 "/ best torch"):  # fmt: skip
        table.add_column(name, justify="right")
    table.add_column("check")
    for row in rows:
        name = row.implementation
        if row.block_k is not None:
            name = f"refattn blockwise bq={row.block_q} bk={row.block_k}"
        if row.agrees is None:
            check = "-"
        elif row.agrees:
            check = "ok"
        else:
            check = f"[bold red]MISMATCH[/] ({row.max_abs_diff:.1e})"
        table.add_row(
            row.shape.label, name, f"{row.backend} {row.device}",
            format_seconds(row.median_s),
            f"{row.kv_bandwidth / 1e9:.1f}",
            "-" if row.read_fraction is None else f"{row.read_fraction:.0%}",
            "-" if row.floor_s is None else format_seconds(row.floor_s),
            f"{row.gflops:.1f}",
            "-" if row.vs_sdpa is None else f"{row.vs_sdpa:.2f}x",
            "-" if row.vs_fastest_torch is None else f"{row.vs_fastest_torch:.2f}x",
            check,
        )  # fmt: skip
    return table


def bandwidth_table(bandwidths: Sequence[Bandwidth]) -> Table:
    """The measured bandwidths: read (a sum) and copy (read + write)."""
    table = Table(title="memory bandwidth, measured in this run", title_justify="left")
    table.add_column("on")
    for name in ("buffer", "read GB/s", "copy GB/s (read + write)"):
        table.add_column(name, justify="right")
    table.add_column("how")
    for b in bandwidths:
        table.add_row(
            f"{b.backend} {b.device}", f"{b.buffer_bytes / 2**20:.0f} MiB",
            f"{b.read / 1e9:.1f}", f"{b.copy / 1e9:.1f}", f"{b.read_with}, {b.copy_with}",
        )  # fmt: skip
    return table


def plot(result: Result, path: str) -> str:
    """Time per decode step against S, log-log, with each device's floor dashed.

    One line per path, backend and device (and dtype and heads when the grid
    has several); the floor is K+V bytes / the measured read bandwidth of each
    device that ran the spec. Returns what happened, for the console.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return f"--plot: matplotlib is not installed (pip install matplotlib); {path} not written"
    decode = [row for row in result.rows if row.mode == "decode"]
    if not decode:
        return "--plot: no decode rows to plot; nothing written"

    def others(row: Row) -> tuple[Any, ...]:  # what a line holds fixed besides S
        return (row.dtype, row.batch, row.q_heads, row.kv_heads, row.head_dim)

    several = len({others(row) for row in decode}) > 1
    lines: dict[tuple[Any, ...], list[Row]] = {}
    floors: dict[tuple[Any, ...], list[Row]] = {}
    for row in decode:
        key = (row.implementation, row.backend, row.device, *others(row))
        lines.setdefault(key, []).append(row)
        if row.implementation == "refattn.attention" and row.read_bandwidth:
            floors.setdefault((row.backend, row.device, *others(row)), []).append(row)
    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.subplots()
    for (name, backend, device, *rest), line in lines.items():
        line.sort(key=lambda row: row.seq_len)
        label = f"{name} on {backend} {device}" + (f" {rest}" if several else "")
        axes.plot([r.seq_len for r in line], [r.median_s for r in line], marker="o", label=label)
    dashes = ("--", ":", "-.")
    for i, ((backend, device, *rest), line) in enumerate(floors.items()):
        line.sort(key=lambda row: row.seq_len)
        read = line[0].read_bandwidth or math.inf  # the same for the whole line
        label = f"floor: K+V / {backend} {device} read {read / 1e9:.1f} GB/s"
        label += f" {rest}" if several else ""
        axes.plot([r.seq_len for r in line], [r.kv_bytes / read for r in line],
                  linestyle=dashes[i % 3], color="black", alpha=0.6, label=label)  # fmt: skip
    shape = decode[0]
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("S, keys in the cache")
    axes.set_ylabel("seconds per decode step (median)")
    title = "decode step" if several else (
        f"decode step: B={shape.batch}, Hq={shape.q_heads}, Hkv={shape.kv_heads}, "
        f"D={shape.head_dim}, {shape.dtype}"
    )  # fmt: skip
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return f"plot written to {path}"


def to_json(result: Result, settings: dict[str, Any]) -> dict[str, Any]:
    """The run as plain data: rows, bandwidths, machine, settings and what was skipped."""
    return {
        "rows": [asdict(row) for row in result.rows],
        "bandwidth": [asdict(b) for b in result.bandwidths],
        "machine": machine_info(),
        "settings": settings,
        "skipped": result.skipped,
    }


def main(
    grid: Grid,
    settings: Settings | None = None,
    *,
    backends: Sequence[str] | None = None,
    json_path: str | None = None,
    plot_path: str | None = None,
    console: Console | None = None,
) -> int:
    """Time the grid on the backends and print the tables; 1 if an output disagreed.

    ``backends`` of None means every available backend but array-api-strict
    (see :func:`select_targets`).
    """
    console = console or make_console()
    settings = settings or Settings()
    block_q, block_k = settings.blocks
    shapes = grid.shapes()
    targets, skipped = select_targets(backends)
    jobs, more_skipped = plan(shapes, targets)
    skipped |= more_skipped
    devices = bandwidth_targets(jobs)
    nbytes = bandwidth_bytes(shapes)
    if settings.bandwidth_mib is not None:
        nbytes = settings.bandwidth_mib * 2**20
    console.print(
        f"refattn bench: {len(shapes)} shapes on {', '.join(t.name for t in targets) or 'nothing'}"
        f"; {len(jobs)} rows, each the median of {settings.repeats} calls after "
        f"{settings.warmup} warm-up; seed {settings.seed}",
        highlight=False,
    )
    with progress_bar(console) as bar:
        task = bar.add_task("bandwidth", total=len(devices) + len(jobs))
        bandwidths = []
        for device in devices:
            bar.update(task, description=f"bandwidth {device.name}")
            bandwidths.append(measure_bandwidth(device, nbytes, repeats=settings.repeats))
            bar.advance(task)

        def advance(row: Row) -> None:
            bar.update(task, advance=1, description=f"{row.mode} S={row.seq_len} {row.backend}")

        rows = run(jobs, block_q=block_q, block_k=block_k, repeats=settings.repeats,
                   warmup=settings.warmup, seed=settings.seed, on_row=advance)  # fmt: skip
    finish(rows, bandwidths)
    result = Result(rows, bandwidths, skipped)
    console.print(bandwidth_table(bandwidths))
    for table in format_tables(rows):
        console.print(table)
    for name, reason in skipped.items():
        console.print(f"{name}: skipped ({reason})", highlight=False)
    for row in result.mismatches:
        console.print(
            f"MISMATCH: {row.implementation} on {row.backend} {row.device}, {row.mode} "
            f"{row.shape.label} {row.dtype}: max |diff| {row.max_abs_diff:.2e} against "
            f"{row.reference} (rtol, atol = {AGREEMENT[row.dtype]}); its time is not meaningful",
            style="bold red", highlight=False,
        )  # fmt: skip
    if json_path:
        recorded = {"grid": asdict(grid), **asdict(settings), "block_q": block_q,
                    "backends": [t.name for t in targets], "bandwidth_bytes": nbytes}  # fmt: skip
        write_json(json_path, to_json(result, recorded))
        console.print(f"JSON written to {json_path}", highlight=False)
    if plot_path:
        console.print(plot(result, plot_path), highlight=False)
    return 1 if result.mismatches else 0
