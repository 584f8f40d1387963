// Token post-processing kernels of cnse-dp, compiled at run time by NVRTC
// with --fmad=false (see kernels/src/sampling/gpu.rs).
//
// Every __device__ helper that computes a number has a twin of the same name
// in kernels/src/sampling/math.rs, with the same operations in the same
// order; the CPU reference (cpu.rs) defines the results and the GPU tests
// compare token ids exactly. Sums of weights are u64 fixed point, so the
// order of a parallel reduction cannot change them.
//
// One block of NT threads per logit row. Selections (top-k by count, top-p by
// mass) are radix selections over the 32-bit order key, 8 bits per pass, with
// ties at the threshold broken by index through a block scan over contiguous
// per-thread segments, so the kept set is the best-first prefix of the order
// (key descending, index ascending) that the CPU reference sorts.

typedef unsigned long long u64;
typedef unsigned int u32;

#define NT 1024
#define WARPS (NT / 32)
#define RADIX 256
#define FULL_MASK 0xffffffffu

#define GOLDEN 0x9E3779B97F4A7C15ull
#define TWO_POW_M24 __uint_as_float(0x33800000u)
#define TWO_POW_M16 __uint_as_float(0x37800000u)
#define WEIGHT_SCALE __uint_as_float(0x53800000u)
#define LOG2E __uint_as_float(0x3FB8AA3Bu)
#define LN2_HI __uint_as_float(0x3F317200u)
#define LN2_LO __uint_as_float(0x35BFBE8Eu)
#define C3 __uint_as_float(0x3E2AAAABu)
#define C4 __uint_as_float(0x3D2AAAABu)
#define C5 __uint_as_float(0x3C088889u)
#define C6 __uint_as_float(0x3AB60B61u)
#define NEG_INF __uint_as_float(0xFF800000u)

// Same layout as RowParams in kernels/src/sampling/mod.rs (32 bytes).
struct RowParams {
    float inv_temp;
    float top_p;
    u32 top_k;
    u32 reserved;
    u64 row_key;
    u64 draw;
};

// ---- arithmetic twins of math.rs -------------------------------------------

__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ float synth_logit(u64 row_key, u32 index) {
    u64 h = mix64(row_key + ((u64)index + 1ull) * GOLDEN);
    float u = (float)(h >> 40) * TWO_POW_M24;
    float logit = u * 6.0f - 3.0f;
    if (((h >> 16) & 0x3FFull) == 0ull) {
        float v = (float)(h & 0xFFFFull) * TWO_POW_M16;
        logit += v * 4.0f + 6.0f;
    }
    return logit;
}

__device__ __forceinline__ u32 key_of(float logit) {
    if (!isfinite(logit)) return 0u;
    u32 b = __float_as_uint(logit);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ u64 rank_of(u32 key, u32 index) {
    return ((u64)key << 32) | (u64)(0xFFFFFFFFu - index);
}

__device__ __forceinline__ u32 index_of_rank(u64 rank) {
    return 0xFFFFFFFFu - (u32)rank;
}

__device__ __forceinline__ float exp_det(float x) {
    if (!(x > -87.0f)) return 0.0f;
    if (x > 0.0f) x = 0.0f;
    float n = floorf(x * LOG2E + 0.5f);
    float r = (x - n * LN2_HI) - n * LN2_LO;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (C3 + r * (C4 + r * (C5 + r * C6)))));
    float scale = __uint_as_float(((u32)((int)n + 127)) << 23);
    return p * scale;
}

__device__ __forceinline__ u64 weight_q(float logit, float max_logit, float inv_temp) {
    if (!isfinite(logit)) return 0ull;
    float w = exp_det((logit - max_logit) * inv_temp);
    return (u64)(w * WEIGHT_SCALE);
}

__device__ __forceinline__ u64 top_p_target(float top_p, u64 total) {
    double t = ceil((double)top_p * (double)total);
    u64 r = t < 1.0 ? 1ull : (u64)t;
    return r < total ? r : total;
}

// ---- block primitives --------------------------------------------------------

// Shared scratch of one block: reductions use red[0..=WARPS], selections
// pass their results through sel_u32/sel_u64.
struct Shared {
    u64 red[WARPS + 1];
    u64 hist[RADIX];
    u64 sel_u64;
    u32 sel_u32[4];
};

