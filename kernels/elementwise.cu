// rawgan CUDA kernels: bias, activations, dropout, and the column sum of bias gradients.
//
// Thread mapping (unless a kernel says otherwise): a 1-D grid-stride loop, one element per
// thread per iteration, n elements of a C-contiguous array (any shape; the channel of
// element i is i % C in NHWC). Every kernel exists as _f32 and _f64. Formulas match
// rawgan/backends/numpy_ops.py operation by operation (same rounding order), so results
// agree to a few ulps.
#include "common.cuh"

// ---- bias -----------------------------------------------------------------------------

// y[i] = x[i] + b[i % C]                                   (bias_add_forward)
template <typename T>
__device__ __forceinline__ void bias_add_body(const T* x, const T* b, T* y, i64 n, int C) {
    RG_GRID_LOOP(i, n) y[i] = x[i] + b[i % C];
}

// part[s*C + c] = sum of x[r, c] over rows r of split s  (bias_add_backward, pass 1)
// Block (32, 8), grid (ceil(C/32), S): see colreduce_partial in common.cuh.
template <typename T>
struct SumOf {
    const T* x; int C;
    __device__ __forceinline__ void operator()(int r, int c, T (&acc)[1]) const {
        acc[0] += x[(i64)r * C + c];
    }
};

// ---- activations ----------------------------------------------------------------------

// LeakyReLU: y = x if x > 0 else alpha*x;  dx = dy * (1 if x > 0 else alpha)
template <typename T>
__device__ __forceinline__ void leaky_fwd_body(const T* x, T* y, i64 n, T alpha) {
    RG_GRID_LOOP(i, n) y[i] = rg_leaky(x[i], alpha);
}
template <typename T>
__device__ __forceinline__ void leaky_bwd_body(const T* dy, const T* x, T* dx, i64 n, T alpha) {
    RG_GRID_LOOP(i, n) dx[i] = rg_leaky_grad(dy[i], x[i], alpha);
}

// ReLU: y = max(x, 0) (NaN propagates, as np.maximum);  dx = dy where x > 0 else 0
template <typename T>
__device__ __forceinline__ void relu_fwd_body(const T* x, T* y, i64 n) {
    RG_GRID_LOOP(i, n) {
        const T v = x[i];
        y[i] = v < T(0) ? T(0) : v;
    }
}
template <typename T>
__device__ __forceinline__ void relu_bwd_body(const T* dy, const T* x, T* dx, i64 n) {
    RG_GRID_LOOP(i, n) dx[i] = x[i] > T(0) ? dy[i] : T(0);
}

// tanh: y = tanh(x);  dx = dy * (1 - y^2), from the OUTPUT y
template <typename T>
__device__ __forceinline__ void tanh_fwd_body(const T* x, T* y, i64 n) {
    RG_GRID_LOOP(i, n) y[i] = rg_tanh(x[i]);
}
template <typename T>
__device__ __forceinline__ void tanh_bwd_body(const T* dy, const T* y, T* dx, i64 n) {
    RG_GRID_LOOP(i, n) {
        const T v = y[i];
        dx[i] = dy[i] * (T(1) - v * v);
    }
}

// sigmoid, overflow-free: e = exp(-|x|);  y = 1/(1+e) if x >= 0 else e/(1+e)
// dx = dy * y * (1 - y), from the OUTPUT y
template <typename T>
__device__ __forceinline__ void sigmoid_fwd_body(const T* x, T* y, i64 n) {
    RG_GRID_LOOP(i, n) {
        const T v = x[i];
        const T e = rg_exp(-rg_abs(v));
        y[i] = v >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
    }
}
template <typename T>
__device__ __forceinline__ void sigmoid_bwd_body(const T* dy, const T* y, T* dx, i64 n) {
    RG_GRID_LOOP(i, n) {
        const T v = y[i];
        dx[i] = dy[i] * v * (T(1) - v);
    }
}

