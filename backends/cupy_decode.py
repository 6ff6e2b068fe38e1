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
2. Inside a block, groups of ``LPK`` lanes ("workers") each take a few keys
   at a time. A worker loads each key and value row once with vector loads,
   computes the score of every query row against it, applies the softcap and
   ALiBi, hides what positions, the window and empty slots hide, and folds
   the visible keys into its running state with the online softmax:

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
``scale`` and ``return_lse``; ``mask``, ``bias`` and ``sink_logits`` are not.
``tests/test_cupy_decode.py`` proves it against the spec with
:func:`refattn.testing.check_attention`, on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from refattn.checks import (
    check_devices,
    check_flags,
    check_per_head,
    check_positions,
    check_qkv,
    check_scalars,
)

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

_KERNELS = r"""
// CH vectors of VEC elements per lane cover a key or value row of up to
// CH * LPK * VEC elements; D and DV themselves are arguments.
#define CHV CH
#define GPW (32 / LPK)  // workers per warp
#define FULL 0xffffffffu

struct __align__(VEC_BYTES) Vec { T x[VEC]; };

__device__ __forceinline__ float to_acc(unsigned short h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ void store(unsigned short* p, float x) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x)); *p = h;
}
__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(double* p, double x) { *p = x; }
__device__ __forceinline__ float neg_inf(float) { return __int_as_float(0xff800000); }
__device__ __forceinline__ double neg_inf(double) {
    return __longlong_as_double(0xfff0000000000000ULL);
}
__device__ __forceinline__ float ex(float x) { return expf(x); }
__device__ __forceinline__ double ex(double x) { return exp(x); }
__device__ __forceinline__ float lg(float x) { return logf(x); }
__device__ __forceinline__ double lg(double x) { return log(x); }
__device__ __forceinline__ float th(float x) { return tanhf(x); }
__device__ __forceinline__ double th(double x) { return tanh(x); }
__device__ __forceinline__ float mx(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double mx(double a, double b) { return fmax(a, b); }

// One block: one range of keys [split * keys_per_split, ...) of KV head kvh of
// sequence b, for up to R of the G * Sq query rows that read that head.
extern "C" __global__ void __launch_bounds__(WARPS * 32)
refattn_decode_split(
    const T* __restrict__ q,            // (B, Hq, Sq, D), contiguous
    const T* __restrict__ k,            // (B, Hkv, S, D), last axis contiguous
    const T* __restrict__ v,            // (B, Hkv, S, DV), last axis contiguous
    const long long* __restrict__ q_pos,  // (B or 1, Sq), or null: S - Sq + i
    const long long* __restrict__ k_pos,  // (B or 1, S), or null: j
    const A* __restrict__ slopes,       // (B or 1, Hq), or null: no ALiBi
    A* __restrict__ part_out,           // (splits, B, Hq, Sq, DV)
    A* __restrict__ part_lse,           // (splits, B, Hq, Sq)
    int B, int Hq, int Hkv, int Sq, long long S, int D, int DV, long long keys_per_split,
    int row_groups,
    long long k_b, long long k_h, long long k_s,
    long long v_b, long long v_h, long long v_s,
    long long q_pos_b, long long k_pos_b, long long slopes_b,
    A scale, A softcap, int causal, long long window, long long sink_tokens)
{
    const int rg = blockIdx.x % row_groups;
    const int kvh = blockIdx.x / row_groups;
    const long long split = blockIdx.y;
    const int b = blockIdx.z;
    const int G = Hq / Hkv;
    const int n_rows = G * Sq;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int li = lane % LPK;       // lane within its worker
    const int n_workers = WARPS * GPW;
    const A NEG_INF = neg_inf(A(0));

    // The query rows: scaled once, held in registers, D split over the worker's lanes.
    A qr[R][CH * VEC];
    long long qp[R];
    A slope[R];
    bool live[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int row = rg * R + r;
        live[r] = row < n_rows;
        const int h = kvh * G + (live[r] ? row / Sq : 0);
        const int i = live[r] ? row % Sq : 0;
        qp[r] = q_pos ? q_pos[b * q_pos_b + i] : S - Sq + i;
        slope[r] = slopes ? slopes[b * slopes_b + h] : A(0);
        const T* qrow = q + (((long long)b * Hq + h) * Sq + i) * D;
#pragma unroll
        for (int c = 0; c < CH; ++c) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                const int d = c * LPK * VEC + li * VEC + e;
                qr[r][c * VEC + e] = (live[r] && d < D) ? to_acc(qrow[d]) * scale : A(0);
            }
        }
    }

    const long long start = split * keys_per_split;
    const long long end = min(start + keys_per_split, S);
    const T* kb = k + b * k_b + kvh * k_h;
    const T* vb = v + b * v_b + kvh * v_h;
    const long long* kpb = k_pos ? k_pos + b * k_pos_b : 0;

    A m[R], l[R], acc[R][CHV * VEC];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        m[r] = NEG_INF;
        l[r] = A(0);
#pragma unroll
        for (int x = 0; x < CHV * VEC; ++x) acc[r][x] = A(0);
    }

    // The trip count depends on the warp only: every lane reaches every shuffle.
    for (long long warp_base = start + (long long)warp * GPW * KT; warp_base < end;
         warp_base += (long long)n_workers * KT) {
        const long long base = warp_base + (long long)(lane / LPK) * KT;
        Vec kv[KT][CH], vv[KT][CHV];
        bool vis[KT][R];
        long long kp[KT];
#pragma unroll
        for (int t = 0; t < KT; ++t) {
            const long long j = base + t;
            kp[t] = j < end ? (kpb ? kpb[j] : j) : -1;
            bool any = false;
#pragma unroll
            for (int r = 0; r < R; ++r) {
                bool seen = live[r] && kp[t] >= 0;
                if (causal) seen = seen && kp[t] <= qp[r];
                if (window > 0) seen = seen && (qp[r] - kp[t] < window || kp[t] < sink_tokens);
                vis[t][r] = seen;
                any = any || seen;
            }
            // A key no row sees is not read: its vectors are zeros, never NaN.
#pragma unroll
            for (int c = 0; c < CH; ++c) {
                const int d = c * LPK * VEC + li * VEC;
                if (any && d < D) {
                    kv[t][c] = *reinterpret_cast<const Vec*>(kb + j * k_s + d);
                } else {
#pragma unroll
                    for (int e = 0; e < VEC; ++e) kv[t][c].x[e] = T(0);
                }
            }
#pragma unroll
            for (int c = 0; c < CHV; ++c) {
                const int d = c * LPK * VEC + li * VEC;
                if (any && d < DV) {
                    vv[t][c] = *reinterpret_cast<const Vec*>(vb + j * v_s + d);
                } else {
#pragma unroll
                    for (int e = 0; e < VEC; ++e) vv[t][c].x[e] = T(0);
                }
            }
        }

        // Scores: each lane's share of q.k, summed over the worker's lanes.
        A s[KT][R];
#pragma unroll
        for (int t = 0; t < KT; ++t) {
            A kf[CH * VEC];  // the key, widened once for every row
#pragma unroll
            for (int c = 0; c < CH; ++c) {
#pragma unroll
                for (int e = 0; e < VEC; ++e) kf[c * VEC + e] = to_acc(kv[t][c].x[e]);
            }
#pragma unroll
            for (int r = 0; r < R; ++r) {
                A dot = A(0);
#pragma unroll
                for (int x = 0; x < CH * VEC; ++x) dot += qr[r][x] * kf[x];
#pragma unroll
                for (int off = LPK / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(FULL, dot, off);
                if (softcap > A(0)) dot = softcap * th(dot / softcap);
                if (slopes) dot -= slope[r] * A(qp[r] >= kp[t] ? qp[r] - kp[t] : kp[t] - qp[r]);
                s[t][r] = vis[t][r] ? dot : NEG_INF;
            }
        }

        // The online softmax. Shifting by 0 while nothing is visible keeps
        // exp(-inf - shift) = 0 rather than NaN, so no row needs a branch.
        A p[KT][R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            A tile_max = NEG_INF;
#pragma unroll
            for (int t = 0; t < KT; ++t) tile_max = mx(tile_max, s[t][r]);
            const A m_new = mx(m[r], tile_max);
            const A shift = m_new == NEG_INF ? A(0) : m_new;
            const A alpha = ex(m[r] - shift);  // 0 while m is still -inf, else e^(m - m')
            A sum = A(0);
#pragma unroll
            for (int t = 0; t < KT; ++t) {
                p[t][r] = ex(s[t][r] - shift);  // 0 for a hidden key
                sum += p[t][r];
            }
            l[r] = l[r] * alpha + sum;
#pragma unroll
            for (int x = 0; x < CHV * VEC; ++x) acc[r][x] *= alpha;
            m[r] = m_new;
        }
#pragma unroll
        for (int t = 0; t < KT; ++t) {
            A vf[CHV * VEC];  // the value, widened once for every row
#pragma unroll
            for (int c = 0; c < CHV; ++c) {
#pragma unroll
                for (int e = 0; e < VEC; ++e) vf[c * VEC + e] = to_acc(vv[t][c].x[e]);
            }
#pragma unroll
            for (int r = 0; r < R; ++r) {
#pragma unroll
                for (int x = 0; x < CHV * VEC; ++x) {
#if ONE_QUERY
                    // Every row of the block sits at one position and sees the same
                    // keys, and a key none sees was never read: p v is exactly 0 there.
                    acc[r][x] += p[t][r] * vf[x];
#else
                    // A key another row sees may hold NaN: add nothing, not 0 * NaN.
                    acc[r][x] += vis[t][r] ? p[t][r] * vf[x] : A(0);
#endif
                }
            }
        }
    }

    // Merge the workers of a warp: lanes li of every worker exchange states.
#pragma unroll
    for (int off = LPK; off < 32; off <<= 1) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const A m_o = __shfl_xor_sync(FULL, m[r], off);
            const A l_o = __shfl_xor_sync(FULL, l[r], off);
            const A m_new = mx(m[r], m_o);
            const A a = m_new == NEG_INF ? A(0) : ex(m[r] - m_new);
            const A a_o = m_new == NEG_INF ? A(0) : ex(m_o - m_new);
            l[r] = l[r] * a + l_o * a_o;
#pragma unroll
            for (int x = 0; x < CHV * VEC; ++x) {
                const A acc_o = __shfl_xor_sync(FULL, acc[r][x], off);
                acc[r][x] = acc[r][x] * a + acc_o * a_o;
            }
            m[r] = m_new;
        }
    }

    // Merge the warps in shared memory: per warp and row, (m, l, acc[DV]).
    extern __shared__ unsigned char shared_raw[];
    A* shared = reinterpret_cast<A*>(shared_raw);
    if (lane < LPK) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            A* slot = shared + (warp * R + r) * (DV + 2);
            if (li == 0) {
                slot[0] = m[r];
                slot[1] = l[r];
            }
#pragma unroll
            for (int c = 0; c < CHV; ++c) {
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    const int d = c * LPK * VEC + li * VEC + e;
                    if (d < DV) slot[2 + d] = acc[r][c * VEC + e];
                }
            }
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < R * DV; idx += WARPS * 32) {
        const int r = idx / DV;
        const int d = idx % DV;
        const int row = rg * R + r;
        if (row >= n_rows) continue;
        A m_all = NEG_INF;
        for (int w = 0; w < WARPS; ++w) m_all = mx(m_all, shared[(w * R + r) * (DV + 2)]);
        A l_all = A(0), o_all = A(0);
        if (m_all != NEG_INF) {
            for (int w = 0; w < WARPS; ++w) {
                const A* slot = shared + (w * R + r) * (DV + 2);
                const A a = ex(slot[0] - m_all);
                l_all += slot[1] * a;
                o_all += slot[2 + d] * a;
            }
        }
        const int h = kvh * G + row / Sq;
        const int i = row % Sq;
        const long long o = ((split * B + b) * Hq + h) * Sq + i;
        const bool empty = m_all == NEG_INF;
        part_out[o * DV + d] = empty ? A(0) : o_all / l_all;
        if (d == 0) part_lse[o] = empty ? NEG_INF : m_all + lg(l_all);
    }
}

// One block per query row: merge the splits' partial states, as merge_states_n does.
extern "C" __global__ void refattn_decode_merge(
    const A* __restrict__ part_out,  // (splits, rows, DV)
    const A* __restrict__ part_lse,  // (splits, rows)
    T* __restrict__ out,             // (rows, DV), the caller's dtype
    A* __restrict__ lse,             // (rows,)
    int splits, long long rows, int DV)
{
    const long long row = blockIdx.x;
    const A NEG_INF = neg_inf(A(0));
    A m = NEG_INF;
    for (int p = 0; p < splits; ++p) m = mx(m, part_lse[p * rows + row]);
    const bool empty = m == NEG_INF;
    for (int d = threadIdx.x; d < DV; d += blockDim.x) {
        A total = A(0), acc = A(0);
        for (int p = 0; p < splits; ++p) {
            const A s = part_lse[p * rows + row];
            if (s == NEG_INF) continue;  // a part that saw no key adds nothing
            const A w = ex(s - m);
            total += w;
            acc += w * part_out[(p * rows + row) * DV + d];
        }
        store(out + row * DV + d, empty ? A(0) : acc / total);
        if (d == 0) lse[row] = empty ? NEG_INF : m + lg(total);
    }
}
"""


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
        return "float64" if self.dtype == "float64" else "float32"

    def source(self) -> str:
        """The CUDA source of both kernels for this configuration."""
        types = {"T": _STORAGE[self.dtype], "A": "double" if self.dtype == "float64" else "float"}
        defines = {
            "VEC": self.vec,
            "VEC_BYTES": self.vec * _ITEMSIZE[self.dtype],
            "LPK": self.lpk,
            "CH": self.chunks,
            "R": self.rows,
            "KT": self.keys,
            "WARPS": self.warps,
            "ONE_QUERY": int(self.one_query),
        }
        head = "".join(f"typedef {c_type} {name};\n" for name, c_type in types.items())
        head += "".join(f"#define {name} {value}\n" for name, value in defines.items())
        return head + _KERNELS

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
def _kernels(config: Config) -> tuple[Any, Any]:
    import cupy

    module = cupy.RawModule(code=config.source(), options=("--std=c++14",))
    return module.get_function("refattn_decode_split"), module.get_function("refattn_decode_merge")


