r"""A fused split-KV decode kernel for CuPy: attention that reads K and V once.

:func:`refattn.attention` is the definition; on a GPU its matmul, softmax and
matmul run as separate kernels, each a full pass over its input, and a
float16 cache is widened to float32 whole before the first product. This
module computes the same thing for the decode case (a few queries per head
over a long cache) in one pass over the cache, the way flash-decoding does:

1. The keys are cut into ``num_splits`` contiguous ranges. One CUDA block
   takes one range of one KV head of one sequence, together with every query
   row that reads that KV head (the G = Hq / Hkv heads of the group, times
   Sq), so grouped-query attention reads each key once for the whole group
   and never repeats heads.
2. Inside a block, groups of ``LANES_PER_KEY`` lanes ("workers") each take a
   few keys at a time. A worker loads each key and value row once with vector
   loads, computes the score of every query row against it, applies the
   softcap and ALiBi, hides what positions, the window and empty slots hide
   (a sink token stays visible through the window), and folds the visible
   keys into its running state with the online softmax:

   .. math::

       m' = \max(m, \max_t s_t), \quad
       \ell' = e^{m - m'} \ell + \textstyle\sum_t e^{s_t - m'}, \quad
       a' = e^{m - m'} a + \textstyle\sum_t e^{s_t - m'} v_t

   Keys no query row sees are never read, and a hidden key adds exactly
   nothing (not ``0 * v``, so a NaN in an empty slot cannot leak).
3. The workers' states are merged (within a warp by shuffles, across warps
   in shared memory) into the range's partial state ``(o, lse)``, with
   :math:`o = a / \ell` and :math:`\text{lse} = m + \log \ell`.
4. A second kernel merges the ranges' partial states exactly as
   :func:`refattn.merge_states_n` does: subtract the largest lse, weight each
   part by :math:`e^{\text{lse}_p - m}`, drop parts that saw no key, and give
   ``o = 0``, ``lse = -inf`` to a row that saw none at all.

float16 caches are read as float16 and computed in float32 (refattn's
compute dtype); float32 and float64 in their own dtype. CuPy has no
bfloat16. Supported: causal, positions (``q_pos``, ``k_pos``, negative for an
empty slot), ``window`` with ``sink_tokens``, ``softcap``, ``alibi_slopes``,
``scale`` and ``return_lse``; ``mask``, ``bias``, ``sink_logits`` and a
window's right reach (``window_right``) are not.
``tests/test_cupy_decode.py`` proves it against the spec with
:func:`refattn.testing.check_attention`, on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import numpy as np

from refattn.checks import ARRAY_OPTIONS, check_call
from refattn.namespace import compute_dtype_name
from refattn.options import AttentionOptions, check_integer, takes_options

#: Warps per block, and keys each worker loads per step (half that in float64):
#: module settings, so that a sweep can try others (benchmarks/cupy_decode_sweep.py).
#: Two keys per step measured fastest on an H200 (benchmarks/README.md): four
#: hold more registers and leave fewer warps to hide the loads' latency.
WARPS = 4
KEYS_PER_STEP = 2
#: Most query rows one block takes (its registers grow with them).
MAX_ROWS = 8
#: Fewest keys a split is given when the heuristic picks ``num_splits``.
MIN_KEYS_PER_SPLIT = 256
#: Blocks per streaming multiprocessor the heuristic aims at.
BLOCKS_PER_SM = 8
#: 32-bit registers per lane the query rows and accumulators may take.
ROW_REGISTERS = 64

_MAX_SPLITS = 65535  # CUDA's limit on a grid's second dimension
_NULL = np.uint64(0)  # a null pointer argument

_STORAGE = {"float16": "unsigned short", "float32": "float", "float64": "double"}
_ITEMSIZE = {"float16": 2, "float32": 4, "float64": 8}

#: The CUDA source of both kernels, a file beside this one (read once, when first compiled).
SOURCE_FILE = "split_kv_decode.cu"


@dataclass(frozen=True)
class Config:
    """What one compiled kernel is specialised for; the sizes themselves are arguments.

    ``vec`` elements are loaded at a time (16 bytes, or one element when the
    head dims or the strides do not allow it), ``lpk`` lanes share one key (a
    power of two, at most 32), each holding ``chunks`` vectors of a row;
    ``rows`` query rows share a block and ``keys`` keys are loaded per worker
    per step, by ``warps`` warps. ``one_query`` (Sq = 1) means every row of a
    block sits at one position and sees the same keys. Few configurations
    exist, so few kernels are compiled.
    """

    dtype: str
    vec: int
    lpk: int
    chunks: int
    rows: int
    keys: int
    warps: int = WARPS
    one_query: bool = True

    @property
    def compute_dtype(self) -> str:
        return compute_dtype_name(self.dtype)

    def source(self) -> str:
        """The CUDA source of both kernels for this configuration."""
        types = {
            "storage_t": _STORAGE[self.dtype],
            "accum_t": "double" if self.dtype == "float64" else "float",
        }
        defines = {
            "VECTOR_ELEMENTS": self.vec,
            "VECTOR_BYTES": self.vec * _ITEMSIZE[self.dtype],
            "LANES_PER_KEY": self.lpk,
            "VECTORS_PER_LANE": self.chunks,
            "ROWS_PER_BLOCK": self.rows,
            "KEYS_PER_STEP": self.keys,
            "WARPS": self.warps,
            "ONE_QUERY": int(self.one_query),
        }
        head = "".join(f"typedef {c_type} {name};\n" for name, c_type in types.items())
        head += "".join(f"#define {name} {value}\n" for name, value in defines.items())
        return head + kernel_source()

    def shared_bytes(self, value_dim: int) -> int:
        """Shared memory of the split kernel: per warp and row, (m, l, acc[Dv])."""
        return self.warps * self.rows * (value_dim + 2) * _ITEMSIZE[self.compute_dtype]


def choose_config(
    dtype: str, head_dim: int, value_dim: int, n_rows: int, *, aligned_to: int, q_len: int = 1
) -> Config:
    """The kernel configuration for a problem.

    ``aligned_to`` is the largest number of elements that the data pointers
    and the strides of k and v are all multiples of; vector loads never
    cross it.

    Examples
    --------
    float16, D = 128, four query heads per KV head: 8-element (16-byte) loads,
    16 lanes per key, one load each, the four rows in one block.

    >>> choose_config("float16", 128, 128, 4, aligned_to=8)
    Config(dtype='float16', vec=8, lpk=16, chunks=1, rows=4, keys=2, warps=4, one_query=True)
    >>> choose_config("float32", 80, 80, 1, aligned_to=16).vec
    4
    >>> choose_config("float32", 3, 3, 1, aligned_to=16).vec  # one element at a time
    1
    """
    if dtype not in _STORAGE:
        raise ValueError(f"dtype must be one of {tuple(_STORAGE)}; got {dtype!r}")
    vec = 16 // _ITEMSIZE[dtype]
    if head_dim % vec or value_dim % vec or aligned_to % vec:
        vec = 1
    need = -(-max(head_dim, value_dim) // vec)  # lanes that would cover a row in one load
    lpk = min(32, 1 << (need - 1).bit_length())
    chunks = 1 << (-(-need // lpk) - 1).bit_length()  # a power of two: fewer kernels
    registers_per_row = 2 * chunks * vec * (2 if dtype == "float64" else 1)  # q and acc
    rows = 1
    while rows < min(n_rows, MAX_ROWS) and 2 * rows * registers_per_row <= ROW_REGISTERS:
        rows *= 2
    keys = max(1, KEYS_PER_STEP // 2) if dtype == "float64" else KEYS_PER_STEP
    return Config(dtype, vec, lpk, chunks, rows, keys, WARPS, q_len == 1)


def choose_splits(
    batch: int, kv_heads: int, row_groups: int, n_keys: int, *, multiprocessors: int
) -> int:
    """How many key ranges to cut the cache into: enough blocks to fill the GPU,
    and no range shorter than :data:`MIN_KEYS_PER_SPLIT` keys.

    >>> choose_splits(1, 8, 1, 8192, multiprocessors=132)   # one sequence: split
    32
    >>> choose_splits(8, 32, 1, 32768, multiprocessors=132)  # many heads: hardly
    5
    >>> choose_splits(1, 8, 1, 100, multiprocessors=132)
    1
    """
    blocks = batch * kv_heads * row_groups
    wanted = -(-BLOCKS_PER_SM * multiprocessors // blocks)
    most = max(1, -(-n_keys // MIN_KEYS_PER_SPLIT))
    return max(1, min(wanted, most))


@cache
def kernel_source() -> str:
    """The contents of :data:`SOURCE_FILE`, installed beside this module as package data."""
    return (resources.files(__package__) / SOURCE_FILE).read_text(encoding="utf-8")


@cache
def _kernels(config: Config) -> tuple[Any, Any]:
    import cupy

    module = cupy.RawModule(code=config.source(), options=("--std=c++14",))
    return module.get_function("refattn_decode_split"), module.get_function("refattn_decode_merge")


@cache
def _multiprocessors(device_id: int) -> int:
    import cupy

    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


@takes_options
def decode_attention(q: Any, k: Any, v: Any, *, num_splits: int | None = None,
                     **options: Any) -> Any:  # fmt: skip
    """:func:`refattn.attention` for CuPy arrays, in one pass over K and V.

    The options are :func:`refattn.attention`'s (the one record,
    :class:`refattn.options.AttentionOptions`, checked by the same checks), for
    the subset listed in the module docstring: ``mask``, ``bias``,
    ``sink_logits`` and ``window_right`` are refused. ``num_splits`` picks how
    many key ranges are computed in parallel and merged (default: :func:`choose_splits`). k and v
    are read in place: any strides, as long as the head dimension is
    contiguous, so a view of a cache's buffer costs no copy.

    Returns ``out`` (B, Hq, Sq, Dv) in q's dtype, and ``lse`` (B, Hq, Sq) in
    the compute dtype if ``return_lse``.
    """
    call = AttentionOptions.of("decode_attention", options)
    _check_kernel_inputs(q, k, v, call, num_splits)
    import cupy

    B, Hq, Sq, D = q.shape
    _, Hkv, S, _ = k.shape
    Dv = v.shape[3]
    dtype = q.dtype.name
    compute = compute_dtype_name(dtype)
    strides = [s // k.itemsize for s in (*k.strides[:3], *v.strides[:3])]
    aligned_to = math.gcd(k.data.ptr // k.itemsize, v.data.ptr // v.itemsize, *strides, 16)
    config = choose_config(dtype, D, Dv, Hq // Hkv * Sq, aligned_to=aligned_to or 16, q_len=Sq)
    row_groups = -(-(Hq // Hkv * Sq) // config.rows)
    if num_splits is None:
        num_splits = choose_splits(B, Hkv, row_groups, S,
                                   multiprocessors=_multiprocessors(q.device.id))  # fmt: skip
    keys_per_split = max(1, -(-S // min(num_splits, _MAX_SPLITS)))
    num_splits = max(1, -(-S // keys_per_split))  # no range left empty by rounding
    part_out = cupy.empty((num_splits, B, Hq, Sq, Dv), dtype=compute)
    part_lse = cupy.empty((num_splits, B, Hq, Sq), dtype=compute)
    out = cupy.empty((B, Hq, Sq, Dv), dtype=dtype)
    lse = cupy.empty((B, Hq, Sq), dtype=compute)
    if B * Hq * Sq:
        split_kernel, merge_kernel = _kernels(config)
        q_pos_rows, q_pos_b = _rows(call.q_pos, cupy.int64)
        k_pos_rows, k_pos_b = _rows(call.k_pos, cupy.int64)
        slopes, slopes_b = _rows(call.alibi_slopes, compute)
        real = cupy.float64 if compute == "float64" else cupy.float32
        split_kernel(
            (Hkv * row_groups, num_splits, B), (config.warps * 32,),
            (cupy.ascontiguousarray(q), k, v, q_pos_rows, k_pos_rows, slopes, part_out, part_lse,
             cupy.int32(B), cupy.int32(Hq), cupy.int32(Hkv), cupy.int32(Sq), cupy.int64(S),
             cupy.int32(D), cupy.int32(Dv), cupy.int64(keys_per_split), cupy.int32(row_groups),
             *(cupy.int64(s) for s in strides),
             cupy.int64(q_pos_b), cupy.int64(k_pos_b), cupy.int64(slopes_b),
             real(1.0 / math.sqrt(D) if call.scale is None else call.scale),
             real(call.softcap or 0.0), cupy.int32(call.causal), cupy.int64(call.window or 0),
             cupy.int64(call.sink_tokens)),
            shared_mem=config.shared_bytes(Dv),
        )  # fmt: skip
        merge_kernel(
            (B * Hq * Sq,), (min(128, 32 * -(-Dv // 32)) or 32,),
            (part_out, part_lse, out, lse, cupy.int32(num_splits), cupy.int64(B * Hq * Sq),
             cupy.int32(Dv)),
        )  # fmt: skip
    return (out, lse) if call.return_lse else out


#: The options of :func:`refattn.attention` the fused kernel does not compute.
NOT_FUSED = ("mask", "bias", "sink_logits", "window_right")


def _check_kernel_inputs(
    q: Any, k: Any, v: Any, options: AttentionOptions, num_splits: int | None
) -> None:
    """refattn.attention's own checks, so that a bad argument reads the same here; then
    what only the kernel asks."""
    unfused = [name for name in NOT_FUSED if getattr(options, name) is not None]
    if unfused:
        raise TypeError(f"decode_attention does not take {unfused}; refattn.attention does")
    try:
        import array_api_compat.cupy as xp
        import cupy
    except ImportError as error:
        raise TypeError(f"q must be a CuPy array, and CuPy is not installed ({error})") from None
    arrays = {"q": q, "k": k, "v": v, **{n: getattr(options, n) for n in ARRAY_OPTIONS}}
    for name, x in arrays.items():
        if x is not None and not isinstance(x, cupy.ndarray):
            raise TypeError(f"{name} must be a CuPy array; got {type(x).__name__}")
    check_call(xp, q, k, v, options)
    if q.dtype.name not in _STORAGE:
        raise TypeError(f"q has dtype {q.dtype}; the fused kernel takes {tuple(_STORAGE)}")
    if v.shape[3] == 0:
        raise ValueError(f"v has head dim 0; expected >= 1 (shape {tuple(v.shape)})")
    for name, x in (("k", k), ("v", v)):
        if x.size and x.shape[3] > 1 and x.strides[3] != x.itemsize:
            raise ValueError(
                f"{name} must be contiguous along its last axis; got strides {x.strides}"
            )
    if num_splits is not None:
        check_integer("num_splits", num_splits, minimum=1)


def merge_splits(part_out: Any, part_lse: Any, dtype: str) -> tuple[Any, Any]:
    """The merge kernel on its own: ``(splits, ..., Dv)`` partial outputs and
    ``(splits, ...)`` lses in the compute dtype to ``(out, lse)``, out in ``dtype``.

    It is what :func:`decode_attention` runs after the split kernel, exposed so
    that tests can hold it against :func:`refattn.merge_states_n`.
    """
    import cupy

    splits, *rest, Dv = part_out.shape
    if tuple(part_lse.shape) != (splits, *rest):
        raise ValueError(
            f"part_lse must be part_out's shape less Dv; got {part_lse.shape} and {part_out.shape}"
        )
    compute = compute_dtype_name(dtype)
    config = choose_config(dtype, 1, 1, 1, aligned_to=1)
    _, merge_kernel = _kernels(config)
    rows = math.prod(rest)
    out = cupy.empty((*rest, Dv), dtype=dtype)
    lse = cupy.empty(tuple(rest), dtype=compute)
    if rows:
        merge_kernel(
            (rows,), (min(128, 32 * -(-Dv // 32)) or 32,),
            (cupy.ascontiguousarray(part_out, dtype=compute),
             cupy.ascontiguousarray(part_lse, dtype=compute), out, lse, cupy.int32(splits),
             cupy.int64(rows), cupy.int32(Dv)),
        )  # fmt: skip
    return out, lse


def _rows(x: Any | None, dtype: Any) -> tuple[Any, int]:
    """A checked (S,), (1, S) or (B, S) argument as a contiguous array of ``dtype``, and
    the stride between its rows (0 when every row reads the same); a null pointer for None.
    """
    import cupy

    if x is None:
        return _NULL, 0
    rows = cupy.ascontiguousarray(x.astype(dtype, copy=False))
    return rows, (rows.shape[-1] if rows.ndim == 2 and rows.shape[0] > 1 else 0)