__device__ __forceinline__ u64 umax64(u64 a, u64 b) { return a > b ? a : b; }

__device__ u64 block_max(u64 v, Shared& s) {
    for (int o = 16; o > 0; o >>= 1) v = umax64(v, __shfl_xor_sync(FULL_MASK, v, o));
    u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) s.red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = s.red[lane];
        for (int o = 16; o > 0; o >>= 1) v = umax64(v, __shfl_xor_sync(FULL_MASK, v, o));
        if (lane == 0) s.red[WARPS] = v;
    }
    __syncthreads();
    return s.red[WARPS];
}

__device__ u64 block_sum(u64 v, Shared& s) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) s.red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = s.red[lane];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
        if (lane == 0) s.red[WARPS] = v;
    }
    __syncthreads();
    return s.red[WARPS];
}

// Exclusive prefix sum over threads in thread order; *total gets the sum.
__device__ u64 block_exclusive_scan(u64 v, Shared& s, u64* total) {
    u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u64 inc = v;
    for (int o = 1; o < 32; o <<= 1) {
        u64 t = __shfl_up_sync(FULL_MASK, inc, o);
        if (lane >= (u32)o) inc += t;
    }
    __syncthreads();
    if (lane == 31) s.red[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        u64 w = s.red[lane];
        u64 wi = w;
        for (int o = 1; o < 32; o <<= 1) {
            u64 t = __shfl_up_sync(FULL_MASK, wi, o);
            if (lane >= (u32)o) wi += t;
        }
        s.red[lane] = wi - w;
        if (lane == 31) s.red[WARPS] = wi;
    }
    __syncthreads();
    u64 excl = s.red[warp] + inc - v;
    *total = s.red[WARPS];
    return excl;
}

// Contiguous segment [lo, hi) of the row owned by this thread, for the passes
// whose result depends on index order.
__device__ __forceinline__ void segment(u32 vocab, u32* lo, u32* hi) {
    u32 seg = (vocab + NT - 1) / NT;
    u32 a = threadIdx.x * seg;
    *lo = a < vocab ? a : vocab;
    u32 b = a + seg;
    *hi = b < vocab ? b : vocab;
}

// Best rank of the row (its argmax, lowest index on ties).
__device__ u64 row_best(const float* row, u32 vocab, Shared& s) {
    u64 best = 0;
    for (u32 i = threadIdx.x; i < vocab; i += NT) best = umax64(best, rank_of(key_of(row[i]), i));
    return block_max(best, s);
}

// ---- selections --------------------------------------------------------------

// Rank floor of top-k: exactly the k best ranks are >= it. Needs 0 < k < vocab.
__device__ u64 top_k_floor(const float* row, u32 vocab, u32 k, Shared& s) {
    u32* hist = (u32*)s.hist;
    u32 prefix = 0, mask = 0, remaining = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (u32 b = threadIdx.x; b < RADIX; b += NT) hist[b] = 0;
        __syncthreads();
        for (u32 i = threadIdx.x; i < vocab; i += NT) {
            u32 key = key_of(row[i]);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xFF], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            u32 rem = remaining;
            int b = RADIX - 1;
            for (; b > 0; --b) {
                if (hist[b] >= rem) break;
                rem -= hist[b];
            }
            s.sel_u32[0] = (u32)b;
            s.sel_u32[1] = rem;
        }
        __syncthreads();
        prefix |= s.sel_u32[0] << shift;
        mask |= 0xFFu << shift;
        remaining = s.sel_u32[1];
    }
    // `remaining` tokens with key == prefix are kept, lowest indices first.
    u32 lo, hi;
    segment(vocab, &lo, &hi);
    u64 count = 0;
    for (u32 i = lo; i < hi; ++i) count += key_of(row[i]) == prefix;
    u64 total;
    u64 before = block_exclusive_scan(count, s, &total);
    if (before < remaining && remaining <= before + count) {
        u64 c = before;
        for (u32 i = lo; i < hi; ++i) {
            if (key_of(row[i]) == prefix && ++c == remaining) {
                s.sel_u32[2] = i;
                break;
            }
        }
    }
    __syncthreads();
    u64 floor = rank_of(prefix, s.sel_u32[2]);
    __syncthreads();
    return floor;
}