@cache
def _multiprocessors(device_id: int) -> int:
    import cupy

    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


def decode_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    q_pos: Any | None = None,
    k_pos: Any | None = None,
    scale: float | None = None,
    window: int | None = None,
    sink_tokens: int = 0,
    softcap: float | None = None,
    alibi_slopes: Any | None = None,
    return_lse: bool = False,
    num_splits: int | None = None,
) -> Any:
    """:func:`refattn.attention` for CuPy arrays, in one pass over K and V.

    The arguments mean what they mean for :func:`refattn.attention` (which
    see), for the subset listed in the module docstring; ``num_splits`` picks
    how many key ranges are computed in parallel and merged (default:
    :func:`choose_splits`). k and v are read in place: any strides, as long as
    the head dimension is contiguous, so a view of a cache's buffer costs no
    copy.

    Returns ``out`` (B, Hq, Sq, Dv) in q's dtype, and ``lse`` (B, Hq, Sq) in
    the compute dtype if ``return_lse``.
    """
    try:
        import array_api_compat.cupy as xp
        import cupy
    except ImportError as error:
        raise TypeError(f"q must be a CuPy array, and CuPy is not installed ({error})") from None

    arrays = {"q": q, "k": k, "v": v, "q_pos": q_pos, "k_pos": k_pos, "alibi_slopes": alibi_slopes}
    for name, x in arrays.items():
        if x is not None and not isinstance(x, cupy.ndarray):
            raise TypeError(f"{name} must be a CuPy array; got {type(x).__name__}")
    # refattn.attention's own checks, so that a bad argument reads the same here
    check_qkv(xp, q, k, v)
    check_devices(**arrays)
    check_flags(causal=causal, return_lse=return_lse)
    check_scalars(scale, window, softcap, sink_tokens)
    B, Hq, Sq, D = q.shape
    _, Hkv, S, _ = k.shape
    Dv = v.shape[3]
    if alibi_slopes is not None:
        check_per_head(xp, "alibi_slopes", alibi_slopes, ((Hq,), (B, Hq)))
    for name, pos, length in (("q_pos", q_pos, Sq), ("k_pos", k_pos, S)):
        if pos is not None:
            check_positions(xp, name, pos, B, length)
    # what only the kernel asks
    dtype = q.dtype.name
    if dtype not in _STORAGE:
        raise TypeError(f"q has dtype {q.dtype}; the fused kernel takes {tuple(_STORAGE)}")
    if Dv == 0:
        raise ValueError(f"v has head dim 0; expected >= 1 (shape {tuple(v.shape)})")
    for name, x in (("k", k), ("v", v)):
        if x.size and x.shape[3] > 1 and x.strides[3] != x.itemsize:
            raise ValueError(
                f"{name} must be contiguous along its last axis; got strides {x.strides}"
            )
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be at least 1; got {num_splits}")

    device_id = q.device.id
    compute = "float64" if dtype == "float64" else "float32"
    q_rows = cupy.ascontiguousarray(q)
    q_pos_rows, q_pos_b = _rows(q_pos, cupy.int64)
    k_pos_rows, k_pos_b = _rows(k_pos, cupy.int64)
    slopes, slopes_b = _rows(alibi_slopes, compute)

    strides = [s // k.itemsize for s in (*k.strides[:3], *v.strides[:3])]
    aligned_to = math.gcd(k.data.ptr // k.itemsize, v.data.ptr // v.itemsize, *strides, 16)
    config = choose_config(dtype, D, Dv, Hq // Hkv * Sq, aligned_to=aligned_to or 16, q_len=Sq)
    row_groups = -(-(Hq // Hkv * Sq) // config.rows)
    if num_splits is None:
        num_splits = choose_splits(B, Hkv, row_groups, S,
                                   multiprocessors=_multiprocessors(device_id))  # fmt: skip
    keys_per_split = max(1, -(-S // min(num_splits, _MAX_SPLITS)))
    num_splits = max(1, -(-S // keys_per_split))  # no range left empty by rounding

    split_kernel, merge_kernel = _kernels(config)
    part_out = cupy.empty((num_splits, B, Hq, Sq, Dv), dtype=compute)
    part_lse = cupy.empty((num_splits, B, Hq, Sq), dtype=compute)
    out = cupy.empty((B, Hq, Sq, Dv), dtype=dtype)
    lse = cupy.empty((B, Hq, Sq), dtype=compute)
    real = cupy.float64 if compute == "float64" else cupy.float32
    if B * Hq * Sq:
        split_kernel(
            (Hkv * row_groups, num_splits, B), (config.warps * 32,),
            (q_rows, k, v, q_pos_rows, k_pos_rows, slopes, part_out, part_lse,
             cupy.int32(B), cupy.int32(Hq), cupy.int32(Hkv), cupy.int32(Sq), cupy.int64(S),
             cupy.int32(D), cupy.int32(Dv), cupy.int64(keys_per_split), cupy.int32(row_groups),
             *(cupy.int64(s) for s in strides),
             cupy.int64(q_pos_b), cupy.int64(k_pos_b), cupy.int64(slopes_b),
             real(1.0 / math.sqrt(D) if scale is None else scale), real(softcap or 0.0),
             cupy.int32(bool(causal)), cupy.int64(window or 0), cupy.int64(sink_tokens)),
            shared_mem=config.shared_bytes(Dv),
        )  # fmt: skip
        merge_kernel(
            (B * Hq * Sq,),
            (min(128, 32 * -(-Dv // 32)) or 32,),
            (
                part_out,
                part_lse,
                out,
                lse,
                cupy.int32(num_splits),
                cupy.int64(B * Hq * Sq),
                cupy.int32(Dv),
            ),
        )
    return (out, lse) if return_lse else out


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
    compute = "float64" if dtype == "float64" else "float32"
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
