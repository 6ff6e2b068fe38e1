// The fused split-KV decode kernels of refattn.backends.cupy_kernels.decode.
//
// Config.source() puts a header before this file that names what one compiled
// kernel is specialised for:
//   storage_t, accum_t   the dtype of q, k, v and out; the dtype computed in
//   VECTOR_ELEMENTS      elements loaded at a time (VECTOR_BYTES bytes)
//   LANES_PER_KEY        lanes of a warp that share one key: a "worker"
//   VECTORS_PER_LANE     vectors each lane holds of a key or value row, so a row
//                        of up to VECTORS_PER_LANE * LANES_PER_KEY * VECTOR_ELEMENTS
//                        elements is covered (D and DV themselves are arguments)
//   ROWS_PER_BLOCK       query rows (heads of a group, times Sq) one block takes
//   KEYS_PER_STEP        keys a worker loads per step
//   WARPS                warps per block
//   ONE_QUERY            1 when Sq = 1: every row of a block sees the same keys
#define WORKERS_PER_WARP (32 / LANES_PER_KEY)
// A lane holds elements d = c * VECTOR_STRIDE + lane_in_worker * VECTOR_ELEMENTS + e of a
// row (vector c < VECTORS_PER_LANE, element e < VECTOR_ELEMENTS): for each c the lanes of a
// worker read neighbouring vectors, so their loads coalesce.
#define VECTOR_STRIDE (LANES_PER_KEY * VECTOR_ELEMENTS)
#define ELEMENTS_PER_LANE (VECTORS_PER_LANE * VECTOR_ELEMENTS)
#define FULL_WARP_MASK 0xffffffffu

struct __align__(VECTOR_BYTES) Vector { storage_t x[VECTOR_ELEMENTS]; };