// Rank floor of top-p among the tokens of rank >= floor: the shortest
// best-first prefix whose weight reaches top_p_target. Needs top_p < 1.
__device__ u64 top_p_floor(const float* row, u32 vocab, u64 floor, float max_logit, float inv_temp, float top_p,
                           Shared& s) {
    u64 part = 0;
    for (u32 i = threadIdx.x; i < vocab; i += NT) {
        float l = row[i];
        if (rank_of(key_of(l), i) >= floor) part += weight_q(l, max_logit, inv_temp);
    }
    u64 total = block_sum(part, s);
    u64 remaining = top_p_target(top_p, total);
    u32 prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (u32 b = threadIdx.x; b < RADIX; b += NT) s.hist[b] = 0;
        __syncthreads();
        for (u32 i = threadIdx.x; i < vocab; i += NT) {
            float l = row[i];
            u32 key = key_of(l);
            if ((key & mask) == prefix && rank_of(key, i) >= floor) {
                u64 w = weight_q(l, max_logit, inv_temp);
                if (w != 0) atomicAdd(&s.hist[(key >> shift) & 0xFF], w);
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            u64 rem = remaining;
            int b = RADIX - 1;
            for (; b > 0; --b) {
                if (s.hist[b] >= rem) break;
                rem -= s.hist[b];
            }
            s.sel_u32[0] = (u32)b;
            s.sel_u64 = rem;
        }
        __syncthreads();
        prefix |= s.sel_u32[0] << shift;
        mask |= 0xFFu << shift;
        remaining = s.sel_u64;
    }
    // Weight `remaining` must come from tokens with key == prefix, in index order.
    u32 lo, hi;
    segment(vocab, &lo, &hi);
    u64 mass = 0;
    for (u32 i = lo; i < hi; ++i) {
        float l = row[i];
        u32 key = key_of(l);
        if (key == prefix && rank_of(key, i) >= floor) mass += weight_q(l, max_logit, inv_temp);
    }
    u64 all;
    u64 before = block_exclusive_scan(mass, s, &all);
    if (before < remaining && remaining <= before + mass) {
        u64 c = before;
        for (u32 i = lo; i < hi; ++i) {
            float l = row[i];
            u32 key = key_of(l);
            if (key == prefix && rank_of(key, i) >= floor) {
                c += weight_q(l, max_logit, inv_temp);
                if (c >= remaining) {
                    s.sel_u32[2] = i;
                    break;
                }
            }
        }
    }
    __syncthreads();
    u64 result = rank_of(prefix, s.sel_u32[2]);
    __syncthreads();
    return result;
}

// The token where the running weight over ranks >= floor, in index order,
// first exceeds the scaled draw.
__device__ u32 draw_token(const float* row, u32 vocab, u64 floor, float max_logit, float inv_temp, u64 draw,
                          Shared& s) {
    u32 lo, hi;
    segment(vocab, &lo, &hi);
    u64 mass = 0;
    for (u32 i = lo; i < hi; ++i) {
        float l = row[i];
        if (rank_of(key_of(l), i) >= floor) mass += weight_q(l, max_logit, inv_temp);
    }
    u64 total;
    u64 before = block_exclusive_scan(mass, s, &total);
    u64 r = __umul64hi(draw, total);
    if (before <= r && r < before + mass) {
        u64 c = before;
        for (u32 i = lo; i < hi; ++i) {
            float l = row[i];
            if (rank_of(key_of(l), i) >= floor) {
                c += weight_q(l, max_logit, inv_temp);
                if (c > r) {
                    s.sel_u32[3] = i;
                    break;
                }
            }
        }
    }
    __syncthreads();
    u32 id = s.sel_u32[3];
    __syncthreads();
    return id;
}

// ---- kernels -----------------------------------------------------------------

// grid (ceil(vocab / blockDim.x), rows): logits of each row from its row_key.
extern "C" __global__ void synth_logits(float* __restrict__ out, const RowParams* __restrict__ params, u32 vocab) {
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < vocab) out[(u64)blockIdx.y * vocab + i] = synth_logit(params[blockIdx.y].row_key, i);
}