// ---- dropout --------------------------------------------------------------------------
//
// Inverted dropout: keep = (u >= rate), mask = keep * scale, scale = 1 / (1 - rate) (cast to
// T on the host, as NumPy casts it), y = x * mask. Three sources for the uniforms u in [0, 1):
//   dropout_host:   u drawn on the host by the layer's numpy Generator and uploaded (exactly
//                   the draws numpy_ops makes): the fallback for bit generators other than
//                   PCG64;
//   dropout_philox: u from Philox-4x32-10 (Salmon et al. 2011), counter-based: element
//                   group g uses counter (g, offset) and key = seed, so a mask is a pure
//                   function of (seed, offset, index): reproducible, no state in memory.
//                   float: 4 elements per Philox call, u = (bits >> 8) * 2^-24;
//                   double: 2 per call, u = ((a >> 5) * 2^26 + (b >> 6)) * 2^-53.
//                   offset = the scalar offset + *base when base is not null: base lives in
//                   device memory, so a captured CUDA graph draws new masks on every replay
//                   (the host rewrites *base between replays; the scalar is baked in).
//   dropout_pcg64:  u = exactly the numbers numpy's Generator(PCG64).random(n, dtype) would
//                   return (PCG64 is numpy's default bit generator), made on the device from
//                   the generator's state; the host then skips the generator past them
//                   (rawgan/backends/streams.py). The masks equal NumPy's, with nothing drawn
//                   on the host or copied. PCG64 (O'Neill 2014, PCG XSL-RR 128/64): state
//                   s <- s * A + inc (mod 2^128), then output v = rotr64(hi ^ lo, hi >> 58)
//                   of the new s. double: one v per number, u = (v >> 11) * 2^-53; float:
//                   32 bits per number, the low half of v then its high half, u =
//                   (bits >> 8) * 2^-24; NumPy buffers a spare high half (has = 1, held):
//                   that is element 0. Jumps: m steps compose to one affine map, s_m =
//                   A^m s + (A^(m-1) + ... + A + 1) inc, built from the binary digits of m
//                   in O(log m) (Brown 1994; numpy's pcg_advance_lcg_128). Mapping: the
//                   outputs are cut into runs of W * R (W = 32, R = 16); slot (run, lane)
//                   takes outputs run * W * R + lane + W j, j < R, so the 32 threads of a
//                   warp write 32 neighbouring outputs at a time (coalesced); a slot jumps to
//                   its first output, then steps W at a time with the map for m = W.
// dropout backward is mul: dx = dy * mask.

template <typename T>
__device__ __forceinline__ void dropout_apply(const T* x, T* y, T* mask, i64 i, T u, T rate,
                                              T scale) {
    const T m = u >= rate ? scale : T(0);
    mask[i] = m;
    y[i] = x[i] * m;
}

template <typename T>
__device__ __forceinline__ void dropout_host_body(const T* x, const T* u, T* y, T* mask, i64 n,
                                                  T rate, T scale) {
    RG_GRID_LOOP(i, n) dropout_apply(x, y, mask, i, u[i], rate, scale);
}

__device__ __forceinline__ void philox4x32_10(u32 (&c)[4], u32 k0, u32 k1) {
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        const u64 p0 = (u64)0xD2511F53u * c[0];
        const u64 p1 = (u64)0xCD9E8D57u * c[2];
        const u32 n0 = (u32)(p1 >> 32) ^ c[1] ^ k0;
        const u32 n2 = (u32)(p0 >> 32) ^ c[3] ^ k1;
        c[0] = n0;
        c[1] = (u32)p1;
        c[2] = n2;
        c[3] = (u32)p0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
}

template <typename T> struct PhiloxUniform;
template <> struct PhiloxUniform<float> {
    enum { E = 4 };
    __device__ __forceinline__ static void get(const u32 (&c)[4], float (&u)[4]) {
#pragma unroll
        for (int q = 0; q < 4; ++q) u[q] = (float)(c[q] >> 8) * (1.0f / 16777216.0f);
    }
};
template <> struct PhiloxUniform<double> {
    enum { E = 2 };
    __device__ __forceinline__ static void get(const u32 (&c)[4], double (&u)[2]) {
#pragma unroll
        for (int q = 0; q < 2; ++q)
            u[q] = ((double)(c[2 * q] >> 5) * 67108864.0 + (double)(c[2 * q + 1] >> 6)) *
                   (1.0 / 9007199254740992.0);
    }
};

template <typename T>
__device__ __forceinline__ void dropout_philox_body(const T* x, T* y, T* mask, i64 n, u64 seed,
                                                    u64 offset, const u64* base, T rate,
                                                    T scale) {
    enum { E = PhiloxUniform<T>::E };
    if (base) offset += *base;
    const i64 groups = (n + E - 1) / E;
    RG_GRID_LOOP(g, groups) {
        u32 c[4] = {(u32)g, (u32)((u64)g >> 32), (u32)offset, (u32)(offset >> 32)};
        philox4x32_10(c, (u32)seed, (u32)(seed >> 32));
        T u[E];
        PhiloxUniform<T>::get(c, u);
#pragma unroll
        for (int q = 0; q < E; ++q) {
            const i64 i = g * E + q;
            if (i < n) dropout_apply(x, y, mask, i, u[q], rate, scale);
        }
    }
}