__device__ __forceinline__ float widen(unsigned short h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }
__device__ __forceinline__ void store_as(unsigned short* p, float x) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x)); *p = h;
}
__device__ __forceinline__ void store_as(float* p, float x) { *p = x; }
__device__ __forceinline__ void store_as(double* p, double x) { *p = x; }
__device__ __forceinline__ float negative_infinity(float) { return __int_as_float(0xff800000); }
__device__ __forceinline__ double negative_infinity(double) {
    return __longlong_as_double(0xfff0000000000000ULL);
}
__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }
__device__ __forceinline__ float log_of(float x) { return logf(x); }
__device__ __forceinline__ double log_of(double x) { return log(x); }
__device__ __forceinline__ float tanh_of(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_of(double x) { return tanh(x); }
__device__ __forceinline__ float max_of(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_of(double a, double b) { return fmax(a, b); }

// One block: one range of keys [split * keys_per_split, ...) of KV head kv_head of
// sequence b, for up to ROWS_PER_BLOCK of the G * Sq query rows that read that head.
extern "C" __global__ void __launch_bounds__(WARPS * 32)
refattn_decode_split(
    const storage_t* __restrict__ q,      // (B, Hq, Sq, D), contiguous
    const storage_t* __restrict__ k,      // (B, Hkv, S, D), last axis contiguous
    const storage_t* __restrict__ v,      // (B, Hkv, S, DV), last axis contiguous
    const long long* __restrict__ q_pos,  // (B or 1, Sq), or null: S - Sq + i
    const long long* __restrict__ k_pos,  // (B or 1, S), or null: j
    const accum_t* __restrict__ slopes,   // (B or 1, Hq), or null: no ALiBi
    accum_t* __restrict__ part_out,       // (splits, B, Hq, Sq, DV)
    accum_t* __restrict__ part_lse,       // (splits, B, Hq, Sq)
    int B, int Hq, int Hkv, int Sq, long long S, int D, int DV, long long keys_per_split,
    int row_groups,
    long long k_b, long long k_h, long long k_s,
    long long v_b, long long v_h, long long v_s,
    long long q_pos_b, long long k_pos_b, long long slopes_b,
    accum_t scale, accum_t softcap, int causal, long long window, long long sink_tokens)
{
    const int row_group = blockIdx.x % row_groups;
    const int kv_head = blockIdx.x / row_groups;
    const long long split = blockIdx.y;
    const int b = blockIdx.z;
    const int G = Hq / Hkv;
    const int n_rows = G * Sq;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int lane_in_worker = lane % LANES_PER_KEY;
    const int n_workers = WARPS * WORKERS_PER_WARP;
    const accum_t NEGATIVE_INFINITY = negative_infinity(accum_t(0));

    // The query rows: scaled once, held in registers, D split over the worker's lanes.
    accum_t q_scaled[ROWS_PER_BLOCK][ELEMENTS_PER_LANE];
    long long q_position[ROWS_PER_BLOCK];
    accum_t slope[ROWS_PER_BLOCK];
    bool live[ROWS_PER_BLOCK];
#pragma unroll
    for (int r = 0; r < ROWS_PER_BLOCK; ++r) {
        const int row = row_group * ROWS_PER_BLOCK + r;
        live[r] = row < n_rows;
        const int h = kv_head * G + (live[r] ? row / Sq : 0);
        const int i = live[r] ? row % Sq : 0;
        q_position[r] = q_pos ? q_pos[b * q_pos_b + i] : S - Sq + i;
        slope[r] = slopes ? slopes[b * slopes_b + h] : accum_t(0);
        const storage_t* qrow = q + (((long long)b * Hq + h) * Sq + i) * D;
#pragma unroll
        for (int c = 0; c < VECTORS_PER_LANE; ++c) {
#pragma unroll
            for (int e = 0; e < VECTOR_ELEMENTS; ++e) {
                const int d = c * VECTOR_STRIDE + lane_in_worker * VECTOR_ELEMENTS + e;
                q_scaled[r][c * VECTOR_ELEMENTS + e] =
                    (live[r] && d < D) ? widen(qrow[d]) * scale : accum_t(0);
            }
        }
    }

    const long long start = split * keys_per_split;
    const long long end = min(start + keys_per_split, S);
    const storage_t* k_of_head = k + b * k_b + kv_head * k_h;
    const storage_t* v_of_head = v + b * v_b + kv_head * v_h;
    const long long* k_pos_of_row = k_pos ? k_pos + b * k_pos_b : 0;

    accum_t m[ROWS_PER_BLOCK], denominator[ROWS_PER_BLOCK], acc[ROWS_PER_BLOCK][ELEMENTS_PER_LANE];
#pragma unroll
    for (int r = 0; r < ROWS_PER_BLOCK; ++r) {
        m[r] = NEGATIVE_INFINITY;
        denominator[r] = accum_t(0);
#pragma unroll
        for (int x = 0; x < ELEMENTS_PER_LANE; ++x) acc[r][x] = accum_t(0);
    }

    // The trip count depends on the warp only: every lane reaches every shuffle.
    for (long long warp_base = start + (long long)warp * WORKERS_PER_WARP * KEYS_PER_STEP;
         warp_base < end; warp_base += (long long)n_workers * KEYS_PER_STEP) {
        const long long base = warp_base + (long long)(lane / LANES_PER_KEY) * KEYS_PER_STEP;
        Vector key_vectors[KEYS_PER_STEP][VECTORS_PER_LANE];
        Vector value_vectors[KEYS_PER_STEP][VECTORS_PER_LANE];
        bool visible[KEYS_PER_STEP][ROWS_PER_BLOCK];
        long long k_position[KEYS_PER_STEP];
#pragma unroll
        for (int t = 0; t < KEYS_PER_STEP; ++t) {
            const long long j = base + t;
            k_position[t] = j < end ? (k_pos_of_row ? k_pos_of_row[j] : j) : -1;
            bool any = false;
#pragma unroll
            for (int r = 0; r < ROWS_PER_BLOCK; ++r) {
                bool seen = live[r] && k_position[t] >= 0;
                if (causal) seen = seen && k_position[t] <= q_position[r];
                if (window > 0) {  // the last window positions, and the sink tokens
                    seen = seen && (q_position[r] - k_position[t] < window
                                    || k_position[t] < sink_tokens);
                }
                visible[t][r] = seen;
                any = any || seen;
            }
            // A key no row sees is not read: its vectors are zeros, never NaN.
#pragma unroll
            for (int c = 0; c < VECTORS_PER_LANE; ++c) {
                const int d = c * VECTOR_STRIDE + lane_in_worker * VECTOR_ELEMENTS;
                if (any && d < D) {
                    key_vectors[t][c] = *reinterpret_cast<const Vector*>(k_of_head + j * k_s + d);
                } else {
#pragma unroll
                    for (int e = 0; e < VECTOR_ELEMENTS; ++e) key_vectors[t][c].x[e] = storage_t(0);
                }
            }
#pragma unroll
            for (int c = 0; c < VECTORS_PER_LANE; ++c) {
                const int d = c * VECTOR_STRIDE + lane_in_worker * VECTOR_ELEMENTS;
                if (any && d < DV) {
                    value_vectors[t][c] = *reinterpret_cast<const Vector*>(v_of_head + j * v_s + d);
                } else {
#pragma unroll
                    for (int e = 0; e < VECTOR_ELEMENTS; ++e) {
                        value_vectors[t][c].x[e] = storage_t(0);
                    }
                }
            }
        }

        // Scores: each lane's share of q.k, summed over the worker's lanes.
        accum_t s[KEYS_PER_STEP][ROWS_PER_BLOCK];
#pragma unroll
        for (int t = 0; t < KEYS_PER_STEP; ++t) {
            accum_t key_wide[ELEMENTS_PER_LANE];  // the key, widened once for every row
#pragma unroll
            for (int c = 0; c < VECTORS_PER_LANE; ++c) {
#pragma unroll
                for (int e = 0; e < VECTOR_ELEMENTS; ++e) {
                    key_wide[c * VECTOR_ELEMENTS + e] = widen(key_vectors[t][c].x[e]);
                }
            }
#pragma unroll
            for (int r = 0; r < ROWS_PER_BLOCK; ++r) {
                accum_t dot = accum_t(0);
#pragma unroll
                for (int x = 0; x < ELEMENTS_PER_LANE; ++x) dot += q_scaled[r][x] * key_wide[x];
#pragma unroll
                for (int off = LANES_PER_KEY / 2; off > 0; off >>= 1) {
                    dot += __shfl_xor_sync(FULL_WARP_MASK, dot, off);
                }
                if (softcap > accum_t(0)) dot = softcap * tanh_of(dot / softcap);
                if (slopes) {  // ALiBi: minus slope times |q_pos - k_pos|
                    dot -= slope[r] * accum_t(q_position[r] >= k_position[t]
                                                  ? q_position[r] - k_position[t]
                                                  : k_position[t] - q_position[r]);
                }
                s[t][r] = visible[t][r] ? dot : NEGATIVE_INFINITY;
            }
        }

        // The online softmax. Shifting by 0 while nothing is visible keeps
        // exp(-inf - shift) = 0 rather than NaN, so no row needs a branch.
        accum_t p[KEYS_PER_STEP][ROWS_PER_BLOCK];
#pragma unroll
        for (int r = 0; r < ROWS_PER_BLOCK; ++r) {
            accum_t tile_max = NEGATIVE_INFINITY;
#pragma unroll
            for (int t = 0; t < KEYS_PER_STEP; ++t) tile_max = max_of(tile_max, s[t][r]);
            const accum_t m_new = max_of(m[r], tile_max);
            const accum_t shift = m_new == NEGATIVE_INFINITY ? accum_t(0) : m_new;
            const accum_t alpha = exp_of(m[r] - shift);  // 0 while m is still -inf, else e^(m - m')
            accum_t sum = accum_t(0);
#pragma unroll
            for (int t = 0; t < KEYS_PER_STEP; ++t) {
                p[t][r] = exp_of(s[t][r] - shift);  // 0 for a hidden key
                sum += p[t][r];
            }
            denominator[r] = denominator[r] * alpha + sum;
#pragma unroll
            for (int x = 0; x < ELEMENTS_PER_LANE; ++x) acc[r][x] *= alpha;
            m[r] = m_new;
        }
#pragma unroll
        for (int t = 0; t < KEYS_PER_STEP; ++t) {
            accum_t value_wide[ELEMENTS_PER_LANE];  // the value, widened once for every row
#pragma unroll
            for (int c = 0; c < VECTORS_PER_LANE; ++c) {
#pragma unroll
                for (int e = 0; e < VECTOR_ELEMENTS; ++e) {
                    value_wide[c * VECTOR_ELEMENTS + e] = widen(value_vectors[t][c].x[e]);
                }
            }
#pragma unroll
            for (int r = 0; r < ROWS_PER_BLOCK; ++r) {
#pragma unroll
                for (int x = 0; x < ELEMENTS_PER_LANE; ++x) {
#if ONE_QUERY
                    // Every row of the block sits at one position and sees the same
                    // keys, and a key none sees was never read: p v is exactly 0 there.
                    acc[r][x] += p[t][r] * value_wide[x];
#else
                    // A key another row sees may hold NaN: add nothing, not 0 * NaN.
                    acc[r][x] += visible[t][r] ? p[t][r] * value_wide[x] : accum_t(0);
#endif
                }
            }
        }
    }

    // Merge the workers of a warp: lanes lane_in_worker of every worker exchange states.
#pragma unroll
    for (int off = LANES_PER_KEY; off < 32; off <<= 1) {
#pragma unroll
        for (int r = 0; r < ROWS_PER_BLOCK; ++r) {
            const accum_t max_other = __shfl_xor_sync(FULL_WARP_MASK, m[r], off);
            const accum_t denominator_other = __shfl_xor_sync(FULL_WARP_MASK, denominator[r], off);
            const accum_t m_new = max_of(m[r], max_other);
            const accum_t a = m_new == NEGATIVE_INFINITY ? accum_t(0) : exp_of(m[r] - m_new);
            const accum_t weight_other =
                m_new == NEGATIVE_INFINITY ? accum_t(0) : exp_of(max_other - m_new);
            denominator[r] = denominator[r] * a + denominator_other * weight_other;
#pragma unroll
            for (int x = 0; x < ELEMENTS_PER_LANE; ++x) {
                const accum_t acc_other = __shfl_xor_sync(FULL_WARP_MASK, acc[r][x], off);
                acc[r][x] = acc[r][x] * a + acc_other * weight_other;
            }
            m[r] = m_new;
        }
    }

    // Merge the warps in shared memory: per warp and row, (m, denominator, acc[DV]).
    extern __shared__ unsigned char shared_raw[];
    accum_t* shared = reinterpret_cast<accum_t*>(shared_raw);
    if (lane < LANES_PER_KEY) {
#pragma unroll
        for (int r = 0; r < ROWS_PER_BLOCK; ++r) {
            accum_t* slot = shared + (warp * ROWS_PER_BLOCK + r) * (DV + 2);
            if (lane_in_worker == 0) {
                slot[0] = m[r];
                slot[1] = denominator[r];
            }
#pragma unroll
            for (int c = 0; c < VECTORS_PER_LANE; ++c) {
#pragma unroll
                for (int e = 0; e < VECTOR_ELEMENTS; ++e) {
                    const int d = c * VECTOR_STRIDE + lane_in_worker * VECTOR_ELEMENTS + e;
                    if (d < DV) slot[2 + d] = acc[r][c * VECTOR_ELEMENTS + e];
                }
            }
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < ROWS_PER_BLOCK * DV; idx += WARPS * 32) {
        const int r = idx / DV;
        const int d = idx % DV;
        const int row = row_group * ROWS_PER_BLOCK + r;
        if (row >= n_rows) continue;
        accum_t m_all = NEGATIVE_INFINITY;
        for (int w = 0; w < WARPS; ++w) {
            m_all = max_of(m_all, shared[(w * ROWS_PER_BLOCK + r) * (DV + 2)]);
        }
        accum_t l_all = accum_t(0), o_all = accum_t(0);
        if (m_all != NEGATIVE_INFINITY) {
            for (int w = 0; w < WARPS; ++w) {
                const accum_t* slot = shared + (w * ROWS_PER_BLOCK + r) * (DV + 2);
                const accum_t a = exp_of(slot[0] - m_all);
                l_all += slot[1] * a;
                o_all += slot[2 + d] * a;
            }
        }
        const int h = kv_head * G + row / Sq;
        const int i = row % Sq;
        const long long o = ((split * B + b) * Hq + h) * Sq + i;
        const bool empty = m_all == NEGATIVE_INFINITY;
        part_out[o * DV + d] = empty ? accum_t(0) : o_all / l_all;
        if (d == 0) part_lse[o] = empty ? NEGATIVE_INFINITY : m_all + log_of(l_all);
    }
}

// One block per query row: merge the splits' partial states, as merge_states_n does.
extern "C" __global__ void refattn_decode_merge(
    const accum_t* __restrict__ part_out,  // (splits, rows, DV)
    const accum_t* __restrict__ part_lse,  // (splits, rows)
    storage_t* __restrict__ out,           // (rows, DV), the caller's dtype
    accum_t* __restrict__ lse,             // (rows,)
    int splits, long long rows, int DV)
{
    const long long row = blockIdx.x;
    const accum_t NEGATIVE_INFINITY = negative_infinity(accum_t(0));
    accum_t m = NEGATIVE_INFINITY;
    for (int p = 0; p < splits; ++p) m = max_of(m, part_lse[p * rows + row]);
    const bool empty = m == NEGATIVE_INFINITY;
    for (int d = threadIdx.x; d < DV; d += blockDim.x) {
        accum_t total = accum_t(0), acc = accum_t(0);
        for (int p = 0; p < splits; ++p) {
            const accum_t s = part_lse[p * rows + row];
            if (s == NEGATIVE_INFINITY) continue;  // a part that saw no key adds nothing
            const accum_t w = exp_of(s - m);
            total += w;
            acc += w * part_out[(p * rows + row) * DV + d];
        }
        store_as(out + row * DV + d, empty ? accum_t(0) : acc / total);
        if (d == 0) lse[row] = empty ? NEGATIVE_INFINITY : m + log_of(total);
    }
}