// grid (rows): temperature, top-k, top-p and the seeded draw, fused.
extern "C" __global__ void __launch_bounds__(NT) sample_rows(const float* __restrict__ logits,
                                                             const RowParams* __restrict__ params,
                                                             u32* __restrict__ out, u32 vocab) {
    __shared__ Shared s;
    const float* row = logits + (u64)blockIdx.x * vocab;
    RowParams p = params[blockIdx.x];
    u64 best = row_best(row, vocab, s);
    u32 arg = index_of_rank(best);
    float max_logit = row[arg];
    if (p.inv_temp == 0.0f || !isfinite(max_logit)) {
        if (threadIdx.x == 0) out[blockIdx.x] = arg;
        return;
    }
    u64 floor = 0;
    if (p.top_k != 0 && p.top_k < vocab) floor = top_k_floor(row, vocab, p.top_k, s);
    if (p.top_p < 1.0f) floor = top_p_floor(row, vocab, floor, max_logit, p.inv_temp, p.top_p, s);
    u32 id = draw_token(row, vocab, floor, max_logit, p.inv_temp, p.draw, s);
    if (threadIdx.x == 0) out[blockIdx.x] = id;
}

// grid (rows): argmax of each row, lowest index on ties.
extern "C" __global__ void __launch_bounds__(NT) argmax_rows(const float* __restrict__ logits,
                                                             u32* __restrict__ out, u32 vocab) {
    __shared__ Shared s;
    u64 best = row_best(logits + (u64)blockIdx.x * vocab, vocab, s);
    if (threadIdx.x == 0) out[blockIdx.x] = index_of_rank(best);
}

// grid (rows): probs = weight / row total (f64 division), one-hot at T = 0.
extern "C" __global__ void __launch_bounds__(NT) softmax_rows(const float* __restrict__ logits,
                                                              float* __restrict__ probs,
                                                              const RowParams* __restrict__ params, u32 vocab) {
    __shared__ Shared s;
    const float* row = logits + (u64)blockIdx.x * vocab;
    float* out = probs + (u64)blockIdx.x * vocab;
    float inv_temp = params[blockIdx.x].inv_temp;
    u64 best = row_best(row, vocab, s);
    u32 arg = index_of_rank(best);
    float max_logit = row[arg];
    if (inv_temp == 0.0f || !isfinite(max_logit)) {
        for (u32 i = threadIdx.x; i < vocab; i += NT) out[i] = i == arg ? 1.0f : 0.0f;
        return;
    }
    u64 part = 0;
    for (u32 i = threadIdx.x; i < vocab; i += NT) part += weight_q(row[i], max_logit, inv_temp);
    double total = (double)block_sum(part, s);
    for (u32 i = threadIdx.x; i < vocab; i += NT)
        out[i] = (float)((double)weight_q(row[i], max_logit, inv_temp) / total);
}

// grid (rows): logits outside the row's top_k ranks become -inf.
extern "C" __global__ void __launch_bounds__(NT) top_k_filter_rows(float* __restrict__ logits,
                                                                   const RowParams* __restrict__ params,
                                                                   u32 vocab) {
    __shared__ Shared s;
    float* row = logits + (u64)blockIdx.x * vocab;
    u32 k = params[blockIdx.x].top_k;
    if (k == 0 || k >= vocab) return;
    u64 floor = top_k_floor(row, vocab, k, s);
    for (u32 i = threadIdx.x; i < vocab; i += NT)
        if (rank_of(key_of(row[i]), i) < floor) row[i] = NEG_INF;
}

// grid (rows): logits outside the row's top-p nucleus become -inf; at T = 0
// only the argmax stays.
extern "C" __global__ void __launch_bounds__(NT) top_p_filter_rows(float* __restrict__ logits,
                                                                   const RowParams* __restrict__ params,
                                                                   u32 vocab) {
    __shared__ Shared s;
    float* row = logits + (u64)blockIdx.x * vocab;
    RowParams p = params[blockIdx.x];
    u64 best = row_best(row, vocab, s);
    float max_logit = row[index_of_rank(best)];
    u64 floor;
    if (p.inv_temp == 0.0f || !isfinite(max_logit)) {
        floor = best;
    } else if (p.top_p >= 1.0f) {
        return;
    } else {
        floor = top_p_floor(row, vocab, 0, max_logit, p.inv_temp, p.top_p, s);
    }
    for (u32 i = threadIdx.x; i < vocab; i += NT)
        if (rank_of(key_of(row[i]), i) < floor) row[i] = NEG_INF;
}