struct u128 { u64 lo, hi; };
__device__ __forceinline__ u128 mul128(u128 a, u128 b) {  // a * b mod 2^128
    return {a.lo * b.lo, __umul64hi(a.lo, b.lo) + a.lo * b.hi + a.hi * b.lo};
}
__device__ __forceinline__ u128 add128(u128 a, u128 b) {  // a + b mod 2^128
    const u64 lo = a.lo + b.lo;
    return {lo, a.hi + b.hi + (lo < a.lo ? 1ull : 0ull)};
}
// A = 2549297995355413924 * 2^64 + 4865540595714422341 (PCG's 128-bit LCG multiplier)
__device__ __forceinline__ u128 pcg64_mult() { return {4865540595714422341ull,
                                                       2549297995355413924ull}; }

// The map of m steps: s -> mult * s + plus, mult = A^m, plus = (A^(m-1) + ... + 1) inc; by
// binary powers: (cur_mult, cur_plus) is the map of 2^b steps, composed into the result
// for every set bit b of m.
__device__ __forceinline__ void pcg64_jump(u128 inc, u64 m, u128& mult, u128& plus) {
    u128 cur_mult = pcg64_mult(), cur_plus = inc;
    mult = {1, 0};
    plus = {0, 0};
    while (m) {
        if (m & 1) {
            mult = mul128(mult, cur_mult);
            plus = add128(mul128(plus, cur_mult), cur_plus);
        }
        cur_plus = mul128(add128(cur_mult, {1, 0}), cur_plus);
        cur_mult = mul128(cur_mult, cur_mult);
        m >>= 1;
    }
}

__device__ __forceinline__ u64 pcg64_output(u128 s) {  // XSL-RR
    const u64 v = s.hi ^ s.lo;
    const unsigned r = (unsigned)(s.hi >> 58);
    return (v >> r) | (v << ((64u - r) & 63u));
}

template <typename T> struct Pcg64Uniform;
template <> struct Pcg64Uniform<float> {  // 2 numbers per output (numpy's next_float)
    enum { P = 2 };
    __device__ __forceinline__ static float from32(u32 b) {
        return (float)(b >> 8) * (1.0f / 16777216.0f);
    }
    __device__ __forceinline__ static void get(u64 v, float (&u)[2]) {
        u[0] = from32((u32)v);
        u[1] = from32((u32)(v >> 32));
    }
};
template <> struct Pcg64Uniform<double> {  // 1 number per output (numpy's next_double)
    enum { P = 1 };
    __device__ __forceinline__ static double from32(u32) { return 0.0; }  // (no buffer)
    __device__ __forceinline__ static void get(u64 v, double (&u)[1]) {
        u[0] = (double)(v >> 11) * (1.0 / 9007199254740992.0);
    }
};

template <typename T>
__device__ __forceinline__ void dropout_pcg64_body(const T* x, T* y, T* mask, i64 n, u64 s_lo,
                                                   u64 s_hi, u64 inc_lo, u64 inc_hi, int has,
                                                   u32 held, T rate, T scale) {
    enum { P = Pcg64Uniform<T>::P, W = 32, R = 16 };
    const i64 first = (P == 2 && has && n > 0) ? 1 : 0;  // element 0: the buffered half
    const i64 outputs = (n - first + P - 1) / P;
    const i64 slots = (outputs + W * R - 1) / (W * R) * W;
    const u128 s0 = {s_lo, s_hi}, inc = {inc_lo, inc_hi};
    u128 w_mult, w_plus;  // the map of W steps
    pcg64_jump(inc, W, w_mult, w_plus);
    if (first && blockIdx.x == 0 && threadIdx.x == 0)
        dropout_apply(x, y, mask, 0, Pcg64Uniform<T>::from32(held), rate, scale);
    RG_GRID_LOOP(slot, slots) {
        i64 k = slot / W * (W * R) + slot % W;  // this slot's first output
        u128 mult, plus;
        pcg64_jump(inc, (u64)k + 1, mult, plus);  // output k comes from the state k+1 steps on
        u128 s = add128(mul128(mult, s0), plus);
        for (int j = 0; j < R && k < outputs; ++j, k += W) {
            T u[P];
            Pcg64Uniform<T>::get(pcg64_output(s), u);
#pragma unroll
            for (int q = 0; q < P; ++q) {
                const i64 i = first + k * P + q;
                if (i < n) dropout_apply(x, y, mask, i, u[q], rate, scale);
            }
            s = add128(mul128(w_mult, s), w_plus);
        }
    }
}

