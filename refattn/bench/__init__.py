r"""``refattn bench``: how fast the spec runs, against PyTorch and against the memory.

What is timed
-------------
Two calls, on the same data on every backend, and, with ``--mode backward``, a
third:

* a **decode step**: one new query per head over a cache of S keys and values,
  q (B, Hq, 1, D), k and v (B, Hkv, S, D). The query sits at the end of the
  cache and sees every key, so no mask is passed to anyone.
* a **prefill**: S queries over their own S keys, causal, q (B, H, S, D) and
  k, v (B, H, S, D). For a square problem refattn's bottom-right causal
  alignment and SDPA's top-left ``is_causal`` are the same mask.

* a **backward**: the gradients dq, dk and dv of a prefill (the prefill's
  shapes and options, causal) for an output gradient dout (B, H, S, D). Only
  the backward is timed, on both sides: refattn's is given the ``out`` and
  ``lse`` its forward saved, torch's walks the graph its forward saved.

Each runs through :func:`refattn.attention` and
:func:`refattn.attention_blockwise` (``--block-q``, ``--block-k``) on every
selected backend, and through two PyTorch peers on the same data:

* **torch SDPA**: ``torch.nn.functional.scaled_dot_product_attention(q, k, v,
  is_causal=..., enable_gqa=Hq != Hkv)``;
* **torch matmul**: ``softmax(q k^T / sqrt(D)) v`` as plain torch calls. GQA
  reshapes q to (B, Hkv, G*Sq, D), so K and V are never repeated; the causal
  mask is built once outside the timing, as a model keeps it in a buffer.

A backward runs through :func:`refattn.attention_backward` and
:func:`refattn.attention_backward_blockwise` (the same ``--block-q`` and
``--block-k``), each given ``out`` and ``lse`` from its own forward
(:func:`refattn.attention` or :func:`refattn.attention_blockwise` with
``return_lse=True``), and through the same two peers' autograd: each peer's
forward runs once on q, k and v that require gradients, and the timed call
is ``torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)``. The
forwards run once, before the timing, and are in no row's time. The backward
is left out of the default ``--mode`` (decode, prefill): on a 2-core CPU its
default shape alone takes about twice as long as both of those.

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
:data:`refattn.testing.tolerance.AGREEMENT`; a row that disagrees is marked
MISMATCH, because a time for a wrong answer is worthless, and the command
exits 1. A backward's output is its dq, dk and dv together, checked against
SDPA's autograd (SDPA's against ``refattn.attention_backward``).

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
counted; a causal prefill has S (S + 1) / 2 visible pairs per head). A
backward's counts FlashAttention-2's five products per pair, 2 (3 D + 2 Dv):
the scores again, dV, dP, dQ and dK. Like a prefill's, its K+V bandwidth
and fraction are small by nature.

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

The package, a room per idea: :mod:`~refattn.bench.shapes` (the grid),
:mod:`~refattn.bench.plan` (which rows, where), :mod:`~refattn.bench.timing`
(timers and bandwidth), :mod:`~refattn.bench.peers` (the timed calls),
:mod:`~refattn.bench.run` (check, time, ratios), :mod:`~refattn.bench.report`
(tables, plot, JSON) and :mod:`~refattn.bench.command` (the command line).
"""

from refattn.bench.peers import make_step, torch_matmul, torch_sdpa
from refattn.bench.plan import (
    BACKWARD_PATHS,
    FUSED,
    PEERS,
    SPEC_PATHS,
    Job,
    Target,
    peer_device,
    plan,
    spec_paths,
)
from refattn.bench.report import format_seconds, machine_info, to_json
from refattn.bench.run import Result, Row, main, run
from refattn.bench.shapes import MODES, Grid, Settings, Shape
from refattn.bench.timing import Bandwidth, cuda_event_seconds, measure_bandwidth, time_calls

# The tolerances of the check live with every other tolerance; bench's own module
# exported them, so ``refattn.bench.AGREEMENT`` still names them.
from refattn.testing.tolerance import AGREEMENT

__all__ = [
    "AGREEMENT",
    "BACKWARD_PATHS",
    "FUSED",
    "MODES",
    "PEERS",
    "SPEC_PATHS",
    "Bandwidth",
    "Grid",
    "Job",
    "Result",
    "Row",
    "Settings",
    "Shape",
    "Target",
    "cuda_event_seconds",
    "format_seconds",
    "machine_info",
    "main",
    "make_step",
    "measure_bandwidth",
    "peer_device",
    "plan",
    "run",
    "spec_paths",
    "time_calls",
    "to_json",
    "torch_matmul",
    "torch_sdpa",
]
