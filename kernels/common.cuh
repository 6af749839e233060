// rawgan CUDA kernels: helpers shared by every kernels/*.cu file.
//
// The .cu files are compiled at run time by NVRTC through cupy.RawModule, which has no
// include path: rawgan/backends/cupy_ops.py pastes this header in place of the
// `#include "common.cuh"` line before compiling. nvcc (tests/test_kernels_compile.py)
// resolves the include normally. No system header is used, so the same text compiles
// under NVRTC, nvcc and the CPU emulator of the tests.
//
// Conventions of every kernel:
//   * float and double are one template, instantiated as two `extern "C"` kernels whose
//     names end in _f32 / _f64 (CuPy's RawModule.get_function finds them by name);
//   * arrays are C-contiguous; activations NHWC, conv weights HWIO (kh, kw, c_in, c_out);
//   * element counts that can pass 2^31 are `long long`; shapes are `int`;
//   * an optional input (bias, ...) is a null pointer when absent.
#pragma once

typedef long long i64;
typedef unsigned long long u64;
typedef unsigned int u32;

// 16-byte vector of T: float4 (4 floats) or double2 (2 doubles); one 128-bit load.
template <typename T> struct Vec16;
template <> struct Vec16<float> { typedef float4 type; enum { n = 4 }; };
template <> struct Vec16<double> { typedef double2 type; enum { n = 2 }; };

// A GPU faults on a misaligned 128-bit load; the tests' CPU emulator checks every one.
#ifdef RG_EMULATOR
#define RG_CHECK_ALIGNED16(p) rgemu::check_aligned16(p)
#else
#define RG_CHECK_ALIGNED16(p)
#endif

__device__ __forceinline__ void vload(const float* p, float (&v)[4]) {
    RG_CHECK_ALIGNED16(p);
    const float4 t = *reinterpret_cast<const float4*>(p);
    v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
}
__device__ __forceinline__ void vload(const double* p, double (&v)[2]) {
    RG_CHECK_ALIGNED16(p);
    const double2 t = *reinterpret_cast<const double2*>(p);
    v[0] = t.x; v[1] = t.y;
}

// Overloads so templates read the same for float and double.
__device__ __forceinline__ float rg_exp(float x) { return expf(x); }
__device__ __forceinline__ double rg_exp(double x) { return exp(x); }
__device__ __forceinline__ float rg_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double rg_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float rg_log(float x) { return logf(x); }
__device__ __forceinline__ double rg_log(double x) { return log(x); }
__device__ __forceinline__ float rg_sin(float x) { return sinf(x); }
__device__ __forceinline__ double rg_sin(double x) { return sin(x); }
__device__ __forceinline__ float rg_cos(float x) { return cosf(x); }
__device__ __forceinline__ double rg_cos(double x) { return cos(x); }
__device__ __forceinline__ float rg_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double rg_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float rg_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double rg_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float rg_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double rg_abs(double x) { return fabs(x); }
__device__ __forceinline__ float rg_fma(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double rg_fma(double a, double b, double c) { return fma(a, b, c); }
template <typename T> __device__ __forceinline__ T rg_min(T a, T b) { return b < a ? b : a; }
template <typename T> __device__ __forceinline__ T rg_max(T a, T b) { return a < b ? b : a; }

// LeakyReLU, written once for the elementwise kernel and every fused epilogue:
//   z = v if v > 0 else slope * v;   dL/dv = dL/dz * (1 if v > 0 else slope)
// For slope >= 0, z > 0 exactly when v > 0, so the backward may test z in place of v.
template <typename T> __device__ __forceinline__ T rg_leaky(T v, T slope) {
    return v > T(0) ? v : slope * v;
}
template <typename T> __device__ __forceinline__ T rg_leaky_grad(T dz, T v, T slope) {
    return v > T(0) ? dz : slope * dz;
}

// Grid-stride loop over [0, n): thread t of the grid visits t, t + gridDim*blockDim, ...
#define RG_GRID_LOOP(i, n)                                                              \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                     \
         i += (i64)gridDim.x * blockDim.x)