// ---- standard normal noise (a GAN's z), on the device ---------------------------------
//
// z ~ N(0, 1) by Box-Muller from the same Philox-4x32-10 stream: counter (g, offset), key =
// seed, offset += *base when base is not null (as dropout_philox). One Philox call gives two
// (u1, u2) pairs for float (24-bit uniforms) or one pair for double (53-bit):
//   u1 in (0, 1] (never 0: log stays finite), u2 in [0, 1),
//   r = sqrt(-2 log u1),  z_even = r cos(2 pi u2),  z_odd = r sin(2 pi u2).
// float: z[4g .. 4g+3] from pairs (c0, c1), (c2, c3); double: z[2g], z[2g+1] from
// u1 = 53 bits of (c0, c1), u2 = 53 bits of (c2, c3).
template <typename T> struct PhiloxPairs;
template <> struct PhiloxPairs<float> {
    enum { E = 4 };
    __device__ __forceinline__ static void get(const u32 (&c)[4], float (&u1)[2], float (&u2)[2]) {
#pragma unroll
        for (int q = 0; q < 2; ++q) {
            u1[q] = (float)((c[2 * q] >> 8) + 1u) * (1.0f / 16777216.0f);
            u2[q] = (float)(c[2 * q + 1] >> 8) * (1.0f / 16777216.0f);
        }
    }
};
template <> struct PhiloxPairs<double> {
    enum { E = 2 };
    __device__ __forceinline__ static void get(const u32 (&c)[4], double (&u1)[1],
                                               double (&u2)[1]) {
        u1[0] = ((double)(c[0] >> 5) * 67108864.0 + (double)(c[1] >> 6) + 1.0) *
                (1.0 / 9007199254740992.0);
        u2[0] = ((double)(c[2] >> 5) * 67108864.0 + (double)(c[3] >> 6)) *
                (1.0 / 9007199254740992.0);
    }
};

template <typename T>
__device__ __forceinline__ void normal_philox_body(T* z, i64 n, u64 seed, u64 offset,
                                                   const u64* base) {
    enum { E = PhiloxPairs<T>::E, P = E / 2 };
    if (base) offset += *base;
    const T two_pi = T(6.283185307179586);
    const i64 groups = (n + E - 1) / E;
    RG_GRID_LOOP(g, groups) {
        u32 c[4] = {(u32)g, (u32)((u64)g >> 32), (u32)offset, (u32)(offset >> 32)};
        philox4x32_10(c, (u32)seed, (u32)(seed >> 32));
        T u1[P], u2[P];
        PhiloxPairs<T>::get(c, u1, u2);
#pragma unroll
        for (int q = 0; q < P; ++q) {
            const T r = rg_sqrt(T(-2) * rg_log(u1[q]));
            const T t = two_pi * u2[q];
            const i64 i = g * E + 2 * q;
            if (i < n) z[i] = r * rg_cos(t);
            if (i + 1 < n) z[i + 1] = r * rg_sin(t);
        }
    }
}

// ---- copies and gradient accumulation (the graph-captured step needs no CuPy kernels) ---

// y[i] = x[i]
template <typename T>
__device__ __forceinline__ void copy_body(const T* x, T* y, i64 n) {
    RG_GRID_LOOP(i, n) y[i] = x[i];
}
// acc[i] += g[i]   (a layer ADDS its parameter gradient into grads: Layer._accumulate)
template <typename T>
__device__ __forceinline__ void accumulate_body(T* acc, const T* g, i64 n) {
    RG_GRID_LOOP(i, n) acc[i] += g[i];
}

// y = a * b elementwise (dropout backward: dx = dy * mask)
template <typename T>
__device__ __forceinline__ void mul_body(const T* a, const T* b, T* y, i64 n) {
    RG_GRID_LOOP(i, n) y[i] = a[i] * b[i];
}

// ---- extern "C" entry points ----------------------------------------------------------

#define RG_ELEMENTWISE_KERNELS(SUF, T)                                                       \
    extern "C" __global__ void bias_add_##SUF(const T* x, const T* b, T* y, i64 n, int C) {   \
        bias_add_body(x, b, y, n, C);                                                        \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                        \
    colsum_partial_##SUF(const T* x, int M, int C, int rows_per, T* part) {                  \
        const SumOf<T> f = {x, C};                                                           \
        colreduce_partial<T, 1>(M, C, rows_per, part, f);                                    \
    }                                                                                        \
    extern "C" __global__ void colsum_final_##SUF(const T* part, int S, int C, T* out) {     \
        colreduce_final(part, S, C, out);                                                    \
    }                                                                                        \
    extern "C" __global__ void leaky_relu_fwd_##SUF(const T* x, T* y, i64 n, T alpha) {      \
        leaky_fwd_body(x, y, n, alpha);                                                      \
    }                                                                                        \
    extern "C" __global__ void leaky_relu_bwd_##SUF(const T* dy, const T* x, T* dx, i64 n,   \
                                                    T alpha) {                               \
        leaky_bwd_body(dy, x, dx, n, alpha);                                                 \
    }                                                                                        \
    extern "C" __global__ void relu_fwd_##SUF(const T* x, T* y, i64 n) {                     \
        relu_fwd_body(x, y, n);                                                              \
    }                                                                                        \
    extern "C" __global__ void relu_bwd_##SUF(const T* dy, const T* x, T* dx, i64 n) {       \
        relu_bwd_body(dy, x, dx, n);                                                         \
    }                                                                                        \
    extern "C" __global__ void tanh_fwd_##SUF(const T* x, T* y, i64 n) {                     \
        tanh_fwd_body(x, y, n);                                                              \
    }                                                                                        \
    extern "C" __global__ void tanh_bwd_##SUF(const T* dy, const T* y, T* dx, i64 n) {       \
        tanh_bwd_body(dy, y, dx, n);                                                         \
    }                                                                                        \
    extern "C" __global__ void sigmoid_fwd_##SUF(const T* x, T* y, i64 n) {                  \
        sigmoid_fwd_body(x, y, n);                                                           \
    }                                                                                        \
    extern "C" __global__ void sigmoid_bwd_##SUF(const T* dy, const T* y, T* dx, i64 n) {    \
        sigmoid_bwd_body(dy, y, dx, n);                                                      \
    }                                                                                        \
    extern "C" __global__ void dropout_host_##SUF(const T* x, const T* u, T* y, T* mask,     \
                                                  i64 n, T rate, T scale) {                  \
        dropout_host_body(x, u, y, mask, n, rate, scale);                                    \
    }                                                                                        \
    extern "C" __global__ void dropout_philox_##SUF(const T* x, T* y, T* mask, i64 n,        \
                                                    u64 seed, u64 offset, const u64* base,   \
                                                    T rate, T scale) {                       \
        dropout_philox_body(x, y, mask, n, seed, offset, base, rate, scale);                 \
    }                                                                                        \
    extern "C" __global__ void dropout_pcg64_##SUF(const T* x, T* y, T* mask, i64 n,         \
                                                   u64 s_lo, u64 s_hi, u64 inc_lo,           \
                                                   u64 inc_hi, int has, u32 held, T rate,    \
                                                   T scale) {                                \
        dropout_pcg64_body(x, y, mask, n, s_lo, s_hi, inc_lo, inc_hi, has, held, rate,       \
                           scale);                                                           \
    }                                                                                        \
    extern "C" __global__ void normal_philox_##SUF(T* z, i64 n, u64 seed, u64 offset,        \
                                                   const u64* base) {                        \
        normal_philox_body(z, n, seed, offset, base);                                        \
    }                                                                                        \
    extern "C" __global__ void copy_##SUF(const T* x, T* y, i64 n) { copy_body(x, y, n); }   \
    extern "C" __global__ void accumulate_##SUF(T* acc, const T* g, i64 n) {                 \
        accumulate_body(acc, g, n);                                                          \
    }                                                                                        \
    extern "C" __global__ void mul_##SUF(const T* a, const T* b, T* y, i64 n) {              \
        mul_body(a, b, y, n);                                                                \
    }

RG_ELEMENTWISE_KERNELS(f32, float)
RG_ELEMENTWISE_KERNELS(f64, double)