// ---------------------------------------------------------------------------------------
// Column reduction of an (M, C) row-major matrix in two passes (deterministic: no atomics).
//
// Pass 1, colreduce_partial: block (32, 8), grid (ceil(C / 32), S). threadIdx.x picks a
// channel (a warp reads 32 consecutive channels of one row: 128 coalesced bytes),
// threadIdx.y one of 8 row lanes, blockIdx.y one of S row splits of `rows_per` rows.
// Each thread sums its rows; the 8 lanes are added through shared memory; the block
// writes part[(v * S + split) * C + c] for each of the NV sums v the functor produces.
// Pass 2 (colreduce_final or a kernel-specific finaliser) adds the S partials of a channel.
//
// The functor F is called as f(row, col, acc) and adds its NV terms into acc[0..NV-1].
// ---------------------------------------------------------------------------------------
template <typename T, int NV, class F>
__device__ __forceinline__ void colreduce_partial(int M, int C, int rows_per, T* part,
                                                  const F& f) {
    __shared__ T sm[NV][8][33];
    const int col = blockIdx.x * 32 + threadIdx.x;
    // rows in 64 bits: the last split's r0 + rows_per (and r + 8) may pass INT_MAX when M
    // is near 2^31; every row handed to f is < M, so the int cast is exact
    const i64 r0 = (i64)blockIdx.y * rows_per;
    const i64 r1 = r0 + rows_per < (i64)M ? r0 + rows_per : (i64)M;
    T acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = T(0);
    if (col < C)
        for (i64 r = r0 + threadIdx.y; r < r1; r += 8) f((int)r, col, acc);
    for (int v = 0; v < NV; ++v) sm[v][threadIdx.y][threadIdx.x] = acc[v];
    __syncthreads();
    if (threadIdx.y == 0 && col < C) {
        for (int v = 0; v < NV; ++v) {
            T s = sm[v][0][threadIdx.x];
            for (int y = 1; y < 8; ++y) s += sm[v][y][threadIdx.x];
            part[((i64)v * gridDim.y + blockIdx.y) * C + col] = s;
        }
    }
}

// out[c] = sum_{s < S} part[s * C + c]; one thread per channel, splits added in order.
template <typename T>
__device__ __forceinline__ void colreduce_final(const T* part, int S, int C, T* out) {
    RG_GRID_LOOP(c, C) {
        T s = part[c];
        for (int k = 1; k < S; ++k) s += part[(i64)k * C + c];
        out[c] = s;
    }
}

// Sum of a value over a 1-D block (blockDim.x a power of two <= 1024), via shared memory.
// Every thread must call it; every thread gets the total.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
    __shared__ T sm[1024];
    sm[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) sm[threadIdx.x] += sm[threadIdx.x + s];
        __syncthreads();
    }
    const T total = sm[0];
    __syncthreads();
    return total;
}

// ---------------------------------------------------------------------------------------
// TF32 tensor cores (sm_80+): one warp-wide D += A B of a 16 x 8 x 8 tile.
//
//   rg_tf32(x)        x rounded to TF32 (10 explicit mantissa bits; round to nearest, ties
//                     away from zero: cvt.rna.tf32.f32), as the bit pattern mma reads
//   rg_mma_tf32(d, a, b)
//                     mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, d += a b. Lane
//                     l of the warp, g = l / 4, t = l % 4, holds (PTX ISA "matrix fragments
//                     for mma.m16n8k8", .tf32):
//                       a[0] A[g][t]   a[1] A[g+8][t]   a[2] A[g][t+4]   a[3] A[g+8][t+4]
//                       b[0] B[t][g]   b[1] B[t+4][g]
//                       d[0] D[g][2t]  d[1] D[g][2t+1]  d[2] D[g+8][2t]  d[3] D[g+8][2t+1]
// All 32 threads of a warp call it together (.aligned). The CPU emulator of the tests
// (RG_EMULATOR) computes the warp's product from fragments staged in shared memory between
// two __syncwarp() (warp barriers only: no block-wide barrier that the GPU would not have);
// on a GPU it is the one instruction. Before sm_80 there is no TF32 mma: the _tf32_ kernels
// still compile there (one module holds every tile) but trap if launched, and cupy_ops
// refuses TF32 on such a device before it launches one.
// ---------------------------------------------------------------------------------------
#ifdef RG_EMULATOR
__device__ __forceinline__ u32 rg_tf32(float x) {
    union { float f; u32 u; } v;
    v.f = x;
    if ((v.u & 0x7f800000u) != 0x7f800000u) v.u = (v.u + 0x1000u) & 0xffffe000u;
    return v.u;
}
__device__ __forceinline__ float rg_u2f(u32 u) {
    union { u32 u; float f; } v;
    v.u = u;
    return v.f;
}
__device__ __forceinline__ void rg_mma_tf32(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    __shared__ float A[32][16][8];
    __shared__ float B[32][8][8];
    const int l = threadIdx.x % 32, w = threadIdx.x / 32, g = l / 4, t = l % 4;
    A[w][g][t] = rg_u2f(a[0]);
    A[w][g + 8][t] = rg_u2f(a[1]);
    A[w][g][t + 4] = rg_u2f(a[2]);
    A[w][g + 8][t + 4] = rg_u2f(a[3]);
    B[w][t][g] = rg_u2f(b[0]);
    B[w][t + 4][g] = rg_u2f(b[1]);
    __syncwarp();
    for (int q = 0; q < 4; ++q) {
        const int r = g + (q >= 2 ? 8 : 0), c = 2 * t + (q & 1);
        float s = d[q];
        for (int k = 0; k < 8; ++k) s = fmaf(A[w][r][k], B[w][k][c], s);
        d[q] = s;
    }
    __syncwarp();
}
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
__device__ __forceinline__ u32 rg_tf32(float) {
    __trap();
    return 0u;
}
__device__ __forceinline__ void rg_mma_tf32(float (&)[4], const u32 (&)[4], const u32 (&)[2]) {
    __trap();
}
#else
__device__ __forceinline__ u32 rg_tf32(float x) {
    u32 r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ void rg_mma_tf32(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif
